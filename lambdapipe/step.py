"""The training step: normalise -> forward (autocast) -> loss -> backward (scaled for fp16)
-> clip -> optimizer step, eager, compiled, or captured whole as one CUDA graph."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from lambdapipe.augment import normalize
from lambdapipe.evaluate import autocast
from lambdapipe.recipes import Recipe
from lambdapipe.runtime import log


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
        log(f"warning: {self.r.compile_mode} compiled step failed, training continues "
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
