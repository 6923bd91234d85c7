"""The training step: normalise -> forward (autocast) -> loss -> backward (scaled for fp16)
-> clip -> optimizer step, eager, compiled, or captured whole as one CUDA graph; and
`build`, what train and bench build a run's step with."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from lambdapipe import logs
from lambdapipe.augment import normalize
from lambdapipe.recipes import STEP_GRAPH, Recipe
from lambdapipe.runtime import Runtime
from lambdapipe.validate import DEVICE_FLAGS


def make_optimizer(model: torch.nn.Module | list[torch.Tensor], r: Recipe,
                   fused: bool = False) -> torch.optim.Optimizer:
    """The recipe's optimizer; `fused` (Runtime.fused_optimizer) runs one launch for all
    parameters instead of several per tensor (launch overhead is what bounds small models),
    the same update as the for-each path to float tolerance (tests/test_train.py)."""
    params = model.parameters() if isinstance(model, torch.nn.Module) else model
    if r.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=r.lr, momentum=r.momentum, nesterov=r.nesterov,
                                    weight_decay=r.weight_decay, fused=fused or None)
    else:
        cls = torch.optim.Adam if r.optimizer == "adam" else torch.optim.AdamW
        optimizer = cls(params, lr=r.lr, betas=tuple(r.betas), weight_decay=r.weight_decay,
                        fused=fused or None)
    # checkpoints keep one format, whatever ran and wherever it resumes
    optimizer.register_state_dict_post_hook(_portable)
    optimizer.register_load_state_dict_pre_hook(_own_flags)
    return optimizer


class Tally(NamedTuple):
    """What the step counts for one run between two evaluations, read on the host."""

    loss_sum: float  # the training loss summed over images
    correct: float  # predictions equal to the (noisy) training label
    clean_correct: float  # ... to the clean label
    images: float
    skipped: float  # fp16 steps the loss scaler skipped (inf/nan gradients)
    first_nonfinite: float  # iteration (step + 1) of the first non-finite loss; -1 while none


COLUMN = Tally(*range(len(Tally._fields)))  # each field's column in a device tally


@torch.no_grad()
def _count(t: torch.Tensor, losses: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
           y_clean: torch.Tensor, iteration: float | torch.Tensor,
           skipped: torch.Tensor | None) -> None:
    """Add one step to `t` with device ops only (no host sync); `losses` is a run's mean
    loss, or (K,) for K fused runs, whose labels are (K, B)."""
    b, c = y.shape[-1], COLUMN
    pred = logits.argmax(dim=-1)
    t[..., c.loss_sum] += losses * b
    t[..., c.correct] += (pred == y).sum(dim=-1)
    t[..., c.clean_correct] += (pred == y_clean).sum(dim=-1)
    t[..., c.images] += b
    if skipped is not None:
        t[..., c.skipped] += skipped
    first = t[..., c.first_nonfinite]
    t[..., c.first_nonfinite] = torch.where((first < 0) & ~torch.isfinite(losses), iteration,
                                            first)


def clip_per_run(params: Sequence[torch.Tensor], max_norm: float) -> None:
    """`clip_grad_norm_` of each run's slice of stacked (K, ...) gradients, as each run alone
    would clip its own (same norm, same 1e-6, same clamp at 1)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads], dim=1)  # (K, n)
    coef = (max_norm / (norms.norm(dim=1) + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *[1] * (g.dim() - 1)).to(g.dtype))


class TrainStep:
    """The step of one run or, with `runs` = K, of K runs as one network (fuse.py: batches
    (K, B, ...), one loss per run, clipping per run). Eager or compiled (a failure falls back
    to eager). Returns device tensors only; `tally` accumulates `Tally`."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, r: Recipe,
                 rt: Runtime, mean: torch.Tensor, std: torch.Tensor, runs: int | None = None,
                 graph_safe: bool = False):
        self.model, self.optimizer, self.r, self.rt = model, optimizer, r, rt
        self.mean, self.std, self.runs, self.graph_safe = mean, std, runs, graph_safe
        mode = "default" if rt.compile == STEP_GRAPH else rt.compile
        self.forward = torch.compile(model, mode=mode) if mode else model
        # what the step runs: "eager", a compile mode, "step-graph", "eager (fallback: reason)"
        self.path = rt.compile or "eager"
        self.scaler = torch.amp.GradScaler(torch.device(rt.device).type,
                                           enabled=rt.scaler and runs is None)
        # the device tally: (fields,) for one run, (runs, fields) for a fused step
        fields = len(Tally._fields)
        self.tally = torch.zeros((fields,) if runs is None else (runs, fields),
                                 dtype=torch.float64, device=rt.device)
        self.tally[..., COLUMN.first_nonfinite] = -1

    def __call__(self, x: torch.Tensor, y: torch.Tensor, y_clean: torch.Tensor, lr: float,
                 step: int) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        try:
            return self.body(x, y, y_clean, float(step + 1))
        except Exception as exc:  # noqa: BLE001 - any compile failure
            if self.forward is self.model:
                raise
            self.fall_back(exc)
        return self.body(x, y, y_clean, float(step + 1))

    def fall_back(self, exc: BaseException) -> None:
        """Continue eagerly after compilation or a capture failed (both before the optimizer
        step, so the step is simply taken again): one warning line, the reason in `path`."""
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        self.path = f"eager (fallback: {type(exc).__name__}: {reason})"
        self.forward = self.model
        self.optimizer.zero_grad(set_to_none=True)
        logs.emit(f"{self.rt.compile} compiled step failed, training continues "
                  f"eagerly: {type(exc).__name__}: {reason}", level="warning")

    def body(self, x: torch.Tensor, y: torch.Tensor, y_clean: torch.Tensor,
             iteration: float | torch.Tensor) -> torch.Tensor:
        """The step after the learning rate is set and the gradients cleared: what a
        step graph captures. `iteration` (step + 1) marks a first non-finite loss."""
        r, fused = self.r, self.runs is not None
        with self.rt.autocast(cache=not self.graph_safe):
            logits = self.forward(normalize(x, self.mean, self.std,
                                            self.rt.channels_last and not fused))
            if fused:
                losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(),
                                         reduction="none", label_smoothing=r.label_smoothing
                                         ).view(y.shape).mean(1)
                loss = losses.sum()  # d sum / d loss_k = 1: no run's gradient reaches another
            else:
                loss = losses = F.cross_entropy(logits.float(), y,
                                                label_smoothing=r.label_smoothing)
        self.scaler.scale(loss).backward()
        if r.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            if fused:
                clip_per_run(list(self.model.parameters()), r.grad_clip)
            else:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), r.grad_clip)
        scale = self.scaler._scale.clone() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # GradScaler lowers its scale exactly when it skips a step
        skipped = (self.scaler._scale < scale).squeeze() if scale is not None else None
        _count(self.tally, losses.detach(), logits, y, y_clean, iteration, skipped)
        return losses.detach()


STEP_GRAPH_WARMUP = 3  # real steps before capture: compilation, cuDNN's choices, optimizer state


class GraphedStep:
    """A `TrainStep` captured whole as one CUDA graph (`compile: step-graph`) after
    STEP_GRAPH_WARMUP real steps; each step then copies its batch, learning rate and iteration
    into the graph's buffers and replays it (one launch). A failed warm-up or capture falls
    back to eager. `capture`: a CPU stand-in in tests."""

    def __init__(self, step: TrainStep, capture: Any = None):
        self.step, self.capture = step, capture or CudaStepGraph
        self.model, self.optimizer, self.scaler = step.model, step.optimizer, step.scaler
        self.rt, self.tally = step.rt, step.tally  # the step's own tally tensor, never replaced
        self.graph: Any = None
        self.warm, self.failed = 0, False
        # CUDA's fused optimizer kernels read a tensor learning rate as float32 (Adam(W)
        # may then round its update differently in the last bit); CPU ones as double
        device = step.rt.device
        lr_dtype = torch.float32 if torch.device(device).type == "cuda" else torch.float64
        self.lr_t = torch.zeros((), dtype=lr_dtype, device=device)
        self.iteration_t = torch.zeros((), dtype=torch.float64, device=device)

    @property
    def path(self) -> str:
        return self.step.path

    def __call__(self, x: torch.Tensor, y: torch.Tensor, y_clean: torch.Tensor, lr: float,
                 step: int) -> torch.Tensor:
        if self.failed:
            return self.step(x, y, y_clean, lr, step)
        try:
            return self._graph_step(x, y, y_clean, lr, step)
        except Exception as exc:  # noqa: BLE001 - any compile or graph-capture failure
            if self.graph is not None:
                # A replay may fail after some of its optimizer kernels ran: taking the step
                # again would apply it twice. Stop; last.ckpt holds the last sound state.
                raise RuntimeError(
                    f"the captured step graph failed at iteration {step + 1} ({exc}); its "
                    "optimizer step may be half applied, so training stops: rerun the same "
                    "command to resume from last.ckpt") from exc
            self.failed = True
            self.step.fall_back(exc)
        return self.step(x, y, y_clean, lr, step)

    def _graph_step(self, x: torch.Tensor, y: torch.Tensor, y_clean: torch.Tensor, lr: float,
                    step: int) -> torch.Tensor:
        """One step of the captured whole-step graph (warm-up steps and the capture first)."""
        body = self.step.body
        self.lr_t.fill_(lr)
        self.iteration_t.fill_(step + 1)
        if self.graph is None:
            for group in self.optimizer.param_groups:  # a checkpoint load put floats back
                group["lr"] = self.lr_t
                if "capturable" in group:
                    group["capturable"] = True  # Adam(W): its step counters on the device
            if self.warm < STEP_GRAPH_WARMUP:
                self.warm += 1
                self.optimizer.zero_grad(set_to_none=True)
                with self.capture.warm_up(self.rt.device):
                    return body(x, y, y_clean, self.iteration_t)
            self.static = (x.clone(), y.clone(), y_clean.clone())
            self.optimizer.zero_grad(set_to_none=True)  # the graph writes fresh gradients
            self.graph = self.capture(lambda: body(*self.static, self.iteration_t),
                                      self.optimizer)
        else:
            for buf, new in zip(self.static, (x, y, y_clean), strict=True):
                buf.copy_(new)
        return self.graph.replay()


def run_optimizer_state(state: dict[str, Any], k: int, k_runs: int) -> dict[str, Any]:
    """Run k's slice of a fused step's optimizer state dict, in the solo format."""
    return {"state": {i: {key: v[k].clone()
                          if isinstance(v, torch.Tensor) and v.dim() > 0
                          and v.shape[0] == k_runs else v
                          for key, v in entry.items()}
                      for i, entry in state["state"].items()},
            "param_groups": copy.deepcopy(state["param_groups"])}


class Seat:
    """What a run sees of the step that trains it: its tally, how the step runs (summary's
    `compile`, `(fused xK)` for a fused job's runs), its optimizer and scaler state in the solo
    format, its weights written into its own model. Alone `k` is None; fused, row k."""

    def __init__(self, step: TrainStep | GraphedStep, k: int | None = None,
                 pack_size: int | None = None):
        self.step, self.k, self.pack_size = step, k, pack_size

    @property
    def tally(self) -> torch.Tensor:
        return self.step.tally if self.k is None else self.step.tally[self.k]

    @property
    def path(self) -> str:
        return self.step.path + (f" (fused x{self.pack_size})" if self.pack_size else "")

    def reset_tally(self) -> None:
        """Zero every count but the first non-finite iteration (the last column)."""
        self.tally[..., :COLUMN.first_nonfinite] = 0

    def counts(self) -> Tally:
        """The tally, a host sync; on several processes every rank's, combined."""
        world = self.step.rt.world
        if world is None:
            return Tally(*self.tally.tolist())
        from lambdapipe.distributed import gathered

        ranks, c = gathered(self.tally), COLUMN  # (ranks, fields): a collective
        first = ranks[:, c.first_nonfinite]
        first = first[first >= 0].min() if (first >= 0).any() else first[0]
        # one averaged gradient: a skipped step is skipped on every rank, counted once
        return Tally(*ranks[:, :c.skipped].sum(0).tolist(), ranks[:, c.skipped].max().item(),
                     first.item())

    def optimizer_state(self) -> dict[str, Any]:
        state = self.step.optimizer.state_dict()
        if self.k is None:
            return state
        return run_optimizer_state(state, self.k, self.step.tally.shape[0])

    def scaler_state(self) -> dict[str, Any]:
        return self.step.scaler.state_dict()

    def sync_into(self, model: torch.nn.Module) -> None:
        if self.k is not None:
            self.step.model.write_into(self.k, model)


def make_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, r: Recipe,
              rt: Runtime, mean: torch.Tensor, std: torch.Tensor, runs: int | None = None,
              capture: Any = None) -> TrainStep | GraphedStep:
    """The step a run runs: a `TrainStep`, captured whole (`GraphedStep`) under step-graph."""
    step = TrainStep(model, optimizer, r, rt, mean, std, runs,
                     graph_safe=rt.compile == STEP_GRAPH)
    return GraphedStep(step, capture) if step.graph_safe else step


def build(model: torch.nn.Module, r: Recipe, rt: Runtime, mean: torch.Tensor,
          std: torch.Tensor) -> tuple[torch.nn.Module, torch.optim.Optimizer,
                                      TrainStep | GraphedStep]:
    """A run's model on its device and layout, its optimizer and its step: what train and
    bench build alike. On several processes the step runs the model wrapped in DDP."""
    model = model.to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    stepped = model
    if rt.world is not None:
        from lambdapipe.distributed import wrap

        model, stepped = wrap(model, rt.device, r.sync_bn)
    optimizer = make_optimizer(model, r, rt.fused_optimizer)
    return model, optimizer, make_step(stepped, optimizer, r, rt, mean, std)


def _portable(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """A state dict any device loads: a float lr, no device-only flags (capturable, fused)."""
    for group in state["param_groups"]:
        if isinstance(group.get("lr"), torch.Tensor):
            group["lr"] = float(group["lr"])
        for flag in DEVICE_FLAGS:
            group.pop(flag, None)
    return state


def _own_flags(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """Loading keeps the loader's device-only flags (old checkpoints may carry others)."""
    groups = [{**saved, **{f: own[f] for f in DEVICE_FLAGS if f in own}}
              for saved, own in zip(state["param_groups"], optimizer.param_groups, strict=False)]
    return {**state, "param_groups": groups}


class CudaStepGraph:
    """A step captured once as a CUDA graph; `replay()` reruns it on the same memory. Warm-up
    runs on a side stream, as capture needs."""

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
