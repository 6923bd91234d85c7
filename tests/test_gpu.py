"""GPU claims: exclusive under contention, shared only on request, released by SIGKILL."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict

import pytest

from lambdapipe import gpu
from lambdapipe.errors import StateError, UserError

HOLDER = """
import sys, time
from pathlib import Path
from lambdapipe import gpu
with gpu.claim("auto", lock_dir=Path(sys.argv[1]), poll_s=0.02) as dev:
    c = gpu.current()
    print("held", dev, c.index, c.slot, flush=True)
    time.sleep(float(sys.argv[2]))
"""


@pytest.fixture
def fake_env(tmp_path, monkeypatch):
    for name in ("SLURM_JOB_ID", "CUDA_VISIBLE_DEVICES", gpu.SLOTS_ENV, gpu.LOCK_DIR_ENV):
        monkeypatch.delenv(name, raising=False)
    log = tmp_path / "claims.jsonl"
    monkeypatch.setenv(gpu.LOG_ENV, str(log))

    def env(n_gpus: int, **extra: str) -> dict[str, str]:
        monkeypatch.setenv(gpu.FAKE_ENV, str(n_gpus))
        return {**os.environ, gpu.FAKE_ENV: str(n_gpus), **extra}

    return env, log


def _claims(log):
    return [json.loads(line) for line in log.read_text().splitlines()]


def _assert_no_overlap(claims, key):
    by_key = defaultdict(list)
    for c in claims:
        by_key[key(c)].append((c["acquired"], c["released"]))
    for k, spans in by_key.items():
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert start >= end, f"two jobs held {k} at once: {spans}"
    return by_key


def test_contention_never_shares_a_device(tmp_path, fake_env):
    env, log = fake_env
    n_gpus, n_jobs = 3, 6
    procs = [subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "locks"), "0.4"],
                              env=env(n_gpus), stdout=subprocess.PIPE, text=True)
             for _ in range(n_jobs)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert all(o.startswith("held cpu") for o in outs)
    claims = _claims(log)
    assert len(claims) == n_jobs
    by_index = _assert_no_overlap(claims, key=lambda c: c["index"])
    assert set(by_index) == set(range(n_gpus))  # every device was used
    assert {c["slot"] for c in claims} == {0}
    # more jobs than devices: someone must have waited for a release
    assert max(len(v) for v in by_index.values()) >= 2


def test_slots_allow_deliberate_sharing(tmp_path, fake_env):
    env, log = fake_env
    procs = [subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "locks"), "0.6"],
                              env=env(1, **{gpu.SLOTS_ENV: "2"}), stdout=subprocess.PIPE,
                              text=True) for _ in range(4)]
    for p in procs:
        p.communicate(timeout=60)
        assert p.returncode == 0
    claims = _claims(log)
    assert {c["index"] for c in claims} == {0}
    assert {c["slot"] for c in claims} == {0, 1}
    _assert_no_overlap(claims, key=lambda c: (c["index"], c["slot"]))
    # two slots on one device: two jobs did overlap in time on that device
    spans = sorted((c["acquired"], c["released"]) for c in claims)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))


def test_sigkilled_holder_releases_its_slot(tmp_path, fake_env):
    env, _ = fake_env
    locks = tmp_path / "locks"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(locks), "120"],
                              env=env(1), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().startswith("held cpu 0 0")
        with pytest.raises(TimeoutError), gpu.claim(lock_dir=locks, poll_s=0.05,
                                                     timeout_s=0.3):
            pass
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
        t0 = time.monotonic()
        with gpu.claim(lock_dir=locks, poll_s=0.05, timeout_s=10) as dev:
            assert dev == "cpu"
            assert gpu.current().index == 0
        assert time.monotonic() - t0 < 5
    finally:
        if holder.poll() is None:
            holder.kill()


def test_explicit_device_waits_for_that_device(tmp_path, fake_env):
    env, _ = fake_env
    env(2)
    locks = tmp_path / "locks"
    with gpu.claim("cuda:1", lock_dir=locks):
        assert gpu.current().index == 1
        # cuda:1 is taken, auto still finds cuda:0
        with gpu.claim("auto", lock_dir=locks, timeout_s=1):
            assert gpu.current().index == 0
        with pytest.raises(TimeoutError), gpu.claim("cuda:1", lock_dir=locks, poll_s=0.05,
                                                    timeout_s=0.2):
            pass
    assert gpu.current() is None


def test_slurm_uses_assigned_device_without_locks(tmp_path, fake_env, monkeypatch):
    env, _ = fake_env
    env(1)
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    locks = tmp_path / "locks"
    with gpu.claim(lock_dir=locks) as dev:
        assert dev == "cpu"  # fake device; a real one would be cuda:0
        assert gpu.current().index == 3 and gpu.current().lock_path is None
    assert not locks.exists()


def test_cpu_and_no_cuda(tmp_path, fake_env):
    env, _ = fake_env
    env(0)
    with gpu.claim("auto", lock_dir=tmp_path / "l") as dev:
        assert dev == "cpu" and gpu.current().lock_path is None
    with gpu.claim("cpu", lock_dir=tmp_path / "l") as dev:
        assert dev == "cpu"
    with pytest.raises(UserError, match="CUDA is not available"), gpu.claim("cuda"):
        pass


def test_a_gpu_asked_for_but_cpu_torch_refuses_in_one_line(tmp_path, fake_env, monkeypatch):
    """A conda env solved on a GPU-less node holds CPU torch: `cuda`, or `auto` in a job
    that was given a GPU, must stop rather than train on the CPU without a word."""
    import torch

    env, _ = fake_env
    env(0)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(gpu, "_gpu_given", lambda: None)
    with gpu.claim("auto", lock_dir=tmp_path / "l") as dev:  # no GPU anywhere: the CPU
        assert dev == "cpu"
    with pytest.raises(StateError, match=r"device 'cuda' requested but torch .* is a CPU "
                                         r"build: install a CUDA build"), gpu.claim("cuda"):
        pass
    monkeypatch.undo()
    env(0)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(StateError, match=r"device 'auto' requested in a job given a GPU "
                                         r"\(CUDA_VISIBLE_DEVICES=3\) but torch .* is a CPU "
                                         r"build.*use --device cpu"), gpu.claim("auto"):
        pass
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a job given none
    assert gpu._gpu_given() is None or "NVIDIA driver" in gpu._gpu_given()


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "cpu:1", "cuda:7"])
def test_bad_device_is_a_user_error(bad, fake_env):
    env, _ = fake_env
    env(2)
    with pytest.raises(UserError, match="invalid device"), gpu.claim(bad):
        pass


def test_bad_slots_env_is_a_user_error(fake_env, monkeypatch):
    env, _ = fake_env
    env(1)
    monkeypatch.setenv(gpu.SLOTS_ENV, "zero")
    with pytest.raises(UserError, match=gpu.SLOTS_ENV), gpu.claim():
        pass


# A job as the workflow starts one: a process that claims, then works (and may start
# processes of its own). It reports what it could reach.
JOB = """
import json, os, subprocess, sys
from pathlib import Path
import torch
from lambdapipe import gpu
before = torch.cuda.is_initialized()
with gpu.claim(sys.argv[2], lock_dir=Path(sys.argv[1]), timeout_s=5) as dev:
    child = subprocess.run([sys.executable, "-c",
                            "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES'))"],
                           capture_output=True, text=True, check=True).stdout.strip()
    print(json.dumps({"device": dev, "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                      "child_visible": child, "initialised_before_claim": before,
                      "initialised_in_claim": torch.cuda.is_initialized(),
                      "claim": gpu.current().record()}))
print(json.dumps({"visible_after": os.environ.get("CUDA_VISIBLE_DEVICES")}))
"""


def _job(locks, device: str, env: dict) -> tuple[dict, dict]:
    res = subprocess.run([sys.executable, "-c", JOB, str(locks), device], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    held, after = (json.loads(line) for line in res.stdout.splitlines()[-2:])
    return held, after


def test_a_claim_of_gpu_2_of_4_reaches_only_that_gpu(tmp_path, fake_env):
    """Two jobs hold GPUs 0 and 1; the third gets GPU 2 and sees only it, before CUDA starts,
    and so do the processes it starts; the variable is the process's again afterwards."""
    env, _ = fake_env
    locks = tmp_path / "locks"
    holders = [subprocess.Popen([sys.executable, "-c", HOLDER, str(locks), "60"], env=env(4),
                                stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        assert sorted(h.stdout.readline().split()[2] for h in holders) == ["0", "1"]
        held, after = _job(locks, "auto", env(4))
    finally:
        for h in holders:
            h.kill()
            h.wait()
    assert held["visible"] == held["child_visible"] == "2"
    assert held["initialised_before_claim"] is False and held["initialised_in_claim"] is False
    assert held["claim"] == {"device": "cpu", "physical_index": 2, "slot": 0,  # fake: cpu
                             "cuda_visible_devices": "2", "parent_cuda_visible_devices": None}
    assert after == {"visible_after": None}


def test_a_given_cuda_visible_devices_is_indexed_into(tmp_path, fake_env):
    """Devices 4-7 given by hand: cuda:2 is the job's third device, physical GPU 6 (and its
    lock file gpu6), shown to the job alone."""
    env, _ = fake_env
    locks = tmp_path / "locks"
    held, after = _job(locks, "cuda:2", env(4, CUDA_VISIBLE_DEVICES="4,5,6,7"))
    assert held["visible"] == held["child_visible"] == "6"
    assert held["claim"]["physical_index"] == 6
    assert held["claim"]["parent_cuda_visible_devices"] == "4,5,6,7"
    assert (locks / "gpu6.slot0.lock").is_file()
    assert after == {"visible_after": "4,5,6,7"}


def test_under_slurm_the_job_sees_the_device_it_asked_for(tmp_path, fake_env):
    env, _ = fake_env
    held, _ = _job(tmp_path / "locks", "cuda:1",
                   env(2, CUDA_VISIBLE_DEVICES="GPU-aaaa,GPU-bbbb", SLURM_JOB_ID="7"))
    assert held["visible"] == held["child_visible"] == "GPU-bbbb"  # UUIDs pass through
    assert held["claim"]["physical_index"] == 1 and held["claim"]["slot"] is None
    assert not (tmp_path / "locks").exists()


def test_a_narrowing_that_does_not_take_effect_is_refused(tmp_path, fake_env, monkeypatch):
    """Real devices whose count does not drop to one under the mask (CUDA started without
    NVML): the job must not run, and its lock is free again."""
    env, _ = fake_env
    monkeypatch.delenv(gpu.FAKE_ENV, raising=False)
    monkeypatch.setattr(gpu, "_cuda_count", lambda: 4)
    locks = tmp_path / "locks"
    with pytest.raises(RuntimeError, match="did not take effect"), gpu.claim(
            "cuda:2", lock_dir=locks):
        pass
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    with gpu.claim("cpu"):  # nothing held, nothing narrowed
        assert gpu.current().visible is None


def test_after_cuda_started_the_claimed_device_is_made_current(tmp_path, fake_env,
                                                              monkeypatch):
    """In a process where CUDA already runs the mask cannot act: the claim hands out cuda:N
    and makes it the current device, so streams, events and graphs follow it."""
    import torch

    env, _ = fake_env
    monkeypatch.delenv(gpu.FAKE_ENV, raising=False)
    monkeypatch.setattr(gpu, "_cuda_count", lambda: 4)
    monkeypatch.setattr(gpu, "_cuda_initialised", lambda: True)
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    with gpu.claim("cuda:2", lock_dir=tmp_path / "locks") as dev:
        assert dev == "cuda:2" and current == ["cuda:2"]
        assert gpu.current().visible is None and gpu.current().index == 2
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


CUDA_JOB = """
import json, sys
from pathlib import Path
import torch
from lambdapipe import gpu
with gpu.claim("auto", lock_dir=Path(sys.argv[1])) as dev:
    x = torch.ones(1, device=dev)
    s = torch.cuda.Stream()
    print(json.dumps({"device": dev, "count": torch.cuda.device_count(),
                      "uuid": str(torch.cuda.get_device_properties(0).uuid),
                      "stream_device": s.device.index, "tensor_device": x.device.index,
                      "index": gpu.current().index}))
"""


@pytest.mark.gpu
def test_on_a_gpu_the_claimed_job_sees_only_its_own_device(tmp_path, monkeypatch):
    """The claim path on real CUDA: with GPU 0's lock taken, the job gets the next GPU (GPU 0
    on a one-GPU machine, whose lock is then left free), sees one device, and its
    new streams are on it: the physical device of the claim, by UUID."""
    import torch

    for name in ("SLURM_JOB_ID", "CUDA_VISIBLE_DEVICES", gpu.FAKE_ENV, gpu.SLOTS_ENV):
        monkeypatch.delenv(name, raising=False)
    locks = tmp_path / "locks"
    locks.mkdir()
    n = torch.cuda.device_count()
    with open(locks / "gpu0.slot0.lock", "w") as held:  # as a job on GPU 0 holds it
        if n > 1:
            fcntl.flock(held, fcntl.LOCK_EX)
        res = subprocess.run([sys.executable, "-c", CUDA_JOB, str(locks)],
                             capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    job = json.loads(res.stdout.splitlines()[-1])
    assert job["device"] == "cuda:0" and job["count"] == 1
    assert job["stream_device"] == job["tensor_device"] == 0
    assert job["index"] == (1 if n > 1 else 0)
    physical = subprocess.run([sys.executable, "-c", "import sys, torch; print(torch.cuda."
                               f"get_device_properties({job['index']}).uuid)"],
                              capture_output=True, text=True, timeout=300, check=True)
    assert physical.stdout.strip() == job["uuid"]


# --------------------------------------------------------------------------- hostile lock files
def _one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_a_planted_link_at_a_lock_file_is_never_followed(tmp_path, fake_env):
    """Issue 28.2: a symlink at gpu0.slot0.lock made a job truncate and overwrite its target."""
    env, _ = fake_env
    env(1)
    locks, victim = tmp_path / "locks", tmp_path / "victim.txt"
    locks.mkdir()
    victim.write_text("precious\n")
    (locks / "gpu0.slot0.lock").symlink_to(victim)
    with pytest.raises(UserError) as exc, gpu.claim("auto", lock_dir=locks):
        pass
    assert "symbolic link" in _one_line(exc) and "gpu0.slot0.lock" in str(exc.value)
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_lock_path_that_is_not_a_file_is_one_line(tmp_path, fake_env, kind):
    env, _ = fake_env
    env(1)
    locks = tmp_path / "locks"
    locks.mkdir()
    target = locks / "gpu0.slot0.lock"
    target.mkdir() if kind == "directory" else os.mkfifo(target)
    with pytest.raises(UserError) as exc, gpu.claim("auto", lock_dir=locks, timeout_s=1):
        pass
    assert "gpu0.slot0.lock" in _one_line(exc)


def test_a_dangling_or_file_lock_dir_is_one_line(tmp_path, fake_env):
    env, _ = fake_env
    env(1)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(UserError, match="does not exist") as exc, \
            gpu.claim("auto", lock_dir=dangling):
        pass
    assert "--gpu-lock-dir" in _one_line(exc) and not (tmp_path / "nowhere").exists()
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(UserError, match="it is a file"), gpu.claim("auto", lock_dir=afile):
        pass


def test_the_lock_dir_is_private_and_another_users_is_refused(tmp_path, fake_env, monkeypatch):
    env, _ = fake_env
    env(1)
    monkeypatch.setattr(gpu.tempfile, "gettempdir", lambda: str(tmp_path))
    with gpu.claim("auto") as dev:
        assert dev == "cpu" and gpu.current().lock_path is not None
    mine = gpu.default_lock_dir()
    assert mine.stat().st_mode & 0o777 == 0o700
    if os.getuid() != 0:
        pytest.skip("chown to another user needs root")
    os.chown(mine, 65534, 65534)
    with pytest.raises(UserError, match="owned by uid 65534") as exc, gpu.claim("auto"):
        pass
    _one_line(exc)
    shutil.rmtree(mine)
    mine.symlink_to(tmp_path)  # a link planted in the shared temp dir
    with pytest.raises(UserError, match="symbolic link in a shared directory"), gpu.claim():
        pass


def test_cli_dangling_gpu_lock_dir_is_one_line(tmp_path, fake_env):
    """In process (click's runner): what is checked is the CLI's handling, a click error
    (SystemExit) with one `Error:` line instead of a traceback, not the process."""
    from click.testing import CliRunner

    from lambdapipe.cli import main

    env, _ = fake_env
    env(1)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    res = CliRunner().invoke(main, ["evaluate", "--ckpt", str(tmp_path / "x.ckpt"), "--device",
                                    "auto", "--gpu-lock-dir", str(dangling)])
    assert res.exit_code != 0 and isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("Error")]
    assert len(errors) == 1 and "--gpu-lock-dir" in errors[0], res.output


def test_a_held_lock_file_names_its_holder_and_is_private(tmp_path, fake_env):
    env, _ = fake_env
    env(1)
    locks = tmp_path / "locks"
    locks.mkdir()
    (locks / "gpu0.slot0.lock").write_text("a dead job's name, longer than ours\n" * 10)
    with gpu.claim("auto", lock_dir=locks):
        path = gpu.current().lock_path
        pid, host, _ = path.read_text().split()
        assert int(pid) == os.getpid() and host == socket.gethostname()
    fresh = tmp_path / "fresh"
    with gpu.claim("auto", lock_dir=fresh):
        assert gpu.current().lock_path.stat().st_mode & 0o777 == 0o600
