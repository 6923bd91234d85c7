"""A run on several GPUs and nodes from the workflow (`train: {gpus: G, nodes: M}`): what its
job asks of SLURM (through snakemake-executor-plugin-slurm's own sbatch builder), how
`lambdapipe launch` starts its ranks (torchrun here, srun in a SLURM job), and what is refused
in one line. The run through a real slurmctld is in tests/test_slurm.py
(TestOneRunOnSeveralTasksThroughSlurm)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from click.testing import CliRunner

from lambdapipe import launch
from lambdapipe.errors import UserError
from lambdapipe.slurm import (
    Partition,
    Request,
    check_executor,
    check_jobs,
    check_requests,
    parse_sinfo,
    task_resources,
)

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- sbatch options
class _Resources(dict):
    """A job's resources as the plugin reads them (`.get` and attributes)."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def sbatch_options(gpus: int, nodes: int, on_gpus: bool = True) -> list[str]:
    """The sbatch call the slurm executor plugin builds for a training job of the workflow
    (the train rule's resources: gpu tokens, mem_mb, runtime, the task resources)."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    res = _Resources(gpu=gpus * nodes if on_gpus else 0, mem_mb=4000, runtime=60,
                     **task_resources(gpus, nodes, on_gpus))
    job = SimpleNamespace(resources=res, threads=4)
    params = dict(run_uuid="u", slurm_logfile="x.log", comment_str="rule_train",
                  account="", partition="-p gpu", workdir="")
    return (get_submit_command(job, params) + set_gres_string(job)).split()


def test_one_gpu_asks_for_nothing_more():
    assert task_resources(1, 1, True) == task_resources(1, 1, False) == {}
    call = sbatch_options(1, 1)
    assert "--gpus=1" in call and "--ntasks-per-gpu=1" not in call
    assert not [o for o in call if o.startswith(("--nodes", "--ntasks-per-node", "--gres"))]


def test_two_nodes_of_four_gpus_ask_for_one_task_per_gpu_on_each():
    assert task_resources(4, 2, True) == {"nodes": 2, "mpi": "srun", "tasks_per_node": 4,
                                          "gres": "gpu:4"}
    call = sbatch_options(4, 2)
    for option in ("--nodes=2", "--ntasks-per-node=4", "--gres=gpu:4", "--gpus=8",
                   "--cpus-per-task=4", "--mem"):
        assert option in call, (option, call)
    assert not [o for o in call if o.startswith(("--ntasks=", "--ntasks-per-gpu"))], call


def test_two_nodes_of_one_gpu_and_cpu_ranks():
    call = sbatch_options(1, 2)  # the plugin takes tasks_per_node above 1 only
    for option in ("--nodes=2", "--ntasks=2", "--ntasks-per-gpu=1", "--gres=gpu:1",
                   "--gpus=2"):
        assert option in call, (option, call)
    cpu = sbatch_options(2, 1, on_gpus=False)  # what the real-cluster test submits
    assert "--nodes=1" in cpu and "--ntasks-per-node=2" in cpu
    assert not [o for o in cpu if o.startswith(("--gpus", "--gres", "--ntasks="))], cpu


# --------------------------------------------------------------------------- pre-flight
def test_preflight_counts_gpus_per_node_and_nodes_per_partition(monkeypatch):
    parts = parse_sinfo("gpu|up|gpu:4(S:0-1)\ngpu|up|gpu:4\nsmall*|up|gpu:4\n")
    assert parts["gpu"] == Partition("gpu", False, True, 4, 2) and parts["small"].nodes == 1
    check_requests([Request("train", "gpu", 4, 2)], parts)
    with pytest.raises(UserError, match="^rule train asks for 2 nodes but partition 'small' "
                                        "has 1: lower train.nodes or use a larger partition$"):
        check_requests([Request("train", None, 4, 2)], parts)
    monkeypatch.setattr("lambdapipe.slurm.cluster_partitions", lambda: parts)
    rule = SimpleNamespace(name="train")
    two_nodes = SimpleNamespace(rule=rule, resources={"slurm_partition": "gpu", "gpu": 8,
                                                      **task_resources(4, 2, True)})
    check_jobs([two_nodes])  # 8 GPUs on 2 nodes: 4 a node, which `gpu` has
    too_many = SimpleNamespace(rule=rule, resources={"slurm_partition": "gpu", "gpu": 10,
                                                     **task_resources(5, 2, True)})
    with pytest.raises(UserError, match="asks for 5 GPU"):
        check_jobs([too_many])


def test_several_nodes_need_the_slurm_executor():
    check_executor("slurm", 4)
    check_executor("local", 1)
    with pytest.raises(UserError) as err:
        check_executor("local", 2)
    assert str(err.value).startswith("config train.nodes 2 needs the slurm executor")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("train", "match"), [
    ({"gpus": 2, "nodes": 3}, r"grids\[0\].set: invalid batch_size 64 on 6 processes"),
    ({"nodes": 2, "pack": "seeds"}, "^config train.nodes 2 with train.pack seeds"),
    ({"nodes": 0}, "train.nodes"),
])
def test_the_config_refuses_what_a_run_on_several_nodes_cannot_do(train, match):
    from lambdapipe.config import check_config, expand_runs

    cfg = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    cfg["train"].update(train)
    with pytest.raises(UserError, match=match) as err:
        expand_runs(check_config(cfg))
    assert "\n" not in str(err.value)
    cfg["train"].update(gpus=4, nodes=2, pack="none")  # 64 over 8 ranks
    assert len(expand_runs(check_config(cfg))) == 8


# --------------------------------------------------------------------------- launch
def fake_scontrol(nodes: str = "gpu[07-08]", num: str = "2", cpus: str = "6"):
    calls = []

    def scontrol(*args):
        calls.append(args)
        if args[:2] == ("show", "job"):
            return (f"JobId={args[-1]} JobName=x UserId=u(1) JobState=RUNNING NodeList={nodes} "
                    f"BatchHost=gpu07 NumNodes={num} NumCPUs=48 NumTasks=8 CPUs/Task={cpus} "
                    "TRES=cpu=48,node=2,gres/gpu=8 Command=/bin/sh\n")
        assert args == ("show", "hostnames", nodes)
        return "gpu07\ngpu08\n"

    return scontrol, calls


def test_outside_slurm_the_ranks_are_torchrun_ones():
    argv, env = launch.command(4, 1, ["train", "--seed", "0"], env={"PATH": "/bin"})
    assert argv == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node=4", "-m", "lambdapipe", "train", "--seed", "0"]
    assert env == {"PATH": "/bin"}
    with pytest.raises(UserError, match="^invalid train.nodes 2 outside a SLURM job: "):
        launch.command(4, 2, ["train"], env={})


def test_in_a_slurm_job_the_ranks_are_srun_tasks_meeting_at_the_first_host():
    scontrol, calls = fake_scontrol()
    argv, env = launch.command(4, 2, ["train", "--seed", "0"],
                               env={"SLURM_JOB_ID": "31337", "PATH": "/bin"}, scontrol=scontrol)
    assert argv == ["srun", "--kill-on-bad-exit=1", "--nodes=2", "--ntasks-per-node=4",
                    "--cpus-per-task=6", sys.executable, "-m", "lambdapipe", "train",
                    "--seed", "0"]
    assert env == {"SLURM_JOB_ID": "31337", "PATH": "/bin", "MASTER_ADDR": "gpu07",
                   "MASTER_PORT": str(15000 + 31337 % 15000)}
    assert calls[0] == ("show", "job", "-o", "31337")


def test_a_job_with_fewer_nodes_than_the_run_is_refused():
    scontrol, _ = fake_scontrol(nodes="gpu07", num="1")
    with pytest.raises(UserError, match=r"^invalid train.nodes 2: SLURM job 5 has 1 node\(s\)"):
        launch.command(4, 2, ["train"], env={"SLURM_JOB_ID": "5"}, scontrol=scontrol)
    with pytest.raises(UserError, match="invalid --gpus 0"):
        launch.command(0, 1, ["train"], env={})


def test_the_cli_replaces_itself_with_the_command(monkeypatch):
    from lambdapipe.cli import main

    seen = []
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setattr("os.execvpe", lambda file, argv, env: seen.append(argv))
    res = CliRunner().invoke(main, ["launch", "--gpus", "2", "train", "--model", "x"])
    assert res.exit_code == 0, res.output
    assert seen == [[sys.executable, "-m", "torch.distributed.run", "--standalone",
                     "--nproc-per-node=2", "-m", "lambdapipe", "train", "--model", "x"]]
    bad = CliRunner().invoke(main, ["launch", "--nodes", "3", "train"])
    assert bad.exit_code == 2 and "invalid train.nodes 3 outside a SLURM job" in bad.output


# --------------------------------------------------------------------------- the workflow
def demo(tmp_path: Path, **train) -> Path:
    cfg = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    cfg["train"].update(train)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def snakemake(tmp_path: Path, config: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "-s",
                           str(ROOT / "workflow" / "Snakefile"), "-d", str(tmp_path / "w"),
                           "--configfile", str(config), *extra], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow  # two Snakemake dry runs
@pytest.mark.cost(40)
def test_the_workflow_plans_runs_on_several_nodes_and_one_gpu_runs_as_before(tmp_path):
    dry = snakemake(tmp_path, demo(tmp_path, device="auto", gpus=2, nodes=2), "-n", "-p",
                    "--resources", "gpu=4")
    assert dry.returncode == 0, dry.stderr[-3000:]
    trains = [ln for ln in dry.stdout.splitlines()
              if ln.startswith("Shell command: lambdapipe launch --gpus 2 --nodes 2 train ")]
    assert len(trains) == 8
    assert dry.stdout.count("nodes=2, mpi=srun, tasks_per_node=2, gres=gpu:2, gpu=4,") == 8
    one = snakemake(tmp_path, demo(tmp_path), "-n", "-p")
    assert one.returncode == 0, one.stderr[-3000:]
    shells = [ln for ln in one.stdout.splitlines() if " train --model" in ln]
    assert len(shells) == 8
    assert all(ln.startswith("Shell command: lambdapipe train --model ") for ln in shells)
    assert "mpi=" not in one.stdout and "nodes=" not in one.stdout


@pytest.mark.slow  # Snakemake starts for real, then stops before its first job
def test_a_local_run_on_several_nodes_is_refused_before_any_job(tmp_path):
    res = snakemake(tmp_path, demo(tmp_path, nodes=2), "--cores", "1")
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith(
        "lambdapipe: config train.nodes 2 needs the slurm executor (snakemake --profile "
        "profiles/slurm), not local")
    assert not (tmp_path / "w" / "data").exists() and not (tmp_path / "w" / "logs").exists()


# --------------------------------------------------------------------------- several nodes
# Outside SLURM a run on M machines is `lambdapipe launch --nodes M --node-rank R
# --master-addr HOST` started on each (torchrun's static rendezvous). Emulated here by two
# launches on this host, node 0 and node 1, one gloo rank each, on one filesystem (as nodes
# share the run's storage). Every rank's Python process loads SITE: dist_tiny registered,
# and an audit hook that logs each write (open for writing, rename, mkdir, remove) under
# $RUN_ROOT with the writer's RANK.
NODE_SITE = '''"""Test-only (tests/test_launch.py): dist_tiny; a rank's writes under RUN_ROOT."""
import json
import os

from torch import nn

from lambdapipe.models.registry import register_model

{source}

register_model(dist_tiny)
_ROOT, _LOG = os.environ.get("RUN_ROOT"), os.environ.get("WRITES_LOG")
_EVENTS = ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "os.truncate")
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _hook(event, args):
    if event == "open":
        path, mode, flags = args
        if not ((mode and any(c in mode for c in "wax+")) or (mode is None and flags & _WRITE)):
            return
        paths = [path]
    elif event in _EVENTS:
        paths = args[:2] if event == "os.rename" else args[:1]  # a rename: source and target
    else:
        return
    for path in paths:
        if not isinstance(path, (str, bytes, os.PathLike)):
            continue
        path = os.path.abspath(os.fsdecode(path))
        if path.startswith(_ROOT + os.sep):
            line = json.dumps({{"rank": os.environ["RANK"], "event": event, "path": path}})
            fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(fd, (line + "\\n").encode())
            os.close(fd)


if _ROOT and _LOG and "RANK" in os.environ:
    import sys

    sys.addaudithook(_hook)
'''


@pytest.fixture(scope="module")
def nodes_env(tmp_path_factory):
    import inspect
    import os

    from test_distributed import dist_tiny

    from lambdapipe import data

    base = tmp_path_factory.mktemp("nodes")
    (base / "site").mkdir()
    (base / "site" / "sitecustomize.py").write_text(
        NODE_SITE.format(source=inspect.getsource(dist_tiny)))
    data.prepare("digits", base / "data")
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{base / 'site'}",
               OMP_NUM_THREADS="1", RUN_ROOT=str(base / "runs"),
               WRITES_LOG=str(base / "writes.jsonl"))
    (base / "runs").mkdir()
    return base, env


def train_args(base: Path, out: Path, iterations: int = 12) -> list[str]:
    from test_distributed import SHORT

    sets = {**SHORT, "iterations": iterations}
    return ["train", "--model", "dist_tiny", "--dataset", "digits", "--data-dir",
            str(base / "data"), "--seed", "3", "--recipe", "demo", "--device", "cpu",
            "--no-progress", "--out", str(out), *[f"--set={k}={v}" for k, v in sets.items()]]


def two_nodes(env: dict, args: list[str]) -> list[subprocess.Popen]:
    """Node 0 and node 1 of one run, each `lambdapipe launch --gpus 1 --nodes 2` with its
    --node-rank, meeting at node 0 (127.0.0.1) on a free port."""
    from test_distributed import free_port

    port = str(free_port())
    return [subprocess.Popen([sys.executable, "-m", "lambdapipe", "launch", "--gpus", "1",
                              "--nodes", "2", "--node-rank", str(r), "--master-addr",
                              "127.0.0.1", "--master-port", port, *args], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
            for r in (0, 1)]


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    done = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        done.append((p.returncode, out, err))
    return done


def test_a_run_on_several_nodes_outside_slurm_is_torchruns_static_rendezvous():
    argv, _ = launch.command(4, 2, ["train"], env={}, node_rank=1, master_addr="node0")
    assert argv == [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                    "--node-rank=1", "--master-addr=node0", "--master-port=29500",
                    "--nproc-per-node=4", "-m", "lambdapipe", "train"]
    for kwargs in ({}, {"node_rank": 0}, {"master_addr": "h"},
                   {"node_rank": 2, "master_addr": "h"}):
        with pytest.raises(UserError, match="^invalid train.nodes 2 outside a SLURM job: start "
                                            "`lambdapipe launch --nodes 2 --node-rank R "):
            launch.command(4, 2, ["train"], env={}, **kwargs)
    with pytest.raises(UserError, match="^invalid --master-port 0"):
        launch.command(1, 2, ["train"], env={}, node_rank=0, master_addr="h", master_port=0)
    with pytest.raises(UserError, match="^invalid --node-rank/--master-addr in SLURM job 9"):
        launch.command(1, 2, ["train"], env={"SLURM_JOB_ID": "9"}, node_rank=0,
                       master_addr="h")


@pytest.mark.slow  # 1 process, 1 node x 2 ranks, three 2-node runs: 16 fresh interpreters
@pytest.mark.cost(100)
def test_two_nodes_equal_one_process_and_resume_on_one_node(nodes_env):
    """2 nodes x 1 gloo rank (two `lambdapipe launch --nodes 2` on this host) train the
    1-process run within float tolerance, rank 1 writing nothing; a 2-node run killed
    (SIGKILL to both nodes' launch trees) after its first evaluation resumes on 1 node x 2
    ranks (`lambdapipe launch --gpus 2`) and ends as the unbroken 1 x 2 run."""
    import contextlib
    import json
    import signal
    import time

    import psutil
    from test_distributed import assert_same, rows

    base, env = nodes_env
    runs, writes = base / "runs", base / "writes.jsonl"
    one = subprocess.run([sys.executable, "-m", "lambdapipe", *train_args(base, runs / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    done = finish(two_nodes(env, train_args(base, runs / "two")))
    assert [rc for rc, _, _ in done] == [0, 0], [err[-2000:] for _, _, err in done]
    assert "--nnodes=2 --node-rank=1 --master-addr=127.0.0.1" in done[1][2]
    assert_same(runs / "one", runs / "two")
    config = json.loads((runs / "two" / "config.json").read_text())
    assert config["runtime"]["world_size"] == 2
    logged = [json.loads(line) for line in writes.read_text().splitlines()]
    assert {w["rank"] for w in logged} == {"0"}  # rank 1 (node 1) wrote nothing
    assert {Path(w["path"]).name for w in logged} >= {"metrics.csv", "summary.json"}
    assert all(Path(w["path"]).is_relative_to(runs / "two") for w in logged)

    long = 160  # 40 evaluations: the kill lands mid-run
    # the unbroken run on 2 ranks of one node (over 160 steps 1 process drifts from 2 ranks
    # by float rounding: a val image or two flips; on 2 ranks the sums are the same)
    whole = subprocess.run([sys.executable, "-m", "lambdapipe", "launch", "--gpus", "2",
                            *train_args(base, runs / "whole", long)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    broken = runs / "broken"
    procs = two_nodes(env, train_args(base, broken, long))
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        while not (broken / "metrics.csv").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        # each node's launch is torchrun; torchrun starts its rank in a session of its own
        tree = [q for p in procs for q in (psutil.Process(p.pid),
                                           *psutil.Process(p.pid).children(recursive=True))]
        for q in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                q.send_signal(signal.SIGKILL)
    finally:
        for p in procs:
            p.communicate(timeout=60)
        psutil.wait_procs(tree, timeout=60)
    assert (broken / "last.ckpt").exists() and not (broken / "summary.json").exists()
    assert 1 <= len(rows(broken)) < long // 4
    resumed = subprocess.run([sys.executable, "-m", "lambdapipe", "launch", "--gpus", "2",
                              *train_args(base, broken, long)], env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = rows(runs / "whole"), rows(broken)
    assert len(a) == len(b) == long // 4
    for x, y in zip(a, b, strict=True):
        for key in ("iteration", "lr", "train_loss", "train_acc", "val_loss", "val_acc"):
            assert x[key] == pytest.approx(y[key], abs=2e-4), (key, x, y)


# --------------------------------------------------------------------------- SLURM, 2 nodes
NODES_SITE = '''"""Test-only (tests/test_launch.py): dist_tiny; each srun rank and its node."""
import json
import os
import sys

from torch import nn

from lambdapipe.models.registry import register_model

{source}

register_model(dist_tiny)
if "SLURM_PROCID" in os.environ and sys.orig_argv[1:4] == ["-m", "lambdapipe", "train"]:
    _keys = ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_PROCID", "SLURMD_NODENAME",
             "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NUM_NODES", "MASTER_ADDR")
    _fd = os.open(os.environ["RANKS_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_fd, (json.dumps({{k: os.environ.get(k) for k in _keys}}) + "\\n").encode())
    os.close(_fd)
'''


@pytest.mark.slurm
@pytest.mark.slow  # a 2-node SLURM cluster, Snakemake through the slurm profile, 2 ranks
@pytest.mark.cost(120)
def test_a_run_on_two_slurm_nodes_through_the_profile(tmp_path):
    """`train: {device: cpu, gpus: 1, nodes: 2}` through the slurm profile on a real
    slurmctld with two nodes (two slurmd on this host, tests/slurm_cluster.py): the training
    job gets 2 nodes, `lambdapipe launch` starts one rank on each with srun, and the run
    equals the 1-process run of the same command."""
    import json
    import re
    import shlex

    from slurm_cluster import start_or_skip
    from test_distributed import assert_same
    from test_slurm import POLLING_SNAKEMAKE, _slurm_args, _snakemake, _train_jobs, dist_tiny_grid

    cluster = start_or_skip(tmp_path / "cluster", gpus=0, nodes=2, cpus=2)
    try:
        work, grid, env = dist_tiny_grid(tmp_path, cluster, NODES_SITE, gpus=1, nodes=2)
        proc = _snakemake(work, grid, env, *_slurm_args(cluster.partition), "--until", "train",
                          snakemake=POLLING_SNAKEMAKE)  # status polls at most 2 s apart
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-4000:]
        (job_id,) = _train_jobs(log)
        job = launch.job_record(job_id, scontrol=lambda *a: cluster.run("scontrol", *a).stdout)
        assert job["JobState"] == "COMPLETED" and job["NumNodes"] == "2", job
        ranks = [json.loads(line) for line in (tmp_path / "ranks.jsonl").read_text().splitlines()]
        assert sorted((r["SLURM_PROCID"], r["SLURMD_NODENAME"]) for r in ranks) == [
            ("0", "localhost"), ("1", cluster.node)]  # one rank on each node
        assert {(r["SLURM_JOB_ID"], r["SLURM_STEP_NUM_NODES"], r["MASTER_ADDR"])
                for r in ranks} == {(job_id, "2", "localhost")}  # one step, the first host
        assert len({r["SLURM_STEP_ID"] for r in ranks}) == 1
        shell = re.search(r"Shell command: lambdapipe launch --gpus 1 --nodes 2 (train .*?) > ",
                          log)
        assert shell, log[-3000:]
        argv = shlex.split(shell.group(1))
        out = argv.index("--out") + 1
        run, argv[out] = work / argv[out], str(tmp_path / "one")
        started = next((work / "logs" / "train").rglob("*.log")).read_text().splitlines()[0]
        assert " srun --kill-on-bad-exit=1 --nodes=2 --ntasks-per-node=1 " in started
        one = subprocess.run([sys.executable, "-m", "lambdapipe", *argv], cwd=work,
                             env={k: v for k, v in env.items() if not k.startswith("SLURM")},
                             capture_output=True, text=True, timeout=600)
        assert one.returncode == 0, one.stderr[-3000:]
        assert json.loads((run / "config.json").read_text())["runtime"]["world_size"] == 2
        assert_same(run, tmp_path / "one")
    finally:
        if cluster is not None:
            cluster.stop()
