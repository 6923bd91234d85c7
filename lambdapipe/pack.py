"""Several runs in one process: the seeds of one grid cell trained together.

A small model leaves a large GPU nearly idle: its step is hundreds of tiny kernels, and
separate processes time-slice the GPU instead of overlapping. Here every run is a
`train.Run` with its own model, optimizer, data order, checkpoints and run directory; the
runs step in turn, and on CUDA each run's work is issued on its own stream (and, compiled,
through its own compiled step), so the kernels of different runs can run side by side.

Packing changes nothing but speed. What runs in one process share is the global RNG: model
initialisation and dropout (in forward) draw from torch's generators, so each run's torch
CPU and CUDA generator states are swapped in before its turn and out after it, and a packed
run draws exactly the numbers it would draw alone: bitwise equal to a solo run on CPU with
`--deterministic` (tests/test_pack.py). Python's and numpy's global generators, which
training never draws from (the data order comes from a generator seeded by seed and epoch),
stay process-wide: swapping numpy's state costs about 0.2 ms, a large part of a small
model's step. The process's RNG state as a whole is restored when the pack is done.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from lambdapipe import rng, runlock
from lambdapipe.errors import UserError
from lambdapipe.runtime import kernels, log
from lambdapipe.train import Run, TrainConfig, check_before_start


class Lane:
    """What one run owns in a shared process: its torch RNG state and, on CUDA, its stream.

    `with lane.turn():` installs the run's torch generator states and makes its stream
    current for one call (`start`, `advance`, `finish`), then keeps the states the call left.
    On CUDA the generator state is a host-side (seed, offset) pair: no device sync.
    """

    def __init__(self, cuda: torch.device | None):
        self.cuda = cuda
        self.stream = torch.cuda.Stream(device=cuda) if cuda is not None else None
        self.rng: tuple | None = None  # taken after the first turn: its seed, its checkpoint's

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        if self.rng is not None:
            torch.set_rng_state(self.rng[0])
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.rng[1], self.cuda)
        with torch.cuda.stream(self.stream) if self.stream is not None \
                else contextlib.nullcontext():
            yield
        self.rng = (torch.get_rng_state(),
                    torch.cuda.get_rng_state(self.cuda) if self.cuda is not None else None)


def cuda_device(device: str) -> torch.device | None:
    """The CUDA device a pack runs on (with its index), or None on the CPU."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())


def check_packed(cfgs: Sequence[TrainConfig]) -> None:
    """What packing adds to `check_before_start`: one directory per run, one kernel mode."""
    outs = [cfg.out.resolve() for cfg in cfgs]
    for out in outs:
        if outs.count(out) > 1:
            raise UserError(f"--out {out} is given to {outs.count(out)} runs: each run of a "
                            "pack needs its own directory (an --out template with {seed})")
    if len({cfg.deterministic for cfg in cfgs}) > 1:
        raise UserError("runs packed in one process must agree on --deterministic")
    for cfg in cfgs:
        check_before_start(cfg)


@contextlib.contextmanager
def own_all(cfgs: Sequence[TrainConfig]) -> Iterator[None]:
    """Every run directory of the pack owned by this process (runlock), or none: a second
    command on any of them refuses in one line naming the holder."""
    with contextlib.ExitStack() as stack:
        for cfg in cfgs:
            stack.enter_context(runlock.own(cfg.out))
        yield


def _label(cfg: TrainConfig, cfgs: Sequence[TrainConfig]) -> str:
    seeds = [c.seed for c in cfgs]
    return f"[seed {cfg.seed}] " if len(set(seeds)) == len(seeds) else f"[{cfg.out}] "


def run_packed(cfgs: Sequence[TrainConfig], device: str = "cpu", progress: bool = False,
               callback: Callable[[TrainConfig, dict[str, float]], None] | None = None,
               fuse: bool = False) -> list[dict[str, Any]]:
    """Train (or resume, or return the finished summary of) every run in `cfgs` together.

    Finished runs (summary.json present) are read, never touched; every other run resumes
    from its own last.ckpt. A run that diverges is finished (status `diverged`) at once while
    the others go on. `callback(cfg, row)` follows each evaluation, as in `train.run`. With
    `fuse` the unfinished runs train as one network (lambdapipe/fuse.py) when they can, else
    (one log line says why) in turn as without it.
    Returns the summaries in the order of `cfgs`; the process's RNG state is restored after.
    """
    cuda = cuda_device(str(device))
    # kept from before the checks: their model builds draw from it too
    with rng.kept(device), own_all(cfgs):  # own_all is re-entrant: the CLI took them already
        return _run_packed(cfgs, str(device), progress, callback, cuda, fuse)


def _run_packed(cfgs, device, progress, callback, cuda, fuse=False) -> list[dict[str, Any]]:
    check_packed(cfgs)
    summaries: list[dict[str, Any] | None] = [None] * len(cfgs)
    todo = []
    for i, cfg in enumerate(cfgs):
        path = cfg.out / "summary.json"
        if path.exists():
            summaries[i] = json.loads(path.read_text())
        else:
            todo.append(i)
    if fuse and todo:
        from lambdapipe import fuse as fusing

        # one unfinished run left of a fused job finishes in the fused job's path too
        reason = fusing.why_not([cfgs[i] for i in todo]) if len(todo) > 1 else None
        if reason is None:
            _run_fused(cfgs, todo, summaries, device, progress, callback, cuda)
            return [s for s in summaries if s is not None]
        log(f"not fused ({reason}): the runs step in turn")
    runs: dict[int, tuple[Run, Lane]] = {}
    device_data: dict = {}  # the cell's splits on the device once, for all its runs
    with kernels(cfgs[0].deterministic, device, cfgs[0].recipe.on(device).tf32):
        for pos, i in enumerate(todo):
            run = Run(cfgs[i], device, progress, _reporter(callback, cfgs[i]),
                      label=_label(cfgs[i], cfgs), bar_position=pos, device_data=device_data)
            runs[i] = run, Lane(cuda)
            with runs[i][1].turn():
                run.start()
        active = list(todo)
        while active:
            for i in list(active):
                run, lane = runs[i]
                with lane.turn():
                    more = run.advance()
                    if not more:
                        summaries[i] = run.finish()
                if not more:
                    active.remove(i)
                    del runs[i], run  # its model, optimizer and device data go with it
        if cuda is not None:
            torch.cuda.synchronize(cuda)
    return [s for s in summaries if s is not None]


def _reporter(callback, cfg: TrainConfig) -> Callable[[dict[str, float]], None]:
    def report(row: dict[str, float]) -> None:
        if callback is not None:
            callback(cfg, row)
    return report


def _run_fused(cfgs, todo, summaries, device, progress, callback, cuda) -> None:
    """The unfinished runs as one network (lambdapipe/fuse.py), started in turn on the
    process's RNG (each seeds its own model). A kill between the runs' checkpoints leaves
    them at different iterations: the runs behind first catch up alone, then all go fused."""
    from lambdapipe.fuse import train_fused

    device_data: dict = {}
    with kernels(cfgs[0].deterministic, device, cfgs[0].recipe.on(device).tf32):
        runs = []
        for pos, i in enumerate(todo):
            runs.append(Run(cfgs[i], device, progress, _reporter(callback, cfgs[i]),
                            label=_label(cfgs[i], cfgs), bar_position=pos,
                            device_data=device_data))
            runs[-1].start()
        for run in runs:  # what summary.json's `compile` says, if a run ends before fusing
            run.step_fn.path = f"{run.step_fn.path} (fused x{len(cfgs)})"
        target = max(run.it for run in runs)
        for run in runs:
            if run.it < target and not run.done():
                run.log(f"catching up alone from iteration {run.it} to {target}, where the "
                         "other runs of the pack resume")
                while run.it < target and run.advance():
                    pass
        live = []
        for k, run in enumerate(runs):
            if run.done():  # finished before its summary was written, or diverged catching up
                summaries[todo[k]] = run.finish()
            else:
                live.append(k)
        if len(live) == 1:
            run = runs[live[0]]
            while run.advance():
                pass
            summaries[todo[live[0]]] = run.finish()
        elif live:
            def done(k: int, summary: dict[str, Any]) -> None:
                summaries[todo[live[k]]] = summary

            train_fused([runs[k] for k in live], done, pack_size=len(cfgs))
        del runs
        if cuda is not None:
            torch.cuda.synchronize(cuda)
