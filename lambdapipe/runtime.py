"""Where a run's messages go, and the process-wide kernel settings it runs under."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch

from lambdapipe.recipes import Recipe


def log(msg: str) -> None:
    """One line on stderr (stdout carries the commands' results)."""
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def kernels(deterministic: bool, device: str, tf32: bool = False) -> Iterator[None]:
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


def runtime_settings(model: torch.nn.Module, r: Recipe, image_size: int, device: str,
                     recorded: dict[str, Any] | None = None) -> dict[str, Any]:
    """The speed settings a run resolved on `device` (config.json's `runtime`), after
    choosing each 'auto' lambda layer's implementation by `device`'s fixed rule. A resumed
    run passes the `runtime` its config.json `recorded`: its layers run the recorded choice."""
    from lambdapipe.models.lambda_layer import choose_impls

    impls = choose_impls(model, image_size, device, (recorded or {}).get("lambda_impls"))
    return {"compile": r.compile_mode or "eager", "channels_last": r.channels_last,
            "tf32": r.tf32, "lambda_impls": impls}
