"""Packed runs: several seeds trained one after another in one process equal each seed
trained alone (bitwise on CPU with --deterministic, dropout included), a diverged run ends
while the others go on, finished runs are never touched, an interrupted pack resumes every
unfinished run."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lambdapipe import data, train
from lambdapipe.cli import main
from lambdapipe.errors import UserError
from lambdapipe.evaluate import load_checkpoint
from lambdapipe.pack import run_packed
from lambdapipe.step import TrainStep

# Dropout draws from the global torch RNG in forward: packing must not mix the runs' streams.
TINY = {"base_width": 4, "drop_rate": 0.3}
SHORT = {"iterations": 24, "eval_every": 8, "batch_size": 32}
SEEDS = (0, 1, 2)
TIMING = {"elapsed_s", "images_per_s", "wall_time_s", "session_time_s", "iter_per_min"}

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    data.prepare("digits", root, progress=False)
    return root


def config(data_dir: Path, out: Path, seed: int, deterministic: bool = True,
           **overrides) -> train.TrainConfig:
    return train.TrainConfig.build(model="resnet18", model_args=TINY, dataset="digits",
                                   data_dir=data_dir, noise="clean", seed=seed, out=out,
                                   recipe="demo", overrides={**SHORT, **overrides},
                                   deterministic=deterministic)


def metrics_text(out: Path) -> list[dict[str, str]]:
    """metrics.csv as written (strings: equal means byte-equal), timing columns left out."""
    with open(out / "metrics.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(fh)]


def summary(out: Path) -> dict:
    return {k: v for k, v in json.loads((out / "summary.json").read_text()).items()
            if k not in TIMING}


@pytest.fixture(scope="module")
def alone(data_dir, tmp_path_factory) -> Path:
    """Each seed trained on its own, the reference a packed run must equal."""
    root = tmp_path_factory.mktemp("alone")
    for seed in SEEDS:
        train.run(config(data_dir, root / str(seed), seed))
    return root


def assert_equal_to_alone(out: Path, ref: Path) -> None:
    assert metrics_text(out) == metrics_text(ref)
    assert summary(out) == summary(ref)
    a, b = (load_checkpoint(d / "last.ckpt")["model"] for d in (out, ref))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_packed_seeds_equal_each_seed_trained_alone(data_dir, alone, tmp_path):
    rows = []
    cfgs = [config(data_dir, tmp_path / str(seed), seed) for seed in SEEDS]
    before = torch.get_rng_state()
    summaries = run_packed(cfgs, callback=lambda cfg, row: rows.append((cfg.seed, row)))
    assert torch.equal(torch.get_rng_state(), before)  # the process's RNG is given back
    assert [s["seed"] for s in summaries] == list(SEEDS)
    # One after another, in the order given: each run's evaluations, then the next run's.
    assert [seed for seed, _ in rows] == [s for s in SEEDS for _ in range(3)]
    assert [r["iteration"] for _, r in rows] == [8, 16, 24] * 3
    for seed in SEEDS:
        assert_equal_to_alone(tmp_path / str(seed), alone / str(seed))
    # Different seeds really trained differently (dropout and init), so equality means something.
    assert summary(tmp_path / "0")["best_train_loss"] != summary(tmp_path / "1")["best_train_loss"]


def test_interrupted_pack_resumes_unfinished_runs_and_leaves_finished_ones(data_dir, alone,
                                                                          tmp_path):
    # Seed 0 finished before this pack started (copied from its solo run); seed 2 was
    # interrupted alone at its first evaluation; the pack is interrupted in seed 1's second.
    shutil.copytree(alone / "0", tmp_path / "0")
    finished = tmp_path / "0" / "summary.json"
    stamp = (finished.stat().st_mtime_ns, finished.read_bytes())
    cfgs = [config(data_dir, tmp_path / str(seed), seed) for seed in SEEDS]

    def first_eval(row):
        raise Interrupt

    with pytest.raises(Interrupt):
        train.run(cfgs[2], callback=first_eval)

    def stop(cfg, row):
        if cfg.seed == 1 and row["iteration"] == 16:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_packed(cfgs, callback=stop)
    assert load_checkpoint(tmp_path / "1" / "last.ckpt")["iteration"] == 16
    assert load_checkpoint(tmp_path / "2" / "last.ckpt")["iteration"] == 8
    assert not (tmp_path / "1" / "summary.json").exists()
    summaries = run_packed(cfgs)
    assert [s["seed"] for s in summaries] == list(SEEDS)
    assert (finished.stat().st_mtime_ns, finished.read_bytes()) == stamp
    for seed in SEEDS:
        assert_equal_to_alone(tmp_path / str(seed), alone / str(seed))


def test_a_diverged_run_is_finished_while_the_others_go_on(data_dir, alone, tmp_path):
    cfgs = [config(data_dir, tmp_path / "huge-lr", 0, lr=1e8, warmup=0),
            config(data_dir, tmp_path / "1", 1)]
    diverged, ok = run_packed(cfgs)
    assert diverged["status"] == "diverged" and 1 <= diverged["diverged_at"] <= 24
    assert ok["status"] == "ok" and ok["iterations"] == 24
    assert_equal_to_alone(tmp_path / "1", alone / "1")


def test_a_pack_refuses_shared_directories_and_mixed_kernels(data_dir, tmp_path):
    with pytest.raises(UserError, match="given to 2 runs"):
        run_packed([config(data_dir, tmp_path / "x", 0), config(data_dir, tmp_path / "x", 1)])
    with pytest.raises(UserError, match="--deterministic"):
        run_packed([config(data_dir, tmp_path / "a", 0),
                    config(data_dir, tmp_path / "b", 1, deterministic=False)])
    assert not list(tmp_path.iterdir())  # refused before anything was written


# --------------------------------------------------------------------------- the CLI
def cli_args(data_dir: Path, out: str, *extra: str) -> list[str]:
    return ["train", "--model", "resnet18", "--model-arg", "base_width=4", "--model-arg",
            "drop_rate=0.3", "--dataset", "digits", "--data-dir", str(data_dir), "--out", out,
            "--recipe", "demo", "--set", "iterations=24", "--set", "eval_every=8", "--set",
            "batch_size=32", "--device", "cpu", "--deterministic", "--no-progress", *extra]


def test_cli_trains_seeds_together_into_an_out_template(data_dir, alone, tmp_path):
    result = CliRunner().invoke(main, cli_args(data_dir, str(tmp_path / "{seed}"),
                                               "--seeds", "2,0", "--no-fuse"))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split(" -> ")[1] for line in lines if " -> " in line] == [
        str(tmp_path / "2" / "summary.json"), str(tmp_path / "0" / "summary.json")]
    for seed in (0, 2):
        assert_equal_to_alone(tmp_path / str(seed), alone / str(seed))


@pytest.mark.parametrize(("out", "extra", "needle"), [
    ("{tmp}/runs", ("--seeds", "0,1"), "expected a template holding {seed}"),
    ("{tmp}/{seed}", ("--seeds", "0,1", "--seed", "1"), "--seed and --seeds exclude"),
    ("{tmp}/{seed}", ("--seeds", "0,0"), "a seed is repeated"),
    ("{tmp}/{seed}", ("--seeds", "0,x"), "invalid --seeds '0,x'"),
    # seed 1's directory holds another config: refused before seed 0 trains a single step
    ("{tmp}/{seed}", ("--seeds", "0,1"), "holds a interrupted run of a different config"),
], ids=["no-template", "seed-and-seeds", "repeated", "not-integers", "second-seed-bad"])
def test_cli_refuses_a_bad_pack_in_one_line_before_training(data_dir, tmp_path, out, extra,
                                                             needle):
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "config.json").write_text(json.dumps({"model": "resnet34"}))
    result = CliRunner().invoke(main, cli_args(data_dir, out.format(tmp=tmp_path, seed="{seed}"),
                                               *extra))
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and needle in errors[0], result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]


@pytest.mark.gpu
def test_packed_runs_on_cuda_match_alone(data_dir, tmp_path):
    """On a GPU: the seeds of a job, one after another, within run-to-run noise of each
    seed trained alone (GPU kernels are not bitwise reproducible)."""
    kw = {"iterations": 200, "eval_every": 100, "batch_size": 64}
    solo = [train.run(config(data_dir, tmp_path / f"alone{s}", s, False, **kw), device="cuda")
            for s in SEEDS]
    packed = run_packed([config(data_dir, tmp_path / f"packed{s}", s, False, **kw)
                         for s in SEEDS], device="cuda")
    for a, b in zip(solo, packed, strict=True):
        assert a["status"] == b["status"] == "ok"
        assert a["iterations"] == b["iterations"]
        # 200 steps on digits land within a few points of accuracy of each other (chance
        # is 0.1, these reach > 0.8).
        assert b["val_acc"] > 0.8 and abs(a["val_acc"] - b["val_acc"]) < 0.1
        assert abs(a["best_train_loss"] - b["best_train_loss"]) < 0.25


@pytest.mark.gpu
def test_packed_runs_on_cuda_with_cuda_graphs_each_compile_their_own_step(data_dir, tmp_path,
                                                                       monkeypatch):
    """The compiled default path: each run's TrainStep compiles its own model (CUDA graphs
    with reduce-overhead), one run after the other in one process."""
    compiled = []
    real_init = TrainStep.__init__

    def recording(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        compiled.append(self.forward)

    monkeypatch.setattr(TrainStep, "__init__", recording)
    kw = {"iterations": 40, "eval_every": 20, "batch_size": 64, "compile": "reduce-overhead"}
    summaries = run_packed([config(data_dir, tmp_path / str(s), s, False, **kw)
                            for s in (0, 1)], device="cuda")
    assert len({id(f) for f in compiled}) == len(compiled) >= 2  # one compiled step per run
    for s in summaries:
        assert s["status"] == "ok" and s["iterations"] == 40 and s["skipped_steps"] == 0
        assert s["tst_nll"] is not None and s["best_val_loss"] is not None  # finite
