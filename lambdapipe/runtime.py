"""Where a run's messages go, and the process-wide kernel settings it runs under."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from lambdapipe.recipes import Recipe


def log(msg: str, level: str = "info") -> None:
    """A message of the run on the `lambdapipe` logger: stderr, each line with a timestamp
    and `level` (info, warning, error), so a job's log file says when it happened."""
    from lambdapipe import logs  # logging's setup lives there; the CLI sets the level

    logs.emit(msg, level)


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
    choosing each 'auto' lambda layer's implementation (timed on CUDA, cached on disk;
    models/autotune.py). `r` is the recipe as it runs there (`Recipe.on`). A resumed run
    passes the `runtime` its config.json `recorded`: its layers run the recorded choice,
    never a new one (a new measurement could choose otherwise)."""
    from lambdapipe.evaluate import AMP_DTYPES
    from lambdapipe.models.autotune import apply_impls, choose_impls, default_cache

    if recorded is not None and isinstance(recorded.get("lambda_impls"), dict):
        apply_impls(model, image_size, recorded["lambda_impls"])
        impls, how = dict(recorded["lambda_impls"]), list(recorded.get("lambda_impls_how", []))
    else:
        chosen = choose_impls(model, image_size, r.batch_size, device,
                              AMP_DTYPES.get(r.precision), r.channels_last,
                              cache=default_cache(), log=log, tf32=r.tf32)
        impls = {name: c["impl"] for name, c in chosen.items()}
        how = sorted({c["how"] for c in chosen.values()})
    return {"compile": r.compile_mode or "eager", "channels_last": r.channels_last,
            "tf32": r.tf32, "lambda_impls": impls, "lambda_impls_how": how}
