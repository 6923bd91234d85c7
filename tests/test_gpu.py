"""GPU claims: exclusive under contention, shared only on request, released by SIGKILL."""

from __future__ import annotations

import json
import os
import signal
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
