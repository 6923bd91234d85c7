"""Measured choice of each lambda layer's implementation ('auto'), before training starts.

The three implementations compute the same function (tests/test_lambda_layer.py), so the
choice changes speed and memory, never results. MACs are a poor guide on a GPU (a large-kernel
convolution of few channels ran 7x slower than the logit order's GEMMs on an H200), so on
CUDA every distinct layer shape is timed once per candidate that fits a memory budget,
forward + backward, outside any compiled region, and the fastest is kept. Measurements are
cached in a JSON file keyed by device name, torch and cuDNN versions, TF32 and shape, so a
grid pays for each shape once per machine. On a CPU (and wherever nothing can be timed) the
layer's fixed rule stands. A resumed run never chooses again: it runs the choice its
config.json records (runtime.runtime_settings).
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lambdapipe import atomic, rng
from lambdapipe.models.lambda_layer import IMPLS, LambdaLayer

CACHE_VERSION = 1
WARMUP, REPEATS = 2, 5
# Fraction of the device memory free before timing that one candidate's dense tensors
# (activations kept for backward, gradients) may take.
MEMORY_FRACTION = 0.25

# timer(fn) -> seconds per call of fn (fn runs one forward + backward)
Timer = Callable[[Callable[[], None]], float]


def default_cache() -> Path:
    """$LAMBDAPIPE_CACHE_DIR, else $XDG_CACHE_HOME/lambdapipe, else ~/.cache/lambdapipe."""
    root = os.environ.get("LAMBDAPIPE_CACHE_DIR")
    if root:
        return Path(root) / "lambda_impls.json"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "lambdapipe" / "lambda_impls.json"


def lambda_layers(model: nn.Module) -> list[tuple[str, LambdaLayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LambdaLayer)]


def map_sizes(model: nn.Module, image_size: int) -> dict[str, tuple[int, int, int]]:
    """Each lambda layer's input (channels, height, width) for `image_size` px images, read
    from one forward pass on the meta device (no memory, no arithmetic)."""
    sizes: dict[str, tuple[int, int, int]] = {}
    layers = lambda_layers(model)
    if not layers:
        return sizes
    shadow = copy.deepcopy(model).to("meta")
    hooks = []
    for name, layer in lambda_layers(shadow):
        def hook(_module, args, name=name):
            c, h, w = args[0].shape[1:]
            sizes[name] = (int(c), int(h), int(w))
        hooks.append(layer.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            shadow.eval()(torch.empty(1, 3, image_size, image_size, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return sizes


def apply_impls(model: nn.Module, image_size: int, impls: dict[str, str]) -> None:
    """Run each 'auto' lambda layer with the implementation `impls` names for it: a run's
    recorded choice (config.json's runtime.lambda_impls), so that evaluating a checkpoint on
    the device it trained on runs what training measured fastest, not the MAC rule."""
    sizes = map_sizes(model, image_size)
    for name, layer in lambda_layers(model):
        impl = impls.get(name)
        if layer.impl == "auto" and impl in IMPLS:
            _, height, width = sizes[name]
            layer.tuned = (height, width, impl)


def shape_key(layer: LambdaLayer, channels: int, height: int, width: int, batch: int,
              dtype: str, channels_last: bool) -> str:
    """Everything the speed of one layer's forward + backward depends on."""
    where = f"r{layer.scope}" if layer.scope else "global"
    return (f"c{channels}-o{layer.heads * layer.value_depth}-k{layer.query_depth}"
            f"-h{layer.heads}-u{layer.intra_depth}-{where}-{height}x{width}-b{batch}-{dtype}"
            f"{'-cl' if channels_last else ''}")


def dense_bytes(layer: LambdaLayer, impl: str, batch: int, height: int, width: int,
                element_size: int) -> int:
    """Bytes of the large tensors `impl` keeps for backward (and their gradients)."""
    n = height * width
    k, u, h, v = layer.query_depth, layer.intra_depth, layer.heads, layer.value_depth
    if impl == "lambda":  # the (n, k, u, m) table, its gradient, the (n, k, b, v) lambdas
        return 2 * n * n * k * u * 4 + n * k * batch * v * element_size
    if impl == "logit":  # the (b, h, n, u, m) logits and their gradient, the table
        return 2 * batch * h * n * u * n * element_size + n * n * k * u * 4
    # conv: the (b, v, k, H, W) position lambdas and their gradient
    return 2 * batch * v * k * n * element_size


def cuda_timer(fn: Callable[[], None]) -> float:
    """Seconds per call: WARMUP calls, then REPEATS timed between CUDA events."""
    for _ in range(WARMUP):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(REPEATS):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000 / REPEATS


def _candidate_step(layer: LambdaLayer, impl: str, x: torch.Tensor,
                    dtype: torch.dtype | None) -> Callable[[], None]:
    probe = copy.deepcopy(layer).train()
    probe.impl, probe.tuned = impl, None

    def step() -> None:
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            out = probe(x)
        out.float().sum().backward()
        probe.zero_grad(set_to_none=True)
        x.grad = None

    step.impl = impl  # type: ignore[attr-defined]  # what a stand-in timer keys on
    return step


def _read_cache(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("version") == CACHE_VERSION else {}


def _write_cache(path: Path, entries: dict[str, Any]) -> None:
    """Read-merge-write: concurrent jobs may each lose the other's new entries (they are
    measured again next time), never corrupt the file."""
    merged = _read_cache(path)
    merged.setdefault("entries", {}).update(entries)
    merged["version"] = CACHE_VERSION
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(Path(path), merged)


def choose_impls(model: nn.Module, image_size: int, batch: int, device: str | torch.device,
                 precision_dtype: torch.dtype | None = None, channels_last: bool = False,
                 cache: Path | None = None, timer: Timer | None = None,
                 free_bytes: int | None = None, log: Callable[[str], None] | None = None,
                 tf32: bool = False) -> dict[str, dict[str, Any]]:
    """Set `tuned` on every 'auto' lambda layer of `model` and return, per layer name, the
    implementation it will run and why ("measured", "cached" or "rule").

    Measurement needs a timer: `cuda_timer` on a CUDA device unless `timer` is given (tests
    pass a stand-in); anywhere else the fixed rule is recorded. `free_bytes` bounds the
    candidates (default: the device's free memory)."""
    device = torch.device(device)
    if timer is None and device.type == "cuda":
        timer = cuda_timer
    sizes = map_sizes(model, image_size)
    dtype_name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
        precision_dtype, str(precision_dtype))
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else device.type)
    # what else changes the timing: cuDNN's version (CUDA) and TF32 matmuls
    prefix = f"{device_name}|torch {torch.__version__}|" + (
        f"cudnn {torch.backends.cudnn.version()}|" if device.type == "cuda" else "") + (
        "tf32|" if tf32 else "")
    cached = _read_cache(cache).get("entries", {}) if timer is not None else {}
    fresh: dict[str, Any] = {}
    chosen: dict[str, dict[str, Any]] = {}
    for name, layer in lambda_layers(model):
        channels, height, width = sizes[name]
        if layer.impl != "auto":
            chosen[name] = {"impl": layer.impl, "how": "requested"}
            continue
        if timer is None:
            layer.tuned = None
            chosen[name] = {"impl": layer.rule_impl(height, width), "how": "rule"}
            continue
        key = prefix + shape_key(layer, channels, height, width, batch, dtype_name,
                                 channels_last)
        entry = fresh.get(key) or cached.get(key)
        how = "cached" if key in cached and key not in fresh else "measured"
        if entry is None or entry.get("impl") not in IMPLS:
            # the probe draws random inputs: a run's RNG streams must not depend on whether
            # its shapes were measured now or read from the cache
            with rng.kept(device):
                entry = _measure(layer, channels, height, width, batch, device,
                                 precision_dtype, channels_last, timer, free_bytes)
            fresh[key] = entry
            how = "measured"
            if log is not None:
                times = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in entry["s"].items())
                log(f"lambda layer {name} ({height}x{width}, batch {batch}, {dtype_name}): "
                    f"{entry['impl']} ({times})")
        layer.tuned = (height, width, entry["impl"])
        chosen[name] = {"impl": entry["impl"], "how": how}
    if fresh and cache is not None:
        try:
            _write_cache(cache, fresh)
        except OSError as exc:  # a read-only home: measure again next time
            if log is not None:
                log(f"lambda impl cache {cache} not written: {exc.strerror or exc}")
    return chosen


def _measure(layer: LambdaLayer, channels: int, height: int, width: int, batch: int,
             device: torch.device, dtype: torch.dtype | None, channels_last: bool,
             timer: Timer, free_bytes: int | None) -> dict[str, Any]:
    if free_bytes is None:
        free_bytes = (torch.cuda.mem_get_info(device)[0] if device.type == "cuda"
                      else 1 << 62)
    element = 4 if dtype is None else 2
    budget = MEMORY_FRACTION * free_bytes
    candidates = [impl for impl in layer.candidate_impls(height, width)
                  if impl == "conv"
                  or dense_bytes(layer, impl, batch, height, width, element) <= budget]
    probe_layer = copy.deepcopy(layer).to(device)
    x = torch.randn(batch, channels, height, width, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        probe_layer = probe_layer.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    seconds: dict[str, float] = {}
    for impl in candidates:
        try:
            seconds[impl] = float(timer(_candidate_step(probe_layer, impl, x, dtype)))
        except torch.cuda.OutOfMemoryError:
            continue
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if not seconds:
        return {"impl": "conv", "s": {}, "at": time.strftime("%Y-%m-%d")}
    best = min(seconds, key=seconds.__getitem__)
    return {"impl": best, "s": seconds, "at": time.strftime("%Y-%m-%d")}
