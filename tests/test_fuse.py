"""Fused packs (lambdapipe/fuse.py): K runs of a cell as one network compute what K runs
alone compute, within float tolerance. The parts are checked in float64 against each model
alone (forward, gradients, BN statistics, clipping, optimizer steps and state). Whole runs are
not compared with solo runs in float32: on these tiny models even a solo float32 run and the
same run in float64 part ways within 24 steps (momentum buffers 50-230 % apart, measured),
so such a comparison would test luck. The whole is checked instead for its wiring (bitwise
against the fused step driven by hand) and against itself across kills."""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from test_pack import (  # the same tiny runs (dropout included) and their readers
    SEEDS,
    TINY,
    Interrupt,
    config,
    metrics_text,
    summary,
)

from lambdapipe import data, fuse, train
from lambdapipe.cli import main
from lambdapipe.evaluate import load_checkpoint
from lambdapipe.models import create_model
from lambdapipe.pack import run_packed
from lambdapipe.recipes import get_recipe
from lambdapipe.runtime import Runtime, resolve
from lambdapipe.step import TrainStep, clip_per_run, make_optimizer, run_optimizer_state

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest
rows = metrics_text


def models(name: str, k: int = 3, **args) -> list[torch.nn.Module]:
    out = []
    for seed in range(k):
        torch.manual_seed(seed)
        out.append(create_model(name, num_classes=10, image_size=32, base_width=4,
                                 **args).double())
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


# --------------------------------------------------------------------------- the parts
@pytest.mark.parametrize(("name", "args"), [
    ("resnet20x1", {}), ("resnet18", {}), ("lr18_l2_lc", {"impl": "conv"}),
    ("lr18_l2_lc", {"impl": "logit"}), ("lr18_l3_rpe", {"impl": "lambda"}),
    ("lambda_resnet18_u4_r7", {"drop_rate": 0.0})])
def test_fused_forward_gradients_and_bn_statistics_equal_each_model_alone(name, args):
    alone = models(name, **args)
    fused = fuse.FusedModel(copy.deepcopy(alone))
    x = torch.randn(3, 4, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (3, 4))
    out = fused(x)
    F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(3, 4).mean(1) \
        .sum().backward()
    for k, model in enumerate(alone):
        logits = model(x[k])
        F.cross_entropy(logits, y[k]).backward()
        assert rel(out[k], logits) < 1e-9
        for n, p in model.named_parameters():
            # lambda layers' softmax: 1e-8 relative; some BN gradients are 0 up to 1e-9
            assert torch.allclose(fused.params[n].grad[k], p.grad, rtol=1e-7, atol=1e-12), n
        for n, b in model.named_buffers():  # running statistics moved by this run's batch only
            assert torch.allclose(fused.stats[n][k].double(), b.double(), rtol=1e-9), n


def test_a_fused_model_compiles_in_one_graph_and_keeps_its_values():
    """What CUDA graphs need (the GPU path compiles the fused step): no graph break, and the
    compiled forward and BN updates equal eager. One trace: fullgraph=True fails on any graph
    break, and the counting backend sees the one graph it is handed."""
    from torch._dynamo.testing import CompileCounterWithBackend

    eager = fuse.FusedModel(models("lr18_l3_lc", 2))
    compiled = copy.deepcopy(eager)
    x = torch.randn(2, 4, 3, 32, 32, dtype=torch.float64)
    torch._dynamo.reset()
    graphs = CompileCounterWithBackend("aot_eager")
    out = torch.compile(compiled, backend=graphs, fullgraph=True)(x)
    assert graphs.frame_count == 1
    assert rel(out, eager(x)) < 1e-12
    for n, b in eager.stats.items():
        assert torch.allclose(compiled.stats[n].double(), b.double()), n


def test_clipping_is_each_runs_own():
    alone = models("resnet20x1", 3)
    fused = fuse.FusedModel(copy.deepcopy(alone))
    for p in fused.parameters():
        # run 0 far above the limit, run 1 just above, run 2 below (not scaled)
        p.grad = torch.randn_like(p) * torch.tensor([10.0, 0.05, 1e-4],
                                                    dtype=p.dtype).view(-1, *[1] * (p.dim() - 1))
    for k, model in enumerate(alone):
        for n, p in model.named_parameters():
            p.grad = fused.params[n].grad[k].clone()
    clip_per_run(fused.parameters(), 1.0)
    norms = []
    for k, model in enumerate(alone):
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item())
        for n, p in model.named_parameters():
            assert rel(fused.params[n].grad[k], p.grad) < 1e-12, n
    assert norms[0] > 1.0 and norms[1] > 1.0 and norms[2] < 1.0


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_one_optimizer_over_stacked_tensors_is_each_runs_own(optimizer):
    r = get_recipe("sgdm", {"optimizer": optimizer, "lr": 0.01, "weight_decay": 5e-4})
    alone = models("resnet20x1", 3)
    fused = fuse.FusedModel(copy.deepcopy(alone))
    solo_opts = [make_optimizer(m, r) for m in alone]
    opt = make_optimizer(fused.parameters(), r)
    for _ in range(3):
        for p in fused.parameters():
            p.grad = torch.randn_like(p)
        for k, (model, o) in enumerate(zip(alone, solo_opts, strict=True)):
            for n, p in model.named_parameters():
                p.grad = fused.params[n].grad[k].clone()
            o.step()
        opt.step()
    for k, (model, o) in enumerate(zip(alone, solo_opts, strict=True)):
        for n, p in model.named_parameters():
            assert rel(fused.params[n][k], p) < 1e-12, n
        # the run's slice of the state is its own optimizer's state dict, format included
        mine, theirs = run_optimizer_state(opt.state_dict(), k, 3), o.state_dict()
        assert mine["param_groups"] == theirs["param_groups"]
        assert mine["state"].keys() == theirs["state"].keys()
        for i, entry in theirs["state"].items():
            assert mine["state"][i].keys() == entry.keys()
            for key, v in entry.items():
                assert torch.allclose(torch.as_tensor(mine["state"][i][key]).double(),
                                      torch.as_tensor(v).double(), rtol=1e-12), (i, key)
    # and back: the runs' states stacked again are the stacked optimizer's
    again = fuse.stacked_optimizer_state([o.state_dict() for o in solo_opts])
    for i, entry in opt.state_dict()["state"].items():
        for key, v in entry.items():
            assert torch.allclose(torch.as_tensor(again["state"][i][key]).double(),
                                  torch.as_tensor(v).double(), rtol=1e-12), (i, key)


# --------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    data.prepare("digits", root, progress=False)
    return root


@pytest.fixture(scope="module")
def fused_ref(data_dir, tmp_path_factory) -> Path:
    """The three seeds trained fused, unbroken."""
    root = tmp_path_factory.mktemp("fused")
    run_packed([config(data_dir, root / str(s), s) for s in SEEDS], fuse=True)
    return root


def test_a_fused_pack_is_the_fused_step_over_each_runs_own_batches(data_dir, fused_ref,
                                                                  tmp_path):
    """The wiring, bitwise: each run's data order and learning rate, its slice written to its
    own run directory (with its slice of the optimizer state, in the solo format). That the
    fused step computes each run's own step is the float64 tests above."""
    runs = [train.Run(config(data_dir, tmp_path / str(s), s), "cpu") for s in SEEDS]
    with Runtime("cpu", deterministic=True).kernels():
        for run in runs:  # fresh, in order: the process RNG then stands where the pack's did
            run.start()
        step = fuse.fused_step([run.model for run in runs], runs[0].r, runs[0].rt, runs[0].mean,
                               runs[0].std)
        for i in range(runs[0].total):
            parts = [run.next_batch() for run in runs]
            step(*(torch.stack(p) for p in zip(*parts, strict=True)), runs[0].lr, i)
            for run in runs:
                run.it += 1
    losses = []
    for k, s in enumerate(SEEDS):
        ckpt = load_checkpoint(fused_ref / str(s) / "last.ckpt")
        assert ckpt["iteration"] == 24
        for name, t in ckpt["model"].items():
            ref = step.model.params.get(name, step.model.stats.get(name))
            assert torch.equal(t, ref[k]), (s, name)
        mine = run_optimizer_state(step.optimizer.state_dict(), k, 3)
        assert ckpt["optimizer"]["param_groups"] == mine["param_groups"]
        assert ckpt["optimizer"]["state"].keys() == mine["state"].keys()
        for i, entry in mine["state"].items():
            assert torch.equal(ckpt["optimizer"]["state"][i]["momentum_buffer"],
                               entry["momentum_buffer"]), (s, i)
        summ = summary(fused_ref / str(s))
        assert summ["status"] == "ok" and summ["compile"] == "eager (fused x3)"
        assert [r["iteration"] for r in rows(fused_ref / str(s))] == ["8", "16", "24"]
        losses.append(summ["best_train_loss"])
    assert len(set(losses)) == 3  # the seeds really differ


def test_a_killed_fused_pack_resumes_to_the_unbroken_result(data_dir, fused_ref, tmp_path):
    def stop(cfg, row):  # after the last run's checkpoint: all three at iteration 16
        if cfg.seed == 2 and row["iteration"] == 16:
            raise Interrupt

    cfgs = [config(data_dir, tmp_path / str(s), s) for s in SEEDS]
    with pytest.raises(Interrupt):
        run_packed(cfgs, fuse=True, callback=stop)
    assert all(load_checkpoint(tmp_path / str(s) / "last.ckpt")["iteration"] == 16
               for s in SEEDS)
    # A fused run's checkpoint is a solo one: a copy of seed 0 resumes alone to the end.
    shutil.copytree(tmp_path / "0", tmp_path / "alone")
    alone = train.run(config(data_dir, tmp_path / "alone", 0))
    assert alone["status"] == "ok" and alone["iterations"] == 24
    assert alone["compile"] == "eager"
    run_packed(cfgs, fuse=True)
    for s in SEEDS:  # bitwise: the same fused kernels, the same dropout stream
        assert rows(tmp_path / str(s)) == rows(fused_ref / str(s))
        assert summary(tmp_path / str(s)) == summary(fused_ref / str(s))
        a, b = (load_checkpoint(d / str(s) / "last.ckpt")["model"] for d in (tmp_path, fused_ref))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_runs_killed_between_their_checkpoints_catch_up_then_fuse(data_dir, tmp_path, capfd):
    def stop(cfg, row):  # seed 0 has written iteration 16, seeds 1 and 2 only 8
        if cfg.seed == 0 and row["iteration"] == 16:
            raise Interrupt

    cfgs = [config(data_dir, tmp_path / str(s), s) for s in SEEDS]
    with pytest.raises(Interrupt):
        run_packed(cfgs, fuse=True, callback=stop)
    capfd.readouterr()
    summaries = run_packed(cfgs, fuse=True)
    err = capfd.readouterr().err
    assert "[seed 1] catching up alone from iteration 8 to 16" in err
    assert "[seed 0] catching up" not in err
    for s, summ in zip(SEEDS, summaries, strict=True):
        assert summ["status"] == "ok" and summ["iterations"] == 24
        assert summ["compile"] == "eager (fused x3)"
        assert [r["iteration"] for r in rows(tmp_path / str(s))] == ["8", "16", "24"]


def test_a_diverged_run_ends_while_the_others_train_on_untouched(data_dir, fused_ref,
                                                                 tmp_path, monkeypatch):
    real = TrainStep.__call__

    def poisoned(self, x, y, y_clean, lr, step):
        if self.runs and step == 10:  # run 1's weights become NaN: non-finite from step 11
            with torch.no_grad():
                next(iter(self.model.params.values()))[1].fill_(float("nan"))
        return real(self, x, y, y_clean, lr, step)

    monkeypatch.setattr(TrainStep, "__call__", poisoned)
    summaries = run_packed([config(data_dir, tmp_path / str(s), s) for s in SEEDS], fuse=True)
    assert summaries[1]["status"] == "diverged" and summaries[1]["diverged_at"] == 11
    for s in (0, 2):
        assert summaries[s]["status"] == "ok" and summaries[s]["iterations"] == 24
        for ra, rb in zip(rows(tmp_path / str(s)), rows(fused_ref / str(s)), strict=True):
            for key in ("train_loss", "val_loss"):  # nothing of run 1's NaNs reached them
                assert math.isclose(float(ra[key]), float(rb[key]), rel_tol=1e-6), (s, key)


def test_optimizers_with_different_step_counters_are_not_stacked():
    """Adam's bias correction counts steps per parameter: runs whose counters differ would
    share one count if stacked, so they train one after another (fuse.train_fused)."""
    from lambdapipe.fuse import why_not_states

    def adam_state(steps: int) -> dict:
        p = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.Adam([p], lr=0.1)
        for _ in range(steps):
            p.grad = torch.ones(3)
            opt.step()
        return opt.state_dict()

    assert why_not_states([adam_state(3), adam_state(3)]) is None
    assert "step counters differ (3.0 and 4.0)" in why_not_states([adam_state(3),
                                                                    adam_state(4)])


def test_runs_that_cannot_fuse_train_one_after_another_and_say_why(data_dir, tmp_path, capfd):
    from lambdapipe.fuse import why_not

    half = [config(data_dir, tmp_path / str(s), s, precision="fp16") for s in (0, 1)]
    assert "fp16" in why_not(half, resolve(half[0].recipe, "cpu"))
    mixed = [config(data_dir, tmp_path / "a", 0), config(data_dir, tmp_path / "b", 1, lr=0.01)]
    rt = resolve(mixed[0].recipe, "cpu")
    assert "not of the same grid cell" in why_not(mixed, rt)
    assert why_not(mixed[:1], rt) == "a single run"
    summaries = run_packed(mixed, fuse=True)
    assert "not fused (" in capfd.readouterr().err
    assert [s["compile"] for s in summaries] == ["eager", "eager"]


def test_cli_fuse_needs_seeds(data_dir, tmp_path):
    args = ["train", "--model", "resnet18", "--model-arg", "base_width=4", "--dataset",
            "digits", "--data-dir", str(data_dir), "--recipe", "demo", "--device", "cpu"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "x"), "--fuse"])
    assert result.exit_code == 2 and "--fuse trains several seeds" in result.output
    assert not list(tmp_path.iterdir())
    # `--seeds` fuses by default (where it can: not fp16, tests below)
    ok = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "{seed}"), "--seeds", "0,1",
                                   "--set", "iterations=8", "--set", "eval_every=8",
                                   "--set", "batch_size=32", "--no-progress"])
    assert ok.exit_code == 0, ok.output
    assert all(summary(tmp_path / str(s))["compile"] == "eager (fused x2)" for s in (0, 1))


@pytest.mark.gpu
@pytest.mark.parametrize("compile_", [False, "auto"])  # the recipe's values: eager, default
def test_fused_runs_on_cuda_match_runs_alone_within_noise(data_dir, tmp_path, compile_):
    """On a GPU, eager and on the default path (CUDA graphs): the fused step compiles without
    falling back, and 200 steps land where runs trained alone land."""
    kw = {"iterations": 200, "eval_every": 100, "batch_size": 64, "compile": compile_}
    cfg = {**TINY, "drop_rate": 0.0}

    def build(out: Path, seed: int) -> train.TrainConfig:
        return train.TrainConfig.build(model="resnet18", model_args=cfg, dataset="digits",
                                       data_dir=data_dir, noise="clean", seed=seed, out=out,
                                       recipe="demo", overrides=kw)

    solo = [train.run(build(tmp_path / f"alone{s}", s), device="cuda") for s in SEEDS]
    fused = run_packed([build(tmp_path / f"fused{s}", s) for s in SEEDS], device="cuda",
                       fuse=True)
    path = "eager" if compile_ is False else "reduce-overhead"
    for a, b in zip(solo, fused, strict=True):
        assert b["compile"] == f"{path} (fused x3)"  # no fallback
        assert a["status"] == b["status"] == "ok" and b["iterations"] == 200
        assert b["val_acc"] > 0.8 and abs(a["val_acc"] - b["val_acc"]) < 0.1
        assert abs(a["best_train_loss"] - b["best_train_loss"]) < 0.25
