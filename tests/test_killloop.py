"""Kill anywhere: `lambdapipe train` SIGKILLed at random moments, and at random file-system
operations (inside save_checkpoint, the metrics rewrite, the summary), never leaves a torn
file under a final name, and the same command then finishes with the metrics of an
uninterrupted run.

CI runs LAMBDAPIPE_KILL_POINTS (default 20) points; the full loop is
`LAMBDAPIPE_KILL_POINTS=24 pytest -m killloop tests/test_killloop.py -s` (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from forkserver import Command, ForkServer

from lambdapipe import data
from lambdapipe.evaluate import load_checkpoint
from lambdapipe.rundir import METRIC_COLUMNS

TIMING = {"wall_time_s", "session_time_s", "iter_per_min"}
TIMING_COLUMNS = {"images_per_s", "elapsed_s"}

# Test-only instrumentation, installed by `python -c` in front of the CLI (never in the
# package): every os.fsync / os.replace is counted, optionally slowed, and the process
# SIGKILLs itself at operation number KILL_AT_OP; KILL_RENAME_LOG lists each rename's
# operation number and final name. atomic.py fsyncs the temp file, renames
# it, then fsyncs the directory, so an operation index lands before, between or after the
# steps of each atomic write, including the three writes of save_checkpoint.
HOOK_OPS = """
import os, signal, time
_n = [0]
_at = int(os.environ.get("KILL_AT_OP", "0"))
_delay = float(os.environ.get("KILL_WRITE_DELAY", "0"))
_renames = os.environ.get("KILL_RENAME_LOG")
def _wrap(real):
    def op(*args, **kwargs):
        _n[0] += 1
        if _delay:
            time.sleep(_delay)
        if _n[0] == _at:
            os.kill(os.getpid(), signal.SIGKILL)
        if _renames and real is _replace:
            with open(_renames, "a") as fh:
                fh.write(f"{_n[0]} {args[1]}\\n")
        return real(*args, **kwargs)
    return op
_replace = os.replace
os.fsync, os.replace = _wrap(os.fsync), _wrap(os.replace)
"""
HOOK = HOOK_OPS + """
import atexit, sys
if os.environ.get("KILL_COUNT_FILE"):
    atexit.register(lambda: open(os.environ["KILL_COUNT_FILE"], "w").write(str(_n[0])))
from lambdapipe.cli import main
sys.exit(main(prog_name="lambdapipe"))
"""


def train_cmd(data_dir: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", HOOK, "train", "--model", "resnet20x1", "--model-arg",
            "base_width=4", "--dataset", "digits", "--data-dir", str(data_dir), "--out",
            str(out), "--recipe", "demo", "--set", "iterations=12", "--set", "eval_every=3",
            "--set", "batch_size=32", "--device", "cpu", "--deterministic", "--no-progress"]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


def run(cmd: list[str], **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env(**extra), capture_output=True, text=True, timeout=300)


# The long loops' commands run in a fork server: one Python process imports torch and
# lambdapipe once, then forks a child per command, which installs HOOK_OPS and runs the
# CLI's main. Each child is a process of its own, SIGKILLed and rerun like any other, but
# without the ~4 CPU-s of imports a fresh interpreter spends first (40 of them in the
# 20-point loop), so a kill lands in the run itself. The fast tier's 3-point loop keeps fresh
# interpreters (`python -c HOOK`): a kill during start-up and the CLI's own entry stay
# covered, and the fork server's reference run must equal the fresh one (`forked`).
# The server is tests/forkserver.py's, shared with the end-to-end grids. HOOK_OPS counts the
# child's operations; `at_exit` writes the count where the fresh HOOK's atexit does.
FORKED_HOOK = HOOK_OPS + """
def at_exit():
    if os.environ.get("KILL_COUNT_FILE"):
        with open(os.environ["KILL_COUNT_FILE"], "w") as fh:
            fh.write(str(_n[0]))
"""


class Zygote:
    """The fork server's client: `run` and `kill_at` a `train_cmd` in a forked child."""

    def __init__(self, logs: Path):
        self.logs, self.count = logs, 0
        self.server = ForkServer(env())

    def close(self) -> None:
        self.server.close()

    def start(self, cmd: list[str], **extra: str) -> tuple[Command, Path]:
        assert cmd[:3] == [sys.executable, "-c", HOOK], cmd
        self.count += 1
        log = self.logs / f"command-{self.count}.log"
        fd, null = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), os.open(
            os.devnull, os.O_RDONLY)
        try:
            command = self.server.start(cmd[3:], env(**extra), (null, fd, fd),
                                        hook=FORKED_HOOK, check_path=False)
        finally:
            os.close(fd)
            os.close(null)
        return command, log

    def run(self, cmd: list[str], **extra: str) -> subprocess.CompletedProcess:
        command, log = self.start(cmd, **extra)
        code = command.wait(timeout=300)
        assert code is not None, "a command ran past 300 s"
        return subprocess.CompletedProcess(cmd, code, "", log.read_text())

    def kill_at(self, cmd: list[str], kind: str, at: float) -> bool:
        if kind == "op":
            return self.run(cmd, KILL_AT_OP=str(at)).returncode == -signal.SIGKILL
        command, log = self.start(cmd, KILL_WRITE_DELAY="0.05")
        try:  # a pidfd names this very process, never a later one given the same pid
            pidfd = os.pidfd_open(command.pid)
        except ProcessLookupError:  # already finished and reaped
            code = command.wait(timeout=300)
            assert code == 0, log.read_text()[-3000:]
            return False
        try:
            code = command.wait(timeout=at)
            if code is None:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                code = command.wait(timeout=300)
        finally:
            os.close(pidfd)
        assert code in (0, -signal.SIGKILL), f"killed at {at} s: {log.read_text()[-3000:]}"
        return code == -signal.SIGKILL


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    server = Zygote(tmp_path_factory.mktemp("zygote-logs"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def forked(reference, zygote, tmp_path_factory):
    """The unbroken run again, through the fork server with slowed writes, as a time point
    runs: the same summary, metrics and file-system operations as the fresh reference, and
    the seconds of the whole run the loops' time points draw from."""
    root, summary, rows, ops, _ = reference
    out = tmp_path_factory.mktemp("forked") / "reference"
    count = out.parent / "ops"
    start = time.monotonic()
    res = zygote.run(train_cmd(root / "data", out), KILL_WRITE_DELAY="0.05",
                     KILL_COUNT_FILE=str(count))
    seconds = time.monotonic() - start
    assert res.returncode == 0, res.stderr[-3000:]
    assert strip_timing(json.loads((out / "summary.json").read_text())) == strip_timing(summary)
    assert metrics(out) == rows and int(count.read_text()) == ops
    return root, summary, rows, ops, seconds


def metrics(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS}
                for row in csv.DictReader(fh)]


def assert_no_torn_file(out: Path) -> list[str]:
    """Every file under its final name is absent or complete; returns the ones present."""
    present = []
    if (out / "config.json").exists():
        json.loads((out / "config.json").read_text())
        present.append("config.json")
    if (out / "metrics.csv").exists():
        text = (out / "metrics.csv").read_text()
        assert text.endswith("\n")
        with open(out / "metrics.csv", newline="") as fh:
            reader = csv.DictReader(fh)
            assert reader.fieldnames == METRIC_COLUMNS
            rows = list(reader)
        assert rows and all(float(r[c]) == float(r[c]) for r in rows for c in METRIC_COLUMNS)
        assert [int(r["iteration"]) for r in rows] == list(range(3, 3 * len(rows) + 1, 3))
        present.append("metrics.csv")
    for name in ("last.ckpt", "best.ckpt"):
        if (out / name).exists():
            ckpt = load_checkpoint(out / name)  # verifies the sha256 sidecar
            assert ckpt["iteration"] in (3, 6, 9, 12)
            present.append(name)
    if (out / "summary.json").exists():
        assert json.loads((out / "summary.json").read_text())["status"] == "ok"
        present.append("summary.json")
    return present


def _reference_run(root: Path) -> None:
    """The unbroken run every kill point is compared with (`shared_dir`'s build), and how
    many file-system operations and seconds it took."""
    data.prepare("digits", root / "data", progress=False)
    start = time.monotonic()
    res = run(train_cmd(root / "data", root / "reference"), KILL_COUNT_FILE=str(root / "ops"))
    (root / "seconds").write_text(repr(time.monotonic() - start))
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.fixture(scope="module")
def reference(shared_dir):
    """(root, summary, metrics rows, file-system operations, seconds) of the unbroken run in
    root/reference, on the data in root/data: one per test run, shared by this module's
    work units (pytest-xdist), which write their own runs under their tmp_path."""
    root = shared_dir("kill-reference", _reference_run)
    summary = json.loads((root / "reference" / "summary.json").read_text())
    ops = int((root / "ops").read_text())
    assert ops > 12 * 4  # 4 evaluations x (2-3 checkpoint writes + metrics) x 2-3 ops each
    return root, summary, metrics(root / "reference"), ops, float((root / "seconds").read_text())


def kill_at(cmd: list[str], kind: str, at: float) -> bool:
    """Run `cmd` and SIGKILL it at its `at`-th file-system operation ("op") or after `at`
    seconds with slowed writes ("time"); True if the kill landed before it finished."""
    if kind == "op":
        return run(cmd, KILL_AT_OP=str(at)).returncode == -signal.SIGKILL
    proc = subprocess.Popen(cmd, env=env(KILL_WRITE_DELAY="0.05"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=at)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
    return proc.wait() == -signal.SIGKILL


# Each command in a fresh interpreter (`python -c HOOK ...`), as a user starts it.
Fresh = SimpleNamespace(run=run, kill_at=kill_at)


# The fast tier's three points come from their own seed, so they add to the full loop's
# points instead of repeating its first three.
@pytest.mark.cost(35)
@pytest.mark.parametrize("n_points, seed_offset", [pytest.param(3, 1000, id="3-points")])
def test_sigkill_anywhere_then_rerun_equals_an_unbroken_run(reference, record_property, tmp_path,
                                                            n_points, seed_offset):
    kill_loop(reference, Fresh, record_property, tmp_path, n_points, seed_offset)


class TestTheFullKillLoop:
    """The full loop (LAMBDAPIPE_KILL_POINTS points): a pytest-xdist work unit of its own (a
    class), beside the packed and fused loops of this module on the other worker."""

    @pytest.mark.killloop
    @pytest.mark.cost(90)  # 10 time points each run a whole run's slowed writes (~7 s)
    @pytest.mark.parametrize("n_points, seed_offset", [
        pytest.param(int(os.environ.get("LAMBDAPIPE_KILL_POINTS", "20")), 0, id="full")])
    def test_sigkill_anywhere_then_rerun_equals_an_unbroken_run(self, forked, zygote,
                                                                record_property, tmp_path,
                                                                n_points, seed_offset):
        kill_loop(forked, zygote, record_property, tmp_path, n_points, seed_offset)


def kill_loop(reference, launcher, record_property, tmp_path: Path, n_points: int,
              seed_offset: int) -> None:
    """N_POINTS kills of `lambdapipe train` (started by `launcher`: Fresh or the Zygote),
    each run then to its end and compared with the unbroken reference."""
    root, summary, rows, ops, seconds = reference
    rng = random.Random(int(os.environ.get("LAMBDAPIPE_KILL_SEED", "0")) + seed_offset)
    # Half the points kill at a file-system operation (inside the atomic writes), half after
    # a random delay with slowed writes (50 ms per fsync/rename), anywhere in the process.
    points = [("op", rng.randint(1, ops)) if i % 2 == 0 else ("time", rng.uniform(0, seconds))
              for i in range(n_points)]
    tally = {"killed": 0, "finished_before_kill": 0, "resumed_from_checkpoint": 0,
             "kills_inside_checkpoint_writes": 0}
    for i, (kind, at) in enumerate(points):
        out = tmp_path / f"point{i}"
        cmd = train_cmd(root / "data", out)
        killed = launcher.kill_at(cmd, kind, at)
        tally["killed" if killed else "finished_before_kill"] += 1
        present = assert_no_torn_file(out)
        if "last.ckpt" in present and "summary.json" not in present:
            tally["resumed_from_checkpoint"] += 1
        if killed and list(out.glob(".*ckpt*.tmp")):
            tally["kills_inside_checkpoint_writes"] += 1  # a temp file left mid-write

        again = launcher.run(cmd)
        assert again.returncode == 0, f"{kind}={at}: {again.stderr[-3000:]}"
        resumed = json.loads((out / "summary.json").read_text())
        strip = {k: v for k, v in resumed.items() if k not in TIMING}
        assert strip == {k: v for k, v in summary.items() if k not in TIMING}, (kind, at)
        assert metrics(out) == rows, (kind, at)
    tally["points"] = n_points
    print(f"kill loop: {json.dumps(tally)} over {ops} file-system operations per run")
    for k, v in tally.items():
        record_property(k, v)
    assert tally["killed"] >= n_points // 2  # the op-points always kill


# --------------------------------------------------------------------------- packed jobs
SEEDS = (0, 1, 2)


def packed_cmd(data_dir: Path, root: Path) -> list[str]:
    """Three seeds in one `lambdapipe train --seeds --no-fuse` process (one after another),
    --out a template; the fused loops add --fuse (the last flag counts)."""
    return [*train_cmd(data_dir, root / "{seed}"), "--seeds", ",".join(map(str, SEEDS)),
            "--no-fuse"]


@pytest.fixture(scope="module")
def packed_reference(reference, zygote, tmp_path_factory):
    root, work = reference[0], tmp_path_factory.mktemp("packed")
    out = work / "packed-reference"
    renames = work / "packed-renames"
    start = time.monotonic()
    res = zygote.run(packed_cmd(root / "data", out), KILL_COUNT_FILE=str(work / "packed-ops"),
              KILL_RENAME_LOG=str(renames))
    seconds = time.monotonic() - start
    assert res.returncode == 0, res.stderr[-3000:]
    ops = int((work / "packed-ops").read_text())
    # the operation right after seed 0's summary.json took its name: seed 0 finished,
    # seeds 1 and 2 one step from their end
    first_done = next(int(line.split()[0]) + 1 for line in renames.read_text().splitlines()
                      if line.endswith(str(out / "0" / "summary.json")))
    summaries = {s: json.loads((out / str(s) / "summary.json").read_text()) for s in SEEDS}
    return summaries, {s: metrics(out / str(s)) for s in SEEDS}, ops, seconds, first_done


def strip_timing(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in TIMING}


@pytest.mark.killloop
@pytest.mark.cost(40)
def test_sigkill_a_packed_job_then_rerun_resumes_each_seed(reference, packed_reference, zygote,
                                                          record_property, tmp_path):
    root, solo_summary, solo_rows = reference[:3]
    summaries, rows, ops, seconds, first_done = packed_reference
    # Packing changes nothing: seed 0 of the pack is the run trained alone.
    assert strip_timing(summaries[0]) == strip_timing(solo_summary) and rows[0] == solo_rows
    n_points = max(2, int(os.environ.get("LAMBDAPIPE_KILL_POINTS", "20")) // 5)
    rng = random.Random(int(os.environ.get("LAMBDAPIPE_KILL_SEED", "0")) + 1)
    points = [("op", first_done)] + [
        ("op", rng.randint(1, ops)) if i % 2 else ("time", rng.uniform(0, seconds))
        for i in range(1, n_points)]
    tally = {"killed": 0, "seeds_finished_before_rerun": 0, "seeds_resumed": 0}
    for i, (kind, at) in enumerate(points):
        out = tmp_path / f"packed{i}"
        cmd = packed_cmd(root / "data", out)
        killed = zygote.kill_at(cmd, kind, at)
        tally["killed"] += killed
        finished = {}
        for seed in SEEDS:
            present = assert_no_torn_file(out / str(seed))
            path = out / str(seed) / "summary.json"
            if "summary.json" in present:
                finished[seed] = (path.stat().st_mtime_ns, path.read_bytes())
            elif "last.ckpt" in present:
                tally["seeds_resumed"] += 1
        tally["seeds_finished_before_rerun"] += len(finished)
        if i == 0:  # the deliberate point: seed 0 done, the others not
            assert killed and set(finished) == {0}, (kind, at, sorted(finished))

        again = zygote.run(cmd)
        assert again.returncode == 0, f"{kind}={at}: {again.stderr[-3000:]}"
        for seed in SEEDS:
            path = out / str(seed) / "summary.json"
            if seed in finished:  # never rewritten, never touched
                assert (path.stat().st_mtime_ns, path.read_bytes()) == finished[seed]
            assert strip_timing(json.loads(path.read_text())) == strip_timing(summaries[seed])
            assert metrics(out / str(seed)) == rows[seed], (kind, at, seed)
    tally["points"] = n_points
    print(f"packed kill loop: {json.dumps(tally)} over {ops} file-system operations")
    for k, v in tally.items():
        record_property(f"packed_{k}", v)
    assert tally["killed"] >= 1


# --------------------------------------------------------------------------- fused packs
@pytest.fixture(scope="module")
def fused_reference(reference, zygote, tmp_path_factory):
    root, work = reference[0], tmp_path_factory.mktemp("fused")
    out = work / "fused-reference"
    start = time.monotonic()
    res = zygote.run([*packed_cmd(root / "data", out), "--fuse"],
              KILL_COUNT_FILE=str(work / "fused-ops"))
    seconds = time.monotonic() - start
    assert res.returncode == 0, res.stderr[-3000:]
    ops = int((work / "fused-ops").read_text())
    summaries = {s: json.loads((out / str(s) / "summary.json").read_text()) for s in SEEDS}
    assert all(s["compile"] == "eager (fused x3)" for s in summaries.values())
    return summaries, {s: metrics(out / str(s)) for s in SEEDS}, ops, seconds


@pytest.mark.killloop
@pytest.mark.cost(40)
def test_sigkill_a_fused_job_then_rerun_finishes_every_seed(reference, fused_ref_points, zygote,
                                                            record_property, tmp_path):
    """A killed `train --seeds --fuse` job rerun: finished seeds untouched, every other seed
    resumed to the end; bitwise equal to the unbroken job when the kill left the unfinished
    seeds at one iteration (the runs behind otherwise catch up alone: float tolerance)."""
    root = reference[0]
    (summaries, rows, ops, seconds), points = fused_ref_points
    tally = {"killed": 0, "bitwise": 0, "caught_up": 0}
    for i, (kind, at) in enumerate(points):
        out = tmp_path / f"fused{i}"
        cmd = [*packed_cmd(root / "data", out), "--fuse"]
        tally["killed"] += zygote.kill_at(cmd, kind, at)
        finished, at_iteration = {}, set()
        for seed in SEEDS:
            present = assert_no_torn_file(out / str(seed))
            path = out / str(seed) / "summary.json"
            if "summary.json" in present:
                finished[seed] = (path.stat().st_mtime_ns, path.read_bytes())
            else:
                at_iteration.add(int(rows_of(out / str(seed))[-1]["iteration"])
                                 if "last.ckpt" in present else 0)
        again = zygote.run(cmd)
        assert again.returncode == 0, f"{kind}={at}: {again.stderr[-3000:]}"
        same_start = len(at_iteration) <= 1
        tally["bitwise" if same_start else "caught_up"] += 1
        for seed in SEEDS:
            path = out / str(seed) / "summary.json"
            if seed in finished:
                assert (path.stat().st_mtime_ns, path.read_bytes()) == finished[seed]
            summary = json.loads(path.read_text())
            assert summary["status"] == "ok" and summary["iterations"] == 12
            got = metrics(out / str(seed))
            assert [r["iteration"] for r in got] == ["3", "6", "9", "12"], (kind, at, seed)
            if same_start:
                assert strip_timing(summary) == strip_timing(summaries[seed]), (kind, at)
                assert got == rows[seed], (kind, at, seed)
    print(f"fused kill loop: {json.dumps(tally)} over {ops} file-system operations")
    for k, v in tally.items():
        record_property(f"fused_{k}", v)
    assert tally["killed"] >= 1


def rows_of(out: Path) -> list[dict[str, str]]:
    """metrics.csv as the checkpoint left it (a kill may leave it one row short)."""
    from lambdapipe.evaluate import load_checkpoint

    return load_checkpoint(out / "last.ckpt")["state"]["rows"]


@pytest.fixture(scope="module")
def fused_ref_points(fused_reference):
    summaries, rows, ops, seconds = fused_reference
    n_points = max(2, int(os.environ.get("LAMBDAPIPE_KILL_POINTS", "20")) // 5)
    rng = random.Random(int(os.environ.get("LAMBDAPIPE_KILL_SEED", "0")) + 2)
    points = [("op", rng.randint(1, ops)) if i % 2 == 0 else ("time", rng.uniform(0, seconds))
              for i in range(n_points)]
    return fused_reference, points
