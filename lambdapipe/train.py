"""The training loop: one loop, the step as a short class, evaluation shared with `evaluate`.

The uint8 dataset lives on the device; each epoch's order, crop offsets and flips are drawn
from a generator seeded by (seed, epoch) (see `augment.py`) and the learning rate is a pure
function of the step (`Recipe.lr_at`), so a run resumed from `last.ckpt` replays exactly the
batches and rates of an unbroken run. The test split is read once, after training, and
scored on the checkpoint that val chose; it never takes part in selection.

Run directory contract (docs/architecture.md): config.json, metrics.csv, last.ckpt and
best.ckpt (+ .sha256), summary.json (its presence means finished).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import platform
import random
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lambdapipe import atomic, live, runlock
from lambdapipe.augment import DeviceImages, augmented_batch, channel_stats, normalize, plan_epoch
from lambdapipe.errors import UserError
from lambdapipe.evaluate import (
    autocast,
    build_model,
    classification_metrics,
    load_checkpoint,
    load_weights,
    predict,
    save_checkpoint,
)
from lambdapipe.recipes import SPEED_FIELDS, Recipe, field_default, get_recipe, recipe_changes
from lambdapipe.validate import check_model, check_out_dir, check_resume, check_seed

METRIC_COLUMNS = ["iteration", "epoch", "lr", "train_loss", "train_acc", "train_clean_acc",
                  "val_loss", "val_acc", "images_per_s", "elapsed_s"]
SYNC_EVERY = 50  # steps between host syncs for the progress bar and the divergence check
SMALL_FILE = 64 << 20  # config.json, summary.json: read bounded (lambdapipe/atomic.py)
SPEED_WINDOW = 5000  # iter_per_min is measured over the last this many steps


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class TrainConfig:
    model: str
    model_args: dict[str, Any]
    dataset: str
    data_dir: Path
    noise: str
    seed: int
    out: Path
    recipe: Recipe
    deterministic: bool = False

    @classmethod
    def build(cls, *, model: str, model_args: dict[str, Any] | None, dataset: str,
              data_dir: Path, noise: str, seed: int, out: Path, recipe: str,
              overrides: dict[str, Any] | None = None,
              deterministic: bool = False) -> TrainConfig:
        return cls(model=model, model_args=dict(model_args or {}), dataset=dataset,
                   data_dir=Path(data_dir), noise=noise, seed=check_seed(seed), out=Path(out),
                   recipe=get_recipe(recipe, overrides), deterministic=deterministic)

    def identity(self) -> dict[str, Any]:
        """What must match for a run directory to be resumed or its results reused."""
        return json.loads(json.dumps({
            "model": self.model, "model_args": self.model_args, "dataset": self.dataset,
            "noise": self.noise, "seed": self.seed, "recipe": self.recipe.to_dict()}))


def _differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """What differs in the experiment; speed settings (SPEED_FIELDS) do not count."""
    diffs = []
    for key, value in wanted.items():
        old = saved.get(key)
        if isinstance(value, dict) and isinstance(old, dict) and key == "recipe":
            diffs += [f"recipe.{k}: {old.get(k)!r} -> {v!r}" for k, v in value.items()
                      if old.get(k, field_default(k)) != v and k not in SPEED_FIELDS]
        elif old != value:
            diffs.append(f"{key}: {old!r} -> {value!r}")
    return diffs


def _load_splits(cfg: TrainConfig, verify: bool = True):
    """Train (with the noise variant) and val; `load_split` names the `prepare` command for
    a dataset or noise variant that is missing."""
    from lambdapipe.data import load_split

    train = load_split(cfg.data_dir, cfg.dataset, "train", noise=cfg.noise, verify=verify)
    val = load_split(cfg.data_dir, cfg.dataset, "val", verify=verify)
    return train, val


def _saved_config(out: Path) -> dict[str, Any] | None:
    try:
        saved = atomic.read_json(out / "config.json", SMALL_FILE, "run config")
    except FileNotFoundError:
        return None
    except UserError as exc:
        raise UserError(f"{exc}: choose another --out") from None
    if not isinstance(saved, dict):
        raise UserError(f"refusing run config {out / 'config.json'}: not a mapping; choose "
                        "another --out")
    return saved


def check_before_start(cfg: TrainConfig) -> None:
    """Every check that can fail on the user's input, before a GPU is claimed: the data and
    its checksums, the noise variant, the model and its arguments (one CPU forward pass),
    the batch size against the split, and what `--out` already holds."""
    check_out_dir(cfg.out)
    runlock.check_free(cfg.out)  # a run in progress, not an "interrupted run" below
    saved = _saved_config(cfg.out)
    if saved is not None:
        diffs = _differences(saved, cfg.identity())
        if diffs:
            state = "finished" if (cfg.out / "summary.json").exists() else "interrupted"
            raise UserError(f"--out {cfg.out} holds a {state} run of a different config "
                            f"({'; '.join(diffs[:3])}): choose another --out")
        if (cfg.out / "summary.json").exists():
            return  # finished with this config: run() returns its summary, trains nothing
    last = cfg.out / "last.ckpt"
    if last.exists():  # corrupted, or of another config: refuse now, not after a GPU claim
        _check_same_run(cfg, last, load_checkpoint(last))
    train, val = _load_splits(cfg)
    r = cfg.recipe
    if r.batch_size > len(train.labels):
        raise UserError(f"invalid batch_size {r.batch_size}: expected at most the "
                        f"{len(train.labels)} training images of {cfg.dataset}")
    check_model(cfg.model, train.num_classes, int(train.images.shape[1]), cfg.model_args)
    model = build_model(_run_config(cfg, train, stats=False))  # its size checked: on meta
    model.eval()
    with torch.no_grad():
        x = torch.zeros(2, 3, *train.images.shape[1:3])
        try:
            model(x)
        except (RuntimeError, ValueError) as exc:
            raise UserError(f"model {cfg.model} {cfg.model_args} cannot run on "
                            f"{cfg.dataset} images ({train.images.shape[1]} px): "
                            f"{str(exc).splitlines()[0]}") from None


def _check_same_run(cfg: TrainConfig, last: Path, ckpt: dict[str, Any]) -> None:
    """At the checks and again at the resume itself: another owner may have written
    last.ckpt in between (a run directory removed and taken under a running owner)."""
    diffs = _differences(ckpt["config"], cfg.identity())
    if diffs:
        raise UserError(f"{last} belongs to a different config ({'; '.join(diffs[:3])}): "
                        "choose another --out")


def _run_config(cfg: TrainConfig, train, stats: bool = True, device: str = "cpu"):
    """The resolved config written to config.json and into every checkpoint."""
    mean, std = channel_stats(train.images) if stats else ([0.0] * 3, [1.0] * 3)
    return json.loads(json.dumps({  # plain JSON types only: checkpoints load weights_only
        **cfg.identity(),
        "deterministic": cfg.deterministic,
        "out": str(cfg.out),
        "data_dir": str(cfg.data_dir),
        "device": str(device),
        "data": {"num_classes": int(train.num_classes), "classes": list(train.classes),
                 "image_size": int(train.images.shape[1]), "train_size": len(train.labels),
                 "mean": mean, "std": std},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "numpy": np.__version__, "lambdapipe": _version()},
    }, default=str))


def runtime_settings(model: torch.nn.Module, r: Recipe, image_size: int,
                     device: str) -> dict[str, Any]:
    """The speed settings a run resolved on `device` (config.json's `runtime`), after
    choosing each 'auto' lambda layer's implementation (timed on CUDA, cached on disk;
    models/autotune.py). `r` is the recipe as it runs there (`Recipe.on`)."""
    from lambdapipe.evaluate import AMP_DTYPES
    from lambdapipe.models.autotune import choose_impls, default_cache

    impls = choose_impls(model, image_size, r.batch_size, device,
                         AMP_DTYPES.get(r.precision), r.channels_last, cache=default_cache(),
                         log=_log)
    return {"compile": r.compile_mode or "eager", "channels_last": r.channels_last,
            "tf32": r.tf32, "lambda_impls": {name: c["impl"] for name, c in impls.items()},
            "lambda_impls_how": sorted({c["how"] for c in impls.values()})}


def _version() -> str:
    from lambdapipe import __version__
    return __version__


# --------------------------------------------------------------------------- the step
def make_optimizer(model: torch.nn.Module | list[torch.Tensor], r: Recipe, device: str = "cpu",
                   fused: bool | None = None) -> torch.optim.Optimizer:
    """The recipe's optimizer. On CUDA the fused kernels (one launch for all parameters
    instead of several per tensor: launch overhead is what bounds small models); they
    compute the same update as the for-each path to float tolerance (tests/test_train.py).

    Never fused SGD under fp16 loss scaling: a step the scaler skips still runs the fused
    SGD kernel, after which fused SGD trains differently from plain SGD (its momentum buffer
    is allocated but not written: test_fused_sgd_under_loss_scaling_is_what_we_avoid shows
    it on torch 2.14 CPU; it is reported for CUDA fused SGD in torch 2.11). Fused Adam/AdamW
    skip such steps cleanly."""
    if fused is None:
        fused = torch.device(device).type == "cuda"
    if r.optimizer == "sgd" and r.precision == "fp16":
        fused = False
    params = model.parameters() if isinstance(model, torch.nn.Module) else model
    if r.optimizer == "sgd":
        return torch.optim.SGD(params, lr=r.lr, momentum=r.momentum, nesterov=r.nesterov,
                               weight_decay=r.weight_decay, fused=fused or None)
    cls = torch.optim.Adam if r.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=r.lr, betas=tuple(r.betas), weight_decay=r.weight_decay,
               fused=fused or None)


STEP_GRAPH_WARMUP = 3  # real steps before capture: compilation, cuDNN's choices, optimizer state


class TrainStep:
    """normalise -> forward (autocast) -> loss -> backward (scaled for fp16) -> clip -> step.

    Returns device tensors only (no host sync); `tally` accumulates, per step, the loss sum,
    correct predictions against the noisy and the clean labels, the image count, the number
    of fp16 steps skipped for inf/nan gradients, and the first iteration whose loss was
    non-finite (-1 while none).

    With `compile: step-graph` (CUDA) the model is compiled (mode default) and, after
    STEP_GRAPH_WARMUP real steps on a side stream, the whole step (`_body`) is captured once as
    a CUDA graph: each later step copies its batch into the graph's input buffers, writes the
    learning rate and iteration into device scalars, and replays it (one launch). `capture`
    replaces the CUDA capture (tests run the same logic on a CPU with a stand-in).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, r: Recipe,
                 device: str, mean: torch.Tensor, std: torch.Tensor, capture: Any = None):
        from lambdapipe.recipes import STEP_GRAPH

        self.model, self.optimizer, self.r, self.device = model, optimizer, r, device
        self.mean, self.std = mean, std
        self.step_graph = r.compile_mode == STEP_GRAPH
        mode = "default" if self.step_graph else r.compile_mode
        self.forward = torch.compile(model, mode=mode) if mode else model
        # what the step runs: "eager", a torch.compile mode, or "eager (fallback: reason)"
        self.path = r.compile_mode or "eager"
        self.scaler = torch.amp.GradScaler(torch.device(device).type,
                                           enabled=r.precision == "fp16")
        self.tally = torch.zeros(6, dtype=torch.float64, device=device)
        self.tally[5] = -1  # first step with a non-finite loss, -1 while none
        if self.step_graph:
            self.capture = capture or CudaStepGraph
            self.graph: Any = None
            self.warm = 0
            # CUDA's fused optimizer kernels read a tensor learning rate as float32 (Adam(W)
            # may then round its update differently in the last bit); CPU ones as double
            lr_dtype = torch.float32 if torch.device(device).type == "cuda" else torch.float64
            self.lr_t = torch.zeros((), dtype=lr_dtype, device=device)
            self.iteration_t = torch.zeros((), dtype=torch.float64, device=device)
            # checkpoints keep the solo format: a float learning rate, whatever ran
            optimizer.register_state_dict_post_hook(_float_lr)

    def reset_tally(self) -> None:
        self.tally[:5] = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor, y_clean: torch.Tensor, lr: float,
                 step: int) -> torch.Tensor:
        if self.forward is self.model and not self.step_graph:
            return self._step(x, y, y_clean, lr, step)
        try:
            if self.step_graph:
                return self._graph_step(x, y, y_clean, lr, step)
            return self._step(x, y, y_clean, lr, step)
        except Exception as exc:  # noqa: BLE001 - any compile or graph-capture failure
            self.fall_back(exc)
        return self._step(x, y, y_clean, lr, step)

    def fall_back(self, exc: BaseException) -> None:
        """Continue eagerly after the compiled step failed (compilation, CUDA graph capture
        or replay): one warning line, and the reason in `path` (summary.json's `compile`).
        Failures surface in the forward or backward, before the optimizer step, or in a
        capture, which runs nothing, so the step is simply taken again; a failure the eager
        step repeats is raised from there."""
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        self.path = f"eager (fallback: {type(exc).__name__}: {reason})"
        self.forward = self.model
        self.step_graph, self.graph = False, None
        self.optimizer.zero_grad(set_to_none=True)
        _log(f"warning: {self.r.compile_mode} compiled step failed, training continues "
             f"eagerly: {type(exc).__name__}: {reason}")

    def _step(self, x: torch.Tensor, y: torch.Tensor, y_clean: torch.Tensor, lr: float,
              step: int) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        return self._body(x, y, y_clean, float(step + 1))

    def _graph_step(self, x: torch.Tensor, y: torch.Tensor, y_clean: torch.Tensor, lr: float,
                    step: int) -> torch.Tensor:
        """One step of the captured whole-step graph (warm-up steps and the capture first)."""
        if self.graph is None:
            for group in self.optimizer.param_groups:  # a checkpoint load put floats back
                group["lr"] = self.lr_t
                if "capturable" in group:
                    group["capturable"] = True  # Adam(W): its step counters on the device
            self.lr_t.fill_(lr)
            self.iteration_t.fill_(step + 1)
            if self.warm < STEP_GRAPH_WARMUP:
                self.warm += 1
                self.optimizer.zero_grad(set_to_none=True)
                with self.capture.warm_up(self.device):
                    return self._body(x, y, y_clean, self.iteration_t)
            self.static = (x.clone(), y.clone(), y_clean.clone())
            self.optimizer.zero_grad(set_to_none=True)  # the graph writes fresh gradients
            self.graph = self.capture(lambda: self._body(*self.static, self.iteration_t),
                                      self.optimizer)
        else:
            for buf, new in zip(self.static, (x, y, y_clean), strict=True):
                buf.copy_(new)
            self.lr_t.fill_(lr)
            self.iteration_t.fill_(step + 1)
        return self.graph.replay()

    def _body(self, x: torch.Tensor, y: torch.Tensor, y_clean: torch.Tensor,
              iteration: float | torch.Tensor) -> torch.Tensor:
        """The step after the learning rate is set and the gradients cleared: what a
        step graph captures. `iteration` (step + 1) marks a first non-finite loss."""
        with autocast(self.device, self.r.precision, cache=not self.step_graph):
            logits = self.forward(normalize(x, self.mean, self.std, self.r.channels_last))
            loss = F.cross_entropy(logits.float(), y, label_smoothing=self.r.label_smoothing)
        self.scaler.scale(loss).backward()
        if self.r.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.r.grad_clip)
        scale = self.scaler._scale.clone() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():
            pred = logits.argmax(dim=1)
            t = self.tally
            t[0] += loss.detach() * y.shape[0]
            t[1] += (pred == y).sum()
            t[2] += (pred == y_clean).sum()
            t[3] += y.shape[0]
            if scale is not None:  # GradScaler lowers its scale exactly when it skips a step
                t[4] += (self.scaler._scale < scale).squeeze()
            # iterations count from 1, as in metrics.csv: step i is iteration i + 1
            t[5] = torch.where((t[5] < 0) & ~torch.isfinite(loss.detach()), iteration, t[5])
        return loss.detach()


def _float_lr(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """A step graph's learning rate is a device scalar; a checkpoint stores it as a float."""
    for group in state["param_groups"]:
        if isinstance(group.get("lr"), torch.Tensor):
            group["lr"] = float(group["lr"])
    return state


class CudaStepGraph:
    """A step captured once as a CUDA graph; `replay()` reruns its kernels on the same memory
    and returns its (overwritten) output. Warm-up runs on a side stream, as capture needs."""

    def __init__(self, body: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer):
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = body()

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.output

    @staticmethod
    @contextlib.contextmanager
    def warm_up(device: str):
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            yield
        torch.cuda.current_stream(device).wait_stream(side)


# --------------------------------------------------------------------------- run state
@dataclass
class RunState:
    iteration: int = 0
    rows: list[dict[str, float]] = field(default_factory=list)
    best_val_acc: float = -1.0
    best_iteration: int = -1
    elapsed_s: float = 0.0
    skipped_steps: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _rng_state(device: str) -> dict[str, Any]:
    py = random.getstate()
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return state


def _set_rng_state(state: dict[str, Any], device: str) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), torch.device(device))


@contextlib.contextmanager
def _kernels(deterministic: bool, device: str, tf32: bool = False):
    """Deterministic kernels and the TF32 setting for the duration of a run (restored
    after, for library users)."""
    prev = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
            torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    if deterministic and torch.device(device).type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0])
        torch.backends.cudnn.benchmark = prev[1]
        torch.set_float32_matmul_precision(prev[2])
        torch.backends.cudnn.allow_tf32 = prev[3]


def _write_metrics(out: Path, rows: list[dict[str, float]]) -> None:
    buf = io.StringIO()
    columns = METRIC_COLUMNS + (["tst_acc"] if rows and "tst_acc" in rows[0] else [])
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(out / "metrics.csv", buf.getvalue())
    live.write(out, rows)  # the same rows in DVCLive's format, for `dvc plots`


def _iter_per_min(rows: list[dict[str, float]], batch_size: int) -> float | None:
    """Steps per minute of pure training time (evaluation excluded) over the last
    SPEED_WINDOW steps, from each row's window length and images/s."""
    steps = seconds = 0.0
    prev = [0] + [row["iteration"] for row in rows]
    for row, start in zip(reversed(rows), reversed(prev[:-1]), strict=True):
        if steps >= SPEED_WINDOW:
            break
        n = row["iteration"] - start
        steps += n
        seconds += n * batch_size / row["images_per_s"] if row["images_per_s"] > 0 else 0.0
    return 60 * steps / seconds if seconds > 0 else None


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _print_recipe(r: Recipe) -> None:
    fields_ = " ".join(f"{k}={v}" for k, v in r.to_dict().items()
                       if k not in ("name", "description"))
    _log(f"recipe {r.name}: {r.description}")
    _log(textwrap.fill(fields_, width=100, initial_indent="  ", subsequent_indent="  "))


# --------------------------------------------------------------------------- the loop
def run(cfg: TrainConfig, device: str = "cpu", progress: bool = False,
        callback: Callable[[dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train (or resume, or return the finished summary of) the run in `cfg.out`.

    `callback(row)` is called after every evaluation, once its checkpoints and metrics are
    on disk (an exception from it interrupts the run exactly like a kill would).
    """
    summary_path = cfg.out / "summary.json"
    with runlock.own(cfg.out):  # one owner per run directory (a refused run leaves nothing)
        check_before_start(cfg)  # also refuses an --out that holds a different config
        if summary_path.exists():
            return atomic.read_json(summary_path, SMALL_FILE, "run summary")
        with _kernels(cfg.deterministic, device, cfg.recipe.on(device).tf32):
            return _train(cfg, str(device), progress, callback)


def _train(cfg: TrainConfig, device: str, progress: bool, callback) -> dict[str, Any]:
    run_ = Run(cfg, device, progress, callback)
    run_.start()
    while run_.advance():
        pass
    return run_.finish()


class Run:
    """One run as an object, so that several can share a process (lambdapipe/pack.py).

    `start()` builds the model, optimizer, step and device data and resumes from last.ckpt;
    `advance()` is one training step (`next_batch`, the step, `after_step`) plus, when due,
    the host sync, the evaluation, the checkpoints and the metrics row; `finish()` scores
    best.ckpt on test and writes summary.json. `_train` drives one to its end, so a run alone
    does what it always did; `label` prefixes its log lines when several runs share one log.
    """

    def __init__(self, cfg: TrainConfig, device: str, progress: bool = False,
                 callback: Callable[[dict[str, float]], None] | None = None,
                 label: str = "", bar_position: int | None = None,
                 device_data: dict[tuple, DeviceImages] | None = None):
        self.cfg, self.device, self.progress, self.callback = cfg, str(device), progress, callback
        self.label, self.bar_position = label, bar_position
        self.diverged_at: int | None = None
        # runs of one cell in one process hold its splits on the device once
        self.device_data = {} if device_data is None else device_data
        # called before each evaluation: a fused pack writes the run's weights into its model
        self.before_evaluate: Callable[[], None] | None = None

    def _log(self, msg: str) -> None:
        _log(self.label + msg)

    def start(self) -> None:
        cfg, device = self.cfg, self.device
        r, out = cfg.recipe.on(device), cfg.out
        self.r, self.out = r, out
        self.started = time.perf_counter()
        train, val = _load_splits(cfg, verify=False)  # checksums verified by check_before_start
        config = _run_config(cfg, train, device=device)
        self.config = config
        _print_recipe(r)
        self.steps_per_epoch = steps_per_epoch = len(train.labels) // r.batch_size
        self.total = total = r.total_steps(steps_per_epoch)
        self.eval_every = r.eval_interval(steps_per_epoch)

        torch.manual_seed(cfg.seed)
        model = build_model(config)
        config["runtime"] = runtime_settings(model, r, config["data"]["image_size"], device)
        model = model.to(device)
        if r.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = make_optimizer(model, r, device)
        mean = torch.tensor(config["data"]["mean"], device=device)
        std = torch.tensor(config["data"]["std"], device=device)
        step_fn = TrainStep(model, optimizer, r, device, mean, std)
        state = RunState()

        last = out / "last.ckpt"
        if last.exists():
            ckpt = load_checkpoint(last, map_location=device)
            _check_same_run(cfg, last, ckpt)
            check_resume(ckpt, last, optimizer=optimizer, scaler=step_fn.scaler, total=total,
                         state_fields=RunState().to_dict())
            load_weights(model, ckpt["model"], str(last))
            optimizer.load_state_dict(ckpt["optimizer"])
            step_fn.scaler.load_state_dict(ckpt["scaler"])
            _set_rng_state(ckpt["rng"], device)
            state = RunState(**ckpt["state"])
            # The checkpoint is the truth: a kill between its rename and metrics.csv's left
            # the file one row short (or one ahead); rewrite it before anything else happens.
            _write_metrics(out, state.rows)
            self._log(f"resuming {out} at iteration {state.iteration} of {total}")
        else:
            out.mkdir(parents=True, exist_ok=True)
            atomic.write_json(out / "config.json", config)
        self.session_start = time.perf_counter() - state.elapsed_s  # spans all sessions
        self.model, self.optimizer, self.step_fn, self.state = model, optimizer, step_fn, state
        self.mean, self.std = mean, std

        def on_device(split: str, images, pad: int = 0) -> DeviceImages:
            key = (str(cfg.data_dir), cfg.dataset, cfg.noise, split, pad)
            if key not in self.device_data:
                self.device_data[key] = DeviceImages(images.images, images.labels,
                                                     images.clean_labels, device, pad=pad)
            return self.device_data[key]

        self.train_data = on_device("train", train, r.crop_padding)
        self.val_data = on_device("val", val)
        del train, val
        self.test_data = None
        if r.track_test_every_eval:  # reported only: best.ckpt is chosen on val below
            from lambdapipe.data import load_split

            self.test_data = on_device("test", load_split(cfg.data_dir, cfg.dataset, "test"))
        self.bar = _progress_bar(total, state.iteration, self.progress, self.bar_position,
                                 self.label.strip() or None)
        self.it, self.plan, self.plan_epoch_no = state.iteration, None, -1
        self.window_start, self.window_it = time.perf_counter(), self.it
        self.lr = r.lr_at(self.it, total, steps_per_epoch)

    def advance(self) -> bool:
        """One step; False once nothing is left to train (the end, or a divergence)."""
        if self.done():
            return False
        x, y, y_clean = self.next_batch()
        self.step_fn(x, y, y_clean, self.lr, self.it)
        return self.after_step()

    def done(self) -> bool:
        return self.it >= self.total or self.diverged_at is not None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The augmented batch of the current step (and its learning rate in `self.lr`);
        the step itself is the caller's (a `TrainStep`, or a fused pack's, lambdapipe/fuse.py)."""
        r, it = self.r, self.it
        epoch, step = divmod(it, self.steps_per_epoch)
        if epoch != self.plan_epoch_no:
            self.plan = plan_epoch(len(self.train_data), self.cfg.seed, epoch, r.crop_padding,
                                   r.flip, self.device, resized_crop=r.resized_crop,
                                   size=self.train_data.size)
            self.plan_epoch_no = epoch
        self.lr = r.lr_at(it, self.total, self.steps_per_epoch)
        return augmented_batch(self.train_data, self.plan, step, r.batch_size)

    def after_step(self) -> bool:
        """Count the step taken; when due, the host sync, the divergence check and the
        evaluation. False once nothing is left to train."""
        self.it = it = self.it + 1
        evaluate_now = it % self.eval_every == 0 or it == self.total
        if it % SYNC_EVERY and not evaluate_now:
            return True
        tally = self.step_fn.tally.tolist()  # the host sync point
        self.bar.update(it - self.bar.n)
        self.bar.set_postfix(loss=f"{tally[0] / max(tally[3], 1):.3f}",
                             acc=f"{tally[1] / max(tally[3], 1):.3f}")
        if tally[5] >= 0:
            self.diverged_at = int(tally[5])
            return False
        if evaluate_now:
            if self.before_evaluate is not None:
                self.before_evaluate()
            self._evaluate(tally)
        return it < self.total

    def _evaluate(self, tally: list[float]) -> None:
        """Val (and test when tracked) metrics, the checkpoints and the metrics row."""
        r, it, lr, state, model, out = self.r, self.it, self.lr, self.state, self.model, self.out
        mean, std = self.mean, self.std
        train_seconds = time.perf_counter() - self.window_start
        logits = predict(model, self.val_data.images, mean, std, r.precision, r.channels_last)
        val_metrics = classification_metrics(logits, self.val_data.labels)
        row = {"iteration": it, "epoch": round(it / self.steps_per_epoch, 4), "lr": lr,
               "train_loss": tally[0] / tally[3], "train_acc": tally[1] / tally[3],
               "train_clean_acc": tally[2] / tally[3], "val_loss": val_metrics["nll"],
               "val_acc": val_metrics["accuracy"],
               "images_per_s": (it - self.window_it) * r.batch_size / max(train_seconds, 1e-9),
               "elapsed_s": time.perf_counter() - self.session_start}
        if self.test_data is not None:
            logits = predict(model, self.test_data.images, mean, std, r.precision,
                             r.channels_last)
            row["tst_acc"] = classification_metrics(logits, self.test_data.labels)["accuracy"]
        state.rows.append(row)
        state.iteration, state.elapsed_s = it, row["elapsed_s"]
        state.skipped_steps += int(tally[4])
        self.step_fn.reset_tally()
        paths = [out / "last.ckpt"]
        runlock.check_still_owned(out)  # not into a directory removed, maybe re-owned
        if row["val_acc"] > state.best_val_acc:
            state.best_val_acc, state.best_iteration = row["val_acc"], it
            paths.insert(0, out / "best.ckpt")
        save_checkpoint({"config": self.config, "model": model.state_dict(),
                         "optimizer": self.optimizer.state_dict(),
                         "scheduler": {"schedule": r.schedule, "step": it, "lr": lr},
                         "scaler": self.step_fn.scaler.state_dict(),
                         "rng": _rng_state(self.device),
                         "iteration": it, "state": state.to_dict()}, *paths)
        _write_metrics(out, state.rows)
        if not self.progress:
            self._log(f"iter {it}/{self.total} epoch {row['epoch']:.2f} lr {lr:.3g} "
                      f"train_loss {row['train_loss']:.4f} train_acc {row['train_acc']:.4f} "
                      f"val_loss {row['val_loss']:.4f} val_acc {row['val_acc']:.4f} "
                      f"{row['images_per_s']:.0f} img/s")
        if self.callback is not None:
            self.callback(row)
        self.window_start, self.window_it = time.perf_counter(), it

    def finish(self) -> dict[str, Any]:
        """Test on best.ckpt and summary.json; then the device data is let go."""
        self.bar.close()
        if self.diverged_at is not None:
            self.state.skipped_steps += int(self.step_fn.tally[4].item())
            self._log(f"diverged: non-finite loss at iteration {self.diverged_at}")
        runlock.check_still_owned(self.out)
        summary = _summarize(self.cfg, self.device, self.r, self.out, self.model, self.step_fn,
                             self.state, self.it, self.diverged_at, self.session_start,
                             self.started, self.config)
        self.train_data = self.val_data = self.test_data = None
        return summary


def _summarize(cfg: TrainConfig, device: str, r: Recipe, out: Path, model: torch.nn.Module,
               step_fn: TrainStep, state: RunState, it: int, diverged_at: int | None,
               session_start: float, started: float,
               config: dict[str, Any]) -> dict[str, Any]:
    """summary.json, in one function so that a field added here (say, how `step_fn` ran)
    reaches solo and packed runs alike."""
    from lambdapipe.models import count_params

    test = _test_on_best(cfg, device)  # the only time the test split is read
    rows = state.rows
    summary = {
        "model": cfg.model, "model_args": cfg.model_args, "dataset": cfg.dataset,
        "noise": cfg.noise, "seed": cfg.seed, "recipe": r.name, "precision": r.precision,
        "recipe_changes": recipe_changes(cfg.recipe), "image_size": config["data"]["image_size"],
        "params": count_params(model), "iterations": it if diverged_at is None else diverged_at,
        "val_acc": state.best_val_acc if state.best_iteration >= 0 else None,
        "best_iteration": state.best_iteration if state.best_iteration >= 0 else None,
        "tst_acc": test["accuracy"] if test else None, "tst_nll": test["nll"] if test else None,
        "ece": test["ece"] if test else None,
        "best_train_loss": min((x["train_loss"] for x in rows), default=None),
        "best_val_loss": min((x["val_loss"] for x in rows), default=None),
        "train_clean_acc": rows[-1]["train_clean_acc"] if rows else None,
        "tst_acc_best_seen": max((x["tst_acc"] for x in rows), default=None)
        if r.track_test_every_eval else None,
        "status": _status(diverged_at, rows, test), "diverged_at": diverged_at,
        "compile": step_fn.path,
        "skipped_steps": state.skipped_steps,
        # evaluations whose val loss was not finite while training was (eval-mode overflow)
        "nonfinite_val_evals": sum(not math.isfinite(x["val_loss"]) for x in rows),
        "iter_per_min": _iter_per_min(rows, r.batch_size),
        "wall_time_s": time.perf_counter() - session_start,
        "session_time_s": time.perf_counter() - started,
    }
    summary = {k: v if not isinstance(v, float) or math.isfinite(v) else None
               for k, v in summary.items()}  # strict JSON: a NaN val loss becomes null
    atomic.write_json(out / "summary.json", summary)
    return summary


def _status(diverged_at: int | None, rows: list[dict[str, float]],
            test: dict[str, Any] | None) -> str:
    """ok, diverged (training loss not finite), or non-finite: training was finite but the
    final evaluation (the last val pass, or test on best.ckpt) was not, so the run is no
    result (the report leaves it out of every mean and names it)."""
    if diverged_at is not None:
        return "diverged"
    finals = ([rows[-1]["val_loss"]] if rows else []) + ([test["nll"]] if test else [])
    return "ok" if all(math.isfinite(v) for v in finals) else "non-finite"


def _test_on_best(cfg: TrainConfig, device: str) -> dict[str, Any] | None:
    """Test metrics of best.ckpt (None when no evaluation happened before divergence)."""
    from lambdapipe.data import load_split

    best = cfg.out / "best.ckpt"
    if not best.exists():
        return None
    ckpt = load_checkpoint(best, map_location=device)
    config = ckpt["config"]
    model = build_model(config, device).to(device)
    load_weights(model, ckpt["model"], str(best))
    test = load_split(cfg.data_dir, cfg.dataset, "test")
    images = DeviceImages(test.images, test.labels, test.clean_labels, device)
    mean = torch.tensor(config["data"]["mean"], device=device)
    std = torch.tensor(config["data"]["std"], device=device)
    r = cfg.recipe.on(device)
    logits = predict(model, images.images, mean, std, r.precision, r.channels_last)
    return classification_metrics(logits, images.labels)


def _progress_bar(total: int, initial: int, enabled: bool, position: int | None = None,
                  desc: str | None = None):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, unit="it", leave=False, position=position, desc=desc)
