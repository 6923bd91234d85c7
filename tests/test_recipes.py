"""Recipes: the published studies' numbers and where each comes from, their schedules, and
refusal of bad overrides."""

from __future__ import annotations

import math

import pytest

from lambdapipe import recipes
from lambdapipe.errors import UserError
from lambdapipe.recipes import PROVENANCE_KINDS, get_recipe, list_recipes, recipe_provenance
from lambdapipe.runtime import resolve

# Its tests take a tenth of a CPU-second or less, not the default 1 s: under pytest-xdist
# this short work unit goes out last, filling in around the long ones (tests/conftest.py).
pytestmark = pytest.mark.cost(0.05)


def test_every_recipe_loads_with_explicit_units():
    assert set(list_recipes()) >= {"sgdm", "adam-restarts", "sgd-restarts", "demo"}
    for name in list_recipes():
        r = get_recipe(name)
        assert (r.iterations is None) != (r.epochs is None)
        assert (r.eval_every is None) != (r.eval_every_epochs is None)


def test_sgdm_has_the_numbers_the_baseline_tables_state():
    r = get_recipe("sgdm")
    assert (r.optimizer, r.lr, r.momentum, r.weight_decay) == ("sgd", 0.1, 0.9, 1e-3)
    assert (r.batch_size, r.iterations) == (256, 48000)
    prov = recipe_provenance("sgdm")
    assert all(prov[k][0] == "stated" for k in ("optimizer", "lr", "momentum", "weight_decay",
                                                 "batch_size", "iterations"))


def test_sgdm_schedule_and_augmentation_are_ours():
    """The tables state no schedule or augmentation: warm-up, cosine, crop and flip are our
    choices, and recipes.yaml says so."""
    r = get_recipe("sgdm")
    assert (r.nesterov, r.eval_every, r.augment, r.crop_padding, r.flip) == (
        False, 1000, "crop", 4, True)
    prov = recipe_provenance("sgdm")
    assert all(prov[k][0] == "ours" for k in ("schedule", "warmup", "augment", "crop_padding",
                                               "flip", "eval_every"))
    total = r.total_steps(steps_per_epoch=175)
    lrs = [r.lr_at(s, total, 175) for s in range(total)]
    peak = lrs.index(max(lrs))
    assert peak == 4799 and max(lrs) == pytest.approx(0.1)  # linear warm-up over 10 %
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1], strict=True))
    assert all(a >= b for a, b in zip(lrs[peak:-1], lrs[peak + 1:], strict=True))
    assert lrs[-1] < 1e-8  # cosine to 0


@pytest.mark.parametrize(("name", "t0", "cycles"), [("adam-restarts", 5, 5),
                                                    ("sgd-restarts", 10, 5)])
def test_warm_restart_budgets_end_at_the_bottom_of_a_cycle(name, t0, cycles):
    r = get_recipe(name)
    spe = 10
    total = r.total_steps(spe)
    assert total == round(r.epochs * spe)
    lrs = [r.lr_at(s, total, spe) for s in range(total)]
    restarts = [s for s in range(1, total) if lrs[s] > lrs[s - 1]]
    ends = [t0 * (2 ** (i + 1) - 1) * spe for i in range(cycles - 1)]  # 5, 15, 35, 75 epochs
    assert restarts == ends
    assert lrs[0] == r.lr and all(lrs[s] == r.lr for s in restarts)
    assert lrs[-1] == pytest.approx(r.restart_eta_min, abs=1e-3 * r.lr)
    assert min(lrs) >= r.restart_eta_min


def test_step_and_constant_schedules():
    r = get_recipe("demo", {"schedule": "step", "warmup": 0, "step_milestones": [0.5, 0.75]})
    assert [r.lr_at(s, 100, 10) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx(
        [0.05, 0.05, 0.005, 0.005, 0.0005, 0.0005])
    c = get_recipe("demo", {"schedule": "constant", "warmup": 0})
    assert {c.lr_at(s, 100, 10) for s in range(100)} == {0.05}


def test_overrides_are_typed_and_a_budget_unit_replaces_the_other():
    r = get_recipe("adam-restarts", {"iterations": 200, "eval_every": 20, "lr": "3e-4",
                                     "precision": "bf16", "grad_clip": None})
    assert (r.iterations, r.epochs, r.eval_every, r.eval_every_epochs) == (200, None, 20, None)
    assert r.lr == 3e-4 and isinstance(r.iterations, int) and r.precision == "bf16"
    assert get_recipe("sgdm", {"epochs": 2.5}).total_steps(100) == 250


@pytest.mark.parametrize(("name", "overrides", "needle"), [
    ("nope", {}, "invalid recipe 'nope': expected one of adam-restarts"),
    ("sgdm", {"optimizer": "lamb"}, "invalid optimizer 'lamb': expected one of sgd, adam"),
    ("sgdm", {"batch_size": 0}, "invalid batch_size 0: expected an integer >= 1"),
    ("sgdm", {"batch_size": 2.5}, "invalid recipe field batch_size 2.5: expected an integer"),
    ("sgdm", {"bogus": 1}, "invalid recipe field 'bogus': expected one of augment, "
                           "batch_size"),
    ("sgdm", {"precision": "fp8"}, "invalid precision 'fp8'"),
    ("sgdm", {"lr": "fast"}, "invalid recipe field lr 'fast': expected a finite number"),
    ("sgdm", {"lr": math.inf}, "expected a finite number"),
    ("sgdm", {"schedule": "linear"}, "invalid schedule 'linear'"),
    ("sgdm", {"flip": "yes"}, "invalid recipe field flip 'yes': expected true or false"),
    ("sgdm", {"iterations": None}, "exactly one of iterations, epochs"),
    ("adam-restarts", {"nesterov": True}, "invalid nesterov True"),
    ("sgdm", {"warmup": 1.5}, "invalid warmup 1.5"),
    ("sgdm", {"compile": "fast"}, "invalid recipe field compile 'fast': expected auto, true, "
                                  "false, step-graph or a torch.compile mode: default, "
                                  "reduce-overhead"),
    ("sgdm", {"channels_last": "yes"}, "invalid recipe field channels_last 'yes': expected "
                                       "auto, true or false"),
    ("sgdm", {"tf32": "no"}, "invalid recipe field tf32 'no': expected true or false"),
])
def test_bad_recipe_input_is_one_line(name, overrides, needle):
    with pytest.raises(UserError) as err:
        get_recipe(name, overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_compile_takes_a_flag_or_a_mode():
    def mode(value):
        return resolve(get_recipe("sgdm", {"compile": value}), "cpu").compile

    assert get_recipe("sgdm").compile == "auto" and mode("auto") is None  # eager on a CPU
    assert mode(True) == "default" and mode("true") == "default"
    assert mode("false") is None
    assert mode("reduce-overhead") == "reduce-overhead"


def test_auto_is_the_fast_path_on_cuda_and_eager_on_cpu():
    """The defaults: CUDA graphs, channels_last and TF32 (fp32 recipes) on a GPU; none on a
    CPU. Explicit settings stand, except channels_last on CPU (below) and TF32 off CUDA."""
    r = get_recipe("sgdm")
    assert (r.compile, r.channels_last, r.tf32) == ("auto", "auto", True)
    gpu, cpu = resolve(r, "cuda:0"), resolve(r, "cpu")
    assert (gpu.compile, gpu.channels_last, gpu.tf32) == ("reduce-overhead", True, True)
    assert (cpu.compile, cpu.channels_last, cpu.tf32) == (None, False, False)
    assert resolve(r, "cuda") == resolve(r, "cuda")  # one answer, whoever asks
    bf16 = resolve(get_recipe("sgdm", {"precision": "bf16"}), "cuda")
    assert bf16.tf32 is False  # autocast runs the matmuls in bf16: TF32 does not apply
    off = resolve(get_recipe("sgdm", {"compile": False, "channels_last": False, "tf32": False}),
                  "cuda")
    assert (off.compile, off.channels_last, off.tf32) == (None, False, False)
    assert resolve(get_recipe("demo", {"compile": "default"}), "cpu").compile == "default"


def test_the_runtime_decides_what_fp16_forbids_and_the_optimizer_kernels():
    """fp16: a loss scaler, no fused seeds, no fused SGD kernels (skipped steps corrupt its
    momentum); bf16 and fp32 none of these. Fused kernels on CUDA only."""
    fp16 = resolve(get_recipe("sgdm", {"precision": "fp16"}), "cuda")
    assert fp16.scaler and "fp16" in fp16.why_not_fused and not fp16.fused_optimizer
    adam16 = resolve(get_recipe("adam-restarts", {"precision": "fp16"}), "cuda")
    assert adam16.fused_optimizer and adam16.scaler
    bf16 = resolve(get_recipe("sgdm", {"precision": "bf16"}), "cuda")
    assert not bf16.scaler and bf16.why_not_fused is None and bf16.fused_optimizer
    assert not resolve(get_recipe("sgdm"), "cpu").fused_optimizer
    assert resolve(get_recipe("sgdm"), "cuda").record()["compile"] == "reduce-overhead"
    assert resolve(get_recipe("sgdm"), "cpu").record()["compile"] == "eager"


def test_channels_last_stays_off_on_cpu():
    """oneDNN's CPU 1x1 weight-gradient kernel corrupts the heap with channels_last."""
    r = get_recipe("demo", {"channels_last": True})
    assert resolve(r, "cpu").channels_last is False
    assert resolve(r, "cuda:1").channels_last is True


@pytest.mark.parametrize("name", list_recipes())
def test_every_field_of_every_recipe_says_where_it_comes_from(name):
    prov = recipe_provenance(name)
    table = recipes._recipe_table()[name]
    assert set(prov) == set(table) - {"description", "provenance"}
    assert all(kind in PROVENANCE_KINDS and len(why) > 10 for kind, why in prov.values())


def test_the_fields_the_sources_do_not_state_are_not_called_theirs():
    """The issue's list: ours or inferred, never stated."""
    adam, sgd = recipe_provenance("adam-restarts"), recipe_provenance("sgd-restarts")
    assert adam["epochs"][0] == "ours"
    assert adam["augment"][0] == "inferred" and "As for image augmentation" in adam["augment"][1]
    assert sgd["epochs"][0] == "ours"
    assert all(sgd[k][0] == "inferred" for k in ("optimizer", "momentum", "weight_decay",
                                                  "lr", "batch_size", "restart_t0"))
    assert all(kind == "ours" for kind, _ in recipe_provenance("demo").values())


@pytest.mark.parametrize(("provenance", "needle"), [
    ({"lr": "stated: the source"}, "provenance must name exactly its fields: missing "
                                   "['batch_size']"),
    ({"lr": "stated: x", "batch_size": "ours: y", "epochs": "ours: z"}, "extra ['epochs']"),
    ({"lr": "guessed: the source", "batch_size": "ours: y"}, "provenance of lr 'guessed: the "
                                                             "source': expected '<stated|"),
    ({"lr": "stated", "batch_size": "ours: y"}, "provenance of lr 'stated'"),
])
def test_bad_provenance_is_one_line(monkeypatch, provenance, needle):
    table = {"toy": {"lr": 0.1, "batch_size": 8, "provenance": provenance}}
    monkeypatch.setattr(recipes, "_recipe_table", lambda: table)
    with pytest.raises(UserError) as err:
        recipe_provenance("toy")
    assert needle in str(err.value) and "\n" not in str(err.value)
