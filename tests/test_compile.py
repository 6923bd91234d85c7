"""The fast path's CPU-checkable half: lambda layers safe under torch.compile and CUDA graphs
(no state stored by a forward, no graph breaks, compiled = eager), the measured choice of each
lambda layer's implementation (with a stand-in timer), and the eager fallback of a compiled
step that fails."""

from __future__ import annotations

import json

import pytest
import torch

from lambdapipe import train
from lambdapipe.models import create_model, list_models
from lambdapipe.models.autotune import choose_impls, lambda_layers
from lambdapipe.models.lambda_layer import LambdaLayer
from lambdapipe.recipes import get_recipe

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest
IMPLS = ["conv", "lambda", "logit"]


def tiny(name: str, **args) -> torch.nn.Module:
    """The smallest model of a name: width 4 (CIFAR ResNets: 4 base channels), 32 px."""
    torch.manual_seed(0)
    return create_model(name, num_classes=10, image_size=32, base_width=4, **args)


def module_state(model: torch.nn.Module) -> dict:
    """Every attribute of every submodule, tensors by identity (their values may change:
    BN running statistics are updated in place, which is not storing)."""
    state = {}
    for name, m in model.named_modules():
        for key, value in vars(m).items():
            if key in ("_parameters", "_buffers", "_modules"):
                value = {k: id(v) for k, v in value.items()}
            elif isinstance(value, torch.Tensor):
                value = ("tensor", id(value))
            elif isinstance(value, dict):
                value = {k: id(v) if isinstance(v, torch.Tensor) else repr(v)
                         for k, v in value.items()}
            else:
                value = repr(value)
            state[f"{name}.{key}"] = value
    return state


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scope", [5, None])
def test_a_forward_stores_nothing_on_the_layer(impl, scope):
    """CUDA graphs replay a forward: a tensor a forward kept on the module (the old index
    cache) is overwritten by the next replay."""
    layer = LambdaLayer(8, 8, query_depth=4, heads=2, scope=scope,
                        context_size=(6, 6) if scope is None else None, impl=impl)
    before = module_state(layer)
    for train_mode in (True, False):
        layer.train(train_mode)(torch.randn(2, 8, 6, 6)).sum().backward()
    assert module_state(layer.train()) == before


def test_a_forward_stores_nothing_on_a_model():
    model = tiny("lr18_l2_rpe", lambda_blocks="all")
    before = module_state(model)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert module_state(model) == before


# The fast tier (-m "not slow") traces one model of each kind of block: basic and
# bottleneck ResNet blocks, and each lambda-layer variant. The other models repeat those
# blocks wider (x2, x4) or deeper, at up to ten times the tracing time: `make test` traces
# every registered model. Not here either: the models test_models_fullgraph_equal_eager
# compiles with fullgraph=True (which fails on any graph break), and lambda_resnet18_u4_r5,
# whose block kind (u=4, a local scope) that test compiles in lambda_resnet18_u4_r7.
FAST_TRACE = {"resnet18", "resnet50", "lambda_resnet18", "lr18_l2_rpe", "lr18_l3_lc"}


@pytest.mark.parametrize("name", [
    n if n in FAST_TRACE else pytest.param(n, marks=pytest.mark.slow)
    for n in list_models()])
def test_no_graph_breaks(name):
    """torch._dynamo traces every registered model's forward (train mode) as one graph; the
    backward is checked by the fullgraph tests below, through AOTAutograd."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(tiny(name))(torch.randn(2, 3, 32, 32))
    reasons = [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_break_count == 0 and explained.graph_count == 1, reasons


def compiled_equals_eager(model: torch.nn.Module, x: torch.Tensor, rtol: float, atol: float):
    """fullgraph=True through AOTAutograd (forward and backward traced as graphs, run by the
    eager kernels): outputs and every gradient equal the eager model's."""
    torch._dynamo.reset()
    grads = []
    outs = []
    for fn in (model, torch.compile(model, fullgraph=True, backend="aot_eager")):
        model.zero_grad(set_to_none=True)
        out = fn(x)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(outs[1], outs[0], rtol=rtol, atol=atol)
    for a, b in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scope", [3, None])
def test_lambda_layer_fullgraph_equals_eager(impl, scope):
    torch.manual_seed(0)
    layer = LambdaLayer(6, 8, query_depth=4, heads=2, intra_depth=2, scope=scope,
                        context_size=(5, 7) if scope is None else None, impl=impl).double()
    compiled_equals_eager(layer, torch.randn(3, 6, 5, 7, dtype=torch.float64), 1e-10, 1e-10)


@pytest.mark.parametrize(("name", "impl"), [
    ("lr18_l2_lc", "conv"), ("lr18_l2_lc", "lambda"), ("lr18_l2_lc", "logit"),
    ("lr18_l3_rpe", "auto"), ("lambda_resnet18_u4_r7", "auto"), ("resnet20x1", None)])
def test_models_fullgraph_equal_eager(name, impl):
    args = {"impl": impl} if impl else {}
    if name.startswith("lambda_"):
        args["drop_rate"] = 0.0  # dropout would draw different masks
    model = tiny(name, **args).double()
    compiled_equals_eager(model, torch.randn(2, 3, 32, 32, dtype=torch.float64), 1e-9, 1e-9)


# --------------------------------------------------------------------------- autotune
class StandInTimer:
    """Seconds per impl from a table; runs each candidate once, so it must work."""

    def __init__(self, seconds: dict[str, float]):
        self.seconds, self.calls = seconds, []

    def __call__(self, fn) -> float:
        fn()
        self.calls.append(fn.impl)
        return self.seconds[fn.impl]


def test_auto_takes_the_measured_fastest_and_caches_it(tmp_path):
    model = tiny("lr18_l2_lc", lambda_blocks="all")  # two lambda layers: 32x32 and 16x16
    cache = tmp_path / "impls.json"
    timer = StandInTimer({"conv": 3.0, "lambda": 1.0, "logit": 2.0})
    chosen = choose_impls(model, 32, 8, "cpu", cache=cache, timer=timer)
    big, small = (name for name, _ in lambda_layers(model))
    # the 32x32 layer's logits exceed LOGIT_MAX_NM: conv and lambda only; 16x16: all three
    assert timer.calls == ["conv", "lambda", "conv", "lambda", "logit"]
    assert chosen == {big: {"impl": "lambda", "how": "measured"},
                      small: {"impl": "lambda", "how": "measured"}}
    layers = dict(lambda_layers(model))
    assert layers[big].tuned == (32, 32, "lambda") and layers[small].tuned == (16, 16, "lambda")
    assert layers[big].resolve_impl(32, 32) == "lambda"
    assert layers[big].resolve_impl(16, 16) == layers[big].rule_impl(16, 16)  # another map
    entries = json.loads(cache.read_text())["entries"]
    assert len(entries) == 2
    assert all(k.startswith(f"cpu|torch {torch.__version__}|") for k in entries)

    # the same shapes again (a fresh model): read from the cache, nothing timed
    again = tiny("lr18_l2_lc", lambda_blocks="all")
    never = StandInTimer({})
    assert {c["how"] for c in choose_impls(again, 32, 8, "cpu", cache=cache,
                                           timer=never).values()} == {"cached"}
    assert never.calls == []
    # another batch size is another shape: measured again
    timer = StandInTimer({"conv": 1.0, "lambda": 2.0, "logit": 0.5})
    chosen = choose_impls(again, 32, 16, "cpu", cache=cache, timer=timer)
    assert [c["impl"] for c in chosen.values()] == ["conv", "logit"]
    assert len(json.loads(cache.read_text())["entries"]) == 4
    # TF32 changes the timing too: its own entries
    choose_impls(again, 32, 16, "cpu", cache=cache, timer=timer, tf32=True)
    entries = json.loads(cache.read_text())["entries"]
    assert len(entries) == 6 and sum("|tf32|" in k for k in entries) == 2


def test_measuring_leaves_the_rng_streams_alone(tmp_path):
    """A run's initialisation and dropout draw the same numbers whether its lambda layers
    were measured now or read from the cache."""
    model = tiny("lr18_l3_lc")
    torch.manual_seed(0)
    timer = StandInTimer({"conv": 1.0, "lambda": 2.0, "logit": 3.0})
    choose_impls(model, 32, 8, "cpu", timer=timer)
    assert timer.calls  # measured: the probe drew its random inputs
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))


def test_auto_measures_only_what_fits_the_memory_budget(tmp_path):
    model = tiny("lr18_l3_rpe")
    timer = StandInTimer({"conv": 3.0, "lambda": 1.0, "logit": 2.0})
    chosen = choose_impls(model, 32, 8, "cpu", timer=timer, free_bytes=1)
    assert timer.calls == ["conv"] and [c["impl"] for c in chosen.values()] == ["conv"]


def test_without_a_timer_the_fixed_rule_stands(tmp_path):
    """On a CPU nothing is timed: the MAC rule, recorded as such, and no cache is written."""
    model = tiny("lr18_l2_lc", lambda_blocks="all")
    chosen = choose_impls(model, 32, 8, "cpu", cache=tmp_path / "c.json")
    layers = dict(lambda_layers(model))
    assert {n: c["impl"] for n, c in chosen.items()} == {
        n: layer.rule_impl(*( (32, 32) if i == 0 else (16, 16)))
        for i, (n, layer) in enumerate(layers.items())}
    assert {c["how"] for c in chosen.values()} == {"rule"}
    assert all(layer.tuned is None for layer in layers.values())
    assert not (tmp_path / "c.json").exists()
    fixed = tiny("lr18_l2_lc", impl="logit")
    assert [c for c in choose_impls(fixed, 32, 8, "cpu", timer=StandInTimer({})).values()] \
        == [{"impl": "logit", "how": "requested"}]


def test_a_resume_runs_the_recorded_impls_and_chooses_nothing(monkeypatch):
    """config.json's runtime.lambda_impls is what a resumed run runs (issue 23, point 4)."""
    from lambdapipe.models import autotune
    from lambdapipe.recipes import get_recipe
    from lambdapipe.runtime import runtime_settings

    monkeypatch.setattr(autotune, "choose_impls", lambda *a, **k: pytest.fail("chose again"))
    model = tiny("lr18_l2_lc", lambda_blocks="all")
    (big, _), (small, _) = lambda_layers(model)
    recorded = {"lambda_impls": {big: "lambda", small: "logit"},
                "lambda_impls_how": ["measured"]}
    runtime = runtime_settings(model, get_recipe("demo"), 32, "cpu", recorded)
    assert runtime["lambda_impls"] == recorded["lambda_impls"]
    assert runtime["lambda_impls_how"] == ["measured"]
    layers = dict(lambda_layers(model))
    assert layers[big].tuned == (32, 32, "lambda") and layers[small].tuned == (16, 16, "logit")


def test_a_damaged_cache_is_measured_again(tmp_path):
    cache = tmp_path / "impls.json"
    cache.write_text("{not json")
    timer = StandInTimer({"conv": 1.0, "lambda": 2.0, "logit": 3.0})
    choose_impls(tiny("lr18_l3_lc"), 32, 8, "cpu", cache=cache, timer=timer)
    assert timer.calls and json.loads(cache.read_text())["version"] == 1


# --------------------------------------------------------------------------- fallback
def test_a_failing_compiled_step_falls_back_to_eager(monkeypatch, capsys):
    """Compilation or graph capture that fails (at the first step, or at a later replay as
    CUDA graphs did with the old index cache) costs one warning line; training goes on
    eagerly and the step equals an eager step."""
    calls = {"n": 0}

    def fake_compile(model, mode=None):
        def compiled(x):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("accessing tensor output of CUDAGraphs that has been "
                                   "overwritten by a subsequent run.\nsecond line")
            return model(x)
        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 10
    losses = []
    for mode in ("reduce-overhead", False):
        r = get_recipe("demo", {"compile": mode})
        torch.manual_seed(0)
        model = create_model("resnet20x1", 10, 16, base_width=4)
        step = train.TrainStep(model, train.make_optimizer(model, r, "cpu"), r, "cpu",
                               torch.zeros(3), torch.ones(3))
        losses.append([step(x, y, y, r.lr, i).item() for i in range(3)])
        if mode:
            assert step.path == ("eager (fallback: RuntimeError: accessing tensor output of "
                                 "CUDAGraphs that has been overwritten by a subsequent run.)")
            assert step.forward is model
            warnings = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
            assert len(warnings) == 1 and "continues eagerly" in warnings[0]
    assert losses[0] == losses[1]


def test_an_eager_failure_is_not_swallowed(monkeypatch):
    """The fallback retries eagerly once; what fails eagerly too is the run's own error."""
    r = get_recipe("demo", {"compile": "default"})
    model = create_model("resnet20x1", 10, 16, base_width=4)
    monkeypatch.setattr(torch, "compile", lambda m, mode=None: m)  # "compiled" = eager
    step = train.TrainStep(model, train.make_optimizer(model, r, "cpu"), r, "cpu",
                           torch.zeros(3), torch.ones(3))

    def broken(x):
        raise ValueError("bad")

    step.forward = broken  # the compiled path fails ...
    labels = torch.full((2,), 50)  # ... and so does the eager one: no class 50 of 10
    with pytest.raises((IndexError, RuntimeError), match="out of bounds"):
        step(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), labels, labels, 0.1, 0)
    assert step.path == "eager (fallback: ValueError: bad)"
