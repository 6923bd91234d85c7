"""ImageNet-2012 streamed from its JPEG index trains, evaluates and resumes (lambdapipe/feed.py).

The tiny ILSVRC2012 archives of test_imagenet_data (3 classes of 3 train JPEGs, 4 val, 8
ImageNet-V2) are prepared at 32 px (the registry's sizes widened to allow it, explicitly), so
the stream's random-resized crops and resize + centre crop run as at 224 px, on small tensors.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from test_distributed import ensure_dist_tiny, rows
from test_imagenet_data import make_ilsvrc

from lambdapipe import data, distributed, feed, train
from lambdapipe.augment import plan_epoch
from lambdapipe.data import imagenet, registry
from lambdapipe.data.stream import open_split
from lambdapipe.errors import UserError

SIZE = 32
STEPS = {"iterations": 6, "eval_every": 3, "batch_size": 2, "warmup": 0.0,
         "precision": "fp32", "loader_workers": 0}


def _registry(monkeypatch) -> None:
    info = registry.DATASETS["imagenet2012"]
    monkeypatch.setitem(registry.DATASETS, "imagenet2012",
                        dataclasses.replace(info, num_train=9, sizes=(SIZE, 224)))
    monkeypatch.setitem(imagenet.ARCHIVES, "imagenet2012", tuple(
        dataclasses.replace(a, md5=None) for a in imagenet.ARCHIVES["imagenet2012"]))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ilsvrc")
    (root / "mirror").mkdir()
    make_ilsvrc(root / "mirror")
    with pytest.MonkeyPatch.context() as mp:
        _registry(mp)
        data.prepare("imagenet2012", root / "d", mirror=root / "mirror", val_size=3,
                     image_size=SIZE, progress=False)
    return root / "d"


def config(data_dir: Path, out: Path, model: str = "dist_tiny", **overrides):
    ensure_dist_tiny()
    return train.TrainConfig.build(model=model, model_args={}, dataset="imagenet2012",
                                   data_dir=data_dir, noise="clean", seed=3, out=out,
                                   recipe="sgdm-imagenet2012",
                                   overrides={**STEPS, **overrides})


@pytest.mark.slow  # a ResNet-18 (ImageNet recipe, width 4) trained, evaluated, explained
def test_cli_trains_evaluates_val_test_and_test_v2(data_dir, tmp_path):
    from lambdapipe.cli import main

    out = tmp_path / "run"
    args = ["train", "--model", "resnet18", "--model-arg", "base_width=4", "--dataset",
            "imagenet2012", "--data-dir", str(data_dir), "--recipe", "sgdm-imagenet2012",
            "--device", "cpu", "--out", str(out)]
    for key, value in STEPS.items():
        args += ["--set", f"{key}={value}"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["iterations"] == 6
    assert summary["image_size"] == SIZE and summary["params"] > 0
    for key in ("val_acc", "tst_acc", "test_v2_acc"):  # val 3, test 4, ImageNet-V2 8 images
        assert 0.0 <= summary[key] <= 1.0, key
    assert [r["iteration"] for r in rows(out)] == [3, 6]
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["data"]["mean"] == [0.485, 0.456, 0.406]
    assert config_json["data"]["train_size"] == 6
    res = CliRunner().invoke(main, ["evaluate", "--ckpt", str(out / "best.ckpt"), "--split",
                                    "test", "--data-dir", str(data_dir), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "imagenet2012 test (n=4" in res.output
    res = CliRunner().invoke(main, ["evaluate", "--ckpt", str(out / "best.ckpt"), "--split",
                                    "test_v2", "--data-dir", str(data_dir), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    v2 = json.loads((out / "eval_test_v2.json").read_text())
    assert v2["n"] == 8 and v2["accuracy"] == summary["test_v2_acc"]
    res = CliRunner().invoke(main, ["explain", "--ckpt", str(out / "best.ckpt"), "--split",
                                    "test", "--images", "2", "--data-dir", str(data_dir),
                                    "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert (out / "explain_test.json").exists()


def test_an_epoch_is_the_array_paths_order_cut_per_rank(data_dir, tmp_path):
    cfg = config(data_dir, tmp_path / "x", batch_size=4)
    split = open_split(data_dir, "imagenet2012", "train")
    whole = feed.TrainStream(split, cfg.recipe, 3, None, "cpu", 1)
    assert whole.plan(1) == [plan_epoch(6, 3, 1, 0, False, "cpu").order[:4].tolist()]
    halves = [feed.TrainStream(split, cfg.recipe, 3, distributed.World(k, 2), "cpu", 1).plan(1)
              for k in (0, 1)]
    assert halves[0][0] + halves[1][0] == whole.plan(1)[0]


def test_workers_give_the_batches_of_no_workers(data_dir, tmp_path):
    """Any number of workers, and the decode in the training process (`jpeg_decode: gpu`,
    here its CPU stand-in: the workers read, this process decodes), give the same batches."""
    split = open_split(data_dir, "imagenet2012", "train")
    batches = {}
    for n, decode in ((0, "cpu"), (2, "cpu"), (1, "gpu")):
        r = config(data_dir, tmp_path / "x", loader_workers=n, jpeg_decode=decode).recipe
        source = feed.TrainStream(split, r, 3, None, "cpu", 3)
        batches[n] = [source.batch(e, s) for e in (0, 1) for s in range(3)]
        assert source.batch(1, 1)[0].equal(batches[n][4][0])  # a step out of turn: reopened
    for n in (2, 1):
        for (xa, ya, _), (xb, yb, _) in zip(batches[0], batches[n], strict=True):
            assert xa.shape == (2, 3, SIZE, SIZE)
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(batches[0][0][0], batches[0][3][0])  # epochs differ
    views = {}
    for decode in ("cpu", "gpu"):
        val = feed.EvalStream(open_split(data_dir, "imagenet2012", "val"), "cpu", 2, decode)
        views[decode] = torch.cat(list(val.batches()))
    assert views["cpu"].shape == (3, 3, SIZE, SIZE) and torch.equal(*views.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs a CUDA device")
def test_nvjpeg_decode_gives_batches_close_to_the_cpu_decoders(data_dir, tmp_path):
    split = open_split(data_dir, "imagenet2012", "train")
    out = {}
    for decode in ("cpu", "gpu"):
        r = config(data_dir, tmp_path / "x", loader_workers=1, jpeg_decode=decode).recipe
        out[decode] = feed.TrainStream(split, r, 3, None, "cuda", 3).batch(0, 0)
    assert out["gpu"][0].device.type == "cuda" and torch.equal(out["cpu"][1], out["gpu"][1])
    diff = (out["cpu"][0].float() - out["gpu"][0].float()).abs()
    assert diff.mean() < 5  # the same crops; decoders differ by a level here and there


def test_resume_after_a_stop_equals_the_unbroken_run(data_dir, tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    more = {"eval_every": 2, "track_test_every_eval": True}  # test streamed at each eval too
    train.run(config(data_dir, whole, **more), "cpu")

    def stop(row):
        if row["iteration"] == 4:  # epoch 1, step 1: resumed inside an epoch
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        train.run(config(data_dir, broken, **more), "cpu", callback=stop)
    assert not (broken / "summary.json").exists() and len(rows(broken)) == 2
    train.run(config(data_dir, broken, **more), "cpu")
    assert "tst_acc" in rows(whole)[0]
    assert rows(whole) == [{**a, **{k: b[k] for k in ("images_per_s", "elapsed_s")}}
                           for a, b in zip(rows(broken), rows(whole), strict=True)]
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (whole, broken))
    for key in ("val_acc", "tst_acc", "test_v2_acc", "best_iteration", "tst_nll"):
        assert sa[key] == sb[key], key


@pytest.mark.slow  # two spawned gloo ranks
def test_two_processes_equal_one_on_the_stream(data_dir, tmp_path):
    from test_distributed import run_on

    one, two = tmp_path / "one", tmp_path / "two"
    run_on(1, config(data_dir, one))
    run_on(2, config(data_dir, two))
    assert len(rows(one)) == 2
    for a, b in zip(rows(one), rows(two), strict=True):
        for key in ("iteration", "lr", "train_loss", "train_acc", "val_loss", "val_acc"):
            assert a[key] == pytest.approx(b[key], abs=2e-4), key


@pytest.mark.parametrize(("overrides", "noise", "match"), [
    ({}, "symmetric-0.2", "invalid noisy labels on imagenet2012"),
    ({"train_on": "train+val", "select_on": "test"}, "clean", "invalid train_on train"),
    ({"augment": "crop", "crop_padding": 4}, "clean", "invalid augment crop with padding"),
])
def test_what_the_stream_does_not_train_with_is_refused(data_dir, tmp_path, overrides,
                                                        noise, match):
    cfg = dataclasses.replace(config(data_dir, tmp_path / "r", **overrides), noise=noise)
    with pytest.raises(UserError, match=match):
        train.run(cfg, "cpu")
    assert not (tmp_path / "r").exists()


@pytest.mark.slow  # a fresh interpreter; 500 x 375 JPEGs made and decoded
def test_decode_bench_runs_on_the_cpu_and_skips_nvjpeg(tmp_path):
    """scripts/decode-bench.py (gpu-bench.sh's decode224 part), tiny: its CPU rows, and
    nvJPEG skipped with a line where there is no CUDA device."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, str(root / "scripts" / "decode-bench.py"),
                           str(tmp_path), "cpu", "12", "4"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "nvJPEG skipped" in done.stderr
    rows = json.loads((tmp_path / "decode224.json").read_text())["rows"]
    assert rows and all(r["decode"] == "cpu" and r["images_per_s"] > 0 for r in rows)
    assert (tmp_path / "decode224.txt").read_text().startswith("decode")


def test_bench_real_data_streams_the_jpegs(data_dir, tmp_path, monkeypatch):
    """`bench --real-data` on ImageNet-2012 times the step fed by the stream, as a run is
    (TrainStream: its batches are the run's), and the evaluation cost decodes the val split."""
    from lambdapipe import bench

    cfg = config(data_dir, tmp_path / "x")
    seen = []
    batch = feed.TrainStream.batch
    monkeypatch.setattr(feed.TrainStream, "batch",
                        lambda self, epoch, step: seen.append((epoch, step)) or batch(
                            self, epoch, step))
    row = bench.measure("resnet18", cfg.recipe, dataset="imagenet2012", data_dir=data_dir,
                        real_data=True, warmup=1, steps=3, model_args={"base_width": 4},
                        device="cpu")
    assert seen == [(0, 0), (0, 1), (0, 2), (1, 0)]  # 3 steps an epoch of 6 images at batch 2
    assert row["real_data"] and row["batch_size"] == 2 and row["images_per_s"] > 0
    assert row["eval_images"] == 3 and row["eval_images_per_s"] > 0  # the val split, decoded
    with pytest.raises(UserError, match="invalid batch size 8: expected at most the 6 images"):
        bench.measure("resnet18", dataclasses.replace(cfg.recipe, batch_size=8),
                      dataset="imagenet2012", data_dir=data_dir, real_data=True, warmup=1,
                      steps=1, model_args={"base_width": 4}, device="cpu")
