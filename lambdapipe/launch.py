"""How a workflow job starts one run on several GPUs: `lambdapipe launch --gpus G --nodes M
train ...` (config `train: {gpus: G, nodes: M}`, docs/distributed.md).

Outside SLURM it is `torchrun --standalone --nproc-per-node G` on this machine (one node), or,
across machines without SLURM, torchrun's static rendezvous: the same `lambdapipe launch --gpus G
--nodes M --node-rank R --master-addr HOST [--master-port P]` started on each of the M machines
(R = 0 on HOST, which rank 0 runs on), i.e. `torchrun --nnodes M --node-rank R --master-addr
HOST --master-port P --nproc-per-node G`. A workflow job cannot do that (one job, one machine):
the workflow runs several nodes under SLURM only (lambdapipe.slurm.check_executor).
Inside a SLURM job (the slurm profile submits such a job with `--nodes=M --ntasks-per-node=G`,
and, on GPUs, `--gres=gpu:G`) it is `srun` starting one rank per task over the job's nodes:
each rank reads its place from SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID
(lambdapipe.distributed.from_env) and meets the others at MASTER_ADDR (the job's first host)
and MASTER_PORT (derived from the job id, so that two runs sharing a node do not collide).

The job is asked about with `scontrol`, not read from SLURM_* variables: Snakemake's jobstep
executor strips those (all but SLURM_JOB_ID) before it runs the job's command, so srun would
otherwise start one task of one CPU. No torch here: this process only builds a command and
replaces itself with it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence

from lambdapipe.errors import UserError

PORT_BASE, PORT_SPAN = 15000, 15000  # below Linux's ephemeral ports (32768-60999)
MASTER_PORT = 29500  # torchrun's default


def _scontrol(*args: str) -> str:
    proc = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or ["no output"])[0]
        raise UserError(f"scontrol {' '.join(args)} exited {proc.returncode}: {first}")
    return proc.stdout


def job_record(job_id: str, scontrol: Callable[..., str] = _scontrol) -> dict[str, str]:
    """`scontrol show job -o JOB` as a dict (NodeList, NumNodes, NumTasks, CPUs/Task, ...)."""
    text = scontrol("show", "job", "-o", job_id)
    return dict(m.groups() for m in re.finditer(r"(\S+?)=(\S*)", text))


def first_host(nodelist: str, scontrol: Callable[..., str] = _scontrol) -> str:
    """The first host of a SLURM host list (`gpu[01-04],big1` -> gpu01), as scontrol expands
    it (the list syntax has ranges, padding and several brackets: SLURM's own parser)."""
    hosts = scontrol("show", "hostnames", nodelist).split()
    if not hosts:
        raise UserError(f"scontrol show hostnames {nodelist} named no host")
    return hosts[0]


def command(gpus: int, nodes: int, args: Sequence[str], env: Mapping[str, str] = os.environ,
            scontrol: Callable[..., str] = _scontrol, node_rank: int | None = None,
            master_addr: str | None = None, master_port: int = MASTER_PORT
            ) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) that start `lambdapipe ARGS` as `gpus` ranks on each of `nodes`
    nodes: torchrun outside SLURM (`node_rank` and `master_addr` across machines), srun inside
    a SLURM job."""
    for name, value in (("gpus", gpus), ("nodes", nodes)):
        if value < 1:
            raise UserError(f"invalid --{name} {value}: expected an integer >= 1")
    python = sys.executable
    job_id = env.get("SLURM_JOB_ID")
    by_hand = node_rank is not None or master_addr is not None
    if job_id and by_hand:
        raise UserError(f"invalid --node-rank/--master-addr in SLURM job {job_id}: srun "
                        "places the ranks and the job's first host is the master; drop them")
    if not job_id:
        torchrun = [python, "-m", "torch.distributed.run"]
        ranks = [f"--nproc-per-node={gpus}", "-m", "lambdapipe", *args]
        if nodes == 1 and not by_hand:
            return [*torchrun, "--standalone", *ranks], dict(env)
        if node_rank is None or master_addr is None or not 0 <= node_rank < nodes:
            raise UserError(f"invalid train.nodes {nodes} outside a SLURM job: start "
                            f"`lambdapipe launch --nodes {nodes} --node-rank R --master-addr "
                            "HOST` on each node (R = 0 .. nodes-1, 0 on HOST; given "
                            f"--node-rank {node_rank}, --master-addr {master_addr}), or run "
                            "under SLURM (snakemake --profile profiles/slurm)")
        if not 0 < master_port < 65536:
            raise UserError(f"invalid --master-port {master_port}: expected 1 .. 65535")
        return [*torchrun, f"--nnodes={nodes}", f"--node-rank={node_rank}",
                f"--master-addr={master_addr}", f"--master-port={master_port}", *ranks], dict(env)
    job = job_record(job_id, scontrol)
    have = int(job.get("NumNodes", "1").split("-")[0] or 1)
    if have < nodes:
        raise UserError(f"invalid train.nodes {nodes}: SLURM job {job_id} has {have} node(s); "
                        "its rule must ask for them (resources nodes, the slurm profile)")
    cpus = job.get("CPUs/Task", "1")
    cpus = cpus if cpus.isdigit() else "1"
    port = PORT_BASE + int(job_id) % PORT_SPAN if job_id.isdigit() else PORT_BASE
    run_env = dict(env, MASTER_ADDR=first_host(job.get("NodeList", ""), scontrol),
                   MASTER_PORT=str(port))
    # --kill-on-bad-exit: a rank that dies ends the others at once, not after the collective
    # timeout (lambdapipe.distributed.TIMEOUT); the step gets the job's GPUs on each node.
    return (["srun", "--kill-on-bad-exit=1", f"--nodes={nodes}", f"--ntasks-per-node={gpus}",
             f"--cpus-per-task={cpus}", python, "-m", "lambdapipe", *args], run_env)
