"""Nothing lost, nothing trusted blindly: a full disk, corrupted and hostile inputs, an
interrupted and a contended Snakemake grid, and a diverging run inside a grid.

The SIGKILL loop over `lambdapipe train` is tests/test_killloop.py, random configs and CLI
arguments tests/test_config_fuzz.py; docs/reliability.md maps every guarantee to its test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from lambdapipe import data, train
from lambdapipe.cli import main
from lambdapipe.errors import UserError
from lambdapipe.evaluate import load_checkpoint, save_checkpoint, sidecar

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--set", "iterations=12", "--set", "eval_every=3", "--set", "batch_size=32"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    data.prepare("digits", root, progress=False)
    return root


def train_args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", "resnet20x1", "--model-arg", "base_width=4", "--dataset",
            "digits", "--data-dir", str(data_dir), "--out", str(out), "--recipe", "demo",
            *SHORT, "--device", "cpu", "--no-progress", *extra]


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def one_line_error(result, code: int = 2) -> str:
    """The CLI failed with `code`, no traceback, and its last line is the error."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: "), result.output
    return last


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def interrupted(data_dir, tmp_path_factory) -> Path:
    """A run stopped after its second evaluation: last.ckpt at iteration 6, no summary."""
    out = tmp_path_factory.mktemp("runs") / "interrupted"
    cfg = train.TrainConfig.build(model="resnet20x1", model_args={"base_width": 4},
                                  dataset="digits", data_dir=data_dir, noise="clean", seed=0,
                                  out=out, recipe="demo",
                                  overrides={"iterations": 12, "eval_every": 3,
                                             "batch_size": 32})

    def stop(row):
        if row["iteration"] == 6:
            raise Interrupt

    with pytest.raises(Interrupt):
        train.run(cfg, callback=stop)
    assert load_checkpoint(out / "last.ckpt")["iteration"] == 6
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)  # files and the dvclive/ curves
    return dst


# --------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("crash_at", [1, 2, 3])
def test_first_checkpoint_is_never_without_its_digest(tmp_path, monkeypatch, crash_at_write,
                                                     crash_at):
    """Regression (found by the kill loop): a kill right after the FIRST last.ckpt rename
    left it without a sidecar, and every resume refused it as corrupted."""
    path = tmp_path / "last.ckpt"
    crash_at_write(crash_at)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"config": {}, "model": {"w": torch.ones(2)}}, path)
    monkeypatch.undo()
    if path.exists():  # renamed into place: its digest is already in the sidecar
        assert load_checkpoint(path, check=False)["model"]["w"].tolist() == [1.0, 1.0]
    else:  # a sidecar without its file reads as "no checkpoint": training starts afresh
        with pytest.raises(UserError, match="does not exist"):
            load_checkpoint(path, check=False)


# --------------------------------------------------------------------------- disk full
FSIZE_RUNNER = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from lambdapipe.cli import main
sys.exit(main(prog_name="lambdapipe"))
"""


def _try_tmpfs(mountpoint: Path, size: int) -> bool:
    mountpoint.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                          str(mountpoint)], capture_output=True)
    return res.returncode == 0


@pytest.mark.parametrize("method", ["tmpfs", "rlimit_fsize"])
def test_disk_full_is_one_line_and_the_previous_checkpoint_stays_loadable(
        interrupted, data_dir, tmp_path, method):
    """A tmpfs with room for the run plus half a checkpoint (ENOSPC); where the container
    forbids mount, only RLIMIT_FSIZE (EFBIG on any file grown past the limit) runs."""
    ckpt_bytes = (interrupted / "last.ckpt").stat().st_size
    used = sum(p.stat().st_size for p in interrupted.iterdir())
    mnt = tmp_path / "small"
    if method == "tmpfs" and not (os.geteuid() == 0 and _try_tmpfs(
            mnt, (used + ckpt_bytes // 2) // 4096 * 4096 + 4 * 4096)):
        pytest.skip("mount -t tmpfs is not permitted here")
    try:
        out = copy_run(interrupted, (mnt if method == "tmpfs" else tmp_path) / "run")
        before = (out / "last.ckpt").read_bytes()
        args = train_args(data_dir, out)[1:]
        if method == "tmpfs":
            cmd = [sys.executable, "-m", "lambdapipe.cli", "train", *args]
        else:
            cmd = [sys.executable, "-c", FSIZE_RUNNER, str(ckpt_bytes // 2), "train", *args]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 1, res.stderr[-2000:]
        assert "Traceback" not in res.stderr
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith("Error: ") and "cannot write" in last and "ckpt" in last, last
        assert ("No space left" if method == "tmpfs" else "File too large") in last
        assert (out / "last.ckpt").read_bytes() == before
        assert load_checkpoint(out / "last.ckpt")["iteration"] == 6
        assert not (out / "summary.json").exists()
        assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    finally:
        if method == "tmpfs":
            subprocess.run(["umount", str(mnt)], check=False)


# --------------------------------------------------------------------------- corrupt inputs
@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_damaged_checkpoint_is_reported_on_resume_and_on_evaluate(
        interrupted, data_dir, tmp_path, damage):
    out = copy_run(interrupted, tmp_path / "run")
    raw = (out / "last.ckpt").read_bytes()
    if damage == "truncate":
        raw = raw[: len(raw) // 3]
    else:
        raw = bytearray(raw)
        raw[len(raw) // 2] ^= 0x10
        raw = bytes(raw)
    (out / "last.ckpt").write_bytes(raw)
    line = one_line_error(cli(*train_args(data_dir, out)), code=1)
    assert "corrupted checkpoint" in line and "last.ckpt" in line
    assert not (out / "summary.json").exists()
    line = one_line_error(cli("evaluate", "--ckpt", str(out / "last.ckpt"), "--data-dir",
                              str(data_dir), "--device", "cpu"), code=1)
    assert "corrupted checkpoint" in line
    assert not (out / "eval_test.json").exists()


def test_corrupted_prepared_array_stops_training_before_it_starts(tmp_path):
    root = tmp_path / "data"
    target = data.prepare("digits", root, progress=False)
    arr = np.load(target / "train_images.npy")
    arr[5, 3, 3, 1] ^= 0x01  # one bit of one pixel
    np.save(target / "train_images.npy", arr)
    out = tmp_path / "run"
    line = one_line_error(cli(*train_args(root, out)), code=1)
    assert "corrupted prepared array" in line and "train_images.npy" in line
    assert not out.exists()


# --------------------------------------------------------------------------- untrusted files
class WritesMarker:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoint_that_runs_code_is_refused(interrupted, data_dir, tmp_path):
    """An attacker can also write a matching sidecar; weights_only loading still refuses."""
    import hashlib
    import pickle

    marker = tmp_path / "marker"
    assert not marker.exists()
    payload = {"config": {"model": "resnet20x1"}, "model": WritesMarker(marker)}
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        evil = pickle.dumps(payload, protocol=protocol)
        pickle.loads(evil)  # the payload really does run code when loaded blindly ...
        assert marker.exists()
        marker.unlink()

        out = copy_run(interrupted, tmp_path / f"run{protocol}")
        (out / "last.ckpt").write_bytes(evil)
        sidecar(out / "last.ckpt").write_text(
            f"{hashlib.sha256(evil).hexdigest()}  last.ckpt\n")
        line = one_line_error(cli(*train_args(data_dir, out)), code=1)  # ... but not here
        assert "not loadable with torch.load(weights_only=True)" in line
        line = one_line_error(cli("evaluate", "--ckpt", str(out / "last.ckpt"),
                                  "--data-dir", str(data_dir), "--device", "cpu"), code=1)
        assert "weights_only" in line
        assert not marker.exists()


@pytest.mark.parametrize("build", ["hardlink", "device", "fifo"])
def test_tar_hardlinks_and_special_files_refused(tmp_path, build):
    """test_download covers `..`, absolute names and symlinks end to end; these complete it."""
    from lambdapipe.data.download import check_tar_member

    info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
    if build == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, "../../etc/passwd"
    elif build == "device":
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    else:
        info.type = tarfile.FIFOTYPE
    with pytest.raises(UserError, match="refusing archive"):
        check_tar_member(info, tmp_path / "a.tar.gz")


@pytest.mark.parametrize("mode", [0o120777, 0o020644])
def test_zip_symlinks_and_devices_refused(tmp_path, mode):
    from lambdapipe.data.download import check_zip_member

    info = zipfile.ZipInfo("tiny-imagenet-200/wnids.txt")
    info.external_attr = mode << 16
    with pytest.raises(UserError, match="is a link or device file"):
        check_zip_member(info, tmp_path / "a.zip")


@pytest.mark.parametrize("url", [
    "http://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "ftp://example.com/cifar-10-python.tar.gz",
    "file:///etc/passwd",
    "http://127.0.0.1.example.com/cifar-10-python.tar.gz",
    "http://localhost.example.com/cifar-10-python.tar.gz",
    "https:///no-host",
])
def test_downloads_only_over_https_or_loopback(tmp_path, url):
    line = one_line_error(cli("download", "--dataset", "cifar10", "--data-dir",
                              str(tmp_path), "--url", url))
    assert "expected https://" in line
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- the grid
def grid_config(tmp_path: Path) -> Path:
    """Three tiny runs, plus one with lr=1e8 in its own grid: it must diverge alone."""
    tiny = {"iterations": 12, "eval_every": 3, "batch_size": 32}
    cfg = {
        "train": {"threads": 1, "mem_mb": 1000, "runtime": 10, "device": "cpu"},
        "datasets": {"digits": {"prepare": {"split_seed": 0}, "grids": [
            {"name": "tiny", "models": ["resnet20x1"], "model_args": {"base_width": 4},
             "noise": [{"kind": "symmetric", "rates": [0]}], "seeds": [0, 1, 2],
             "recipe": "demo", "set": tiny},
            {"name": "nan", "models": ["resnet32x1"], "model_args": {"base_width": 4},
             "noise": [{"kind": "symmetric", "rates": [0]}], "seeds": [0], "recipe": "demo",
             "set": {**tiny, "lr": 1e8, "warmup": 0}},
        ]}},
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def snakemake_cmd(work: Path, configfile: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(ROOT / "workflow" / "Snakefile"),
            "-d", str(work), "--cores", "2", "--configfile", str(configfile), *extra]


def summaries(work: Path) -> dict[str, tuple[bytes, int, bool]]:
    """{run: (bytes, mtime_ns, protected)}; protected = Snakemake saw the job finish."""
    out = {}
    for p in (work / "results" / "runs").glob("*/*/*/*/summary.json"):
        st = p.stat()
        out[str(p.parent.relative_to(work))] = (p.read_bytes(), st.st_mtime_ns,
                                                not st.st_mode & 0o222)
    return out


@pytest.mark.slow
@pytest.mark.cost(70)
@pytest.mark.parametrize("sig", [signal.SIGKILL])
def test_interrupted_grid_reruns_only_missing_jobs_and_a_second_snakemake_is_refused(
        tmp_path, sig, record_property):
    work = tmp_path / "work"
    work.mkdir()
    configfile = grid_config(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(snakemake_cmd(work, configfile), cwd=work, env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:  # kill the whole group once one run is finished and another is mid-training
        while time.monotonic() < deadline:
            done = [k for k, v in summaries(work).items() if v[2]]
            started = list((work / "results" / "runs").glob("*/*/*/*/config.json"))
            if done and len(started) > len(summaries(work)):
                break
            assert proc.poll() is None, "the grid finished before it could be interrupted"
            time.sleep(0.1)
        else:
            pytest.fail("no finished run within 300 s")
    finally:
        os.killpg(proc.pid, sig)
        proc.wait()
    before = summaries(work)
    finished = {k: v for k, v in before.items() if v[2]}
    partial = [p.parent for p in (work / "results" / "runs").glob("*/*/*/*/config.json")
               if str(p.parent.relative_to(work)) not in finished]
    assert finished and partial
    record_property("finished_at_kill", len(finished))
    record_property("partial_at_kill", len(partial))

    # SIGKILL leaves Snakemake's lock behind: --unlock is the documented recovery.
    subprocess.run(snakemake_cmd(work, configfile, "--unlock"), cwd=work, env=env,
                   capture_output=True, check=True, timeout=300)
    first = subprocess.Popen(snakemake_cmd(work, configfile, "--rerun-incomplete"), cwd=work,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    locks = work / ".snakemake" / "locks"
    while not (locks.is_dir() and any(locks.iterdir())) and first.poll() is None:
        time.sleep(0.05)
    second = subprocess.run(snakemake_cmd(work, configfile), cwd=work, env=env,
                            capture_output=True, text=True, timeout=300)
    log, _ = first.communicate(timeout=600)
    assert second.returncode != 0
    assert "cannot be locked" in second.stdout + second.stderr
    assert first.returncode == 0, log[-4000:]

    after = summaries(work)
    assert len(after) == 4 and all(v[2] for v in after.values())
    for run, (raw, mtime, _) in finished.items():  # finished runs were not retrained
        assert after[run][:2] == (raw, mtime), run
    trained = int(log.split("Job stats:")[1].split("\ntrain ")[1].split()[0])
    assert trained == 4 - len(finished)

    # The diverged run ends as `diverged`, the rest as `ok`, and the report marks it.
    status = {k: json.loads(v[0])["status"] for k, v in after.items()}
    from lambdapipe.config import expand_runs, load_config

    (nan,) = [r for r in expand_runs(load_config(configfile)) if r.model == "resnet32x1"]
    assert nan.path.startswith("digits/clean/resnet32x1-")  # <model>-<fingerprint>
    assert status.pop(f"results/runs/{nan.path}") == "diverged"
    assert set(status.values()) == {"ok"}
    tables = "\n".join(p.read_text() for p in (work / "results").rglob("*.md"))
    assert "diverged@" in tables


# --------------------------------------------------------------------------- one owner
# Test-only hook in front of the CLI: once `run()` holds --out (the lock is taken, nothing
# else written), write HOLD_READY and wait for HOLD_GO before training, so a second command
# meets a first one that is certainly mid-run, on any machine under any load.
HOLD_RUNNER = """
import os, sys, time
from pathlib import Path
from lambdapipe import train
real = train.Run.train
def held(self):
    Path(os.environ["HOLD_READY"]).write_text(str(os.getpid()))
    while not Path(os.environ["HOLD_GO"]).exists():
        time.sleep(0.05)
    return real(self)
train.Run.train = held
from lambdapipe.cli import main
sys.exit(main(prog_name="lambdapipe"))
"""


def start_holder(data_dir: Path, out: Path, tmp_path: Path, *extra: str):
    ready, go = tmp_path / "ready", tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOLD_READY": str(ready),
           "HOLD_GO": str(go)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD_RUNNER,
                             *train_args(data_dir, out, *extra)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 300
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the first train never took --out: {proc.communicate()[0][-3000:]}")
        time.sleep(0.05)
    return proc, go


@pytest.mark.parametrize("second_seed", ["0", "1"], ids=["same-config", "different-config"])
def test_a_run_directory_has_one_owner(data_dir, tmp_path, second_seed):
    """Two trainings on one --out: the second refuses in one line naming the first (pid and
    command) and writes nothing; the first finishes alone. Same config or not."""
    from lambdapipe import runlock

    out = tmp_path / "run"
    first, go = start_holder(data_dir, out, tmp_path, "--seed", "0")
    try:
        assert sorted(p.name for p in out.iterdir()) == [runlock.LOCK_NAME]
        line = one_line_error(cli(*train_args(data_dir, out, "--seed", second_seed)), code=1)
        assert f"--out {out} is in use by pid {first.pid} " in line, line
        assert "train --model resnet20x1" in line and "--seed 0" in line, line
        # Past the probe too (a second process that passed its checks at the same moment):
        with pytest.raises(runlock.RunDirBusy, match=f"pid {first.pid}"), runlock.own(out):
            pass
        assert sorted(p.name for p in out.iterdir()) == [runlock.LOCK_NAME]
    finally:
        go.write_text("")
        log, _ = first.communicate(timeout=600)
    assert first.returncode == 0, log[-3000:]
    assert json.loads((out / "config.json").read_text())["seed"] == 0
    summary = (out / "summary.json").read_bytes()
    assert json.loads(summary)["seed"] == 0
    assert not (out / runlock.LOCK_NAME).exists()  # released with the run
    after = cli(*train_args(data_dir, out, "--seed", second_seed))
    if second_seed == "0":  # now the finished run's summary, not a second training
        assert after.exit_code == 0, after.output
        assert (out / "summary.json").read_bytes() == summary
    else:
        assert "holds a finished run of a different config (seed: 0 -> 1)" in \
            one_line_error(after)


def test_a_sigkilled_owner_leaves_no_stale_lock(data_dir, tmp_path):
    """The kernel drops a dead owner's flock: its lock file (still naming it) does not stop
    the next command, which trains and then removes the file."""
    from lambdapipe import runlock

    out = tmp_path / "run"
    first, _ = start_holder(data_dir, out, tmp_path, "--seed", "0")
    first.kill()
    first.communicate(timeout=60)
    assert json.loads((out / runlock.LOCK_NAME).read_text())["pid"] == first.pid
    result = cli(*train_args(data_dir, out, "--seed", "0"))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["status"] == "ok"
    assert not (out / runlock.LOCK_NAME).exists()


# --------------------------------------------------------------------------- ckpt contents
@contextlib.contextmanager
def memory_cap(headroom: int = 3 << 30):
    """RLIMIT_AS at this process's size plus `headroom` for the duration: an allocation the
    size a hostile checkpoint asks for fails (a traceback the test sees) instead of filling
    the machine. The soft limit goes back up afterwards (the hard one is untouched)."""
    import resource

    size = int(next(line.split()[1] for line in Path("/proc/self/status").read_text()
                    .splitlines() if line.startswith("VmSize:"))) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = size + headroom
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def hostile(case: str, ckpt: dict) -> dict:
    """The checkpoints of issue 17: each loads with weights_only and has a matching sidecar."""
    cfg = ckpt["config"]
    if case == "base_width_4096":  # ~22 GB when built for real
        cfg["model_args"]["base_width"] = 4096
    elif case == "empty":
        return {"config": {}, "model": {}}
    elif case == "precision_evil":
        cfg["recipe"]["precision"] = "evil"
    elif case == "mean_text":
        cfg["data"]["mean"] = "abc"
    elif case == "std_zero":
        cfg["data"]["std"] = [0.0, 1.0, 1.0]
    elif case == "num_classes_1e9":
        cfg["data"]["num_classes"] = 10**9
    elif case == "config_list":
        ckpt["config"] = [1, 2]
    elif case == "weights_not_tensors":
        ckpt["model"] = {"stem.0.weight": [1, 2]}
    elif case == "extra_weight":
        ckpt["model"]["huge"] = torch.zeros(3)
    elif case == "seed_negative":
        cfg["seed"] = -1
    elif case == "model_args_base_width_-8":
        cfg["model_args"]["base_width"] = -8
    return ckpt


HOSTILE = ["base_width_4096", "empty", "precision_evil", "mean_text", "std_zero",
           "num_classes_1e9", "config_list", "weights_not_tensors", "extra_weight",
           "seed_negative", "model_args_base_width_-8"]


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_checkpoint_contents_are_one_line_by_every_route(interrupted, data_dir,
                                                                 tmp_path, case):
    """evaluate, explain and a resume each refuse in one line (exit 1: the file is at fault,
    not the command line), allocate nothing large, and write nothing."""
    out = copy_run(interrupted, tmp_path / "run")
    save_checkpoint(hostile(case, load_checkpoint(out / "last.ckpt")), out / "last.ckpt")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with memory_cap():
        lines = [
            one_line_error(cli("evaluate", "--ckpt", str(out / "last.ckpt"), "--data-dir",
                               str(data_dir), "--device", "cpu"), code=1),
            one_line_error(cli("explain", "--ckpt", str(out / "last.ckpt"), "--data-dir",
                               str(data_dir), "--device", "cpu"), code=1),
            one_line_error(cli(*train_args(data_dir, out)), code=1)]
    for line in lines:
        assert "last.ckpt" in line, line
        assert "invalid run config in checkpoint" in line or "does not fit its model" in line \
            or "belongs to a different config" in line, line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# --------------------------------------------------------------------------- validation first
def test_bad_train_input_writes_nothing(data_dir, tmp_path):
    """Each is one line, and --out (and everything around it) is left as it was."""
    cases = {
        "seed -1": (["--seed", "-1"], "invalid seed -1"),
        "23-digit seed": (["--seed", "1" * 23], "invalid seed 111"),
        "dangling symlink": ([], "a symbolic link to"),
        "a file": ([], "is a file"),  # click's own check
    }
    for name, (extra, needle) in cases.items():
        out = tmp_path / name.replace(" ", "_")
        if name == "dangling symlink":
            out.symlink_to(tmp_path / "nowhere" / "x")
        if name == "a file":
            out.write_text("mine")
        before = sorted(p.name for p in tmp_path.iterdir())
        line = one_line_error(cli(*train_args(data_dir, out, *extra)))
        assert needle in line, (name, line)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, name
        assert not (tmp_path / "nowhere").exists()


def test_out_on_a_read_only_filesystem_is_one_line(interrupted, data_dir, tmp_path):
    """train refuses before it starts (exit 2); evaluate's --out fails at its write (exit 1)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mnt)],
            capture_output=True).returncode != 0:
        pytest.skip("mount -t tmpfs is not permitted here")
    try:
        line = one_line_error(cli(*train_args(data_dir, mnt / "run")))
        assert f"invalid --out '{mnt / 'run'}'" in line and "not writable" in line, line
        line = one_line_error(cli("evaluate", "--ckpt", str(interrupted / "last.ckpt"),
                                  "--data-dir", str(data_dir), "--device", "cpu", "--out",
                                  str(mnt / "sub" / "eval.json")), code=1)
        assert "cannot write" in line and "Read-only file system" in line, line
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.parametrize("case", ["binary", "base_width_-8", "nul_in_mirror", "seed_2**63"])
def test_check_config_refuses_what_train_would_refuse(tmp_path, case):
    cfg = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    grid = cfg["datasets"]["digits"]["grids"][0]
    needle = {"binary": "is not UTF-8 text", "base_width_-8": "invalid base_width -8",
              "nul_in_mirror": "invalid config mirror", "seed_2**63": "invalid seed"}[case]
    path = tmp_path / "config.yaml"
    if case == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    else:
        if case == "base_width_-8":
            grid["model_args"] = {"base_width": -8}
        elif case == "nul_in_mirror":
            cfg["mirror"] = "/shared/arch\x00ives"
        else:
            grid["seeds"] = [0, 2**63]
        path.write_text(yaml.safe_dump(cfg))
    line = one_line_error(cli("check-config", "--configfile", str(path)))
    assert needle in line, line


# --------------------------------------------------------------------------- prepare
PREPARE_FSIZE_RUNNER = FSIZE_RUNNER


@pytest.mark.parametrize("method", ["tmpfs", "rlimit_fsize"])
def test_prepare_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, method):
    """The arrays are memory-mapped: without the space reserved first, the store into a page
    the disk cannot back was SIGBUS (exit 135, no message, the temporary directory left
    filling the disk). Now: exit 1, one line naming the directory and the bytes needed."""
    root = tmp_path / "small"
    if method == "tmpfs":
        if not (os.geteuid() == 0 and _try_tmpfs(root, 300 * 1024)):
            pytest.skip("mount -t tmpfs is not permitted here")
        cmd = [sys.executable, "-m", "lambdapipe.cli"]
    else:  # digits' train_images.npy is ~1 MB
        cmd = [sys.executable, "-c", PREPARE_FSIZE_RUNNER, str(300 * 1024)]
    try:
        res = subprocess.run([*cmd, "prepare", "--dataset", "digits", "--data-dir",
                              str(root)], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 1, (res.returncode, res.stderr[-2000:])
        assert "Traceback" not in res.stderr
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith("Error: ") and "cannot write" in last, last
        assert ("No space left" if method == "tmpfs" else "File too large") in last, last
        assert f"in {root / 'prepared'}" in last and "needs" in last and "bytes" in last, last
        assert sorted(p.name for p in (root / "prepared").iterdir()) == []
    finally:
        if method == "tmpfs":
            subprocess.run(["umount", str(root)], check=False)


# The test sends SIGTERM or SIGINT, so the child sets both to their defaults itself: a shell
# starts background jobs (`make test &`, nohup) with SIGINT ignored, which a child inherits.
PREPARE_HOLD = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
from pathlib import Path
from lambdapipe.data import prepared
real = prepared._save
def slow(path, *args, **kwargs):
    real(path, *args, **kwargs)
    Path(os.environ["HOLD_READY"]).write_text(str(path))
    while True:
        time.sleep(0.05)
prepared._save = slow
from lambdapipe.cli import main
sys.exit(main(prog_name="lambdapipe"))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_prepare_removes_its_temporary_directory_on_sigterm_and_sigint(tmp_path, sig):
    root, ready = tmp_path / "data", tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-c", PREPARE_HOLD, "prepare", "--dataset", "digits", "--data-dir",
         str(root)], env={**os.environ, "OMP_NUM_THREADS": "1", "HOLD_READY": str(ready)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.05)
        written = Path(ready.read_text())
        assert written.parent.name.endswith(".tmp") and written.exists()
        proc.send_signal(sig)
        log, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()  # no-op once it has exited
        proc.wait()
    if sig == signal.SIGTERM:  # dies of the signal, as SLURM and shells expect
        assert proc.returncode == -signal.SIGTERM, log[-2000:]
    else:  # click's KeyboardInterrupt: "Aborted!", exit 1
        assert proc.returncode == 1 and "Aborted!" in log, log[-2000:]
    assert "Traceback" not in log
    assert not written.parent.exists()
    assert sorted(p.name for p in (root / "prepared").iterdir()) == []


def test_prepare_removes_temporaries_whose_owner_is_gone(tmp_path):
    """A SIGKILLed prepare cannot clean up; the next one removes its directory (owner pid
    dead, this host) and leaves a live owner's, another host's and unknown names alone."""
    import socket

    from lambdapipe.data.prepared import _tmp_prefix

    parent = tmp_path / "data" / "prepared"
    parent.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()  # reaped: its pid names no process
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    host = socket.gethostname()
    try:
        dirs = {
            "dead": parent / f".digits.{dead.pid}@{host}.abc123.tmp",
            "alive": parent / f".digits.{alive.pid}@{host}.abc123.tmp",
            "other_host": parent / f".digits.{dead.pid}@elsewhere-{host}.abc123.tmp",
            "unknown": parent / ".digits.q1w2e3r4.tmp",
            "other_dataset": parent / f".cifar10.{dead.pid}@{host}.abc123.tmp",
        }
        for d in dirs.values():
            d.mkdir()
            (d / "train_images.npy").write_bytes(b"x" * 1000)
        assert _tmp_prefix("digits") == f".digits.{os.getpid()}@{host}."
        data.prepare("digits", tmp_path / "data", progress=False)
        assert not dirs["dead"].exists()
        assert all(d.exists() for k, d in dirs.items() if k != "dead")
    finally:
        alive.kill()
        alive.wait()


# --------------------------------------------------------------------------- round three (#28)
def test_an_owner_whose_run_directory_vanished_stops_without_recreating_it(data_dir, tmp_path):
    """Issue 28.3: `rm -rf R` under a running owner; it stops in one line at its next write
    instead of recreating R (where a second owner may have started meanwhile)."""
    from lambdapipe import runlock

    out = tmp_path / "run"
    cfg = train.TrainConfig.build(model="resnet20x1", model_args={"base_width": 4},
                                  dataset="digits", data_dir=data_dir, noise="clean", seed=0,
                                  out=out, recipe="demo",
                                  overrides={"iterations": 12, "eval_every": 3,
                                             "batch_size": 32})

    def remove(row):
        if row["iteration"] == 3:
            shutil.rmtree(out)

    with pytest.raises(runlock.RunDirGone, match="was removed or replaced") as exc:
        train.run(cfg, callback=remove)
    assert "\n" not in str(exc.value)
    assert not out.exists()


def test_a_resume_checks_the_checkpoint_config_itself(interrupted, data_dir, tmp_path):
    """Issue 28.3: a last.ckpt written by another owner after this run's checks (seed 0's,
    into seed 1's directory) is refused at the resume itself, not resumed."""
    out = copy_run(interrupted, tmp_path / "run")
    (out / "config.json").unlink()
    cfg = train.TrainConfig.build(model="resnet20x1", model_args={"base_width": 4},
                                  dataset="digits", data_dir=data_dir, noise="clean", seed=1,
                                  out=out, recipe="demo",
                                  overrides={"iterations": 12, "eval_every": 3,
                                             "batch_size": 32})
    with pytest.raises(UserError, match=r"belongs to a different config \(seed: 0 -> 1\)"):
        train.Run(cfg, "cpu").start()


def tamper(case: str, ckpt: dict) -> dict:
    """Issue 28.4: a checkpoint whose config and weights are fine but whose resume state is
    not (each with a valid sidecar)."""
    opt, state = ckpt["optimizer"], ckpt["state"]
    first = next(iter(opt["state"]))
    if case == "optimizer_empty":
        ckpt["optimizer"] = {}
    elif case == "optimizer_missing":
        del ckpt["optimizer"]
    elif case == "optimizer_lr_text":
        opt["param_groups"][0]["lr"] = "fast"
    elif case == "optimizer_buffer_shape":
        key = next(iter(opt["state"][first]))
        opt["state"][first][key] = torch.zeros(7, 7)
    elif case == "optimizer_extra_param":
        opt["state"][10**6] = {"momentum_buffer": torch.zeros(1)}
    elif case == "rng_missing":
        del ckpt["rng"]
    elif case == "rng_torch_shape":
        ckpt["rng"]["torch"] = torch.zeros(3, dtype=torch.uint8)
    elif case == "rng_python_types":
        ckpt["rng"]["python"] = ["a", "b", "c"]
    elif case == "rng_numpy_extra_key":
        ckpt["rng"]["evil"] = 1
    elif case == "scaler_text":
        ckpt["scaler"] = "x"
    elif case == "state_extra_key":
        state["evil"] = 1
    elif case == "state_iteration_negative":
        state["iteration"] = ckpt["iteration"] = -1
    elif case == "state_iteration_huge":
        state["iteration"] = ckpt["iteration"] = 10**15
    elif case == "state_rows_text":
        state["rows"] = ["row"]
    elif case == "state_empty":
        ckpt["state"] = {}
    return ckpt


TAMPERED = ["optimizer_empty", "optimizer_missing", "optimizer_lr_text",
            "optimizer_buffer_shape", "optimizer_extra_param", "rng_missing", "rng_torch_shape",
            "rng_python_types", "rng_numpy_extra_key", "scaler_text", "state_extra_key",
            "state_iteration_negative", "state_iteration_huge", "state_rows_text",
            "state_empty"]


@pytest.mark.parametrize("case", TAMPERED)
def test_a_tampered_resume_state_is_one_line(interrupted, data_dir, tmp_path, case):
    out = copy_run(interrupted, tmp_path / "run")
    save_checkpoint(tamper(case, load_checkpoint(out / "last.ckpt")), out / "last.ckpt")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    line = one_line_error(cli(*train_args(data_dir, out)))
    assert "last.ckpt cannot be resumed" in line, line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def _capped_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The CLI in a child under a 4 GiB address-space cap and a timeout: a FIFO that hangs
    it or a read of /dev/zero that fills memory fails the test, not the machine."""
    import resource

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    return subprocess.run([sys.executable, "-m", "lambdapipe", *args], capture_output=True,
                          text=True, timeout=timeout, preexec_fn=cap,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _child_one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode in (1, 2), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: "), proc.stderr[-3000:]
    return last


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "whitespace", "not_utf8", "garbage"])
def test_a_hostile_sidecar_is_one_line_naming_it(interrupted, tmp_path, data_dir, kind):
    """Issue 28.4: a sidecar that is a FIFO (evaluate hung), a link to /dev/zero (an
    unbounded read), whitespace only, not UTF-8, or not `sha256sum` lines."""
    out = copy_run(interrupted, tmp_path / "run")
    side = sidecar(out / "last.ckpt")
    side.unlink()
    if kind == "fifo":
        os.mkfifo(side)
    elif kind == "dev_zero":
        side.symlink_to("/dev/zero")
    elif kind == "whitespace":
        side.write_text("  \n\t\n")
    elif kind == "not_utf8":
        side.write_bytes(b"\xff\xfe" * 40 + b"\n")
    else:
        side.write_text("not a digest at all\n")
    try:
        line = _child_one_line(_capped_cli("evaluate", "--ckpt", str(out / "last.ckpt"),
                                           "--data-dir", str(data_dir), "--device", "cpu"))
    except subprocess.TimeoutExpired:
        pytest.fail(f"evaluate hung on a {kind} sidecar")
    assert "last.ckpt.sha256" in line, line


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "finished"
    result = cli(*train_args(data_dir, out))
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("name,content", [("summary.json", b'{"status": "o'),
                                          ("summary.json", b""),
                                          ("config.json", b"\xff\xfe"),
                                          ("config.json", b"[1, 2]")])
def test_a_truncated_summary_or_config_on_rerun_is_one_line(finished, data_dir, tmp_path,
                                                            name, content):
    out = copy_run(finished, tmp_path / "run")
    (out / name).write_bytes(content)
    line = one_line_error(cli(*train_args(data_dir, out)))
    assert name in line, line


@pytest.mark.parametrize("damage", ["truncated", "not_a_mapping", "no_arrays", "escaping_name",
                                    "classes_short"])
def test_a_corrupt_data_manifest_is_one_line_in_prepare_and_train(data_dir, tmp_path, damage):
    root = tmp_path / "data"
    shutil.copytree(data_dir, root)
    path = root / "prepared" / "digits" / "manifest.json"
    manifest = json.loads(path.read_text())
    if damage == "truncated":
        path.write_text(path.read_text()[:40])
    else:
        if damage == "not_a_mapping":
            manifest = [manifest]
        elif damage == "no_arrays":
            del manifest["arrays"]
        elif damage == "escaping_name":
            manifest["arrays"]["../../../etc/passwd"] = {"sha256": "0" * 64}
        else:
            manifest["classes"] = manifest["classes"][:2]
        path.write_text(json.dumps(manifest))
    for args in (["prepare", "--dataset", "digits", "--data-dir", str(root)],
                 train_args(root, tmp_path / "run")):
        line = one_line_error(cli(*args))
        assert "manifest.json" in line, line
    assert not (tmp_path / "run").exists()


def test_stale_temporaries_of_a_killed_run_are_removed_when_it_resumes(interrupted, data_dir,
                                                                       tmp_path):
    """Issue 28.7: a SIGKILLed train left `.last.ckpt.sha256.*.tmp`, still there after the
    resumed run finished. Our own names (old and new style) go; other names stay."""
    out = copy_run(interrupted, tmp_path / "run")
    ours = [".last.ckpt.sha256.ab12cd_3.tmp", ".metrics.csv.999999@elsewhere.zz99yy88.tmp",
            ".best.ckpt.4194304@" + os.uname().nodename + ".abcdefgh.tmp"]
    others = ["notes.tmp", ".mine.tmp"]
    for name in ours + others:
        (out / name).write_text("x")
    result = cli(*train_args(data_dir, out))
    assert result.exit_code == 0, result.output
    left = {p.name for p in out.iterdir()}
    assert not left & set(ours) and set(others) <= left


def test_a_report_removes_the_temporaries_a_killed_report_left(tmp_path):
    """Issue 28.7: killed reports left `curves/.../.*.tsv.*.tmp` that reruns never removed.
    Those of a dead pid on this host go; a live writer's, another host's and other names
    stay."""
    from lambdapipe import atomic
    from lambdapipe.report import build_report

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = os.uname().nodename
    curves = tmp_path / "report" / "curves" / "digits"
    curves.mkdir(parents=True)
    gone = [curves / f".val_acc.tsv.{dead.pid}@{host}.abcdefgh.tmp",
            tmp_path / "report" / f".runs.csv.{dead.pid}@{host}.zz_9yy88.tmp"]
    kept = [curves / f".val_acc.tsv.{os.getppid()}@{host}.abcdefgh.tmp",
            curves / f".val_acc.tsv.{dead.pid}@another-host.abcdefgh.tmp",
            curves / "notes.tmp"]
    for p in gone + kept:
        p.write_text("x")
    (tmp_path / "runs").mkdir()
    with contextlib.suppress(UserError):  # no runs: the cleanup comes first regardless
        build_report(tmp_path / "runs", tmp_path / "report")
    assert not any(p.exists() for p in gone) and all(p.exists() for p in kept)
    # the names atomic writes use carry their owner (seen mid-write)
    seen = []
    with atomic.atomic_open(tmp_path / "x.txt", "w") as fh:
        seen = [p.name for p in tmp_path.glob(".x.txt.*.tmp")]
        fh.write("y")
    assert len(seen) == 1 and seen[0].startswith(f".x.txt.{os.getpid()}@{host}."), seen
