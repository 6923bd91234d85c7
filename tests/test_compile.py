"""The fast path's CPU-checkable half: lambda layers safe under torch.compile and CUDA graphs
(no state stored by a forward, no graph breaks, compiled = eager), the fixed rule choosing each
lambda layer's implementation per device kind, and the eager fallback of a compiled
step that fails."""

from __future__ import annotations

import pytest
import torch

from lambdapipe.models import create_model, list_models
from lambdapipe.models.lambda_layer import LambdaLayer, choose_impls, lambda_layers
from lambdapipe.recipes import get_recipe
from lambdapipe.runtime import resolve
from lambdapipe.step import TrainStep, make_optimizer

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


# One impl of the whole model in the fast tier (the lambda order, CUDA's rule where it fits);
# test_lambda_layer_fullgraph_equals_eager compiles every impl of the layer there too
@pytest.mark.parametrize(("name", "impl"), [
    pytest.param("lr18_l2_lc", "conv", marks=pytest.mark.slow), ("lr18_l2_lc", "lambda"),
    pytest.param("lr18_l2_lc", "logit", marks=pytest.mark.slow),
    ("lr18_l3_rpe", "auto"), ("lambda_resnet18_u4_r7", "auto"), ("resnet20x1", None)])
def test_models_fullgraph_equal_eager(name, impl):
    args = {"impl": impl} if impl else {}
    if name.startswith("lambda_"):
        args["drop_rate"] = 0.0  # dropout would draw different masks
    model = tiny(name, **args).double()
    compiled_equals_eager(model, torch.randn(2, 3, 32, 32, dtype=torch.float64), 1e-9, 1e-9)


# --------------------------------------------------------------------------- impl rule
def test_auto_follows_the_fixed_rule_of_the_device_kind():
    """On CUDA a GEMM order (the lambda order where its table fits, else the logit order),
    never the conv order while a GEMM order fits; on a CPU the fewest MACs; `impl=` wins on
    both. The choice is set per layer and map; another map size falls back to the CPU rule."""
    model = tiny("lr18_l2_lc", lambda_blocks="all")  # two lambda layers: 32x32 and 16x16
    big, small = (name for name, _ in lambda_layers(model))
    layers = dict(lambda_layers(model))
    assert choose_impls(model, 32, "cuda:0") == {big: "lambda", small: "lambda"}
    assert layers[big].chosen == (32, 32, "lambda") and layers[small].chosen == (16, 16, "lambda")
    assert layers[big].resolve_impl(32, 32) == "lambda"
    assert layers[big].resolve_impl(16, 16) == layers[big].rule_impl(16, 16)  # another map
    on_cpu = choose_impls(model, 32, "cpu")
    assert on_cpu == {big: layers[big].rule_impl(32, 32), small: layers[small].rule_impl(16, 16)}
    assert on_cpu[big] == "conv"  # the MAC rule's large-kernel conv at 32x32 (lc, r=23)
    # the lambda order's table too large: the logit order on CUDA, never conv
    wide = LambdaLayer(64, 64, query_depth=32, intra_depth=32, scope=None, context_size=(16, 16))
    assert wide.candidate_impls(16, 16) == ["conv", "logit"]
    assert wide.rule_impl(16, 16, "cuda") == "logit"
    # neither GEMM order fits: conv is all there is
    huge = LambdaLayer(64, 64, intra_depth=4, scope=7)
    assert huge.candidate_impls(32, 32) == ["conv"] and huge.rule_impl(32, 32, "cuda") == "conv"
    fixed = tiny("lr18_l2_lc", impl="logit")
    for device in ("cpu", "cuda"):
        assert set(choose_impls(fixed, 32, device).values()) == {"logit"}
        assert all(layer.chosen is None for _, layer in lambda_layers(fixed))


def test_choosing_leaves_the_rng_streams_alone():
    """A run's initialisation and dropout draw the same numbers whatever was chosen."""
    torch.manual_seed(0)
    choose_impls(tiny("lr18_l3_lc"), 32, "cuda")
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    choose_impls(tiny("lr18_l3_lc"), 32, "cuda")
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), expected)


def test_a_resume_runs_the_recorded_impls():
    """config.json's runtime.lambda_impls is what a resumed run runs (issue 23, point 4),
    whatever the rule would choose now; a name it lacks (or an unknown impl) gets the rule."""
    model = tiny("lr18_l2_lc", lambda_blocks="all")
    (big, _), (small, _) = lambda_layers(model)
    recorded = {"lambda_impls": {big: "lambda", small: "logit"}}
    rt = resolve(get_recipe("demo"), "cpu").with_model(model, 32, recorded)
    assert rt.record()["lambda_impls"] == recorded["lambda_impls"]
    layers = dict(lambda_layers(model))
    assert layers[big].chosen == (32, 32, "lambda") and layers[small].chosen == (16, 16, "logit")
    partial = choose_impls(model, 32, "cpu", {big: "bogus"})
    assert partial == {big: "conv", small: layers[small].rule_impl(16, 16)}


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
        step = TrainStep(model, make_optimizer(model, r), r, resolve(r, "cpu"),
                               torch.zeros(3), torch.ones(3))
        losses.append([step(x, y, y, r.lr, i).item() for i in range(3)])
        if mode:
            assert step.path == ("eager (fallback: RuntimeError: accessing tensor output of "
                                 "CUDAGraphs that has been overwritten by a subsequent run.)")
            assert step.forward is model
            warnings = [ln for ln in capsys.readouterr().err.splitlines() if " WARNING " in ln]
            assert len(warnings) == 1 and "continues eagerly" in warnings[0]
    assert losses[0] == losses[1]


def test_an_eager_failure_is_not_swallowed(monkeypatch):
    """The fallback retries eagerly once; what fails eagerly too is the run's own error."""
    r = get_recipe("demo", {"compile": "default"})
    model = create_model("resnet20x1", 10, 16, base_width=4)
    monkeypatch.setattr(torch, "compile", lambda m, mode=None: m)  # "compiled" = eager
    step = TrainStep(model, make_optimizer(model, r), r, resolve(r, "cpu"),
                           torch.zeros(3), torch.ones(3))

    def broken(x):
        raise ValueError("bad")

    step.forward = broken  # the compiled path fails ...
    labels = torch.full((2,), 50)  # ... and so does the eager one: no class 50 of 10
    with pytest.raises((IndexError, RuntimeError), match="out of bounds"):
        step(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), labels, labels, 0.1, 0)
    assert step.path == "eager (fallback: ValueError: bad)"
