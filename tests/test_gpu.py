"""GPU claims: exclusive under contention, shared only on request, released by SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict

import pytest

from lambdapipe import gpu
from lambdapipe.errors import UserError

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
    env, _ = fake_env
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    proc = subprocess.run([sys.executable, "-m", "lambdapipe", "evaluate", "--ckpt",
                           str(tmp_path / "x.ckpt"), "--device", "auto", "--gpu-lock-dir",
                           str(dangling)], capture_output=True, text=True, env=env(1))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
