"""The process's random generators (PyTorch's for initialisation and dropout; Python's and
numpy's for library users; the data order has its own, augment.py): a checkpoint stores a
`snapshot` so a resumed run continues them exactly; runs sharing a process keep them around
work that must not move them. Tensors and plain types only (`weights_only=True` loads).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def _cuda(device: str | torch.device) -> torch.device | None:
    """The CUDA device whose generator counts (with its index), or None off CUDA."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())


def snapshot(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Python's, numpy's and torch's generator states (and the CUDA one of `device`)."""
    py = random.getstate()
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    cuda = _cuda(device)
    if cuda is not None:
        state["cuda"] = torch.cuda.get_rng_state(cuda)
    return state


def restore(state: dict[str, Any], device: str | torch.device = "cpu") -> None:
    """Put back a `snapshot` (a CUDA state only onto a CUDA device: a GPU run resumes on a
    CPU with its CPU streams)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    cuda = _cuda(device)
    if "cuda" in state and cuda is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), cuda)


@contextlib.contextmanager
def kept(device: str | torch.device = "cpu") -> Iterator[None]:
    """Every generator as it was before the block."""
    state = snapshot(device)
    try:
        yield
    finally:
        restore(state, device)
