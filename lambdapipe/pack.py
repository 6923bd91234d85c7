"""The seeds of one grid cell in one process (`lambdapipe train --seeds`): one process start
and data load for all. The unfinished runs train as one network where they can (fuse.py),
otherwise one after another, each exactly as `train --seed N` trains it (bitwise:
tests/test_pack.py). A killed job rerun resumes each run from its own last.ckpt
(tests/test_killloop.py). (Runs stepping in turn on their own CUDA streams measured 1.01x
one run on an H200: dropped in issue 23.)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from lambdapipe import logs, rng, runlock
from lambdapipe.errors import UserError
from lambdapipe.rundir import TrainConfig, check_before_start, finished
from lambdapipe.runtime import resolve
from lambdapipe.train import Run


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
    """Train (or resume, or read the finished summary of) every run in `cfgs`; with `fuse`
    as one network where they can (else one log line says why). A diverged run is finished
    while the others go on; `callback(cfg, row)` follows each evaluation. The summaries in
    the order of `cfgs`; the process's RNG state is given back after."""
    device = str(device)
    # kept from before the checks: their model builds draw from it too
    with rng.kept(device), own_all(cfgs):  # own_all is re-entrant: the CLI took them already
        check_packed(cfgs)
        summaries = [finished(cfg.out) for cfg in cfgs]
        todo = [i for i, summary in enumerate(summaries) if summary is None]
        rt = resolve(cfgs[0].recipe, device, cfgs[0].deterministic)  # kernels: check_packed
        fused = False
        if fuse and todo:
            from lambdapipe import fuse as fusing

            # one unfinished run left of a fused job finishes in the fused job's path too
            reason = fusing.why_not([cfgs[i] for i in todo], rt) if len(todo) > 1 else None
            fused = reason is None
            if not fused:
                logs.emit(f"not fused ({reason}): the runs train one after another")
        device_data: dict = {}  # a fused job's runs hold the cell's splits on the device once

        def new_run(pos: int, i: int) -> Run:
            return Run(cfgs[i], rt if fused else device, progress,
                       None if callback is None else functools.partial(callback, cfgs[i]),
                       label=_label(cfgs[i], cfgs), bar_position=pos,
                       device_data=device_data if fused else None,
                       pack_size=len(cfgs) if fused else None)

        with rt.kernels():
            if fused:  # started in turn on the process's RNG (each seeds its own model)
                runs = [new_run(pos, i) for pos, i in enumerate(todo)]
                for run in runs:
                    run.start()
                done = fusing.train_fused(runs, len(cfgs))
                del runs
            else:  # each run to its end (and let go) before the next starts
                done = [new_run(pos, i).train() for pos, i in enumerate(todo)]
        for i, summary in zip(todo, done, strict=True):
            summaries[i] = summary
        return summaries
