"""One run on several processes: PyTorch's DistributedDataParallel (NCCL on GPUs, gloo on the
CPU), started the standard way (`torchrun --nproc-per-node N -m lambdapipe.cli train ...`, or
`srun` one task per GPU). A distributed run is the one-process run split by rows: every rank
draws the epoch's order, crops and flips from the same (seed, epoch) generator and keeps its
contiguous slice of each global batch (`shard_plan`); DDP averages the gradients of equal
slices, which is the gradient of the global batch's mean loss. The global batch, learning-rate
schedule and data order are therefore those of one process, whatever the number of ranks.
Batch-norm statistics are per rank (per slice) unless the recipe sets `sync_bn: true`
(SyncBatchNorm: GPUs only, PyTorch's limit). Rank 0 alone holds the run lock and writes the
run directory; the others train and write nothing (docs/distributed.md)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from lambdapipe.errors import UserError

T = TypeVar("T")
# torchrun's variables, then srun's: SLURM_STEP_NUM_TASKS exists in an srun step only, so a
# batch script's single process (SLURM_NTASKS > 1 for its steps) is not taken for a rank.
ENV_KEYS = (("RANK", "WORLD_SIZE", "LOCAL_RANK"),
            ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"))
TIMEOUT = datetime.timedelta(minutes=30)  # a collective waits this long for a dead rank
# compile modes that capture CUDA graphs: a captured step cannot hold DDP's gradient all-reduce
GRAPH_MODES = ("reduce-overhead", "max-autotune", "step-graph")


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank `rank` of `size`, GPU `local_rank` of its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def lead(self) -> bool:
        """Rank 0: the one that holds the run lock and writes the run directory."""
        return self.rank == 0


def from_env(env: Mapping[str, str] = os.environ) -> World:
    """The world torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or srun (SLURM_PROCID,
    SLURM_STEP_NUM_TASKS, SLURM_LOCALID) started this process in; one process otherwise."""
    for keys in ENV_KEYS:
        if keys[1] in env and keys[0] in env:
            try:
                rank, size, local = (int(env.get(k, "0")) for k in keys)
            except ValueError:
                raise UserError(f"invalid {'/'.join(keys)} {[env.get(k) for k in keys]}: "
                                "expected integers (set by torchrun or srun)") from None
            if not 0 <= rank < size:
                raise UserError(f"invalid {keys[0]} {rank}: expected 0 .. {keys[1]}-1 = "
                                f"{size - 1}")
            return World(rank, size, local)
    return World()


def check(world: World, batch_size: int, drop_last: bool, compile_mode: Any,
          seeds: int = 1) -> None:
    """What a run on `world.size` processes refuses, one line each, before anything starts."""
    n = world.size
    if n == 1:
        return
    if batch_size % n:
        raise UserError(f"invalid batch_size {batch_size} on {n} processes: expected a "
                        f"multiple of {n} (each rank takes an equal slice of the global batch)")
    if not drop_last:
        raise UserError(f"invalid drop_last false on {n} processes: an epoch's partial last "
                        "batch would split unevenly across ranks; run it on one process")
    if compile_mode in GRAPH_MODES:
        raise UserError(f"invalid compile {compile_mode} on {n} processes: a captured CUDA "
                        "graph cannot hold DDP's gradient all-reduce; use auto (eager), false "
                        "or default")
    if seeds > 1:
        raise UserError(f"invalid --seeds on {n} processes: a distributed run trains one "
                        "seed; start one torchrun per seed")


def rank_device(world: World, device: str, env: Mapping[str, str] = os.environ) -> str:
    """What this rank asks `gpu.claim` for: `cpu`; else a free GPU through the lock files
    (`cuda`, narrowed to it, so several jobs on one machine never share a GPU), except under
    SLURM where the job's visible GPUs are indexed by SLURM_LOCALID when a task sees several
    (`--gpus-per-node`) and the one it sees otherwise (`--gpus-per-task=1`)."""
    kind = device.split(":")[0]
    if ":" in device:
        raise UserError(f"invalid --device {device} on {world.size} processes: expected auto, "
                        "cuda (each rank claims a free GPU) or cpu")
    if kind == "cpu":
        return "cpu"
    visible = [v for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if env.get("SLURM_JOB_ID") and len(visible) > 1:
        return f"cuda:{world.local_rank}"
    return device


def check_train(train: Mapping[str, Any]) -> World:
    """The world of a config's `train: {gpus: G, nodes: M}` runs (lambdapipe.config): G ranks
    on each of M nodes, G * M in all; refusing `pack`, which trains seeds in one process."""
    gpus, nodes, pack = train.get("gpus", 1), train.get("nodes", 1), train.get("pack", "none")
    if gpus * nodes > 1 and pack != "none":
        what = f"train.gpus {gpus}" if nodes == 1 else f"train.nodes {nodes}"
        raise UserError(f"config {what} with train.pack {pack}: a run on several "
                        "GPUs trains one seed; set pack: none")
    return World(0, gpus * nodes)


@contextlib.contextmanager
def joined(world: World, device: str) -> Iterator[str]:
    """The process group for the block on `device`, this rank's claimed device (NCCL on a
    GPU, gloo on the CPU); yields `device`."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(torch.device(device))
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise UserError(f"{key} is not set: torchrun sets it; under srun export "
                            "MASTER_ADDR (the first node) and MASTER_PORT (docs/distributed.md)")
    dist.init_process_group("nccl" if cuda else "gloo", rank=world.rank,
                            world_size=world.size, timeout=TIMEOUT)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def current() -> World | None:
    """The world of this process's group (`joined`), or None for a one-process run."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return World(dist.get_rank(), dist.get_world_size(),
                 int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))))


def decided(world: World | None, fn: Callable[[], T]) -> T:
    """`fn()` on rank 0 alone (checks, the lock, summary.json): its result on every rank, or
    its error (rank 0 raises it, the others one line naming it) instead of a hang."""
    if world is None:
        return fn()
    box: list[Any] = [None]
    if world.lead:
        try:
            box[0] = ("ok", fn())
        except BaseException as exc:
            box[0] = ("error", f"{type(exc).__name__}: {exc}")
            dist.broadcast_object_list(box, 0)
            raise
    dist.broadcast_object_list(box, 0)
    kind, value = box[0]
    if kind == "error":
        raise UserError(f"rank 0 stopped the run: {value}")
    return value


def shard_plan(plan: Any, batch_size: int, world: World) -> Any:
    """An epoch's plan (augment.EpochPlan) cut to this rank's rows: rows r*b .. (r+1)*b - 1 of
    every global batch of `batch_size` (b = batch_size / ranks); batch k of the result is
    rank r's slice of the one-process batch k (full batches only: drop_last)."""
    b = batch_size // world.size
    lo = world.rank * b

    def cut(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        steps = len(t) // batch_size
        return t[:steps * batch_size].view(steps, batch_size, *t.shape[1:])[
            :, lo:lo + b].reshape(steps * b, *t.shape[1:])

    return dataclasses.replace(plan, **{f.name: cut(getattr(plan, f.name))
                                        for f in dataclasses.fields(plan)})


def wrap(model: torch.nn.Module, device: str, sync_bn: bool
         ) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the model, with SyncBatchNorm where `sync_bn`; the DDP module the step runs). The
    first is what checkpoints and evaluation use: DDP shares its parameters."""
    if sync_bn:
        if torch.device(device).type != "cuda":
            raise UserError("invalid sync_bn true on the CPU: PyTorch's SyncBatchNorm runs on "
                            "GPUs only; set sync_bn=false (per-rank statistics)")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    dev = torch.device(device)
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[dev.index] if dev.type == "cuda" else None)
    return model, ddp


def gathered(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t`, stacked (ranks, ...): gloo and NCCL alike."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.stack(parts)
