"""The community fork's data protocol as recipe fields (lambdapipe/protocol.py): per-epoch
learning rates against PyTorch's own scheduler, the kept last batch (391 steps of 50,000 at
batch 128), one-line refusals, and a tiny digits run that trains on train+val and chooses
best.ckpt on test."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from lambdapipe import data, train
from lambdapipe.augment import DeviceImages, augmented_batch, plan_epoch
from lambdapipe.errors import UserError
from lambdapipe.provenance import run_settings
from lambdapipe.recipes import get_recipe

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest
FORK = {"select_on": "test", "train_on": "train+val", "drop_last": False, "lr_step": "epoch"}


# --------------------------------------------------------------------------- learning rate
def test_lr_per_epoch_is_torch_warm_restarts_stepped_once_an_epoch():
    """Known answer: CosineAnnealingWarmRestarts(T_0=10, T_mult=2, eta_min=1e-5) stepped once
    per epoch, as the fork's logs show, over its 70 epochs of 391 steps."""
    r = get_recipe("sgd-restarts-fork70")
    spe = r.steps_per_epoch(50_000)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=10, T_mult=2,
                                                                 eta_min=1e-5)
    total = r.total_steps(spe)
    for epoch in range(70):
        want = opt.param_groups[0]["lr"]
        for step in (epoch * spe, epoch * spe + 1, epoch * spe + spe - 1):
            assert r.lr_at(step, total, spe) == pytest.approx(want, rel=1e-12, abs=1e-15)
        sched.step()
    # by hand: a cycle's top, its middle, and the restarts at 10 and 30
    assert r.lr_at(0, total, spe) == 0.1
    assert r.lr_at(5 * spe + 7, total, spe) == pytest.approx(1e-5 + 0.5 * (0.1 - 1e-5))
    assert r.lr_at(10 * spe + 390, total, spe) == r.lr_at(30 * spe, total, spe) == 0.1


def test_lr_per_step_changes_within_an_epoch():
    r, e = get_recipe("sgd-restarts"), get_recipe("sgd-restarts", {"lr_step": "epoch"})
    total = r.total_steps(390)
    assert r.lr_at(0, total, 390) == e.lr_at(0, total, 390) == e.lr_at(389, total, 390)
    assert r.lr_at(389, total, 390) < e.lr_at(389, total, 390)
    assert r.lr_at(5 * 390, total, 390) == e.lr_at(5 * 390 + 100, total, 390)


# --------------------------------------------------------------------------- the last batch
def test_no_drop_last_keeps_the_partial_batch():
    ours, kept = get_recipe("sgd-restarts"), get_recipe("sgd-restarts-fork70")
    assert ours.steps_per_epoch(45_000) == 351 and ours.steps_per_epoch(50_000) == 390
    assert kept.steps_per_epoch(50_000) == 391  # the fork's logs: 391 iterations an epoch
    assert kept.total_steps(391) == 70 * 391
    # the last step of an epoch is the partial batch: every image once, none twice
    images = torch.zeros(10, 4, 4, 3, dtype=torch.uint8)
    labels = torch.arange(10)
    d = DeviceImages(images.numpy(), labels.numpy(), labels.numpy(), "cpu")
    plan = plan_epoch(10, 0, 0, 0, False, "cpu")
    seen = [augmented_batch(d, plan, s, 4)[1] for s in range(get_recipe(
        "demo", {"drop_last": False, "batch_size": 4}).steps_per_epoch(10))]
    assert [len(b) for b in seen] == [4, 4, 2]
    assert sorted(torch.cat(seen).tolist()) == list(range(10))


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("overrides, needle", [
    ({"select_on": "train"}, "select_on 'train'"),
    ({"train_on": "all"}, "train_on 'all'"),
    ({"lr_step": "batch"}, "lr_step 'batch'"),
    ({"drop_last": "maybe"}, "drop_last 'maybe'"),
    ({"train_on": "train+val"}, "set select_on=test"),
    ({"drop_last": False, "compile": "step-graph"}, "one captured graph"),
])
def test_bad_protocol_is_one_line(overrides, needle):
    with pytest.raises(UserError) as err:
        get_recipe("demo", overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_protocol_is_part_of_the_identity_and_defaults_rename_nothing():
    def settings(**over):
        return run_settings("resnet18", {}, get_recipe("sgd-restarts", over).to_dict(), None)

    before = settings()
    assert "select_on" not in json.dumps(before)  # a default leaves old fingerprints alone
    each = [settings(select_on="test"), settings(train_on="train+val", select_on="test"),
            settings(drop_last=False), settings(lr_step="epoch")]
    assert len({json.dumps(s, sort_keys=True) for s in [before, *each]}) == 5


# --------------------------------------------------------------------------- a tiny run
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    prepared = data.prepare("digits", root, progress=False)
    data.make_noise(prepared, data.noise_spec("symmetric", 0.25, 0))
    return root


def config(data_dir: Path, out: Path, noise: str = "clean", **overrides) -> train.TrainConfig:
    return train.TrainConfig.build(model="resnet20x1", model_args={"base_width": 8},
                                   dataset="digits", data_dir=data_dir, noise=noise, seed=0,
                                   out=out, recipe="demo", overrides=overrides)


def test_selects_on_test_and_trains_on_train_and_val(data_dir, tmp_path):
    """Every evaluation scores test; best.ckpt is the evaluation of highest test accuracy and
    its test score is the summary's; the run trained on train + val, the last batch kept."""
    cfg = config(data_dir, tmp_path / "run", epochs=3, eval_every_epochs=0.5, batch_size=100,
                 **FORK)
    summary = train.run(cfg)
    with open(tmp_path / "run" / "metrics.csv") as fh:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]
    n_train = len(data.load_split(data_dir, "digits", "train").labels)
    n_val = len(data.load_split(data_dir, "digits", "val").labels)
    n = n_train + n_val
    conf = json.loads((tmp_path / "run" / "config.json").read_text())
    assert conf["data"]["train_size"] == n
    spe = math.ceil(n / 100)
    assert n % 100 and summary["iterations"] == 3 * spe  # the partial batch is a step
    accs = [row["tst_acc"] for row in rows]
    best = rows[accs.index(max(accs))]
    assert summary["select_on"] == "test" and summary["train_on"] == "train+val"
    assert summary["best_iteration"] == best["iteration"]
    assert summary["tst_acc"] == pytest.approx(max(accs))  # best.ckpt scored on test again
    assert summary["val_acc"] == best["val_acc"]  # val's score at that checkpoint
    assert len({row["lr"] for row in rows if row["iteration"] <= spe}) == 1  # one lr in epoch 0


def test_our_protocol_still_selects_on_val(data_dir, tmp_path):
    summary = train.run(config(data_dir, tmp_path / "run", iterations=20, eval_every=5,
                               track_test_every_eval=True))
    with open(tmp_path / "run" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    vals = [float(row["val_acc"]) for row in rows]
    assert summary["select_on"] == "val" and summary["train_on"] == "train"
    assert summary["val_acc"] == max(vals)
    assert summary["best_iteration"] == int(rows[vals.index(max(vals))]["iteration"])


def test_train_and_val_refuses_noisy_labels(data_dir, tmp_path):
    with pytest.raises(UserError, match="train_on train\\+val with noise symmetric"):
        train.run(config(data_dir, tmp_path / "run", noise="symmetric-0.25", iterations=4,
                         eval_every=2, **FORK))


def test_config_refuses_train_and_val_with_noise_before_any_job():
    from lambdapipe.config import check_config, expand_runs

    grid = {"models": ["resnet20x1"], "seeds": [0], "recipe": "demo",
            "noise": [{"kind": "symmetric", "rates": [0, 0.25]}],
            "set": {"select_on": "test", "train_on": "train+val"}}
    with pytest.raises(UserError) as err:
        check_config({"datasets": {"digits": {"grids": [grid]}}})
    assert str(err.value) == (
        "config datasets.digits.grids[0].set: invalid train_on train+val with noise "
        "symmetric-0.25: expected clean labels (val's labels are clean, so train+val would "
        "dilute the noise)")
    grid["noise"][0]["rates"] = [0]
    assert len(expand_runs(check_config({"datasets": {"digits": {"grids": [grid]}}}))) == 1
