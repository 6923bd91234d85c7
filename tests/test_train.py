"""Training on the embedded digits dataset: it learns, noise hurts, resume is exact,
divergence ends cleanly, checkpoints are safe, the test split never selects, bad input fails
before any work."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lambdapipe import data, evaluate, train
from lambdapipe.cli import main
from lambdapipe.errors import UserError
from lambdapipe.evaluate import load_checkpoint
from lambdapipe.rundir import METRIC_COLUMNS
from lambdapipe.runtime import Runtime, resolve
from lambdapipe.step import TrainStep, make_optimizer

TINY = {"base_width": 8}
SHORT = {"iterations": 30, "eval_every": 10}
TIMING = {"wall_time_s", "session_time_s", "iter_per_min"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    prepared = data.prepare("digits", root)
    data.make_noise(prepared, data.noise_spec("symmetric", 0.5, 0))
    return root


def config(data_dir: Path, out: Path, noise: str = "clean", model: str = "resnet20x1",
           seed: int = 0, deterministic: bool = False, **overrides) -> train.TrainConfig:
    return train.TrainConfig.build(model=model, model_args=TINY, dataset="digits",
                                   data_dir=data_dir, noise=noise, seed=seed, out=out,
                                   recipe="demo", overrides=overrides,
                                   deterministic=deterministic)


def read_metrics(out: Path) -> list[dict[str, float]]:
    with open(out / "metrics.csv") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "finished"
    train.run(config(data_dir, out, **SHORT))
    return out


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def train_args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", "resnet20x1", "--model-arg", "base_width=8", "--dataset",
            "digits", "--data-dir", str(data_dir), "--out", str(out), "--recipe", "demo",
            "--device", "cpu", "--no-progress", *extra]


# --------------------------------------------------------------------------- learning
@pytest.mark.slow  # two whole demo runs (400 steps each): make test, not the fast tier
@pytest.mark.cost(40)
def test_demo_recipe_learns_digits_and_label_noise_hurts(data_dir, tmp_path, monkeypatch):
    clean = train.run(config(data_dir, tmp_path / "clean"))
    noisy = train.run(config(data_dir, tmp_path / "noisy", noise="symmetric-0.5"))
    assert clean["status"] == noisy["status"] == "ok"
    assert clean["iterations"] == noisy["iterations"] == 400
    assert clean["tst_acc"] > 0.9  # chance is 0.1
    assert noisy["tst_acc"] < clean["tst_acc"] and noisy["tst_nll"] > clean["tst_nll"]
    # On 50 % symmetric noise the model fits the truth better than the labels it was given.
    last = read_metrics(tmp_path / "noisy")[-1]
    assert last["train_clean_acc"] > last["train_acc"] + 0.2

    out = tmp_path / "clean"
    assert {p.name for p in out.iterdir()} >= {
        "config.json", "metrics.csv", "last.ckpt", "last.ckpt.sha256", "best.ckpt",
        "best.ckpt.sha256", "summary.json"}
    with open(out / "metrics.csv") as fh:
        assert next(csv.reader(fh)) == METRIC_COLUMNS
    assert [r["iteration"] for r in read_metrics(out)] == list(range(50, 401, 50))
    # The same curve in DVCLive's format, for `dvc plots` (lambdapipe/live.py).
    tsv = (out / "dvclive" / "plots" / "metrics" / "val" / "acc.tsv").read_text().split()
    assert tsv[3::2] == [str(r["val_acc"]) for r in read_metrics(out)]
    saved = json.loads((out / "config.json").read_text())
    assert saved["recipe"]["name"] == "demo" and saved["model_args"] == TINY
    assert json.loads((out / "summary.json").read_text()) == clean

    # Same config, finished: the summary comes back and nothing trains again.
    mtime = (out / "metrics.csv").stat().st_mtime_ns
    monkeypatch.setattr(train.Run, "train", lambda self: pytest.fail("retrained a finished run"))
    assert train.run(config(data_dir, out)) == clean
    assert (out / "metrics.csv").stat().st_mtime_ns == mtime


def test_summary_records_the_recipe_changes_and_image_size(finished):
    """What the report needs to put a run beside only like published rows."""
    summary = json.loads((finished / "summary.json").read_text())
    assert summary["recipe"] == "demo"
    assert summary["recipe_changes"] == {"iterations": 30, "eval_every": 10}
    config = json.loads((finished / "config.json").read_text())
    assert summary["image_size"] == config["data"]["image_size"] == 16


# --------------------------------------------------------------------------- resume
class Interrupt(Exception):
    pass


@pytest.mark.parametrize("augment", [{}, {"augment": "random-resized-crop", "flip": True}],
                         ids=["crop", "random-resized-crop"])
def test_resume_from_last_checkpoint_equals_an_unbroken_run(data_dir, tmp_path, augment):
    # 45 steps, 22 per epoch: the break at 30 falls mid-epoch, the end off the eval grid.
    kw = {"iterations": 45, "eval_every": 10, "deterministic": True, **augment}
    unbroken = train.run(config(data_dir, tmp_path / "a", **kw))

    def stop_at_30(row):
        if row["iteration"] == 30:
            raise Interrupt

    out = tmp_path / "b"
    with pytest.raises(Interrupt):
        train.run(config(data_dir, out, **kw), callback=stop_at_30)
    assert not (out / "summary.json").exists()
    assert load_checkpoint(out / "last.ckpt")["iteration"] == 30
    resumed = train.run(config(data_dir, out, **kw))

    def strip(summary):
        return {k: v for k, v in summary.items() if k not in TIMING}

    assert strip(resumed) == strip(unbroken)

    def curves(run_dir):
        return [{k: v for k, v in row.items() if k not in ("images_per_s", "elapsed_s")}
                for row in read_metrics(run_dir)]

    assert curves(out) == curves(tmp_path / "a")
    a, b = (load_checkpoint(d / "last.ckpt")["model"] for d in (tmp_path / "a", out))
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- divergence
def test_huge_learning_rate_diverges_with_exit_code_zero(data_dir, tmp_path):
    out = tmp_path / "diverged"
    result = cli(*train_args(data_dir, out, "--set", "lr=1e8", "--set", "iterations=200",
                             "--set", "warmup=0"))
    assert result.exit_code == 0, result.output
    assert "diverged at iteration" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert isinstance(summary["diverged_at"], int) and 1 <= summary["diverged_at"] <= 200
    assert summary["iterations"] == summary["diverged_at"]
    json.loads((out / "summary.json").read_text(), parse_constant=pytest.fail)  # strict JSON


# --------------------------------------------------------------------------- checkpoints
def test_checkpoints_load_weights_only_and_corruption_is_detected(data_dir, finished,
                                                                 tmp_path):
    summary = json.loads((finished / "summary.json").read_text())
    for name, iteration in (("last", 30), ("best", summary["best_iteration"])):
        path = finished / f"{name}.ckpt"
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert set(ckpt) >= {"config", "model", "optimizer", "scheduler", "scaler", "rng",
                             "iteration", "state"}
        assert ckpt["iteration"] == iteration
        assert set(ckpt["rng"]) >= {"python", "numpy", "torch"}
        assert ckpt["optimizer"]["state"]  # momentum buffers travel with it
        assert ckpt["config"]["model"] == "resnet20x1"
        assert [r["iteration"] for r in ckpt["state"]["rows"]] == list(range(10, iteration + 1,
                                                                             10))
        digest, fname = (finished / f"{name}.ckpt.sha256").read_text().split()
        assert fname == path.name
        assert digest == hashlib.sha256(path.read_bytes()).hexdigest()

    broken = tmp_path / "broken"
    shutil.copytree(finished, broken)
    (broken / "summary.json").unlink()  # an interrupted run with a damaged last.ckpt
    raw = bytearray((broken / "last.ckpt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (broken / "last.ckpt").write_bytes(bytes(raw))
    with pytest.raises(UserError, match="corrupted checkpoint"):
        load_checkpoint(broken / "last.ckpt")
    with pytest.raises(UserError, match="corrupted checkpoint"):
        train.check_before_start(config(data_dir, broken, **SHORT))


# --------------------------------------------------------------------------- selection
def test_test_split_is_read_once_after_training_on_the_val_chosen_checkpoint(
        data_dir, tmp_path, monkeypatch):
    events: list[tuple[str, object]] = []
    real_load, real_score = data.load_split, evaluate.classification_metrics

    def spy_load(data_dir, dataset, split, **kw):
        events.append(("load", split))
        return real_load(data_dir, dataset, split, **kw)

    def spy_score(logits, labels, **kw):
        events.append(("score", len(labels)))
        return real_score(logits, labels, **kw)

    monkeypatch.setattr(data, "load_split", spy_load)
    monkeypatch.setattr(evaluate, "classification_metrics", spy_score)  # val, and test at the end
    out = tmp_path / "run"
    summary = train.run(config(data_dir, out, iterations=60, eval_every=10))

    n_val = len(real_load(data_dir, "digits", "val"))
    n_test = len(real_load(data_dir, "digits", "test"))
    assert events.count(("load", "test")) == 1
    first_test = events.index(("load", "test"))
    assert events[first_test:] == [("load", "test"), ("score", n_test)]  # once, at the very end
    assert [e for e in events[:first_test] if e[0] == "score"] == [("score", n_val)] * 6

    rows = read_metrics(out)
    best = max(rows, key=lambda r: (r["val_acc"], -r["iteration"]))  # first maximum
    assert summary["val_acc"] == best["val_acc"]
    assert summary["best_iteration"] == best["iteration"]
    assert load_checkpoint(out / "best.ckpt")["iteration"] == best["iteration"]


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("extra", "needle"), [
    (["--recipe", "nope"], "'nope' is not one of 'adam-restarts'"),
    (["--set", "optimizer=lamb"], "invalid optimizer 'lamb'"),
    (["--set", "batch_size=0"], "invalid batch_size 0"),
    (["--set", "batch_size=100000"], "expected at most the 1294 training images of digits"),
    (["--set", "colour=red"], "invalid recipe field 'colour'"),
    (["--model", "resnet21"], "unknown model 'resnet21'"),
    (["--model-arg", "depth=3"], "invalid model argument 'depth'"),
    (["--dataset", "mnist"], "'mnist' is not one of 'cifar10'"),
    (["--seed", "-1"], "invalid seed -1"),
    (["--seed", "1" * 23], f"invalid seed {'1' * 23}: expected an integer in [0, "),
])
def test_bad_input_fails_in_one_line_before_training(data_dir, tmp_path, extra, needle):
    out = tmp_path / "run"
    result = cli(*train_args(data_dir, out), *extra)  # later options win in click
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1].startswith("Error: ")
    assert needle in result.output and "Traceback" not in result.output
    assert not out.exists()  # nothing written, not even the run directory or its lock


def test_a_noise_variant_not_prepared_fails_in_one_line_without_usage(data_dir, tmp_path):
    """Well-formed input naming data that is not there: exit 1, no usage block."""
    out = tmp_path / "run"
    result = cli(*train_args(data_dir, out), "--noise", "0.3")
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and "Usage" not in result.output
    assert "lambdapipe prepare --dataset digits --noise 0.3" in result.output
    assert not out.exists()


def test_finished_results_of_another_config_are_never_overwritten(data_dir, finished,
                                                                  tmp_path):
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in finished.rglob("*") if p.is_file()}
    result = cli(*train_args(data_dir, finished, "--seed", "1", "--set", "iterations=30",
                             "--set", "eval_every=10"))
    assert result.exit_code == 2, result.output
    assert "holds a finished run of a different config (seed: 0 -> 1)" in result.output
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in finished.rglob("*")
            if p.is_file()} == before

    # A checkpoint of another model in --out (no config.json beside it) is refused too.
    out = tmp_path / "other"
    out.mkdir()
    for name in ("last.ckpt", "last.ckpt.sha256"):
        shutil.copy(finished / name, out / name)
    result = cli(*train_args(data_dir, out, "--model", "resnet32x1"))
    assert result.exit_code == 2, result.output
    assert "belongs to a different config (model: 'resnet20x1' -> 'resnet32x1'" in result.output


# --------------------------------------------------------------------------- precision
def test_fp16_overflowing_steps_are_skipped_and_counted_not_diverged():
    from lambdapipe.models import create_model
    from lambdapipe.recipes import get_recipe

    r = get_recipe("demo", {"precision": "fp16", "channels_last": True, "grad_clip": 1.0})
    torch.manual_seed(0)
    model = create_model("resnet20x1", 10, 16, **TINY).to(memory_format=torch.channels_last)
    rt = Runtime("cpu", "fp16", channels_last=True)  # the CUDA layout, here on a CPU
    step = TrainStep(model, make_optimizer(model, r), r, rt,
                           torch.zeros(3), torch.ones(3))
    step.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)  # fp16 grads overflow
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    y = torch.arange(8) % 10
    for i in range(3):
        step(x, y, y, 0.05, i)
    skipped, diverged_at = step.tally[4].item(), step.tally[5].item()
    assert (skipped, diverged_at) == (3, -1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_bf16_run_with_progress_bar(data_dir, tmp_path):
    summary = train.run(config(data_dir, tmp_path / "bf16", iterations=20, eval_every=10,
                               precision="bf16"), progress=True)
    assert summary["status"] == "ok" and summary["precision"] == "bf16"
    assert summary["skipped_steps"] == 0 and 0 <= summary["tst_acc"] <= 1


def _eight_steps(r, optimizer_for) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """Start and end weights and fp16-skipped steps of 8 TrainSteps of a tiny ResNet-20 on
    fixed images, with `optimizer_for(model)`; fp16 starts at a loss scale that overflows."""
    from lambdapipe.models import create_model

    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 10
    torch.manual_seed(0)
    model = create_model("resnet20x1", 10, 16, **TINY)
    start = [p.detach().clone() for p in model.parameters()]
    step = TrainStep(model, optimizer_for(model), r, resolve(r, "cpu"), torch.zeros(3),
                           torch.ones(3))
    if r.precision == "fp16":
        step.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    for i in range(8):
        step(x, y, y, r.lr, i)
    return start, [p.detach().clone() for p in model.parameters()], step.tally[4].item()


@pytest.mark.parametrize("recipe,precision", [("sgdm", "fp32"), ("adam-restarts", "fp32"),
                                              ("adam-restarts", "fp16"), ("demo", "fp16")])
def test_fused_optimizer_matches_the_foreach_path(recipe, precision, one_thread):
    """CUDA runs use the fused optimizer kernels; they must compute the same training,
    including fp16 steps the loss scaler skips (the first of them here)."""
    from lambdapipe.recipes import get_recipe

    # An lr each optimizer is stable at: 8 steps of Adam at 0.05 on 8 images are chaotic,
    # and any two roundings drift apart by the lr itself.
    lr = 0.05 if recipe in ("sgdm", "demo") else 1e-3
    r = get_recipe(recipe, {"precision": precision, "grad_clip": 1.0, "lr": lr})
    # SGD under fp16 loss scaling is never fused (its skipped steps corrupt momentum)
    expect_fused = not (r.optimizer == "sgd" and precision == "fp16")
    assert resolve(r, "cuda").fused_optimizer is expect_fused
    params, skipped = [], []
    for fused in (False, True):
        def optimizer_for(model, fused=fused):  # the kernels a CUDA run would take
            opt = make_optimizer(model, r, fused and resolve(r, "cuda").fused_optimizer)
            assert opt.defaults["fused"] is (True if fused and expect_fused else None)
            return opt

        if fused and not expect_fused:
            # The CUDA run builds the very optimizer of the first pass (asserted here): the
            # same 8 steps again would compare a deterministic run with itself.
            optimizer_for(torch.nn.Linear(1, 1))
            params.append(params[0])
            skipped.append(skipped[0])
            continue
        start, end, skips = _eight_steps(r, optimizer_for)
        params.append(end)
        skipped.append(skips)
        moved = max((a - b).abs().max().item() for a, b in zip(end, start, strict=True))
        assert moved > 0.1 * r.lr  # the steps did train
    assert skipped[0] == skipped[1]
    assert (1 <= skipped[0] <= 6) if precision == "fp16" else skipped[0] == 0
    # Adam divides by sqrt(v): a float-rounding difference in a tiny gradient moves a weight
    # by a small fraction of lr, so its tolerance is in units of lr.
    atol = 1e-6 if r.optimizer == "sgd" else 1e-3 * r.lr
    for a, b in zip(*params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=atol)


def test_fused_sgd_under_loss_scaling_is_what_we_avoid(one_thread):
    """Why make_optimizer never fuses SGD under fp16: with a skipped step, fused SGD trains
    differently from plain SGD. If this starts skipping (a fixed torch), the exception can go."""
    from lambdapipe.recipes import get_recipe

    r = get_recipe("demo", {"precision": "fp16", "grad_clip": 1.0, "lr": 0.05})
    assert r.optimizer == "sgd"
    runs = [_eight_steps(r, lambda model, fused=fused: torch.optim.SGD(
                model.parameters(), lr=0.05, momentum=0.9, fused=fused))
            for fused in (None, True)]
    (_, plain, skipped), (_, fused, skipped_fused) = runs
    assert skipped >= 1
    if skipped == skipped_fused and all(torch.allclose(a, b, rtol=1e-5, atol=1e-6)
                                        for a, b in zip(plain, fused, strict=True)):
        pytest.skip(f"torch {torch.__version__}: fused SGD now matches plain SGD across a "
                    "skipped fp16 step; make_optimizer may fuse SGD under fp16 again")


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")),
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_step_matches_eager(one_thread):
    """`compile:` is a speed setting: the compiled step (the lambda layer's einsums and
    position conv included) trains the same model as the eager one. Two steps: further on,
    a tiny-width BN channel amplifies rounding and the comparison stops meaning anything."""
    from lambdapipe.models import create_model
    from lambdapipe.recipes import get_recipe

    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 10
    losses, params = [], []
    for mode in (False, "reduce-overhead"):  # CUDA graphs are skipped on CPU: a plain compile
        r = get_recipe("demo", {"compile": mode, "lr": 0.05})
        torch.manual_seed(0)
        model = create_model("lr18_l3_lc", 10, 16, **TINY)
        step = TrainStep(model, make_optimizer(model, r), r, resolve(r, "cpu"),
                               torch.zeros(3), torch.ones(3))
        assert (step.forward is model) is (mode is False)
        losses.append([step(x, y, y, r.lr, i).item() for i in range(2)])
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    torch.testing.assert_close(params[0], params[1], rtol=1e-4, atol=1e-5)
