"""One run on several processes (DDP, gloo on the CPU): its results are the one-process run's
within float tolerance, rank 1 writes nothing, a killed run resumes on another number of
processes, and what it cannot do it refuses in one line.

The equality runs use `dist_tiny`, a small conv net without batch-norm registered here: with
batch-norm each rank normalises its own slice (per-rank statistics, as PyTorch's DDP does),
which differs from the global batch's, and SyncBatchNorm (`sync_bn: true`) runs on GPUs only.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from torch import nn

from lambdapipe import atomic, data, distributed, train
from lambdapipe.augment import EpochPlan
from lambdapipe.errors import UserError
from lambdapipe.models.registry import list_models, register_model


def dist_tiny(num_classes: int, image_size: int, width: int = 8) -> nn.Module:
    """A conv net without batch-norm: its step does not depend on how a batch is split."""
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(4 * width, num_classes))


def ensure_dist_tiny() -> None:
    """Registered when a test (or a spawned rank) needs it, never at import: collection would
    otherwise put it in other modules' "every registered model" lists."""
    if "dist_tiny" not in list_models():
        register_model(dist_tiny)

# a hung collective would wait 30 minutes (distributed.TIMEOUT): fail long before that
pytestmark = pytest.mark.timeout(480)
SHORT = {"iterations": 12, "eval_every": 4, "batch_size": 16, "warmup": 0.0}
COMPARED = ("iteration", "lr", "train_loss", "train_acc", "val_loss", "val_acc")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    data.prepare("digits", root)
    return root


def config(data_dir: Path, out: Path, model: str = "dist_tiny", **overrides):
    ensure_dist_tiny()
    return train.TrainConfig.build(model=model, model_args={}, dataset="digits",
                                   data_dir=data_dir, noise="clean", seed=3, out=out,
                                   recipe="demo", overrides={**SHORT, **overrides})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, size: int, port: int, cfg, stop_at: int | None) -> None:
    """One rank of a spawned run (torch.multiprocessing); `stop_at`: rank 0 dies after that
    iteration's checkpoint, as a kill would."""
    torch.set_num_threads(1)
    ensure_dist_tiny()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(size), LOCAL_RANK=str(rank))
    if rank:  # rank 1 must write nothing: any atomic write fails its run
        def refuse(path, *args, **kwargs):
            raise AssertionError(f"rank {rank} wrote {path}")

        atomic.atomic_open = refuse
    whole_batch = train.augmented_batch

    def sliced(data, plan, step, batch_size):  # each rank steps on its slice alone
        assert batch_size == cfg.recipe.batch_size // size
        return whole_batch(data, plan, step, batch_size)

    train.augmented_batch = sliced

    def stop(row):
        if row["iteration"] == stop_at:
            raise RuntimeError("killed")

    world = distributed.from_env()
    with distributed.joined(world, "cpu") as dev:
        train.run(cfg, dev, callback=stop if stop_at else None)


def run_on(n: int, cfg, stop_at: int | None = None) -> None:
    """`cfg` trained on `n` processes (1: in this process, no process group)."""
    if n == 1:
        def stop(row):
            if row["iteration"] == stop_at:
                raise KeyboardInterrupt("killed")
        train.run(cfg, "cpu", callback=stop if stop_at else None)
        return
    torch.multiprocessing.spawn(_rank, args=(n, free_port(), cfg, stop_at), nprocs=n)


def rows(out: Path) -> list[dict[str, float]]:
    with open(out / "metrics.csv") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def assert_same(a: Path, b: Path, tol: float = 2e-4) -> None:
    ra, rb = rows(a), rows(b)
    assert len(ra) == len(rb) == SHORT["iterations"] // SHORT["eval_every"]
    for x, y in zip(ra, rb, strict=True):
        for key in COMPARED:
            assert x[key] == pytest.approx(y[key], abs=tol), (key, x, y)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for key in ("val_acc", "tst_acc", "iterations", "best_iteration"):
        assert sa[key] == pytest.approx(sb[key], abs=tol), key


# --------------------------------------------------------------------------- units
def test_world_from_torchrun_and_srun_variables():
    assert distributed.from_env({}) == distributed.World()
    assert distributed.from_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == \
        distributed.World(1, 4, 1)
    srun = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1"}
    assert distributed.from_env(srun) == distributed.World(5, 8, 1)
    # a batch script's one process (no srun step) is not a rank
    assert distributed.from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}).size == 1
    with pytest.raises(UserError, match="invalid RANK 4"):
        distributed.from_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_each_rank_claims_a_free_gpu_or_its_slurm_gpu():
    w = distributed.World(1, 4, 1)
    assert distributed.rank_device(w, "cpu", {}) == "cpu"
    assert distributed.rank_device(w, "cuda", {}) == "cuda"  # a free one, by the lock files
    assert distributed.rank_device(w, "auto", {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}) == "auto"
    slurm = {"SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    assert distributed.rank_device(w, "cuda", slurm) == "cuda:1"  # --gpus-per-node
    one = {"SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": "2"}
    assert distributed.rank_device(w, "cuda", one) == "cuda"  # --gpus-per-task=1
    with pytest.raises(UserError, match="invalid --device cuda:1 on 4 processes"):
        distributed.rank_device(w, "cuda:1", {})


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"batch_size": 30}, "invalid batch_size 30 on 4 processes"),
    ({"drop_last": False}, "invalid drop_last false on 4 processes"),
    ({"compile_mode": "reduce-overhead"}, "invalid compile reduce-overhead"),
    ({"compile_mode": "step-graph"}, "invalid compile step-graph"),
    ({"seeds": 3}, "invalid --seeds on 4 processes"),
])
def test_what_several_processes_refuse(kwargs, match):
    args = {"batch_size": 32, "drop_last": True, "compile_mode": "auto", "seeds": 1, **kwargs}
    with pytest.raises(UserError, match=match):
        distributed.check(distributed.World(0, 4), **args)
    distributed.check(distributed.World(0, 1), **args)  # one process: nothing to refuse


def test_ranks_slices_make_up_the_one_process_batches():
    n, b = 50, 8  # 6 full batches, 2 images left over (drop_last)
    plan = EpochPlan(torch.randperm(n), torch.arange(n), torch.arange(n) % 3,
                     torch.arange(n) % 2 == 0)
    parts = [distributed.shard_plan(plan, b, distributed.World(r, 4)) for r in range(4)]
    for step in range(n // b):
        whole = plan.order[step * b:(step + 1) * b]
        sliced = torch.cat([p.order[step * 2:(step + 1) * 2] for p in parts])
        assert torch.equal(whole, sliced)
        assert torch.equal(torch.cat([p.dy[step * 2:(step + 1) * 2] for p in parts]),
                           plan.dy[step * b:(step + 1) * b])
    assert parts[0].h is None


def test_runtime_records_the_world_and_auto_compile_is_eager_on_several():
    from lambdapipe.recipes import get_recipe
    from lambdapipe.runtime import resolve

    r = get_recipe("sgdm")
    assert resolve(r, "cuda").record()["world_size"] == 1
    rt = resolve(r, "cuda", world=distributed.World(0, 2))
    assert rt.record()["world_size"] == 2 and rt.compile is None and rt.lead
    assert not resolve(r, "cpu", world=distributed.World(1, 2)).lead


# --------------------------------------------------------------------------- runs
def test_two_processes_equal_one_and_rank_one_writes_nothing(data_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_on(1, config(data_dir, one))
    run_on(2, config(data_dir, two))  # rank 1's writes would fail it (`_rank`)
    assert_same(one, two)
    cfg = json.loads((two / "config.json").read_text())
    assert cfg["runtime"]["world_size"] == 2
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())


@pytest.mark.slow  # three spawned runs
def test_killed_run_resumes_on_another_number_of_processes(data_dir, tmp_path):
    whole, broken, broken2 = tmp_path / "whole", tmp_path / "broken", tmp_path / "broken2"
    run_on(1, config(data_dir, whole))
    # rank 0 dies; rank 1 then fails its next collective, and spawn ends both
    with pytest.raises(torch.multiprocessing.ProcessRaisedException,
                       match="killed|Connection closed"):
        run_on(2, config(data_dir, broken), stop_at=8)
    assert not (broken / "summary.json").exists() and len(rows(broken)) == 2
    run_on(1, config(data_dir, broken))  # 2 processes -> 1
    assert_same(whole, broken)
    with pytest.raises(KeyboardInterrupt):
        run_on(1, config(data_dir, broken2), stop_at=4)
    run_on(2, config(data_dir, broken2))  # 1 process -> 2
    assert_same(whole, broken2)


@pytest.mark.slow  # torchrun: two fresh interpreters
def test_torchrun_starts_the_cli_train_command(data_dir, tmp_path):
    """The standard start: torchrun runs `python -m lambdapipe.cli train` on 2 gloo ranks;
    rank 0 alone prints the result; batch-norm (resnet20x1) runs with per-rank statistics;
    each rank claims its own GPU through the lock files (2 fake GPUs: locks real, device cpu)."""
    out, claims = tmp_path / "run", tmp_path / "claims.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--standalone", "-m", "lambdapipe.cli", "train",
           "--model", "resnet20x1", "--model-arg", "base_width=4", "--dataset", "digits",
           "--data-dir", str(data_dir), "--out", str(out), "--recipe", "demo",
           "--device", "auto", "--gpu-lock-dir", str(tmp_path / "locks"), "--no-progress",
           *[f"--set={k}={v}" for k, v in SHORT.items()]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LAMBDAPIPE_FAKE_GPUS": "2",
           "LAMBDAPIPE_GPU_LOG": str(claims)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ok: val_acc=") == 1, proc.stdout
    assert json.loads((out / "config.json").read_text())["runtime"]["world_size"] == 2
    assert json.loads((out / "summary.json").read_text())["iterations"] == 12
    held = [json.loads(line) for line in claims.read_text().splitlines()]
    assert sorted(c["index"] for c in held) == [0, 1]  # two ranks, two GPUs
    bad = subprocess.run([*cmd[:-len(SHORT)], "--set=batch_size=15"], capture_output=True,
                         text=True, timeout=300, env=env)
    assert bad.returncode != 0 and "invalid batch_size 15 on 2 processes" in bad.stderr


def torchrun(out: Path, data_dir: Path, *sets: str) -> list[str]:
    """`lambdapipe train` on 2 gloo ranks under torchrun (resnet20x1: batch-norm per rank)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--standalone", "-m", "lambdapipe.cli", "train",
            "--model", "resnet20x1", "--model-arg", "base_width=4", "--dataset", "digits",
            "--data-dir", str(data_dir), "--out", str(out), "--recipe", "demo",
            "--device", "cpu", "--no-progress", *[f"--set={s}" for s in sets]]


@pytest.mark.slow  # three torchrun runs
def test_torchrun_run_killed_with_sigkill_resumes_exactly(data_dir, tmp_path):
    """The kill loop's case on several processes: SIGKILL to torchrun and both ranks once the
    first evaluation is on disk; the same command resumes and ends as the unbroken run."""
    sets = ("iterations=120", "eval_every=4", "batch_size=16", "warmup=0.0")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    subprocess.run(torchrun(whole, data_dir, *sets), check=True, capture_output=True,
                   timeout=300, env=env)
    proc = subprocess.Popen(torchrun(broken, data_dir, *sets),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        while not (broken / "metrics.csv").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        # torchrun starts each rank in a session of its own: kill the whole tree at once
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for p in tree:
            p.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        psutil.wait_procs(tree, timeout=60)
    assert (broken / "last.ckpt").exists() and not (broken / "summary.json").exists()
    done = subprocess.run(torchrun(broken, data_dir, *sets), capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = rows(whole), rows(broken)
    assert len(a) == len(b) == 30
    for x, y in zip(a, b, strict=True):
        for key in COMPARED:
            assert x[key] == pytest.approx(y[key], abs=2e-4), (key, x, y)


def test_gpu_bench_multi_gpu_part_is_skipped_without_two_gpus(tmp_path):
    """scripts/gpu-bench.sh's multi-GPU part must not fail on a machine with fewer GPUs."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "LAMBDAPIPE_BENCH_DEVICE": "cpu",
           "LAMBDAPIPE_BENCH_OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", str(root / "scripts" / "gpu-bench.sh"), "multi-gpu"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "multi-gpu skipped: 0 CUDA GPUs here" in done.stderr
    assert not (tmp_path / "out" / "multi-gpu.json").exists()


# --------------------------------------------------------------------------- the workflow
def demo_config(**train_fields) -> dict:
    import yaml

    root = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((root / "config" / "demo.yaml").read_text())
    cfg["train"] = {**cfg["train"], **train_fields}
    return cfg


@pytest.mark.parametrize(("fields", "match"), [
    ({"gpus": 3}, "grids\\[0\\].set: invalid batch_size 64 on 3 processes"),
    ({"gpus": 2, "pack": "seeds"}, "train.gpus 2 with train.pack seeds"),
])
def test_config_refuses_what_runs_on_several_gpus_cannot_do(fields, match):
    from lambdapipe.config import check_config, expand_runs

    with pytest.raises(UserError, match=match):
        expand_runs(check_config(demo_config(**fields)))
    assert len(expand_runs(check_config(demo_config(gpus=2)))) == 8


@pytest.mark.slow  # two Snakemake dry runs
def test_workflow_starts_runs_on_several_gpus_with_torchrun(tmp_path):
    """`train: {gpus: 2}`: each train job takes 2 gpu tokens and runs under torchrun; a
    machine given fewer tokens than a run's GPUs stops the workflow in one line."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(demo_config(gpus=2, device="auto")))
    base = [sys.executable, "-m", "snakemake", "-s", str(root / "workflow" / "Snakefile"),
            "-d", str(tmp_path), "-n", "-p", "--configfile", str(path)]
    dry = subprocess.run([*base, "--resources", "gpu=2"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    trains = [ln for ln in dry.stdout.splitlines()
              if ln.startswith("Shell command: lambdapipe launch --gpus 2 --nodes 1 train ")]
    assert len(trains) == 8  # lambdapipe launch: torchrun here (tests/test_launch.py)
    assert dry.stdout.count("tasks_per_node=2, gres=gpu:2, gpu=2,") == 8
    few = subprocess.run([*base, "--resources", "gpu=1"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert few.returncode != 0
    assert "config train.gpus 2 needs --resources gpu=2 or more (given gpu=1)" in (
        few.stdout + few.stderr)
