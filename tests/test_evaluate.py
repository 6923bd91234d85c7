"""Evaluation: the metrics' arithmetic, a checkpoint scored on any split, and refusal of a
checkpoint the registry or its weights do not fit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lambdapipe import data, train
from lambdapipe.cli import main
from lambdapipe.errors import UserError
from lambdapipe.evaluate import (
    build_model,
    classification_metrics,
    evaluate_checkpoint,
    format_result,
    load_checkpoint,
    save_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def reference_ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    conf, pred = probs.max(1), probs.argmax(1)
    ece = 0.0
    for lo, hi in zip(np.linspace(0, 1, bins + 1)[:-1], np.linspace(0, 1, bins + 1)[1:],
                      strict=True):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.mean() * abs((pred[inside] == labels[inside]).mean()
                                       - conf[inside].mean())
    return ece


def test_metrics_match_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 4, generator=gen) * 3
    labels = torch.randint(0, 4, (500,), generator=gen)
    labels[:3] = 3  # class 3 is never predicted correctly below unless its logit wins
    m = classification_metrics(logits, labels, detailed=True)
    probs = logits.double().softmax(1).numpy()
    y = labels.numpy()
    pred = probs.argmax(1)
    assert m["n"] == 500
    assert m["accuracy"] == pytest.approx((pred == y).mean())
    assert m["nll"] == pytest.approx(-np.log(probs[np.arange(500), y]).mean())
    assert m["ece"] == pytest.approx(reference_ece(probs, y))
    confusion = np.zeros((4, 4), dtype=int)
    np.add.at(confusion, (y, pred), 1)
    assert m["confusion_matrix"] == confusion.tolist()
    assert m["per_class_accuracy"] == pytest.approx(
        [confusion[c, c] / confusion[c].sum() for c in range(4)])


def test_a_perfectly_calibrated_confident_model_has_zero_ece_and_absent_classes_are_none():
    logits = torch.tensor([[20.0, 0, 0], [0, 20.0, 0]])
    m = classification_metrics(logits, torch.tensor([0, 1]), detailed=True)
    assert m["accuracy"] == 1.0 and m["ece"] == pytest.approx(0, abs=1e-7)
    assert m["per_class_accuracy"] == [1.0, 1.0, None]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval")
    data_dir = root / "data"
    prepared = data.prepare("digits", data_dir)
    data.make_noise(prepared, data.noise_spec("symmetric", 0.5, 0))
    out = root / "noisy"
    train.run(train.TrainConfig.build(
        model="resnet20x1", model_args={"base_width": 8}, dataset="digits", data_dir=data_dir,
        noise="symmetric-0.5", seed=0, out=out, recipe="demo",
        overrides={"iterations": 60, "eval_every": 20}))
    return data_dir, out


def test_best_checkpoint_on_test_reproduces_the_summary(runs, tmp_path):
    data_dir, out = runs
    summary = json.loads((out / "summary.json").read_text())
    target = tmp_path / "eval_test.json"
    result = evaluate_checkpoint(out / "best.ckpt", "test", data_dir, "cpu", target)
    assert result["accuracy"] == pytest.approx(summary["tst_acc"])
    assert result["nll"] == pytest.approx(summary["tst_nll"])
    assert result["ece"] == pytest.approx(summary["ece"])
    assert result["iteration"] == summary["best_iteration"]
    assert json.loads(target.read_text()) == result
    assert sum(map(sum, result["confusion_matrix"])) == result["n"] == 359
    assert len(result["per_class_accuracy"]) == 10
    text = format_result(result)
    assert "accuracy" in text and len(text.splitlines()) == 2 + 10


def test_train_split_is_scored_against_clean_and_noisy_labels(runs):
    data_dir, out = runs
    result = evaluate_checkpoint(out / "last.ckpt", "train", data_dir, "cpu", None)
    assert result["noise"] == "symmetric-0.5"
    assert result["accuracy"] > result["label_accuracy"]  # noisy labels are half wrong
    assert "noisy labels" in format_result(result)


def test_several_splits_scored_at_once_equal_each_scored_alone(runs, monkeypatch):
    """checkpoint_scores (train's final test pass and extra test sets) loads the checkpoint
    once for all its splits; each split's result is the one evaluate gives it alone."""
    from lambdapipe import evaluate

    data_dir, out = runs
    alone = {s: evaluate_checkpoint(out / "last.ckpt", s, data_dir, "cpu", None)
             for s in ("test", "val", "train")}
    loads, real_load = [], evaluate.load_checkpoint

    def counted(*args, **kwargs):
        loads.append(args)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(evaluate, "load_checkpoint", counted)
    together = evaluate.checkpoint_scores(out / "last.ckpt", ["test", "val", "train"],
                                          data_dir, "cpu")
    assert len(loads) == 1 and list(together) == ["test", "val", "train"]
    assert together == alone


def test_cli_evaluate_writes_beside_the_checkpoint(runs):
    data_dir, out = runs
    result = CliRunner().invoke(main, ["evaluate", "--ckpt", str(out / "best.ckpt"),
                                       "--split", "val", "--data-dir", str(data_dir),
                                       "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "eval_val.json").read_text())["split"] == "val"


@pytest.mark.parametrize("verb", ["evaluate", "explain"])
def test_a_run_that_diverged_before_any_evaluation_is_reported_not_an_error(tmp_path, verb):
    """The workflow calls evaluate and explain on every run; one without best.ckpt because it
    diverged first must not stop the grid, while a missing checkpoint otherwise is an error."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"status": "diverged", "best_iteration": None,
                                                  "diverged_at": 3}))
    args = [verb, "--ckpt", str(run / "best.ckpt"), "--data-dir", str(tmp_path / "no-data"),
            "--device", "cpu"] + (["--out", str(run / "eval_test.json")] if verb == "evaluate"
                                  else [])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    written = json.loads((run / f"{verb[:4] if verb == 'evaluate' else verb}_test.json")
                         .read_text())
    assert written["status"] == "diverged" and written["best_ckpt"] is None

    (run / "summary.json").write_text(json.dumps({"status": "ok", "best_iteration": 10}))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "best.ckpt" in result.output and "not" in result.output.splitlines()[-1]


def _resave(src: Path, dst: Path, **config_changes) -> Path:
    ckpt = load_checkpoint(src)
    ckpt["config"].update(config_changes)
    save_checkpoint(ckpt, dst)
    return dst


def test_checkpoint_the_registry_or_its_weights_do_not_fit_is_refused(runs, tmp_path):
    data_dir, out = runs
    unknown = _resave(out / "best.ckpt", tmp_path / "unknown.ckpt", model="resnet21")
    with pytest.raises(UserError, match="unknown model 'resnet21'"):
        evaluate_checkpoint(unknown, "test", data_dir, "cpu", None)
    wider = _resave(out / "best.ckpt", tmp_path / "wider.ckpt", model_args={"base_width": 16})
    with pytest.raises(UserError, match="does not fit its model"):
        evaluate_checkpoint(wider, "test", data_dir, "cpu", None)
    result = CliRunner().invoke(main, ["evaluate", "--ckpt", str(wider), "--data-dir",
                                       str(data_dir), "--device", "cpu"])
    assert result.exit_code == 1, result.output  # the file is at fault: no usage
    assert result.output.strip().splitlines()[-1].startswith("Error: checkpoint")
    assert not (tmp_path / "eval_test.json").exists()

    (tmp_path / "wider.ckpt.sha256").write_text("0" * 64 + "  wider.ckpt\n")
    with pytest.raises(UserError, match="corrupted checkpoint"):
        evaluate_checkpoint(wider, "test", data_dir, "cpu", None)
    plain = tmp_path / "plain.ckpt"
    save_checkpoint({"weights": torch.zeros(1)}, plain)
    with pytest.raises(UserError, match="not a lambdapipe checkpoint"):
        evaluate_checkpoint(plain, "test", data_dir, "cpu", None)


@pytest.mark.parametrize("crash_at", [1, 2, 3])
def test_checkpoint_survives_a_crash_between_any_two_writes(tmp_path, monkeypatch, crash_at_write,
                                                            crash_at):
    """A kill between the sidecar and checkpoint renames must never make last.ckpt unreadable."""
    from lambdapipe.evaluate import load_checkpoint, save_checkpoint

    path = tmp_path / "last.ckpt"
    old = {"config": {"v": 1}, "model": {"w": torch.zeros(3)}}
    new = {"config": {"v": 2}, "model": {"w": torch.ones(3)}}
    save_checkpoint(old, path)

    crash_at_write(crash_at)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(new, path)
    monkeypatch.undo()

    loaded = load_checkpoint(path, check=False)  # the file format, not a run's contents
    # Steps: 1 widen sidecar, 2 rename checkpoint, 3 narrow sidecar.
    assert loaded["config"]["v"] == (1 if crash_at <= 2 else 2)
    path.write_bytes(path.read_bytes()[:-7] + b"garbage")
    with pytest.raises(UserError, match="corrupted checkpoint"):
        load_checkpoint(path, check=False)


def test_on_the_device_it_trained_on_a_model_runs_the_lambda_impls_training_ran():
    """Evaluation (evaluate, explain, the final test pass) on the kind of device a run
    trained on runs each lambda layer as training recorded it; on another kind of device,
    or for an older checkpoint without the record, the rule of the device at hand."""
    from lambdapipe.models.lambda_layer import lambda_layers

    config = {"model": "lr18_l2_lc", "model_args": {"base_width": 4, "lambda_blocks": "all"},
              "data": {"num_classes": 10, "image_size": 32}, "device": "cuda:0",
              "runtime": {"lambda_impls": {"layer2.0.conv1.0": "logit",
                                           "layer2.1.conv1": "logit"}}}

    def chosen(cfg, device):
        model = build_model(cfg, device)
        return {name: layer.chosen for name, layer in lambda_layers(model)}

    on_cuda = chosen(config, "cuda")
    assert on_cuda == {"layer2.0.conv1.0": (32, 32, "logit"), "layer2.1.conv1": (16, 16, "logit")}
    # on a CPU the MAC rule: the large-kernel conv order at 32x32
    assert chosen(config, "cpu")["layer2.0.conv1.0"] == (32, 32, "conv")
    rule = {"layer2.0.conv1.0": (32, 32, "lambda"), "layer2.1.conv1": (16, 16, "lambda")}
    assert chosen({**config, "device": "cpu"}, "cuda") == rule
    assert chosen({k: v for k, v in config.items() if k != "runtime"}, "cuda") == rule
    assert set(chosen(config, None).values()) == {None}  # no device: nothing chosen
