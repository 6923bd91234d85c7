"""Pre-flight check of what a workflow asks of SLURM, before the first job is submitted.

Without it a profile the cluster cannot honour (a misspelt partition, GPUs on a partition
that has none) is found out by `sbatch` one job at a time, after the grid has started,
inside a multi-line executor error. `check_jobs` asks `sinfo` once and turns the first
impossible request into one `UserError` line naming the rule, the value and what exists.

Only what `sinfo` can see is checked: partitions, their state, their nodes' GPU gres.
Accounts are left to sbatch: without slurmdbd there is nothing to check them against.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from collections.abc import Iterable

from lambdapipe.errors import UserError

_PAREN = re.compile(r"\([^)]*\)")  # socket affinity in gres strings: gpu:a100:4(S:0-1)


@dataclasses.dataclass(frozen=True)
class Partition:
    name: str
    default: bool
    up: bool
    max_gpus: int  # most GPUs any one node of the partition has
    nodes: int = 1  # how many nodes it has


@dataclasses.dataclass(frozen=True)
class Request:
    """What one job will ask sbatch for (`-p`, GPUs per node from `--gpus`/`--gres=gpu:`,
    `--nodes`)."""

    rule: str
    partition: str | None
    gpus: int  # per node
    nodes: int = 1


def task_resources(gpus: int, nodes: int, on_gpus: bool) -> dict[str, object]:
    """What a run of `gpus` ranks on each of `nodes` nodes asks of SLURM beyond its `gpu`
    tokens (the job's --gpus, all nodes together), in snakemake-executor-plugin-slurm's own
    resource names: `nodes` (--nodes=M); one task per GPU of each node (`tasks_per_node`:
    --ntasks-per-node=G; the plugin takes it above 1 only, so G = 1 is `tasks`: --ntasks=M,
    one per node, with `tasks_per_gpu`: --ntasks-per-gpu=1, which the plugin would otherwise
    set to `tasks`); on GPUs `gres` (--gres=gpu:G, per node, so each node has its G); and
    `mpi`, which makes the plugin run the job's command as it is (it then starts its tasks
    itself with srun, `lambdapipe launch`) instead of inside its one-task `srun -n1`.
    Nothing for a run on one GPU, whose job stays as it always was. Other executors ignore
    these names."""
    if gpus * nodes == 1:
        return {}
    tasks: dict[str, object] = ({"tasks_per_node": gpus} if gpus > 1
                                else {"tasks": nodes, "tasks_per_gpu": 1})
    gres = {"gres": f"gpu:{gpus}"} if on_gpus else {}
    return {"nodes": nodes, "mpi": "srun", **tasks, **gres}


def gres_gpus(gres: str | None) -> int:
    """GPUs in a gres string: `gpu:2`, `gpu:a100:4(S:0-1),nic:1`, `(null)` -> 2, 4, 0."""
    total = 0
    for item in _PAREN.sub("", gres or "").split(","):
        parts = item.strip().split(":")
        if parts[0] != "gpu":
            continue
        count = parts[-1] if len(parts) > 1 else "1"
        total += int(count) if count.isdigit() else 1  # `gpu:a100` means one
    return total


def parse_sinfo(text: str) -> dict[str, Partition]:
    """Partitions from `sinfo -h -N -o %P|%a|%G` (one line per node and partition)."""
    nodes: dict[str, list[tuple[bool, int]]] = {}
    defaults: set[str] = set()
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 3:
            continue
        name, avail, gres = fields
        if name.endswith("*"):
            name = name[:-1]
            defaults.add(name)
        nodes.setdefault(name, []).append((avail.strip().lower() == "up", gres_gpus(gres)))
    return {name: Partition(name, name in defaults, any(up for up, _ in rows),
                            max(g for _, g in rows), len(rows))
            for name, rows in nodes.items()}


def cluster_partitions() -> dict[str, Partition]:
    """The partitions this login node's SLURM controller knows; UserError if none answers."""
    if shutil.which("sinfo") is None:
        raise UserError("the slurm executor needs `sinfo` on PATH: run snakemake on a "
                        "SLURM login node (or use the default profile to run locally)")
    proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%P|%a|%G"], capture_output=True,
                          text=True, timeout=60)
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or ["no output"])[0]
        raise UserError(f"cannot reach the SLURM controller (sinfo exited "
                        f"{proc.returncode}): {first}")
    partitions = parse_sinfo(proc.stdout)
    if not partitions:
        raise UserError("sinfo lists no partition: this SLURM cluster has nothing to run on")
    return partitions


def check_requests(requests: Iterable[Request],
                   partitions: dict[str, Partition] | None = None) -> None:
    """Raise a one-line UserError for the first request the cluster cannot meet."""
    partitions = cluster_partitions() if partitions is None else partitions
    names = ", ".join(sorted(partitions))
    default = next((p for p in partitions.values() if p.default), None)
    for req in requests:
        if req.partition:
            part = partitions.get(req.partition)
            if part is None:
                raise UserError(f"slurm_partition {req.partition!r} (rule {req.rule}) does "
                                f"not exist on this cluster: expected one of {names}")
        elif default is None:
            raise UserError(f"rule {req.rule} names no slurm_partition and the cluster has "
                            f"no default one: set default-resources slurm_partition to one "
                            f"of {names}")
        else:
            part = default
        if not part.up:
            raise UserError(f"partition {part.name!r} (rule {req.rule}) is not up: "
                            f"`sinfo -p {part.name}` says why; pick another of {names}")
        if req.nodes > part.nodes:
            raise UserError(f"rule {req.rule} asks for {req.nodes} nodes but partition "
                            f"{part.name!r} has {part.nodes}: lower train.nodes or use a "
                            f"larger partition")
        if req.gpus > part.max_gpus:
            have = f"at most {part.max_gpus} GPU(s) per node" if part.max_gpus else "no GPUs"
            with_gpus = [p.name for p in partitions.values() if p.max_gpus >= req.gpus]
            hint = (f"use a GPU partition ({', '.join(sorted(with_gpus))})" if with_gpus
                    else "set `train: {device: cpu}` in the config to run without GPUs")
            raise UserError(f"rule {req.rule} asks for {req.gpus} GPU(s) but partition "
                            f"{part.name!r} has {have} (gres): {hint}")


def _job_nodes(resources) -> int:
    try:
        return max(1, int(resources.get("nodes") or 1))
    except (TypeError, ValueError):
        return 1


def _job_gpus(resources) -> int:
    """GPUs per node: `--gres=gpu:N` is per node, `--gpus=N` for the whole job."""
    gpus = resources.get("gpu") or 0
    gres_count = gres_gpus(resources.get("gres"))
    try:
        return max(-(-int(gpus) // _job_nodes(resources)), gres_count)
    except (TypeError, ValueError):
        return max(1, gres_count)  # `gpu: a100`-like strings still ask for a GPU


def check_jobs(jobs: Iterable) -> None:
    """Check the jobs a Snakemake run is about to submit (from an `onstart` handler)."""
    seen: set[Request] = set()
    for job in jobs:
        if getattr(job, "is_local", False):  # localrules (e.g. `all`) never reach sbatch
            continue
        res = job.resources
        partition = res.get("slurm_partition")
        req = Request(job.rule.name, str(partition) if partition else None, _job_gpus(res),
                      _job_nodes(res))
        seen.add(req)
    check_requests(sorted(seen, key=lambda r: (r.rule, r.partition or "", r.gpus, r.nodes)))


def check_executor(executor: str | None, nodes: int) -> None:
    """A run on several nodes is started by srun in a SLURM job: refused on any other
    executor (a local run's ranks are torchrun's, on this one machine)."""
    if nodes > 1 and executor != "slurm":
        raise UserError(f"config train.nodes {nodes} needs the slurm executor (snakemake "
                        f"--profile profiles/slurm), not {executor or 'none'}: on one machine "
                        "use nodes: 1 and train.gpus for its GPUs")


def preflight(workflow, nodes: int = 1) -> None:
    """`onstart` hook: `train.nodes` above 1 only on the slurm executor; on it, check every
    job to be submitted. Exits with one line (status 1) if the cluster cannot run them."""
    plugin = getattr(workflow, "executor_plugin", None)
    try:
        check_executor(getattr(plugin, "name", None), nodes)
    except UserError as exc:
        raise SystemExit(f"lambdapipe: {exc}") from None
    if plugin is None or plugin.name != "slurm":
        return
    try:
        check_jobs(workflow.dag.needrun_jobs())
    except UserError as exc:
        raise SystemExit(f"lambdapipe: {exc}") from None
