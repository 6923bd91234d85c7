"""`lambdapipe explain` on CPU-trained demo checkpoints: FullGrad/Grad-CAM maps and position
embeddings are written, finite and on the same images for a ResNet and a Lambda-ResNet; the
report draws them side by side from the files alone; unfit input fails in one line."""

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
from lambdapipe.explain import _target_layer

MODELS = ("resnet20x1", "lr18_l3_lc")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny runs on digits (20 steps, width 4) in the run-directory layout."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("explain")
    data_dir = root / "data"
    data.prepare("digits", data_dir)
    for model in MODELS:
        cfg = train.TrainConfig.build(
            model=model, model_args={"base_width": 4}, dataset="digits", data_dir=data_dir,
            noise="clean", seed=0, out=root / "runs" / "digits" / "clean" / model / "0",
            recipe="demo", overrides={"iterations": 20, "eval_every": 10})
        train.run(cfg)
    yield root / "runs", data_dir
    torch.set_num_threads(before)


def explain(*args: str):
    return CliRunner().invoke(main, ["explain", *args])


@pytest.mark.cost(15)  # two runs trained (module fixture), both explained, a report
def test_explain_writes_finite_maps_on_the_same_images_and_the_report_shows_them(runs):
    root, data_dir = runs
    arrays, metas = {}, {}
    for model in MODELS:
        ckpt = root / "digits" / "clean" / model / "0" / "best.ckpt"
        res = explain("--ckpt", str(ckpt), "--images", "5", "--data-dir", str(data_dir))
        assert res.exit_code == 0, res.output
        run = ckpt.parent
        for name in ("explain_test.npz", "explain_test.json", "explain_test.png",
                     "explain_test.svg"):
            assert (run / name).stat().st_size > 0, name
        with np.load(run / "explain_test.npz", allow_pickle=False) as npz:
            arrays[model] = {k: npz[k] for k in npz.files}
        metas[model] = json.loads((run / "explain_test.json").read_text())

    test = data.load_split(data_dir, "digits", "test")
    for model, a in arrays.items():
        assert a["indices"].tolist() == [0, 1, 2, 3, 4]
        np.testing.assert_array_equal(a["images"], test.images[:5])
        np.testing.assert_array_equal(a["labels"], test.labels[:5])
        for key in ("fullgrad", "gradcam"):
            assert a[key].shape == (5, 16, 16), key
            assert np.isfinite(a[key]).all() and a[key].min() >= 0 and a[key].max() <= 1
            assert a[key].max() > 0, f"{model} {key} map is all zero"
        assert metas[model]["predicted"] == [test.classes[i] for i in a["predicted"]]
    assert metas["resnet20x1"]["gradcam_layer"] == "layer3"  # CIFAR ResNet: 3 stages
    assert metas["lr18_l3_lc"]["gradcam_layer"] == "layer4"
    # The lambda layer's embeddings: k=16 kernels of scope r=23 for u=1.
    assert "position" not in arrays["resnet20x1"]
    assert arrays["lr18_l3_lc"]["position"].shape == (16, 1, 23, 23)
    assert np.isfinite(arrays["lr18_l3_lc"]["position"]).all()
    assert metas["lr18_l3_lc"]["position"]["kind"] == "lc"
    # Stage 3 of a 16 px input: the one lambda layer, in the stage's last block, sees 4x4.
    assert metas["lr18_l3_lc"]["position"]["feature_map"] == [4, 4]
    pos = root / "digits" / "clean" / "lr18_l3_lc" / "0" / "explain_test_position.png"
    assert pos.stat().st_size > 0

    from lambdapipe.report import build_report

    out = root.parent / "report"
    written = build_report(root, out)
    names = {p.name for p in written}
    assert {"attention_digits.png", "position_digits.png"} <= names
    svg = (out / "figures-svg" / "attention_digits.svg").read_text()
    assert "resnet20x1" in svg and "lr18_l3_lc" in svg


def test_bad_input_is_one_line(runs, tmp_path):
    root, data_dir = runs
    ckpt = root / "digits" / "clean" / "resnet20x1" / "0" / "best.ckpt"
    res = explain("--ckpt", str(ckpt), "--images", "0", "--data-dir", str(data_dir))
    assert res.exit_code == 2 and "invalid --images 0: expected an integer >= 1" in res.output
    res = explain("--ckpt", str(ckpt), "--images", "100000", "--data-dir", str(data_dir))
    assert res.exit_code == 2 and "the test split of digits has" in res.output

    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    res = explain("--ckpt", str(foreign), "--data-dir", str(data_dir))
    assert res.exit_code == 1 and "Usage" not in res.output, res.output  # the file's fault
    assert len([line for line in res.output.splitlines() if line.startswith("Error")]) == 1
    assert not list(tmp_path.glob("explain_*"))

    with pytest.raises(UserError, match="no convolutional last stage"):
        _target_layer(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)), "mlp")


def test_non_finite_outputs_are_a_status_not_a_failure(runs, tmp_path):
    """Eval-mode outputs that overflow (a lambda net whose BN statistics still lag) must not
    stop a grid: explain exits 0 and its JSON says non-finite."""
    from lambdapipe.evaluate import load_checkpoint, save_checkpoint

    root, data_dir = runs
    state = load_checkpoint(root / "digits" / "clean" / "resnet20x1" / "0" / "best.ckpt")
    bn = next(k for k in state["model"] if k.endswith("running_var"))
    state["model"][bn] = torch.full_like(state["model"][bn], float("nan"))
    ckpt = tmp_path / "run" / "best.ckpt"
    ckpt.parent.mkdir()
    save_checkpoint(state, ckpt)
    res = CliRunner().invoke(main, ["explain", "--ckpt", str(ckpt), "--data-dir",
                                    str(data_dir), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "run" / "explain_test.json").read_text())["status"] == \
        "non-finite"
    assert not (tmp_path / "run" / "explain_test.npz").exists()
