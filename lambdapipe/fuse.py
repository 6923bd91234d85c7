"""The seeds of one grid cell as one network: a small model's step is hundreds of tiny
kernels, so the K models are stacked (`torch.func.stack_module_state`) and run under `vmap`,
each kernel doing the work of K runs (PyTorch's model-ensembling recipe). The K losses are
summed (no run's gradient reaches another's slice); SGD and Adam(W) are elementwise, so one
optimizer over stacked tensors is K optimizers; clipping is per run.

Each run keeps its own `train.Run`; before each evaluation its slice is written into its own
model and saved as a solo run's, so checkpoints resume fused or alone. A step equals the
run's own to float tolerance, which training amplifies: fused equals alone statistically, not
numerically (tests/test_fuse.py, tests/test_fused_claim.py). A diverged run is finished at
once, its slice rides along unread.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch.func import functional_call, stack_module_state, vmap

from lambdapipe import rng
from lambdapipe.recipes import Recipe
from lambdapipe.rundir import TrainConfig
from lambdapipe.runtime import Runtime
from lambdapipe.step import GraphedStep, Seat, TrainStep, make_optimizer, make_step
from lambdapipe.train import Run


def why_not(cfgs: Sequence[TrainConfig], rt: Runtime) -> str | None:
    """Why these runs cannot train as one network under `rt` (None when they can)."""
    if len(cfgs) < 2:
        return "a single run"
    cells = [{k: v for k, v in cfg.identity().items() if k != "seed"} for cfg in cfgs]
    odd = [cfg for cfg, cell in zip(cfgs, cells, strict=True) if cell != cells[0]]
    if odd:
        return f"{odd[0].out} is not of the same grid cell as {cfgs[0].out}"
    return rt.why_not_fused


class FusedModel(torch.nn.Module):
    """K models of one architecture as one module: (K, B, C, H, W) -> (K, B, classes). The
    stacks are the module's own parameters and buffers so that CUDA graphs treat them as
    static rather than copying them in at every replay."""

    def __init__(self, models: Sequence[torch.nn.Module]):
        super().__init__()
        self.k = len(models)
        params, buffers = stack_module_state(list(models))
        self.param_names, self.buffer_names = list(params), list(buffers)
        self.stacked = torch.nn.ParameterList(torch.nn.Parameter(t) for t in params.values())
        for i, t in enumerate(buffers.values()):
            self.register_buffer(f"stat{i}", t)
        # the architecture without storage, kept out of the module's tree (no parameters)
        self.__dict__["template"] = copy.deepcopy(models[0]).to("meta").train()

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.param_names, self.stacked, strict=True))

    @property
    def stats(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f"stat{i}") for i, name in enumerate(self.buffer_names)}

    def _one(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
             x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.template, (params, buffers), (x,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return vmap(self._one, randomness="different")(self.params, self.stats, x)

    @torch.no_grad()
    def write_into(self, k: int, model: torch.nn.Module) -> None:
        """Run k's weights and buffers (BN statistics) into `model`, a run's own model."""
        params, stats = self.params, self.stats
        for name, t in model.named_parameters():
            t.copy_(params[name][k])
        for name, t in model.named_buffers():
            t.copy_(stats[name][k])


def why_not_states(states: Sequence[dict[str, Any]]) -> str | None:
    """Why the runs' optimizer states cannot be stacked (None when they can): one optimizer
    keeps one `step` counter per parameter (Adam's bias correction), so the runs' must agree."""
    for i, first in states[0]["state"].items():
        for s in states[1:]:
            for key, v in first.items():
                if isinstance(v, torch.Tensor) and v.dim() == 0 \
                        and not torch.equal(v, s["state"][i][key]):
                    return f"their optimizers' {key} counters differ ({v.item()} and " \
                           f"{s['state'][i][key].item()})"
    return None


def stacked_optimizer_state(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The K runs' optimizer state dicts (solo format) as one for the stacked parameters."""
    merged = {i: {key: torch.stack([s["state"][i][key] for s in states])
                  if isinstance(v, torch.Tensor) and v.dim() > 0 else v
                  for key, v in first.items()}
              for i, first in states[0]["state"].items()}
    return {"state": merged, "param_groups": copy.deepcopy(states[0]["param_groups"])}


def fused_step(models: Sequence[torch.nn.Module], r: Recipe, rt: Runtime, mean: torch.Tensor,
               std: torch.Tensor, states: Sequence[dict[str, Any]] | None = None,
               capture: Any = None) -> TrainStep | GraphedStep:
    """The fused step of `models` (on the device), its optimizer holding the runs' `states`."""
    fused = FusedModel(models)
    optimizer = make_optimizer(list(fused.parameters()), r, rt.fused_optimizer)
    if states and states[0]["state"]:
        optimizer.load_state_dict(stacked_optimizer_state(states))
    return make_step(fused, optimizer, r, rt, mean, std, runs=fused.k, capture=capture)


def train_fused(runs: Sequence[Run], pack_size: int) -> list[dict[str, Any]]:
    """Train started runs as one network until each is finished: their summaries. A kill
    between the runs' checkpoints leaves them at different iterations: the runs behind first
    catch up alone, then the unfinished ones go fused (one left, or optimizer states that
    cannot be stacked: one after another). `pack_size`: the job's seeds."""
    target = max(run.it for run in runs)
    for run in runs:
        if run.it < target and not run.done():
            run.log(f"catching up alone from iteration {run.it} to {target}, where the "
                    "other runs of the pack resume")
            while run.it < target and run.advance():
                pass
    # done: finished before its summary was written, or diverged catching up
    summaries = [run.finish() if run.done() else None for run in runs]
    todo = [k for k, summary in enumerate(summaries) if summary is None]
    states = [runs[k].seat.optimizer_state() for k in todo]
    reason = why_not_states(states) if len(todo) > 1 and states[0]["state"] else None
    if reason is not None:
        runs[todo[0]].log(f"not fused ({reason}): the runs train one after another")
    if reason is not None or len(todo) < 2:
        for k in todo:
            while runs[k].advance():
                pass
            summaries[k] = runs[k].finish()
        return summaries
    first = runs[todo[0]]
    step = fused_step([runs[k].model for k in todo], first.r, first.rt, first.mean, first.std,
                      states)
    for j, k in enumerate(todo):
        runs[k].join(Seat(step, j, pack_size))
    batches = [runs[k].next_batch() for k in todo]
    active = list(range(len(todo)))
    while active:
        x, y, y_clean = (torch.stack(parts) for parts in zip(*batches, strict=True))
        lead = runs[todo[active[0]]]
        step(x, y, y_clean, lead.lr, lead.it)
        for j in list(active):
            run = runs[todo[j]]
            if run.after_step():
                batches[j] = run.next_batch()
            else:  # finished, or diverged: its slice rides along on its last batch
                with rng.kept(first.device):  # testing best.ckpt builds a model: it draws
                    summaries[todo[j]] = run.finish()
                active.remove(j)
    return summaries
