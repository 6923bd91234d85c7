"""The grid on a real (single-node, loopback) SLURM cluster that the test starts itself.

Marked `slurm`; skipped with the reason when slurm-wlm/munge cannot be installed or started
(not root, no apt-get). See tests/slurm_cluster.py for how the cluster is built.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from slurm_cluster import start_or_skip

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = start_or_skip(tmp_path_factory.mktemp("slurm"), gpus=1)
    yield c
    c.stop()


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


def test_scancel_stops_a_running_job(cluster, tmp_path):
    job = cluster.sbatch("-o", str(tmp_path / "sleep.out"), "--wrap", "sleep 120")
    cluster.wait_job(job, states=("RUNNING",))
    cluster.run("scancel", job)
    assert cluster.wait_job(job, timeout_s=30) == "CANCELLED"


def test_requests_the_cluster_cannot_meet_are_refused_at_submission(cluster):
    bad = cluster.run("sbatch", "-p", "nosuchpartition", "--wrap", "true", check=False)
    assert bad.returncode != 0 and "invalid partition" in bad.stderr.lower()
    greedy = cluster.run("sbatch", f"--gres=gpu:{cluster.gpus + 1}", "--wrap", "true",
                         check=False)
    assert greedy.returncode != 0


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
