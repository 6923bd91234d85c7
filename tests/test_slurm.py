"""The grid on a real (single-node, loopback) SLURM cluster that the test starts itself.

Marked `slurm`; skipped with the reason when slurm-wlm/munge cannot be installed or started
(not root, no apt-get). See tests/slurm_cluster.py for how the cluster is built.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from slurm_cluster import start_or_skip

from lambdapipe.errors import UserError
from lambdapipe.slurm import Partition, Request, check_requests, cluster_partitions, gres_gpus


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = start_or_skip(tmp_path_factory.mktemp("slurm"), gpus=1)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def cpu_cluster(tmp_path_factory):
    """A second cluster whose only node has no GPUs (no GresTypes at all)."""
    c = start_or_skip(tmp_path_factory.mktemp("slurm-cpu"), gpus=0)
    yield c
    c.stop()


@pytest.fixture
def on(monkeypatch):
    """Point this process's SLURM clients at CLUSTER."""

    def use(cluster):
        monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
        monkeypatch.setenv("PATH", cluster.env["PATH"])
        return cluster

    return use


# ---------------------------------------------------------------- pre-flight, no cluster
@pytest.mark.parametrize("gres, n", [("gpu:2", 2), ("gpu:a100:4(S:0-1),nic:1", 4),
                                      ("(null)", 0), ("", 0), ("gpu:a100:2(S:0,1),gpu:v100:1", 3),
                                      ("gpu", 1), ("shard:8", 0)])
def test_gres_gpus(gres, n):
    assert gres_gpus(gres) == n


PARTS = {"cpu": Partition("cpu", True, True, 0), "gpu": Partition("gpu", False, True, 4),
         "old": Partition("old", False, False, 8)}


@pytest.mark.parametrize("req, message", [
    (Request("train", "gpu", 4), None),
    (Request("prepare", None, 0), None),
    (Request("train", "gpuu", 1), "slurm_partition 'gpuu' (rule train) does not exist on "
                                  "this cluster: expected one of cpu, gpu, old"),
    (Request("train", None, 1), "rule train asks for 1 GPU(s) but partition 'cpu' has no GPUs"),
    (Request("train", "gpu", 5), "partition 'gpu' has at most 4 GPU(s) per node"),
    (Request("train", "old", 1), "partition 'old' (rule train) is not up"),
])
def test_check_requests(req, message):
    if message is None:
        check_requests([req], PARTS)
        return
    with pytest.raises(UserError) as err:
        check_requests([req], PARTS)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_no_default_partition_is_named():
    parts = {"a": Partition("a", False, True, 0)}
    with pytest.raises(UserError, match="names no slurm_partition .* one of a$"):
        check_requests([Request("report", None, 0)], parts)


def test_no_controller_is_one_line(monkeypatch, tmp_path):
    (tmp_path / "empty.conf").write_text("")  # a missing file would be retried for 60 s
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "empty.conf"))
    if not __import__("shutil").which("sinfo"):
        with pytest.raises(UserError, match="needs `sinfo` on PATH"):
            cluster_partitions()
        return
    with pytest.raises(UserError, match=r"^cannot reach the SLURM controller .*: \S"):
        cluster_partitions()


# ---------------------------------------------------------------- the cluster itself


@pytest.mark.slurm
def test_batch_job_runs_on_the_node_with_its_gpu(cluster, tmp_path):
    out = tmp_path / "job-%j.out"
    show = "hostname; env | grep -E '^(CUDA_VISIBLE_DEVICES|SLURM_JOB_GPUS)='"
    job = cluster.sbatch("--gres=gpu:1", "-o", str(out), "--wrap", show)
    assert cluster.wait_job(job) == "COMPLETED"
    text = (tmp_path / f"job-{job}.out").read_text()
    assert text.splitlines()[0] == cluster.node
    assert "CUDA_VISIBLE_DEVICES=0" in text and "SLURM_JOB_GPUS=0" in text
    srun = cluster.run("srun", "-n1", "printenv", "SLURM_JOB_ID").stdout.strip()
    assert srun.isdigit() and int(srun) > int(job)
    done = {r["JobId"]: r for r in cluster.finished_jobs()}
    assert done[job]["JobState"] == "COMPLETED" and done[job]["Partition"] == cluster.partition
    assert done[srun]["JobState"] == "COMPLETED"


@pytest.mark.slurm
def test_scancel_stops_a_running_job(cluster, tmp_path):
    job = cluster.sbatch("-o", str(tmp_path / "sleep.out"), "--wrap", "sleep 120")
    cluster.wait_job(job, states=("RUNNING",))
    cluster.run("scancel", job)
    assert cluster.wait_job(job, timeout_s=30) == "CANCELLED"


@pytest.mark.slurm
def test_requests_the_cluster_cannot_meet_are_refused_at_submission(cluster):
    bad = cluster.run("sbatch", "-p", "nosuchpartition", "--wrap", "true", check=False)
    assert bad.returncode != 0 and "invalid partition" in bad.stderr.lower()
    greedy = cluster.run("sbatch", f"--gres=gpu:{cluster.gpus + 1}", "--wrap", "true",
                         check=False)
    assert greedy.returncode != 0


@pytest.mark.slurm
def test_sinfo_view_of_both_clusters(cluster, cpu_cluster, on):
    on(cluster)
    assert cluster_partitions() == {"debug": Partition("debug", True, True, 1)}
    on(cpu_cluster)
    assert cluster_partitions() == {"debug": Partition("debug", True, True, 0)}
    with pytest.raises(UserError, match="has no GPUs"):
        check_requests([Request("train", "debug", 1)])


@pytest.mark.slurm
def test_stop_leaves_no_daemon_behind(tmp_path):
    c = start_or_skip(tmp_path / "c", gpus=0)
    try:
        job = c.sbatch("-o", str(tmp_path / "s.out"), "--wrap", "sleep 300")
        c.wait_job(job, states=("RUNNING",))
        pids = [p.pid for p in c.procs.values()]
        assert len(pids) == 3
        no_gres = c.run("sbatch", "--gres=gpu:1", "--wrap", "true", check=False)
        assert no_gres.returncode != 0
    finally:
        c.stop()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (c.stray_step_daemons() or _alive(pids)):
        time.sleep(0.2)
    assert not _alive(pids)
    assert c.stray_step_daemons() == []
    assert subprocess.run(["scontrol", "ping"], env=c.env, capture_output=True,
                          timeout=30).returncode != 0


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        alive.append(pid)
    return alive


# ---------------------------------------------------------------- the grid through snakemake
REPO = Path(__file__).resolve().parents[1]
TIMING = re.compile(r"time|per_min|per_s")  # wall_time_s, session_time_s, iter_per_min...


def _grid_config(path: Path) -> Path:
    """The demo config, trimmed to 4 short runs and asking for a GPU per training job."""
    cfg = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    cfg["train"]["device"] = "auto"  # -> resources gpu=1 -> sbatch --gpus=1
    grid = cfg["datasets"]["digits"]["grids"][0]
    # 30 steps: a training job still runs for seconds (its snakemake and torch start), ample
    # to scancel it mid-run; what is compared is the same for 30 steps as for 300.
    grid.update(models=["resnet20x1"], seeds=[0, 1], set={"iterations": 30, "eval_every": 15})
    grid["noise"] = [{"kind": "symmetric", "rates": [0, 0.25]}]
    path.write_text(yaml.safe_dump(cfg))
    return path


# Timeouts of the grid's steps: minutes on an idle 2-core machine, several times that when
# it is shared (pytest-timeout's limit still stops a hang).
def _snakemake(workdir: Path, config: Path, env: dict, *extra: str, timeout: float = 900,
               snakemake: tuple[str, ...] = ("snakemake",)) -> subprocess.CompletedProcess:
    cmd = [*snakemake, "-s", str(REPO / "workflow" / "Snakefile"), "-d", str(workdir),
           "--configfile", str(config), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


# Snakemake whose SLURM executor checks its jobs' states at most 2 s apart, not up to 10 s
# more after each check that saw no job finish (tests/snakemake_polling.py): the runs that
# wait on jobs in SLURM. Inside the jobs, and where no job is submitted, Snakemake as is.
POLLING_SNAKEMAKE = (sys.executable, str(Path(__file__).with_name("snakemake_polling.py")))


def _slurm_args(partition: str) -> list[str]:
    # partition from the command line; --workflow-profile none drops
    # workflow/profiles/default, whose gpu=1 token would let only one GPU job run at a time on
    # the whole cluster.
    return ["--profile", str(REPO / "profiles" / "slurm"), "--workflow-profile", "none",
            "--default-resources", f"slurm_partition={partition}", "mem_mb=1000",
            "runtime=10", "--set-resources", "train:cpus_per_task=1",
            "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks",
            "2", "--latency-wait", "5", "--retries", "0"]


def _summaries(workdir: Path) -> dict[str, dict]:
    out = {}
    for path in sorted((workdir / "results" / "runs").glob("*/*/*/*/summary.json")):
        key = str(path.parent.relative_to(workdir / "results" / "runs"))
        out[key] = {k: v for k, v in json.loads(path.read_text()).items()
                    if not TIMING.search(k)}
    return out


def _train_jobs(log: str) -> list[str]:
    """SLURM job ids of the train rule's submissions in a snakemake log."""
    return re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+) "
                      r"\(log: \S*/rule_train/", log)


def _run_locally(path: Path, fork_server) -> None:
    """The grid without SLURM or GPUs (`shared_dir`'s build): the reference the SLURM run
    must equal, in PATH/work; its jobs' `lambdapipe` children of the fork server
    (tests/forkserver.py), where the SLURM run's are fresh interpreters."""
    path.mkdir()
    env_local = fork_server.env({k: v for k, v in os.environ.items()
                                 if not k.startswith(("SLURM_", "LAMBDAPIPE_"))})
    t0 = time.monotonic()
    local = _snakemake(path / "work", _grid_config(path / "grid.yaml"), env_local,
                       "--cores", "2", "--workflow-profile", "none")
    assert local.returncode == 0, local.stderr[-3000:]
    (path / "seconds").write_text(f"{time.monotonic() - t0:.1f}")


@pytest.fixture(scope="module")
def local_grid(shared_dir, request) -> Path:
    """The local reference run, built once per test run by whichever pytest-xdist worker
    asks first: TestTheGridRunLocally on the other worker while this one drives SLURM, or
    the comparison below if it comes first (or runs alone). Skipped, like the SLURM tests,
    where SLURM cannot be installed: nothing would compare with it."""
    start_or_skip(None)
    fork_server = request.getfixturevalue("fork_server")  # after the skip: none started then
    return shared_dir("slurm-local-grid", lambda path: _run_locally(path, fork_server))


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """The grid on SLURM with one training job scancel'ed mid-run, then the rerun. Returns
    what the tests look at."""
    base = tmp_path_factory.mktemp("grid")
    c = start_or_skip(base / "cluster", gpus=2)
    try:
        config = _grid_config(base / "grid.yaml")
        env = dict(c.env, LAMBDAPIPE_FAKE_GPUS="2",
                   LAMBDAPIPE_GPU_LOG=str(base / "claims.jsonl"))
        work = base / "slurm"
        cmd = [*POLLING_SNAKEMAKE, "-s", str(REPO / "workflow" / "Snakefile"), "-d", str(work),
               "--configfile", str(config), *_slurm_args(c.partition)]
        t0 = time.monotonic()
        first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        cancelled = _cancel_a_training_job_once_one_finished(c, work)
        first_out = first.communicate(timeout=900)[0]
        t_first = time.monotonic() - t0
        finished_before = {p: p.stat().st_mtime_ns
                           for p in (work / "results" / "runs").glob("*/*/*/*/summary.json")}
        t0 = time.monotonic()
        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        t_rerun = time.monotonic() - t0
        yield dict(cluster=c, work=work, first=first,
                   first_out=first_out, cancelled=cancelled, finished_before=finished_before,
                   rerun=rerun, claims=base / "claims.jsonl",
                   seconds=dict(slurm=t_first, rerun=t_rerun))
    finally:
        c.stop()


def _cancel_a_training_job_once_one_finished(c, work: Path, timeout_s: float = 900) -> str:
    """scancel a RUNNING train job while at least one run has already finished."""
    deadline = time.monotonic() + timeout_s
    runs = work / "results" / "runs"
    while time.monotonic() < deadline:
        done = list(runs.glob("*/*/*/*/summary.json")) if runs.exists() else []
        if done:
            out = c.run("squeue", "-h", "-t", "running", "-o", "%i|%k", check=False).stdout
            training = [line.split("|")[0] for line in out.splitlines() if "rule_train" in line]
            if training:
                c.run("scancel", training[0])
                return training[0]
        time.sleep(0.3)
    raise AssertionError("no training job was running after the first run finished")


class TestTheGridThroughSlurm:
    """One pytest-xdist work unit (a class): its SLURM run and the local reference it is
    compared with (TestTheGridRunLocally) run side by side on the two workers."""

    pytestmark = [pytest.mark.slurm, pytest.mark.cost(100)]

    def test_every_job_went_through_slurm_and_saw_its_gpu(self, grid):
        c, rerun = grid["cluster"], grid["rerun"]
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
        log = grid["first_out"] + rerun.stdout + rerun.stderr
        submitted = set(re.findall(r"has been submitted with SLURM jobid (\d+)", log))
        by_state = {}
        for rec in c.finished_jobs():
            by_state.setdefault(rec["JobState"], set()).add(rec["JobId"])
        # every job snakemake submitted ran and finished in slurmctld's own record
        assert submitted and submitted <= by_state.get("COMPLETED", set()) | {grid["cancelled"]}
        # 4 train + 4 evaluate + 2 explain + prepare (clean labels too) + 1 noise + report, one
        # extra train for the cancelled run
        trains = _train_jobs(log)
        assert len(trains) == 5 and grid["cancelled"] in trains
        assert len(submitted) == 14
        # each training job took the SLURM path of gpu.claim: its own job id, its gres index
        claims = [json.loads(line) for line in grid["claims"].read_text().splitlines()]
        train_claims = {cl["slurm_job_id"]: cl for cl in claims if cl["slurm_job_id"] in trains}
        assert set(train_claims) == set(trains) - {grid["cancelled"]} | (
            {grid["cancelled"]} & set(train_claims))
        for cl in train_claims.values():
            assert cl["slot"] is None and cl["index"] in (0, 1)  # no lock: SLURM assigned it

    def test_scancel_then_rerun_trains_only_what_is_missing(self, grid):
        c, first, rerun = grid["cluster"], grid["first"], grid["rerun"]
        assert first.returncode != 0  # the cancelled job failed the first run
        states = {r["JobId"]: r["JobState"] for r in c.finished_jobs()}
        assert states[grid["cancelled"]] == "CANCELLED"
        assert f"SLURM-job '{grid['cancelled']}' failed" in grid["first_out"]
        retrained = _train_jobs(rerun.stdout + rerun.stderr)
        finished = grid["finished_before"]
        assert len(retrained) == 4 - len(finished) >= 1
        for path, mtime in finished.items():
            assert path.stat().st_mtime_ns == mtime, f"{path} was retrained"
        print("seconds:", grid["seconds"])

    def test_slurm_results_equal_the_local_run(self, grid, local_grid):
        local, slurm = _summaries(local_grid / "work"), _summaries(grid["work"])
        assert len(local) == 4 and set(slurm) == set(local)
        for key in local:
            assert slurm[key] == local[key], key


class TestTheGridRunLocally:
    """The reference for TestTheGridThroughSlurm, built here when this work unit comes first
    (on the other pytest-xdist worker): the grid, device auto, runs without a GPU or SLURM,
    every run ok. Skipped with the SLURM tests where SLURM cannot be installed: nothing would
    compare with it."""

    pytestmark = [pytest.mark.slurm, pytest.mark.cost(90)]

    def test_every_run_of_the_grid_run_locally_is_ok(self, local_grid):
        summaries = _summaries(local_grid / "work")
        assert len(summaries) == 4
        assert {s["status"] for s in summaries.values()} == {"ok"}
        assert {s["iterations"] for s in summaries.values()} == {30}
        print("seconds:", (local_grid / "seconds").read_text())


@pytest.mark.slurm
@pytest.mark.parametrize("which", ["committed profile", "unknown partition", "gpu, no gres"])
def test_bad_profile_fails_in_one_line_before_any_job(which, cluster, cpu_cluster, tmp_path):
    target = cpu_cluster if which == "gpu, no gres" else cluster
    before = len(target.finished_jobs()), target.run("squeue", "-h").stdout
    config = _grid_config(tmp_path / "grid.yaml")
    if which == "committed profile":  # its CHANGE_ME placeholders, as shipped
        extra = ["--profile", str(REPO / "profiles" / "slurm"), "--workflow-profile", "none"]
        expect = "lambdapipe: slurm_partition 'CHANGE_ME_partition' (rule evaluate)"
    else:
        extra = _slurm_args("nosuch" if which == "unknown partition" else target.partition)
        expect = ("lambdapipe: slurm_partition 'nosuch' (rule " if which == "unknown partition"
                  else "lambdapipe: rule evaluate asks for 1 GPU(s) but partition 'debug' has "
                       "no GPUs")  # evaluate and train both ask; rules are checked by name
    proc = _snakemake(tmp_path / "w", config, target.env, *extra, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(expect), proc.stderr[-2000:]
    assert "submitted with SLURM jobid" not in proc.stdout + proc.stderr
    assert (len(target.finished_jobs()), target.run("squeue", "-h").stdout) == before


# ---------------------------------------------------------------- one run on several tasks
SITE = '''"""Test-only: registers dist_tiny in every Python process of the run (the workflow's own,
the jobs', each rank) and records each rank srun starts (its SLURM task variables)."""
import json
import os
import sys

from torch import nn

from lambdapipe.models.registry import register_model

{source}

register_model(dist_tiny)
if "SLURM_PROCID" in os.environ and sys.orig_argv[1:4] == ["-m", "lambdapipe", "train"]:
    _keys = ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_LOCALID",
             "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NUM_NODES", "RANK", "MASTER_ADDR")
    _fd = os.open(os.environ["RANKS_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_fd, (json.dumps({{k: os.environ.get(k) for k in _keys}}) + "\\n").encode())
    os.close(_fd)
'''


def dist_tiny_grid(base: Path, cluster, site: str, gpus: int, nodes: int
                   ) -> tuple[Path, Path, dict[str, str]]:
    """(work dir, grid.yaml, environment) of one short dist_tiny run of the demo config at
    `train: {device: cpu, gpus, nodes}` on `cluster`: `site` (a sitecustomize template given
    dist_tiny's source) in every Python process, each rank logged to base/ranks.jsonl, and
    the data as the prepare rule makes it, made here (the one SLURM job is the run's)."""
    import inspect

    from test_distributed import SHORT, dist_tiny

    (base / "site").mkdir()
    (base / "site" / "sitecustomize.py").write_text(
        site.format(source=inspect.getsource(dist_tiny)))
    cfg = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    cfg["train"].update(device="cpu", gpus=gpus, nodes=nodes)
    grid = cfg["datasets"]["digits"]["grids"][0]
    grid.pop("model_args")
    grid.update(models=["dist_tiny"], seeds=[3], set=dict(SHORT),
                noise=[{"kind": "symmetric", "rates": [0]}])
    (base / "grid.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(cluster.env, PYTHONPATH=f"{REPO}{os.pathsep}{base / 'site'}",
               RANKS_LOG=str(base / "ranks.jsonl"), OMP_NUM_THREADS="1")
    work = base / "work"
    subprocess.run([sys.executable, "-m", "lambdapipe", "prepare", "--dataset", "digits",
                    "--data-dir", str(work / "data"), "--split-seed", "0"], env=env,
                   check=True, capture_output=True, timeout=300)
    return work, base / "grid.yaml", env


@pytest.fixture(scope="class")
def ranks_run(cluster, tmp_path_factory):
    """`train: {device: cpu, gpus: 2, nodes: 1}` through the slurm profile up to the train
    rule (one training job of 2 tasks on data prepared beforehand), then the same
    `lambdapipe train` command on one process outside SLURM."""
    base = tmp_path_factory.mktemp("ranks")
    work, _, env = dist_tiny_grid(base, cluster, SITE, gpus=2, nodes=1)
    t0 = time.monotonic()
    proc = _snakemake(work, base / "grid.yaml", env, *_slurm_args(cluster.partition),
                      "--until", "train", snakemake=POLLING_SNAKEMAKE)
    seconds = {"slurm": time.monotonic() - t0}
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert len(re.findall(r"has been submitted with SLURM jobid", log)) == 1, log[-3000:]
    shell = re.search(r"Shell command: lambdapipe launch --gpus 2 --nodes 1 (train .*?) > ", log)
    assert shell, log[-3000:]
    argv = shlex.split(shell.group(1))
    out = argv.index("--out") + 1
    run, argv[out] = work / argv[out], str(base / "one")
    t0 = time.monotonic()
    one = subprocess.run([sys.executable, "-m", "lambdapipe", *argv], cwd=work, env=env,
                         capture_output=True, text=True, timeout=600)
    seconds["one process"] = time.monotonic() - t0
    assert one.returncode == 0, one.stderr[-3000:]
    return dict(log=log, work=work, run=run, one=base / "one", ranks=base / "ranks.jsonl",
                job=_train_jobs(log), seconds=seconds)


class TestOneRunOnSeveralTasksThroughSlurm:
    """`train: {gpus: 2}` through the slurm profile on the CPU (gloo): the training job asks
    SLURM for 1 node x 2 tasks, its command starts the 2 ranks with srun (one task each), and
    the run equals the 1-process run of the same command. The test cluster has one node, so
    several nodes are exercised here as nodes=1 x 2 tasks; what `nodes: 2` asks of sbatch is
    tested in tests/test_launch.py."""

    pytestmark = [pytest.mark.slurm, pytest.mark.cost(130)]

    def test_the_job_asked_slurm_for_one_node_and_two_tasks(self, cluster, ranks_run):
        from lambdapipe.launch import job_record

        assert len(ranks_run["job"]) == 1
        job = job_record(ranks_run["job"][0],
                         scontrol=lambda *args: cluster.run("scontrol", *args).stdout)
        assert job["JobState"] == "COMPLETED"
        assert (job["NumNodes"], job["NumTasks"], job["CPUs/Task"]) == ("1", "2", "1")
        assert job["NtasksPerN:B:S:C"].split(":")[0] == "2"  # --ntasks-per-node=2
        print("seconds:", ranks_run["seconds"])

    def test_each_rank_was_a_task_of_one_srun_step(self, cluster, ranks_run):
        ranks = [json.loads(line) for line in ranks_run["ranks"].read_text().splitlines()]
        assert sorted(r["SLURM_PROCID"] for r in ranks) == ["0", "1"]
        assert {r["SLURM_JOB_ID"] for r in ranks} == set(ranks_run["job"])
        assert len({r["SLURM_STEP_ID"] for r in ranks}) == 1  # one step, not the batch one
        assert {(r["SLURM_STEP_NUM_TASKS"], r["SLURM_STEP_NUM_NODES"]) for r in ranks} == {
            ("2", "1")}
        assert {r["RANK"] for r in ranks} == {None}  # not torchrun's
        assert {r["MASTER_ADDR"] for r in ranks} == {cluster.node}  # the job's first host
        config = json.loads((ranks_run["run"] / "config.json").read_text())
        assert config["runtime"]["world_size"] == 2
        work = ranks_run["work"]
        log = work / "logs" / "train" / ranks_run["run"].relative_to(work / "results" / "runs")
        started = log.with_name(log.name + ".log").read_text().splitlines()[0]
        assert started.startswith(f"lambdapipe launch: MASTER_ADDR={cluster.node} ")
        assert " srun --kill-on-bad-exit=1 --nodes=1 --ntasks-per-node=2 " in started

    def test_the_run_equals_the_one_process_run(self, ranks_run):
        from test_distributed import assert_same

        assert_same(ranks_run["run"], ranks_run["one"])

