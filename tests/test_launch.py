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
