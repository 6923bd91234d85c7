"""Named training recipes: hyperparameters in one place, validated before any work starts.

The recipes live in `recipes.yaml` (package data) so a reader sees every number of a study on
one screen; `get_recipe(name, overrides)` returns a frozen `Recipe` or raises a one-line
`UserError` naming the bad name, field or value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, fields
from importlib import resources
from typing import Any

import yaml

from lambdapipe.errors import UserError, bad_value

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "warm-restarts", "step", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
# How a training image is cropped (lambdapipe/augment.py): pad-and-crop (CIFAR style, by
# crop_padding pixels), the ImageNet-style random-resized crop (crop_scale, crop_ratio), or
# not at all; `flip` mirrors with either crop.
AUGMENTS = ("crop", "random-resized-crop", "none")
# torch.compile modes (`compile: true` is "default"); reduce-overhead adds CUDA graphs.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Ours: the model compiled (mode default) and the whole training step (forward, loss,
# backward, clipping, optimizer, tallies) captured as one CUDA graph (step.GraphedStep), so the
# host issues one launch a step. CUDA only (off on a CPU); not with fp16, whose loss scaler
# decides on the host whether a step is taken.
STEP_GRAPH = "step-graph"
# Fields that change speed, not the experiment: a run directory resumes across them.
SPEED_FIELDS = ("compile", "channels_last", "tf32", "loader_workers", "jpeg_decode")
# Where a streamed split's JPEGs decode (lambdapipe/feed.py): CPU workers, or nvJPEG.
JPEG_DECODES = ("cpu", "gpu")
# The data protocol (lambdapipe/protocol.py): which split chooses best.ckpt, what is trained on,
# whether an epoch's last partial batch is kept, and how often the learning rate changes. Ours
# is the first of each; the LambdaNetworks community fork's is test, train+val, kept, epoch.
SELECT_ON = ("val", "test")
TRAIN_ON = ("train", "train+val")
LR_STEPS = ("step", "epoch")


@dataclass(frozen=True)
class Recipe:
    """One training recipe. Units: see the header of recipes.yaml."""

    name: str
    description: str = ""
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    batch_size: int = 128
    iterations: int | None = None  # budget in optimizer steps ...
    epochs: float | None = None  # ... or in passes over the training split
    eval_every: int | None = None  # evaluate every this many steps ...
    eval_every_epochs: float | None = None  # ... or every this many epochs
    schedule: str = "cosine"
    warmup: float = 0.0  # linear warm-up, fraction of the budget
    restart_t0: float = 10.0  # warm-restarts: first cycle, in epochs (SGDR's T_0)
    restart_t_mult: float = 2.0  # each cycle this many times longer than the last
    restart_eta_min: float = 0.0  # lr at the bottom of each cycle
    step_milestones: tuple[float, ...] = (0.5, 0.75)  # step: fractions of the budget
    step_gamma: float = 0.1
    label_smoothing: float = 0.0
    grad_clip: float | None = None  # max global gradient norm
    precision: str = "fp32"
    augment: str = "crop"  # one of AUGMENTS; a config without it means crop, as before
    crop_padding: int = 4  # augment crop: random crop after zero padding (0 = none)
    crop_scale: tuple[float, float] = (0.08, 1.0)  # random-resized-crop: area fraction range
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # random-resized-crop: aspect w/h range
    flip: bool = True  # random horizontal flip (with any augment but none)
    # speed requests, resolved on the device by runtime.resolve
    channels_last: bool | str = "auto"  # auto: on CUDA, off on CPU
    compile: bool | str = "auto"  # auto, false, true (= "default") or one of COMPILE_MODES
    tf32: bool = True  # fp32 matmuls and convolutions on TF32 tensor cores (CUDA only)
    # processes decoding a streamed (JPEG-index) split's batches (lambdapipe/feed.py)
    loader_workers: int | str = "auto"
    jpeg_decode: str = "cpu"  # one of JPEG_DECODES (gpu: the workers read, nvJPEG decodes)
    # Test accuracy at every evaluation, as the LambdaNetworks community table reads it (best
    # seen); reported beside ours, never used to choose a checkpoint.
    track_test_every_eval: bool = False
    # The data protocol (SELECT_ON, TRAIN_ON, LR_STEPS above; lambdapipe/protocol.py).
    select_on: str = "val"  # the split whose accuracy chooses best.ckpt
    train_on: str = "train"  # train+val: the whole official training set (no hold-out)
    drop_last: bool = True  # false: an epoch ends with its partial batch (ceil steps)
    lr_step: str = "step"  # epoch: the rate changes once an epoch (a scheduler stepped per epoch)
    sync_bn: bool = False  # several processes: batch-norm statistics over the global batch

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["step_milestones"] = list(self.step_milestones)
        d["crop_scale"], d["crop_ratio"] = list(self.crop_scale), list(self.crop_ratio)
        return d

    @property
    def resized_crop(self) -> tuple[tuple[float, float], tuple[float, float]] | None:
        """(scale, ratio) of the random-resized crop, or None under another augment."""
        if self.augment != "random-resized-crop":
            return None
        return self.crop_scale, self.crop_ratio

    def steps_per_epoch(self, train_size: int) -> int:
        """Optimizer steps in one pass over `train_size` images: floor with drop_last, ceil
        without (the last, partial batch is a step of its own)."""
        if self.drop_last:
            return train_size // self.batch_size
        return -(-train_size // self.batch_size)

    def total_steps(self, steps_per_epoch: int) -> int:
        if self.iterations is not None:
            return self.iterations
        return max(1, round(self.epochs * steps_per_epoch))

    def eval_interval(self, steps_per_epoch: int) -> int:
        if self.eval_every is not None:
            return self.eval_every
        return max(1, round(self.eval_every_epochs * steps_per_epoch))

    def lr_at(self, step: int, total: int, steps_per_epoch: int) -> float:
        """Learning rate for optimizer step `step` (0-based) of `total`; a pure function so a
        resumed run needs no scheduler state beyond the step count. With lr_step epoch every
        step of an epoch takes the rate of its first step (a scheduler stepped per epoch)."""
        if self.lr_step == "epoch":
            step -= step % steps_per_epoch
        warm = round(self.warmup * total)
        if step < warm:
            return self.lr * (step + 1) / warm
        if self.schedule == "constant":
            return self.lr
        if self.schedule == "step":
            passed = sum(step >= round(m * total) for m in self.step_milestones)
            return self.lr * self.step_gamma**passed
        if self.schedule == "cosine":
            t = (step - warm) / max(1, total - warm)
            return 0.5 * self.lr * (1 + math.cos(math.pi * t))
        # warm-restarts (SGDR, Loshchilov & Hutter 2017): T_i = T_0 * T_mult^i epochs,
        # eta = eta_min + (eta_max - eta_min) (1 + cos(pi T_cur / T_i)) / 2.
        t_cur = (step - warm) / steps_per_epoch
        t_i = self.restart_t0
        while t_cur >= t_i:
            t_cur -= t_i
            t_i *= self.restart_t_mult
        lo = self.restart_eta_min
        return lo + 0.5 * (self.lr - lo) * (1 + math.cos(math.pi * t_cur / t_i))


# Fields added after run directories existed: a saved config may lack them, and
# `field_default` then gives the behaviour from before they existed.
ADDED_FIELDS = ("augment", "crop_scale", "crop_ratio", "tf32", "select_on", "train_on",
                "drop_last", "lr_step", "sync_bn")


def field_default(key: str) -> Any:
    """A field's value in a saved config written before the field existed: every field added
    since defaults to the behaviour from before it existed, so old runs stay resumable."""
    return _DEFAULTS.get(key)


@functools.cache
def _recipe_table() -> dict[str, dict[str, Any]]:
    text = resources.files("lambdapipe").joinpath("recipes.yaml").read_text()
    return yaml.safe_load(text)


def list_recipes() -> list[str]:
    return sorted(_recipe_table())


_FIELDS = {f.name: f for f in fields(Recipe)}
_DEFAULTS = Recipe(name="").to_dict()
_INT = {"batch_size", "iterations", "eval_every", "crop_padding"}
_OPTIONAL = {"iterations", "epochs", "eval_every", "eval_every_epochs", "grad_clip"}
_BOOL = {"nesterov", "flip", "tf32", "track_test_every_eval", "drop_last", "sync_bn"}
_STR = {"name", "description", "optimizer", "schedule", "precision", "augment", "select_on",
        "train_on", "lr_step"}
_PAIRS = {"betas", "step_milestones", "crop_scale", "crop_ratio"}
# Setting one unit of a pair clears the other, so `--set iterations=200` works on any recipe.
EXCLUSIVE_PAIRS = {"iterations": "epochs", "epochs": "iterations",
              "eval_every": "eval_every_epochs", "eval_every_epochs": "eval_every"}
# Setting `augment` resets what the new augment does not use, unless set too, so
# `--set augment=none` is "no augmentation" on any recipe.
_AUGMENT_RESETS = {"none": {"crop_padding": 0, "flip": False},
                   "random-resized-crop": {"crop_padding": 0}}
# A recipe's `provenance:` says where each of its numbers comes from: one of these words,
# a colon, then the source's words (stated), what it was inferred from, or why we chose it.
PROVENANCE_KINDS = ("stated", "inferred", "ours")


def _coerce(key: str, value: Any) -> Any:
    if key == "augment" and (value is None or str(value).lower() in ("none", "null")):
        return "none"  # a word of its own here, not a missing value
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if key in _OPTIONAL:
            return None
        raise bad_value(f"recipe field {key}", value, "a value (only "
                        + ", ".join(sorted(_OPTIONAL)) + " may be none)")
    if key in _BOOL:
        if isinstance(value, bool):
            return value
        raise bad_value(f"recipe field {key}", value, "true or false")
    if key == "compile":
        if isinstance(value, bool) or value in (*COMPILE_MODES, "auto", STEP_GRAPH):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise bad_value("recipe field compile", value,
                        f"auto, true, false, {STEP_GRAPH} or a torch.compile mode: "
                        + ", ".join(COMPILE_MODES))
    if key == "channels_last":
        if isinstance(value, bool) or value == "auto":
            return value
        raise bad_value("recipe field channels_last", value, "auto, true or false")
    if key == "jpeg_decode":
        if value in JPEG_DECODES:
            return value
        raise bad_value("recipe field jpeg_decode", value, JPEG_DECODES)
    if key == "loader_workers":
        if value == "auto":
            return value
        if isinstance(value, bool) or not str(value).isdigit() or int(value) > 256:
            raise bad_value("recipe field loader_workers", value, "auto or 0 .. 256")
        return int(value)
    if key in _STR:
        return str(value)
    if key in _PAIRS:
        items = value if isinstance(value, list | tuple) else str(value).split(",")
        try:
            return tuple(float(v) for v in items)
        except (TypeError, ValueError):
            raise bad_value(f"recipe field {key}", value, "a list of numbers") from None
    if key in _INT:  # exact (no float round trip: 10**23 is not 99999999999999999999999)
        return _coerce_int(key, value)
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or abs(number) > FLOAT_MAX:
        raise bad_value(f"recipe field {key}", value, f"a finite number, at most {FLOAT_MAX:g}")
    return number


# Upper bounds far beyond any real run and far below what breaks (a budget that never ends,
# an int64 overflow in a step counter): iterations 10^9 is ~3 years at 10 steps/s.
INT_MAX = {"batch_size": 1 << 20, "iterations": 10**9, "eval_every": 10**9, "crop_padding": 1024}
FLOAT_MAX = 1e12


def _coerce_int(key: str, given: Any) -> int:
    value = given
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        value = int(value.strip()) if len(value) < 30 else INT_MAX[key] + 1
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_value(f"recipe field {key}", given, "an integer")
    if value > INT_MAX[key]:
        raise bad_value(f"recipe field {key}", given, f"an integer at most {INT_MAX[key]:,}")
    return value


def _validate(r: Recipe) -> None:
    def need(ok: bool, what: str, value: Any, allowed: Any) -> None:
        if not ok:
            raise bad_value(what, value, allowed)

    need(r.optimizer in OPTIMIZERS, "optimizer", r.optimizer, OPTIMIZERS)
    need(r.schedule in SCHEDULES, "schedule", r.schedule, SCHEDULES)
    need(r.precision in PRECISIONS, "precision", r.precision, PRECISIONS)
    need(r.lr > 0, "lr", r.lr, "a number > 0")
    need(r.batch_size >= 1, "batch_size", r.batch_size, "an integer >= 1")
    need(0 <= r.momentum < 1, "momentum", r.momentum, "a number in [0, 1)")
    need(r.weight_decay >= 0, "weight_decay", r.weight_decay, "a number >= 0")
    need(len(r.betas) == 2 and all(0 <= b < 1 for b in r.betas), "betas", list(r.betas),
         "two numbers in [0, 1)")
    need(not (r.nesterov and (r.optimizer != "sgd" or r.momentum == 0)), "nesterov",
         r.nesterov, "false unless optimizer is sgd with momentum > 0")
    need((r.iterations is None) != (r.epochs is None), "budget",
         f"iterations={r.iterations}, epochs={r.epochs}", "exactly one of iterations, epochs")
    need(r.iterations is None or r.iterations >= 1, "iterations", r.iterations, "an integer >= 1")
    need(r.epochs is None or r.epochs > 0, "epochs", r.epochs, "a number > 0")
    need((r.eval_every is None) != (r.eval_every_epochs is None), "evaluation interval",
         f"eval_every={r.eval_every}, eval_every_epochs={r.eval_every_epochs}",
         "exactly one of eval_every, eval_every_epochs")
    need(r.eval_every is None or r.eval_every >= 1, "eval_every", r.eval_every,
         "an integer >= 1")
    need(r.eval_every_epochs is None or r.eval_every_epochs > 0, "eval_every_epochs",
         r.eval_every_epochs, "a number > 0")
    need(0 <= r.warmup < 1, "warmup", r.warmup, "a fraction in [0, 1)")
    need(r.restart_t0 > 0, "restart_t0", r.restart_t0, "a number of epochs > 0")
    need(r.restart_t_mult >= 1, "restart_t_mult", r.restart_t_mult, "a number >= 1")
    need(0 <= r.restart_eta_min <= r.lr, "restart_eta_min", r.restart_eta_min,
         f"a number in [0, lr={r.lr}]")
    need(all(0 < m < 1 for m in r.step_milestones), "step_milestones",
         list(r.step_milestones), "fractions of the budget in (0, 1)")
    need(0 < r.step_gamma <= 1, "step_gamma", r.step_gamma, "a number in (0, 1]")
    need(0 <= r.label_smoothing < 1, "label_smoothing", r.label_smoothing, "a number in [0, 1)")
    need(r.grad_clip is None or r.grad_clip > 0, "grad_clip", r.grad_clip, "none or > 0")
    need(not (r.compile == STEP_GRAPH and r.precision == "fp16"), "compile", r.compile,
         "auto or a torch.compile mode with precision fp16 (its loss scaler decides on the "
         f"host whether to step, which one captured graph cannot): {STEP_GRAPH} needs bf16 "
         "or fp32")
    need(r.augment in AUGMENTS, "augment", r.augment, AUGMENTS)
    need(r.crop_padding >= 0, "crop_padding", r.crop_padding, "an integer >= 0")
    need(r.crop_padding == 0 or r.augment == "crop", "crop_padding", r.crop_padding,
         f"0 with augment {r.augment} (padding belongs to augment crop)")
    need(not (r.flip and r.augment == "none"), "flip", r.flip,
         "false with augment none (no augmentation at all)")
    need(len(r.crop_scale) == 2 and 0 < r.crop_scale[0] <= r.crop_scale[1] <= 1,
         "crop_scale", list(r.crop_scale), "two fractions 0 < min <= max <= 1")
    need(len(r.crop_ratio) == 2 and 0 < r.crop_ratio[0] <= r.crop_ratio[1],
         "crop_ratio", list(r.crop_ratio), "two aspect ratios 0 < min <= max")
    need(r.select_on in SELECT_ON, "select_on", r.select_on, SELECT_ON)
    need(r.train_on in TRAIN_ON, "train_on", r.train_on, TRAIN_ON)
    need(r.lr_step in LR_STEPS, "lr_step", r.lr_step, LR_STEPS)
    need(r.train_on == "train" or r.select_on == "test", "train_on", r.train_on,
         "train with select_on val (val is trained on under train+val: set select_on=test)")
    need(r.drop_last or r.compile != STEP_GRAPH, "drop_last", r.drop_last,
         f"true with compile {STEP_GRAPH} (one captured graph has one batch shape)")


def recipe_changes(recipe: Recipe) -> dict[str, Any]:
    """The fields where `recipe` differs from the named recipe in recipes.yaml (its `--set`
    overrides): a run records them so a report never passes it off as the named recipe."""
    named = get_recipe(recipe.name).to_dict()
    return {k: v for k, v in recipe.to_dict().items() if v != named.get(k)}


def get_recipe(name: str, overrides: dict[str, Any] | None = None) -> Recipe:
    """The named recipe with `overrides` applied (`--set KEY=VALUE`), fully validated."""
    table = _recipe_table()
    if name not in table:
        raise bad_value("recipe", name, list_recipes())
    values: dict[str, Any] = {"name": name, **table[name]}
    values.pop("provenance", None)  # documentation, checked by recipe_provenance
    overrides = overrides or {}
    for key, value in overrides.items():
        if key not in _FIELDS or key == "name":
            raise bad_value("recipe field", key, sorted(set(_FIELDS) - {"name"}))
        values[key] = value
        if key in EXCLUSIVE_PAIRS and EXCLUSIVE_PAIRS[key] not in overrides:
            values[EXCLUSIVE_PAIRS[key]] = None
        if key == "augment":
            for cleared, to in _AUGMENT_RESETS.get(_coerce(key, value), {}).items():
                if cleared not in overrides:
                    values[cleared] = to
    unknown = set(values) - set(_FIELDS)
    if unknown:  # a typo in recipes.yaml itself
        raise UserError(f"recipes.yaml: recipe {name!r} has unknown fields {sorted(unknown)}")
    recipe = Recipe(**{k: _coerce(k, v) for k, v in values.items()})
    _validate(recipe)
    return recipe


def recipe_provenance(name: str) -> dict[str, tuple[str, str]]:
    """{field: (kind, text)} for every field the recipe sets: where its value comes from.

    kind is one of PROVENANCE_KINDS; a field without an entry, an entry for a field the
    recipe does not set, or an unknown kind is an error in recipes.yaml itself.
    """
    table = _recipe_table()
    if name not in table:
        raise bad_value("recipe", name, list_recipes())
    entry = dict(table[name])
    prov = entry.pop("provenance", None) or {}
    set_fields = set(entry) - {"description"}
    if set(prov) != set_fields:
        raise UserError(f"recipes.yaml: recipe {name!r} provenance must name exactly its "
                        f"fields: missing {sorted(set_fields - set(prov))}, extra "
                        f"{sorted(set(prov) - set_fields)}")
    out = {}
    for key, text in prov.items():
        kind, sep, why = str(text).partition(":")
        if not sep or kind.strip() not in PROVENANCE_KINDS or not why.strip():
            raise UserError(f"recipes.yaml: recipe {name!r} provenance of {key} {text!r}: "
                            f"expected '<{'|'.join(PROVENANCE_KINDS)}>: <source or reason>'")
        out[key] = (kind.strip(), why.strip())
    return out
