"""`compile: step-graph`: the whole training step captured once and replayed. On a CPU the
capture is a stand-in that reruns the captured body as a replay would (from no gradients, on
the graph's own input buffers), so the logic around the graph (warm-up, input buffers, the
learning rate and iteration as device scalars, the checkpoint's float learning rate, the
fallback) is checked here bitwise against the plain step; the CUDA capture itself is checked
on a GPU (marked `gpu`)."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import pytest
import torch

from lambdapipe import data, train
from lambdapipe.models import create_model
from lambdapipe.recipes import get_recipe
from lambdapipe.runtime import Runtime, resolve
from lambdapipe.step import COLUMN, STEP_GRAPH_WARMUP, make_optimizer, make_step

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest
TINY = {"base_width": 4, "drop_rate": 0.2}  # dropout: replays draw fresh masks, as graphs do


class RerunReplay:
    """CPU stand-in for step.CudaStepGraph: a replay reruns the body, which in a captured
    graph starts without gradients (they were cleared before the capture)."""

    captures = 0

    def __init__(self, body, optimizer):
        type(self).captures += 1
        self.body, self.optimizer = body, optimizer

    def replay(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        return self.body()

    @staticmethod
    def warm_up(device):
        return contextlib.nullcontext()


class FailingCapture(RerunReplay):
    def __init__(self, body, optimizer):
        raise RuntimeError("operation not permitted when stream is capturing")


def batches(n: int):
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=g),
             torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def on_cpu(r) -> Runtime:
    """`r` resolved on CUDA (its step graph, fused optimizer kernels), run on the CPU: the
    graph's logic with the stand-in captures above."""
    return dataclasses.replace(resolve(r, "cuda"), device="cpu", channels_last=False,
                               tf32=False, fused_optimizer=True)


def train_steps(overrides: dict, capture=None, steps: int = 8):
    """`steps` steps of a tiny ResNet-18 (dropout) with fused optimizer kernels, the learning
    rate changing every step; returns the weights, the tally and the step."""
    r = get_recipe("demo", overrides)
    torch.manual_seed(0)
    model = create_model("resnet18", 10, 16, **TINY)
    optimizer = make_optimizer(model, r, fused=True)
    step = make_step(model, optimizer, r, on_cpu(r), torch.full((3,), 0.5),
                     torch.full((3,), 0.25), capture=capture)
    for i, (x, y) in enumerate(batches(steps)):
        step(x, y, (y + 1) % 10, 0.05 / (1 + i), i)
    return [p.detach().clone() for p in model.parameters()], step.tally.clone(), step


@pytest.fixture
def no_inductor(monkeypatch):
    """The graph's logic, not inductor's kernels: torch.compile is the identity here."""
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: model)


@pytest.mark.parametrize("overrides", [
    {"optimizer": "sgd", "grad_clip": 0.5},
    {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "nesterov": False},
    {"optimizer": "sgd", "precision": "bf16"},
], ids=["sgd-clip", "adamw", "bf16"])
def test_the_replayed_step_is_the_plain_step(no_inductor, overrides):
    RerunReplay.captures = 0
    plain, plain_tally, _ = train_steps({**overrides, "compile": False})
    graphed, tally, step = train_steps({**overrides, "compile": "step-graph"}, RerunReplay)
    assert RerunReplay.captures == 1 and step.warm == STEP_GRAPH_WARMUP
    assert step.path == "step-graph" and step.graph is not None
    assert all(torch.equal(a, b) for a, b in zip(plain, graphed, strict=True))
    assert torch.equal(plain_tally, tally)
    # the checkpoint keeps the solo format: a float learning rate (the last step's)
    group = step.optimizer.state_dict()["param_groups"][0]
    assert isinstance(group["lr"], float) and group["lr"] == pytest.approx(0.05 / 8)


def test_a_fused_pack_replays_its_step_as_one_graph(no_inductor):
    """The fused step (lambdapipe/fuse.py) captured: K runs, one graph, the same numbers."""
    from lambdapipe import fuse

    results = []
    for compile_, capture in ((False, None), ("step-graph", RerunReplay)):
        r = get_recipe("demo", {"compile": compile_, "grad_clip": 0.5})
        models = []
        for seed in range(3):
            torch.manual_seed(seed)
            models.append(create_model("resnet18", 10, 16, **TINY))
        torch.manual_seed(0)
        step = fuse.fused_step(models, r, on_cpu(r), torch.full((3,), 0.5),
                               torch.full((3,), 0.25), capture=capture)
        for i, (x, y) in enumerate(batches(6)):
            xs, ys = x.expand(3, *x.shape).clone(), torch.stack([y, (y + 1) % 10, y])
            step(xs, ys, ys, 0.05 / (1 + i), i)
        results.append((step, [p.detach().clone() for p in step.model.parameters()]))
    (plain, a), (graphed, b) = results
    assert graphed.path == "step-graph" and graphed.graph is not None
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert torch.equal(plain.tally, graphed.tally)


def test_the_first_non_finite_iteration_is_counted_inside_the_graph(no_inductor):
    r = get_recipe("demo", {"compile": "step-graph"})
    torch.manual_seed(0)
    model = create_model("resnet18", 10, 16, **TINY)
    step = make_step(model, make_optimizer(model, r, fused=True), r, on_cpu(r),
                     torch.zeros(3), torch.ones(3), capture=RerunReplay)
    for i, (x, y) in enumerate(batches(7)):
        if i == 5:  # after the capture (step 3): the graph's iteration scalar marks it
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        step(x, y, y, 0.05, i)
    assert step.tally[COLUMN.first_nonfinite].item() == 6  # iteration = step + 1


def test_a_failed_capture_falls_back_to_eager_and_changes_nothing(no_inductor, capfd):
    plain, plain_tally, _ = train_steps({"compile": False})
    graphed, tally, step = train_steps({"compile": "step-graph"}, FailingCapture)
    assert step.path.startswith("eager (fallback: RuntimeError: operation not permitted")
    assert "step-graph compiled step failed, training continues eagerly" in capfd.readouterr().err
    assert all(torch.equal(a, b) for a, b in zip(plain, graphed, strict=True))
    assert torch.equal(plain_tally, tally)


class FailingReplay(RerunReplay):
    """A replay that fails after its optimizer step ran (a half-applied step)."""

    def replay(self) -> torch.Tensor:
        super().replay()
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_a_failed_replay_stops_instead_of_taking_the_step_again(no_inductor):
    with pytest.raises(RuntimeError, match="rerun the same command to resume from last.ckpt"):
        train_steps({"compile": "step-graph"}, FailingReplay)


def test_checkpoints_carry_no_device_only_optimizer_flags(no_inductor):
    """A step graph's Adam runs capturable (and fused on CUDA); its checkpoint resumes into
    a plain CPU optimizer, which keeps its own flags and steps."""
    _, _, step = train_steps({"compile": "step-graph", "optimizer": "adamw", "lr": 1e-3,
                              "nesterov": False})
    assert step.optimizer.param_groups[0]["capturable"]
    state = step.optimizer.state_dict()
    assert not {"capturable", "fused"} & set(state["param_groups"][0])
    r = get_recipe("demo", {"optimizer": "adamw", "lr": 1e-3, "nesterov": False})
    torch.manual_seed(0)
    model = create_model("resnet18", 10, 16, **TINY)
    plain = make_optimizer(model, r, fused=False)
    plain.load_state_dict(state)
    assert not plain.param_groups[0]["capturable"] and not plain.param_groups[0]["fused"]
    model(torch.zeros(2, 3, 16, 16)).sum().backward()
    plain.step()
    # and an old checkpoint that still carries them loads the same way
    old = {**state, "param_groups": [{**g, "capturable": True, "fused": True}
                                     for g in state["param_groups"]]}
    plain.load_state_dict(old)
    assert not plain.param_groups[0]["capturable"] and not plain.param_groups[0]["fused"]


def test_step_graph_is_a_cuda_setting():
    r = get_recipe("sgdm", {"compile": "step-graph", "precision": "bf16"})
    assert resolve(r, "cuda").compile == "step-graph"
    assert resolve(r, "cpu").compile is None  # eager on a CPU, as auto is
    with pytest.raises(Exception, match="step-graph needs bf16 or fp32"):
        get_recipe("sgdm", {"compile": "step-graph", "precision": "fp16"})


@pytest.mark.gpu
def test_a_step_graph_run_on_cuda_trains_like_the_default_path(tmp_path):
    """On a GPU: captured without falling back, and where the default path lands."""
    root = tmp_path / "data"
    data.prepare("digits", root, progress=False)

    def run(out: Path, compile_: str) -> dict:
        return train.run(train.TrainConfig.build(
            model="resnet18", model_args={"base_width": 8}, dataset="digits", data_dir=root,
            noise="clean", seed=0, out=out, recipe="demo",
            overrides={"iterations": 200, "eval_every": 100, "batch_size": 64,
                       "compile": compile_, "precision": "bf16"}), device="cuda")

    graphed, default = run(tmp_path / "graph", "step-graph"), run(tmp_path / "auto", "auto")
    assert graphed["compile"] == "step-graph" and graphed["status"] == "ok"
    assert graphed["val_acc"] > 0.8 and abs(graphed["val_acc"] - default["val_acc"]) < 0.1
