"""Shared test setup: `gpu`-marked tests are skipped on machines without CUDA, `killloop`
and `slurm` tests are `slow`; no test leaves a process running, whether it passed, failed or
timed out; tests run in parallel (pytest-xdist) without sharing lock files, caches or
threads. docs/testing.md says why each is so."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import uuid
import warnings
from pathlib import Path

import psutil
import pytest
from filelock import FileLock
from hypothesis import settings

# torch.compile on CPU (inductor) compiles in this process instead of a pool of worker
# processes that would outlive the test that started it (and be killed at its teardown,
# below); with one or two cores per worker a pool gains nothing. Read when torch's inductor
# is first imported, so set before any test imports it.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

# `make test-fast` runs every property test with fewer examples (`--hypothesis-profile
# fast`); `make test`, and pytest without the option, with each test's own count. A test
# that sets its own count takes the smaller: `min(60, settings().max_examples)`.
settings.register_profile("fast", max_examples=15)


@functools.cache
def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _scope(item) -> str:
    """pytest-xdist's `--dist loadscope` work unit of a test: its class if it has one, else
    its module (xdist splits the node id at its last `::` the same way)."""
    return item.nodeid.rsplit("::", 1)[0]


# Rough seconds of a test on a 2-core machine, only to start the longest work first under
# pytest-xdist: `@pytest.mark.cost(seconds)` where a test is much longer than its mark says.
DEFAULT_COST = {"slow": 10.0, "fast": 1.0}


def _cost(item) -> float:
    mark = item.get_closest_marker("cost")
    if mark:
        return float(mark.args[0])
    return DEFAULT_COST["slow" if item.get_closest_marker("slow") else "fast"]


@pytest.hookimpl(wrapper=True)  # around `-m`'s deselection
def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip without CUDA; `killloop` and `slurm` tests are `slow` too (so
    `-m "not slow"` leaves them out without each file saying so twice).

    Under pytest-xdist, `make test` hands out whole work units (`--dist loadscope`: a
    module, or a class of one): the tests of a unit share its module- and class-scoped
    fixtures (a trained run, a Snakemake grid, a SLURM cluster), built once on one worker.
    The units go out longest first (their tests' `cost`), so that two long ones run side
    by side on the two workers and the short ones fill in around them, instead of a long
    one starting last and running alone at the end (`--no-loadscope-reorder` keeps this
    order; every worker sorts the same way)."""
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") and not _has_cuda():  # not a param id "gpu"
            item.add_marker(skip)
        if item.get_closest_marker("killloop") or item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.slow)
    result = yield  # `-m` deselects: the costs below are those of what runs
    if os.environ.get("PYTEST_XDIST_WORKER"):
        cost: dict[str, float] = {}
        for item in items:
            cost[_scope(item)] = cost.get(_scope(item), 0.0) + _cost(item)
        order = {s: k for k, s in enumerate(cost)}
        items.sort(key=lambda item: (-cost[_scope(item)], order[_scope(item)]))
    return result


def pytest_collection_finish(session):
    """Under pytest-xdist, each worker's torch (and every process it starts) uses its share
    of the cores: two workers of two intra-op threads each on 2 cores make tiny models'
    steps several times slower. After collection, so that it also overrides the thread
    count a test module sets when imported."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        return
    import torch

    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _no_state_shared_between_runs(tmp_path_factory):
    """The machine-wide places lambdapipe keeps state, per test run and per xdist worker:
    the GPU lock files (default: one directory in $TMPDIR for the whole machine, where two
    workers, or two checkouts testing at once, would wait on each other's fake GPUs) and the
    lambda-layer timing cache (default: ~/.cache/lambdapipe, the user's own). Tests that
    need their own set them on top (monkeypatch, or the environment of what they start);
    every process a test starts inherits these."""
    # multiprocessing's resource tracker is one process for this process's lifetime: started
    # here, it is not the child of the first test that spawns a process (test_bench), which
    # would kill it at its teardown.
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    root = tmp_path_factory.mktemp("machine-state")  # per worker under xdist
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAMBDAPIPE_GPU_LOCK_DIR", str(root / "gpu-locks"))
        yield


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory):
    """`shared_dir(name, build)`: the directory `name`, built by `build(path)` once per test
    run and shared by every pytest-xdist worker, for what several modules or work units
    need and is costly to make (a trained reference run, a finished grid). The first worker
    to ask builds it under a file lock; the others wait for it and read it. Its users only
    read it: what a test writes goes to its own tmp_path.

    Under xdist each worker's basetemp is `<run's basetemp>/popen-gwN`, so their parent is
    the run's own directory, and the next run never sees this one's builds. A build that
    raised leaves no `.done`: the next asker builds again (and fails in its own test)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    root = root / "shared"
    root.mkdir(exist_ok=True)

    def get(name: str, build) -> Path:
        path = root / name
        with FileLock(root / f"{name}.lock"):
            if not (root / f"{name}.done").exists():
                if path.exists():
                    shutil.rmtree(path)
                build(path)
                (root / f"{name}.done").touch()
        return path

    return get


@pytest.fixture(scope="session")
def fork_server():
    """tests/forkserver.py's fork server, one per pytest-xdist worker, started when a test
    first asks for it: Snakemake run with `fork_server.env()` runs each rule's `python -m
    lambdapipe` as a child forked from it, without a fresh interpreter's ~4 CPU-s of
    imports (docs/testing.md says which end-to-end runs use it and which do not)."""
    from forkserver import ForkServer

    server = ForkServer()
    yield server
    server.close()


@pytest.fixture
def crash_at_write(monkeypatch):
    """`crash_at_write(n)`: the n-th atomic write_text/write_bytes from now raises
    KeyboardInterrupt, as a kill between two renames would stop the process there."""
    from lambdapipe import atomic

    def arm(crash_at: int) -> None:
        calls = {"n": 0}

        def counted(real):
            def write(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == crash_at:
                    raise KeyboardInterrupt("killed")
                return real(*args, **kwargs)
            return write

        monkeypatch.setattr(atomic, "write_text", counted(atomic.write_text))
        monkeypatch.setattr(atomic, "write_bytes", counted(atomic.write_bytes))

    return arm


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    the suite shares 2 cores with other jobs, and oversubscribed threads make a tiny model's
    step several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Every process a test starts inherits this variable (with the test's own value), so the
# test's teardown finds what it started even after a parent died and the orphan was
# re-parented to init, or when it runs in a new session (start_new_session=True).
TEST_TAG = "LAMBDAPIPE_TEST_TAG"


def _tagged(proc: psutil.Process, tag: str) -> bool:
    try:
        return proc.environ().get(TEST_TAG) == tag
    except (psutil.Error, OSError):  # gone, a zombie, or not ours to read
        return False


def _started_since(before: set[int], me: int, tag: str) -> dict[int, psutil.Process]:
    """The processes not in `before` that are children of `me` or their descendants, or
    that carry `tag`."""
    new = {p.pid: p for p in psutil.process_iter() if p.pid not in before and p.pid != me}
    parent = {}
    for pid, proc in new.items():
        with contextlib.suppress(psutil.Error):
            parent[pid] = proc.ppid()
    ours, grew = {me}, True
    while grew:  # children, then their children, ...
        grew = False
        for pid in new:
            if pid not in ours and parent.get(pid) in ours:
                ours.add(pid)
                grew = True
    return {pid: proc for pid, proc in new.items() if pid in ours or _tagged(proc, tag)}


@pytest.fixture(autouse=True)
def _kill_what_the_test_started():
    """Kill, pass or fail, every process the test started and left running: the children of
    this process that were not there before (and their descendants), and any process that
    carries this test's tag. A timed-out test (pytest-timeout) then leaves nothing behind
    to load the machine for the tests after it. A process left running by a test that
    passed is also reported as a warning: the test should have stopped it itself.

    Children that module- or session-scoped fixtures started (set up before this fixture:
    pytest sets up wider scopes first) and what they spawn later are left alone."""
    me = psutil.Process()
    # Every process there now: what the test starts has a pid not among them. Reading only
    # the new ones at teardown (not every process's parent and environment: ~15 ms a test
    # on a busy machine) finds the same ones.
    before = set(psutil.pids())
    tag = f"{os.getpid()}-{uuid.uuid4().hex}"
    previous = os.environ.get(TEST_TAG)
    os.environ[TEST_TAG] = tag
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(TEST_TAG, None)
        else:
            os.environ[TEST_TAG] = previous
        left = _started_since(before, me.pid, tag)
        running = []
        for proc in left.values():
            with contextlib.suppress(psutil.Error):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    running.append(f"{proc.pid} {' '.join(proc.cmdline())[:200]}")
                proc.kill()
        psutil.wait_procs(list(left.values()), timeout=30)
        if running:
            warnings.warn("killed what the test left running: " + "; ".join(running),
                          stacklevel=1)
