"""Every speed decision of a run, made once: `resolve` turns (recipe, device, model) into one
frozen `Runtime`, which config.json records (`runtime`) and step, fuse, evaluate, bench and
project take as given."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from lambdapipe.distributed import World
from lambdapipe.recipes import STEP_GRAPH, Recipe

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# `compile: auto` (the default): CUDA graphs on a GPU, where they measured 3x eager for every
# model (docs/performance.md); eager on a CPU, where compiling costs minutes and gains little.
AUTO_COMPILE = {"cuda": "reduce-overhead"}


@dataclass(frozen=True)
class Runtime:
    """How a run runs on its device, every `auto` resolved (`resolve`)."""

    device: str
    precision: str = "fp32"
    compile: str | None = None  # a torch.compile mode, STEP_GRAPH, or None: eager
    channels_last: bool = False
    tf32: bool = False
    fused_optimizer: bool = False  # one launch for all parameters (CUDA)
    deterministic: bool = False
    lambda_impls: dict[str, str] = field(default_factory=dict)
    world: World | None = None  # several processes (distributed.py); None: one

    @property
    def lead(self) -> bool:
        """Whether this process writes the run directory (rank 0, or the only one)."""
        return self.world is None or self.world.lead

    @property
    def scaler(self) -> bool:
        """fp16's loss scaler (bf16 and fp32 need none)."""
        return self.precision == "fp16"

    @property
    def why_not_fused(self) -> str | None:
        """Why seeds cannot train as one network here (None when they can)."""
        if self.scaler:
            return "fp16 loss scaling: one scale for all runs would skip every run's step " \
                   "when one run overflows"
        return None

    def autocast(self, cache: bool = True):
        """Mixed precision; `cache=False` inside a captured CUDA graph, where autocast's
        cache of cast weights must not outlive the capture."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type,
                              dtype=AMP_DTYPES[self.precision], cache_enabled=cache)

    @contextlib.contextmanager
    def kernels(self) -> Iterator[None]:
        """Deterministic kernels and TF32 for the duration of a run (restored after, for
        library users)."""
        prev = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
                torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
        if self.deterministic and torch.device(self.device).type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(self.deterministic)
        torch.backends.cudnn.benchmark = not self.deterministic
        torch.set_float32_matmul_precision("high" if self.tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = self.tf32
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(prev[0])
            torch.backends.cudnn.benchmark = prev[1]
            torch.set_float32_matmul_precision(prev[2])
            torch.backends.cudnn.allow_tf32 = prev[3]

    def with_model(self, model: torch.nn.Module, image_size: int,
                   recorded: dict[str, Any] | None = None) -> Runtime:
        """This runtime with `model`'s lambda layers set to their implementation: the ones a
        resumed run's config.json `recorded`, else this device's rule (lambda_layer.py)."""
        from lambdapipe.models.lambda_layer import choose_impls

        impls = choose_impls(model, image_size, self.device,
                             (recorded or {}).get("lambda_impls"))
        return dataclasses.replace(self, lambda_impls=impls)

    def record(self) -> dict[str, Any]:
        """config.json's `runtime`."""
        return {"compile": self.compile or "eager", "channels_last": self.channels_last,
                "tf32": self.tf32, "precision": self.precision,
                "fused_optimizer": self.fused_optimizer, "lambda_impls": dict(self.lambda_impls),
                "world_size": self.world.size if self.world else 1}


def resolve(r: Recipe, device: str, deterministic: bool = False,
            world: World | None = None) -> Runtime:
    """The one place a recipe's speed settings meet the device. channels_last is a GPU layout:
    on CPU, oneDNN's 1x1-convolution weight-gradient kernel (torch 2.14, one thread) writes
    past its buffer with it and corrupts the heap. TF32 exists on CUDA only. CUDA's fused
    optimizer kernels, but never fused SGD under fp16 loss scaling: a step the scaler skips
    still runs its kernel, after which it trains differently from plain SGD
    (test_fused_sgd_under_loss_scaling_is_what_we_avoid; docs/performance.md). On several
    processes (`world`) auto is eager: CUDA graphs cannot hold DDP's all-reduce."""
    kind = torch.device(device).type
    cuda = kind == "cuda"
    mode = AUTO_COMPILE.get(kind) if r.compile == "auto" and world is None else r.compile
    mode = None if mode == "auto" else mode
    mode = "default" if mode is True else (mode or None)
    if mode == STEP_GRAPH and not cuda:
        mode = None
    return Runtime(device=str(device), precision=r.precision, compile=mode,
                   channels_last=cuda and r.channels_last is not False,
                   tf32=cuda and r.tf32 and r.precision == "fp32",
                   fused_optimizer=cuda and not (r.optimizer == "sgd" and r.precision == "fp16"),
                   deterministic=deterministic, world=world)


def of_run(config: dict[str, Any], device: str, model: torch.nn.Module) -> Runtime:
    """The runtime of a saved run (config.json, a checkpoint's config) on `device`, with
    `model`'s lambda layers set (`impls_of_run`)."""
    from lambdapipe.recipes import get_recipe

    saved = dict(config["recipe"])
    return impls_of_run(config, resolve(get_recipe(saved.pop("name"), saved), device), model)


def impls_of_run(config: dict[str, Any], rt: Runtime, model: torch.nn.Module) -> Runtime:
    """`rt` with a saved run's `model` set to the lambda impls training recorded when it
    trained on this kind of device, else to this device's rule."""
    same = torch.device(rt.device).type == str(config.get("device", "")).split(":")[0]
    return rt.with_model(model, config["data"]["image_size"],
                         config.get("runtime") if same else None)
