"""Nothing lost, nothing trusted blindly: a full disk, corrupted and hostile inputs, an
interrupted and a contended Snakemake grid, and a diverging run inside a grid.

The SIGKILL loop over `lambdapipe train` is tests/test_killloop.py, random configs and CLI
arguments tests/test_config_fuzz.py; docs/reliability.md maps every guarantee to its test.
"""

from __future__ import annotations

import json
import os
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
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
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
    line = one_line_error(cli(*train_args(data_dir, out)))
    assert "corrupted checkpoint" in line and "last.ckpt" in line
    assert not (out / "summary.json").exists()
    line = one_line_error(cli("evaluate", "--ckpt", str(out / "last.ckpt"), "--data-dir",
                              str(data_dir), "--device", "cpu"))
    assert "corrupted checkpoint" in line
    assert not (out / "eval_test.json").exists()


def test_corrupted_prepared_array_stops_training_before_it_starts(tmp_path):
    root = tmp_path / "data"
    target = data.prepare("digits", root, progress=False)
    arr = np.load(target / "train_images.npy")
    arr[5, 3, 3, 1] ^= 0x01  # one bit of one pixel
    np.save(target / "train_images.npy", arr)
    out = tmp_path / "run"
    line = one_line_error(cli(*train_args(root, out)))
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
        line = one_line_error(cli(*train_args(data_dir, out)))  # ... but not here
        assert "not loadable with torch.load(weights_only=True)" in line
        line = one_line_error(cli("evaluate", "--ckpt", str(out / "last.ckpt"),
                                  "--data-dir", str(data_dir), "--device", "cpu"))
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
    return [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(work),
            "--cores", "2", "--configfile", str(configfile), *extra]


def summaries(work: Path) -> dict[str, tuple[bytes, int, bool]]:
    """{run: (bytes, mtime_ns, protected)}; protected = Snakemake saw the job finish."""
    out = {}
    for p in (work / "results" / "runs").glob("*/*/*/*/summary.json"):
        st = p.stat()
        out[str(p.parent.relative_to(work))] = (p.read_bytes(), st.st_mtime_ns,
                                                not st.st_mode & 0o222)
    return out


@pytest.mark.slow
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
    assert status.pop("results/runs/digits/clean/resnet32x1/0") == "diverged"
    assert set(status.values()) == {"ok"}
    tables = "\n".join(p.read_text() for p in (work / "results").rglob("*.md"))
    assert "diverged@" in tables
