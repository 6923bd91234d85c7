"""`lambdapipe bench` on the CPU with tiny widths: it times the training step of train.py,
reports every figure, and refuses bad arguments before any work."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from lambdapipe import bench, bench_table, data
from lambdapipe.cli import main
from lambdapipe.errors import UserError
from lambdapipe.step import TrainStep

TINY = {"base_width": 8}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def test_rows_time_the_training_step_of_train_py(monkeypatch):
    calls = []
    real_call = TrainStep.__call__

    def counting(self, *args, **kwargs):
        calls.append(args[-1])  # the step index
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(TrainStep, "__call__", counting)
    rows = bench.run(["resnet20x1", "resnet18"], dataset="digits", batch_size=8,
                     precision="fp32", warmup=1, steps=2, model_args=TINY, device="cpu")
    assert calls == [0, 1, 2] * 2  # warm-up + timed steps, per model, through TrainStep
    assert [r["model"] for r in rows] == ["resnet20x1", "resnet18"]
    for r in rows:
        assert r["iter_per_min"] > 0 and r["images_per_s"] == pytest.approx(
            r["iter_per_min"] * 8 / 60)
        assert r["step_ms"] == pytest.approx(60_000 / r["iter_per_min"])
        assert r["peak_mem_gib"] is None and r["mfu"] is None  # no GPU, no peak to compare
        assert r["params"] > 0 and r["device"] == "cpu" and not r["diverged"]
        # what else a run pays: start-up beyond steady steps, evaluation, checkpoint writes
        assert r["startup_s"] >= 0 and r["data_s"] > 0 and r["ckpt_s"] > 0
        assert r["eval_images"] == bench.SYNTHETIC_IMAGES and r["eval_images_per_s"] > 0
        assert r["slots"] == 1 and r["iter_per_min_per_slot"] == r["iter_per_min"]
    r20, r18 = rows
    assert r18["vs_resnet18"] == 1.0 and r18["vs_resnet"] is None  # a ResNet has no base
    assert r20["vs_resnet18"] == pytest.approx(r20["images_per_s"] / r18["images_per_s"])


def test_table_json_and_cli(tmp_path):
    rows = bench.run(["resnet20x1"], dataset="digits", batch_size=8, precision="bf16",
                     warmup=0, steps=1, model_args=TINY, device="cpu")
    assert rows[0]["vs_resnet18"] is None  # no ResNet-18 in this run
    table = bench_table.format_rows(rows).splitlines()
    assert table[0].split()[:3] == ["model", "params(M)", "iter/min"]
    assert table[2].startswith("resnet20x1") and "bf16" in table[-1]
    bench_table.write_rows(rows, tmp_path / "b.json")
    written = json.loads((tmp_path / "b.json").read_text())
    assert written["rows"][0]["model"] == "resnet20x1"
    assert written["torch"] == torch.__version__ and written["date"].startswith("20")

    out = tmp_path / "cli.json"
    result = CliRunner().invoke(main, [
        "bench", "--models", "resnet20x1", "--dataset", "digits", "--batch-size", "8",
        "--precision", "fp32", "--warmup", "1", "--steps", "1", "--model-arg", "base_width=8",
        "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "resnet20x1" in result.output and json.loads(out.read_text())["rows"]


def test_impls_times_every_implementation_of_each_lambda_layer(tmp_path):
    """`bench --impls`: each lambda layer alone under every implementation that fits, with
    `*` on the one the device's rule runs (the check of the rule on a GPU)."""
    out = tmp_path / "impls.json"
    result = CliRunner().invoke(main, [
        "bench", "--models", "lr18_l3_lc,resnet20x1", "--impls", "--dataset", "digits",
        "--batch-size", "2", "--precision", "fp32", "--warmup", "0", "--steps", "1",
        "--model-arg", "base_width=4", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["conv", "lambda", "logit"]  # resnet20x1: no layer
    assert all(r["model"] == "lr18_l3_lc" and r["ms"] > 0 for r in rows)
    picked = [line for line in result.output.splitlines() if line.endswith("*")]
    assert len(picked) == 1 and rows[0]["rule"] in picked[0].split()
    refused = CliRunner().invoke(main, ["bench", "--models", "lr18_l3_lc", "--impls",
                                        "--pack", "2", "--device", "cpu"])
    assert refused.exit_code == 2 and "--impls times each lambda layer" in refused.output


def test_real_data_uses_the_prepared_split(tmp_path):
    data.prepare("digits", tmp_path)
    rows = bench.run(["resnet20x1"], dataset="digits", data_dir=tmp_path, real_data=True,
                     batch_size=16, precision="fp32", warmup=1, steps=1, model_args=TINY)
    assert rows[0]["real_data"] is True
    with pytest.raises(UserError, match="at most the 1294 images"):
        bench.run(["resnet20x1"], dataset="digits", data_dir=tmp_path, real_data=True,
                  batch_size=5000, precision="fp32", warmup=0, steps=1, model_args=TINY)


@pytest.mark.parametrize(("args", "needle"), [
    (["--models", "resnet21"], "invalid model 'resnet21'"),
    (["--steps", "0"], "invalid steps 0"),
    (["--batch-size", "0"], "invalid batch size 0"),
    (["--models", ","], "no model to benchmark"),
    (["--slots", "0"], "invalid --slots '0': expected integers >= 1"),
    (["--slots", "two"], "invalid --slots 'two': expected integers >= 1"),
    (["--slots", "1,2"], "one count without --config"),
    (["--config", "config/demo.yaml"], "--config takes models and model args from the config"),
    (["--compile", "fast"], "'fast' is not one of 'auto', 'false', 'true'"),
    (["--pack", "0"], "invalid --pack 0: expected an integer >= 1"),
    (["--pack", "2", "--slots", "2"], "--pack 2 and --slots 2 exclude each other"),
    (["--fuse"], "--fuse times packed runs as one network: give --pack 2 or more"),
])
def test_bad_arguments_are_one_line(args, needle):
    result = CliRunner().invoke(main, ["bench", "--dataset", "digits", "--device", "cpu",
                                       "--models", "resnet20x1", *args])
    assert result.exit_code == 2
    assert needle in result.output.strip().splitlines()[-1]


def test_an_unfused_pack_is_one_run_after_another_beside_one_run(monkeypatch):
    """`--pack 3` without --fuse: training runs the seeds one after another, so the packed
    row is the one-run row's rate shared by three runs, with nothing more timed."""
    calls = []
    real_call = TrainStep.__call__

    def counting(self, *args, **kwargs):
        calls.append((id(self), args[-1]))
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(TrainStep, "__call__", counting)
    rows = bench.run(["resnet20x1"], dataset="digits", batch_size=8, precision="fp32",
                     warmup=1, steps=2, model_args=TINY, device="cpu", pack=3)
    assert [i for _, i in calls] == [0, 1, 2]  # the one-run row only
    one, packed = rows
    assert (one["pack"], packed["pack"], one["vs_one_run"]) == (1, 3, 1.0)
    assert packed["iter_per_min"] == pytest.approx(3 * packed["iter_per_min_per_run"])
    assert packed["images_per_s"] == pytest.approx(packed["iter_per_min"] * 8 / 60)
    assert packed["vs_one_run"] == pytest.approx(packed["iter_per_min"] / one["iter_per_min"])
    assert packed["step_ms"] == pytest.approx(60_000 / packed["iter_per_min_per_run"])
    assert not packed["diverged"] and packed["startup_s"] >= 0
    table = bench_table.format_rows(rows).splitlines()
    assert table[2].split()[0] == "resnet20x1" and table[3].startswith("resnet20x1 x3")
    assert "'x3': that many runs in one process" in table[-1]
    assert packed["vs_one_run"] == 1.0 and not packed["fused"]
    assert f"resnet20x1 {packed['vs_one_run']:.2f}x one run" in table[-1]


def test_fused_pack_times_one_step_for_all_runs(monkeypatch):
    """`--pack 3 --fuse`: after the one-run row, one fused step a round for the three runs
    (no step of their own), as `train --seeds --fuse` trains them."""

    solo, fused = [], []
    real = TrainStep.__call__

    def counting(self, x, y, y_clean, lr, step):
        if self.runs is None:
            solo.append(step)
        else:
            fused.append((tuple(x.shape[:2]), step))
        return real(self, x, y, y_clean, lr, step)

    monkeypatch.setattr(TrainStep, "__call__", counting)
    rows = bench.run(["resnet20x1"], dataset="digits", batch_size=8, precision="fp32",
                     warmup=1, steps=2, model_args=TINY, device="cpu", pack=3, fuse=True)
    assert solo == [0, 1, 2]  # the one-run row only
    assert fused == [((3, 8), 0), ((3, 8), 1), ((3, 8), 2)]
    one, packed = rows
    assert packed["fused"] and packed["path"] == "eager, fused" and not packed["diverged"]
    assert packed["iter_per_min"] == pytest.approx(3 * packed["iter_per_min_per_run"])
    assert bench_table.format_rows(rows).splitlines()[3].startswith("resnet20x1 x3 fused")
    # fp16 is not fused in training (fuse.why_not), so not in the bench either
    half = bench.run(["resnet20x1"], dataset="digits", batch_size=8, precision="fp16",
                     warmup=1, steps=1, model_args=TINY, device="cpu", pack=2, fuse=True)
    assert not half[1]["fused"]


def test_slots_run_in_processes_at_once_and_sum():
    """Two processes share the device; the row is their aggregate (what LAMBDAPIPE_GPU_SLOTS
    buys), and a failing slot is one line, not a hang."""
    from lambdapipe.recipes import get_recipe

    r = get_recipe("demo", {"batch_size": 8})
    kw = dict(name="resnet20x1", recipe=r, dataset="digits", warmup=1, steps=2,
              eval_images=64, model_args=TINY, device="cpu")
    row = bench.measure_slots(2, **kw)
    assert row["slots"] == 2 and row["iter_per_min_per_slot"] > 0
    assert row["iter_per_min"] == pytest.approx(2 * row["iter_per_min_per_slot"])
    assert row["images_per_s"] == pytest.approx(row["iter_per_min"] * 8 / 60, rel=1e-6)
    with pytest.raises(UserError, match=r"a benchmark slot failed: .*base_width"):
        bench.measure_slots(2, **{**kw, "model_args": {"base_width": -1}})


@pytest.mark.slow  # 2 x 2 spawned gloo processes: 21 CPU-s on the 2-core machine
def test_ranks_time_the_ddp_step_of_one_run_in_gloo_processes():
    """`ranks=2`: two spawned processes join a gloo group as `train` does under torchrun and
    time the DDP step at the global batch (each rank its half), all-reduce included; the
    row is rank 0's, with the evaluation and checkpoint rank 0 pays alone. What DDP refuses
    is one line before any process starts; a failing rank is one line, not a hang."""
    from lambdapipe.recipes import get_recipe

    kw = dict(name="resnet20x1", recipe=get_recipe("demo", {"batch_size": 8}),
              dataset="digits", warmup=1, steps=2, eval_images=32, model_args={"base_width": 4},
              device="cpu")
    row = bench.measure_slots(1, ranks=2, **kw)
    assert (row["ranks"], row["batch_size"], row["path"]) == (2, 8, "eager")
    assert row["images_per_s"] == pytest.approx(row["iter_per_min"] * 8 / 60)
    assert row["iter_per_min_per_slot"] == row["iter_per_min"] and not row["diverged"]
    assert row["eval_images"] == 32 and row["ckpt_s"] > 0 and row["data_s"] > 0
    with pytest.raises(UserError, match="invalid batch_size 7 on 2 processes"):
        bench.measure_slots(1, ranks=2, **{**kw, "recipe": get_recipe("demo", {"batch_size": 7})})
    with pytest.raises(UserError, match=r"a benchmark rank failed: .*base_width"):
        bench.measure_slots(1, ranks=2, **{**kw, "model_args": {"base_width": -1}})


def test_gpu_bench_script_runs_every_part_and_writes_the_index(tmp_path):
    """scripts/gpu-bench.sh is the one command that regenerates the GPU figures; here with a
    stand-in `lambdapipe` that records its arguments (the real one is tested above)."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    fake = tmp_path / "bin" / "lambdapipe"
    fake.parent.mkdir()
    fake.write_text("""#!/usr/bin/env python3
import json, sys
args = sys.argv[1:]
print("table for", " ".join(args))
if "--out" in args:
    out = args[args.index("--out") + 1]
    rows = [{"device_name": "fake-gpu"}]
    json.dump({"torch": "9.9", "date": "2026-11-23T00:00:00+00:00", "rows": rows},
              open(out, "w"))
""")
    fake.chmod(0o755)
    env = {**os.environ, "LAMBDAPIPE_CMD": str(fake),
           "LAMBDAPIPE_BENCH_DEVICE": "cpu", "LAMBDAPIPE_BENCH_OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", str(root / "scripts" / "gpu-bench.sh"), "default", "impls",
                           "step",
                           "slots", "data", "cifar10", "pack", "fused", "step-graph"],
                          env=env,
                          capture_output=True,
                          text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    assert sorted(p.stem for p in out.glob("*.json")) == [
        "cifar10-baselines", "cifar10-baselines-fused", "cifar10-baselines-graphs",
        "cifar10-baselines-packed", "cifar10-default", "cifar10-step-graph", "data-real",
        "data-synthetic", "default", "fused4", "fused4-step-graph", "impls", "pack4", "slots2",
        "step", "step-graph"]
    assert "--impls" in (out / "impls.cmd").read_text()
    assert ("--models resnet18,resnet20x1,lr18_l3_lc,lr18_l3_rpe,lr18_l2_lc,lr18_l2_rpe,"
            "lr34_l3_lc --batch-size 256 --precision bf16") in (out / "default.cmd").read_text()
    assert "--pack 3 --compile reduce-overhead" in (out / "cifar10-baselines-packed.cmd"
                                                     ).read_text()
    assert "--pack 3 --fuse" in (out / "cifar10-baselines-fused.cmd").read_text()
    index = (out / "index.md").read_text()
    assert "## cifar10-baselines" in index and "fake-gpu, torch 9.9, 2026-11-23" in index
    assert ("`lambdapipe bench --config config/resnet_baselines.yaml --datasets cifar10 "
            "--seeds 0 --slots 1,2 --device cpu --out") in index
    assert "--real-data" in (out / "data-real.cmd").read_text()

    bad = subprocess.run(["bash", str(root / "scripts" / "gpu-bench.sh"), "bogus"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown part 'bogus'" in bad.stderr


def test_lambda_resnets_are_compared_with_the_resnet_of_their_depth():
    assert [bench.matching_resnet(m) for m in ("lr34_l3_lc", "lr18_l2_rpe",
                                               "lambda_resnet50_u4_r7", "resnet18")] == [
        "resnet34", "resnet18", "resnet50", None]
    rows = bench.run(["resnet18", "lr18_l3_lc", "lr34_l3_lc"], dataset="digits",
                     batch_size=8, precision="fp32", warmup=0, steps=1, model_args=TINY,
                     eval_images=16)
    r18, lr18, lr34 = rows
    assert lr18["vs_resnet"] == pytest.approx(lr18["images_per_s"] / r18["images_per_s"])
    assert lr34["vs_resnet"] is None  # no resnet34 measured in this run
    assert lr18["mem_vs_resnet"] is None  # CPU: no peak memory
    assert "vs base" in bench_table.format_rows(rows)
