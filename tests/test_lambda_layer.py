"""The lambda layer against a slow reference written from the paper's equations."""

from __future__ import annotations

import pytest
import torch

from lambdapipe.errors import UserError
from lambdapipe.models.lambda_layer import LambdaLayer

# Its tests take a tenth of a CPU-second or less, not the default 1 s: under pytest-xdist
# this short work unit goes out last, filling in around the long ones (tests/conftest.py).
pytestmark = pytest.mark.cost(0.05)

torch.set_num_threads(2)
IMPLS = ["conv", "lambda", "logit"]


def reference(layer: LambdaLayer, x: torch.Tensor) -> torch.Tensor:
    """y_n = (lambda^c + lambda^p_n)^T q_n, with e_nm = R[m - n] built by explicit loops."""
    b, _, height, width = x.shape
    h, k, u, v = layer.heads, layer.query_depth, layer.intra_depth, layer.value_depth
    n = height * width
    q = layer.to_queries(x).reshape(b, h, k, n)
    keys = torch.softmax(layer.to_keys(x).reshape(b, u, k, n), dim=-1)
    vals = layer.to_values(x).reshape(b, u, v, n)
    rel = layer.rel_embedding
    cy, cx = rel.shape[-2] // 2, rel.shape[-1] // 2
    pos = [(i, j) for i in range(height) for j in range(width)]
    e = torch.zeros(n, n, k, u, dtype=x.dtype)
    for a, (ny, nx) in enumerate(pos):
        for c, (my, mx) in enumerate(pos):
            dy, dx = my - ny, mx - nx
            if abs(dy) <= cy and abs(dx) <= cx:  # inside the scope (all offsets for rpe)
                e[a, c] = rel[:, :, cy + dy, cx + dx]
    content = torch.einsum("bukm,buvm->bkv", keys, vals)
    position = torch.einsum("nmku,buvm->bnkv", e, vals)
    y = torch.einsum("bhkn,bkv->bhvn", q, content) + torch.einsum("bhkn,bnkv->bhvn", q, position)
    return y.reshape(b, h * v, height, width)


def make(dim=6, dim_out=8, k=3, heads=2, u=1, scope=3, size=(5, 7), impl="auto", seed=0):
    torch.manual_seed(seed)
    ctx = size if scope is None else None
    layer = LambdaLayer(dim, dim_out, query_depth=k, heads=heads, intra_depth=u, scope=scope,
                        context_size=ctx, impl=impl).double()
    for bn in (layer.to_queries[1], layer.to_values[1]):  # make BN non-trivial in eval mode
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    return layer.eval()


CASES = [  # (u, scope, (H, W)): u=1 and u>1, non-square maps, scopes smaller and larger than
    (1, 3, (5, 7)),  # the map, and the global rpe form
    (3, 5, (6, 4)),
    (2, 23, (4, 5)),
    (1, None, (4, 6)),
    (2, None, (5, 3)),
]


@pytest.mark.parametrize("impl", [*IMPLS, "auto"])
@pytest.mark.parametrize(("u", "scope", "size"), CASES)
def test_equals_paper_reference(impl, u, scope, size):
    layer = make(u=u, scope=scope, size=size, impl=impl)
    x = torch.randn(2, 6, *size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", IMPLS)
def test_train_mode_gradients_equal_reference(impl):
    layer = make(u=2, scope=3, size=(4, 5), impl=impl).train()
    x = torch.randn(3, 6, 4, 5, dtype=torch.float64, requires_grad=True)
    g_fast = torch.autograd.grad(layer(x).square().sum(), [x, layer.rel_embedding])
    g_ref = torch.autograd.grad(reference(layer, x).square().sum(), [x, layer.rel_embedding])
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scope", [5, None])
def test_translation_equivariance(impl, scope):
    """Content confined away from the borders: shifting the input shifts the output."""
    size = (9, 10)
    layer = make(u=2, scope=scope, size=size, impl=impl)
    for bn in (layer.to_queries[1], layer.to_values[1]):  # zero input must give zero q and v
        bn.reset_parameters()
        bn.reset_running_stats()
    x = torch.zeros(1, 6, *size, dtype=torch.float64)
    x[..., 2:5, 2:6] = torch.randn(6, 3, 4, dtype=torch.float64)
    shifted = torch.roll(x, shifts=(2, 3), dims=(-2, -1))
    with torch.no_grad():
        y, y_shifted = layer(x), layer(shifted)
    torch.testing.assert_close(y_shifted[..., 2:, 3:], y[..., :-2, :-3], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(y_shifted, y)  # the output does move


@pytest.mark.parametrize("impl", IMPLS)
def test_wide_scope_lc_equals_rpe(impl):
    """A lambda convolution whose scope covers every offset is the global rpe layer."""
    size = (5, 6)
    rpe = make(u=2, scope=None, size=size, impl=impl, seed=1)
    lc = make(u=2, scope=11, size=size, impl=impl, seed=2)  # 11 = 2 * max(H, W) - 1
    state = {k: t for k, t in rpe.state_dict().items() if k != "rel_embedding"}
    lc.load_state_dict(state, strict=False)
    with torch.no_grad():
        lc.rel_embedding[:, :, 1:-1, :] = rpe.rel_embedding  # (9, 11) offsets inside (11, 11)
    x = torch.randn(2, 6, *size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(lc(x), rpe(x), rtol=1e-10, atol=1e-10)
        narrow = make(u=2, scope=3, size=size, impl=impl, seed=1)
        narrow.load_state_dict(state, strict=False)
        narrow.rel_embedding.copy_(rpe.rel_embedding[:, :, 3:6, 4:7])
        assert not torch.allclose(narrow(x), rpe(x))  # a narrow scope is a different function


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_gradients_finite_under_autocast(impl, dtype):
    torch.manual_seed(0)
    layer = LambdaLayer(32, 32, query_depth=16, heads=4, intra_depth=1, scope=7, impl=impl)
    x = torch.randn(4, 32, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        y = layer(x)
        loss = y.float().square().mean()
    assert y.dtype == (dtype or torch.float32)
    loss.backward()
    grads = [x.grad] + [p.grad for p in layer.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if dtype is not None:  # close to the fp32 result, to the precision of the format
        ref = layer(x.detach()).float()
        err = (y.float() - ref).abs().max() / ref.abs().max()
        assert err < 0.05


def test_auto_picks_cheapest_feasible():
    lc16 = LambdaLayer(256, 256, scope=23)  # lr18_l3_lc: logit order is 6x cheaper here
    assert lc16.resolve_impl(16, 16) == "logit"
    rpe32 = LambdaLayer(128, 128, scope=None, context_size=(32, 32))  # logits too big
    assert rpe32.resolve_impl(32, 32) == "lambda"
    lc32 = LambdaLayer(64, 64, intra_depth=4, scope=7)  # dense tables too big
    assert lc32.resolve_impl(32, 32) == "conv"
    assert lc16.macs(16, 16) < LambdaLayer(256, 256, scope=23, impl="conv").macs(16, 16)


def test_rpe_rejects_other_map_sizes():
    layer = LambdaLayer(8, 8, query_depth=4, heads=2, scope=None, context_size=(4, 4))
    with pytest.raises(ValueError, match="map"):
        layer(torch.randn(1, 8, 5, 4))


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"query_depth": 0}, "query depth k 0"),
    ({"heads": 3}, "heads 3"),
    ({"scope": 4}, "scope r 4"),
    ({"intra_depth": 0}, "intra-depth u 0"),
    ({"impl": "fast"}, "impl 'fast'"),
    ({"scope": None}, "context_size"),
])
def test_bad_hyperparameters(kwargs, needle):
    with pytest.raises(UserError) as err:
        LambdaLayer(8, 8, **kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- pos_init
def conv3d_reference(layer: LambdaLayer, x: torch.Tensor) -> torch.Tensor:
    """The lambda convolution as a biased Conv3d(u, k, (1, r, r)) over the values, the form
    of lucidrains/lambda-networks (the report's lc code), with our R and bias as its weights."""
    b, _, height, width = x.shape
    h, k, u, v = layer.heads, layer.query_depth, layer.intra_depth, layer.value_depth
    n = height * width
    q = layer.to_queries(x).reshape(b, h, k, n)
    keys = torch.softmax(layer.to_keys(x).reshape(b, u, k, n), dim=-1)
    vals = layer.to_values(x).reshape(b, u, v, n)
    r = layer.scope
    weight = layer.rel_embedding[:, :, None]  # (k, u, 1, r, r)
    lam_p = torch.nn.functional.conv3d(vals.reshape(b, u, v, height, width), weight,
                                       layer.position_bias, padding=(0, r // 2, r // 2))
    content = torch.einsum("bukm,buvm->bkv", keys, vals)
    y = (torch.einsum("bhkn,bkv->bhvn", q, content)
         + torch.einsum("bhkn,bkvn->bhvn", q, lam_p.reshape(b, k, v, n)))
    return y.reshape(b, h * v, height, width)


def test_torch_default_init_is_conv3d_default():
    """The weight and bias of a default-initialised Conv3d(u, k, (1, r, r)): U(+-1/sqrt(u r^2))."""
    torch.manual_seed(0)
    layer = LambdaLayer(8, 8, query_depth=16, heads=2, intra_depth=2, scope=23,
                        pos_init="torch_default")
    bound = 1 / (2 * 23 * 23) ** 0.5
    w, bias = layer.rel_embedding.detach(), layer.position_bias.detach()
    assert w.shape == (16, 2, 23, 23) and bias.shape == (16,)
    assert w.abs().max() <= bound and bias.abs().max() <= bound
    assert w.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.05)  # uniform's std
    normal = LambdaLayer(8, 8, query_depth=16, heads=2, intra_depth=2, scope=23)
    assert normal.position_bias is None
    assert normal.rel_embedding.std().item() == pytest.approx(16 ** -0.5, rel=0.05)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("u", "scope", "size"), [(1, 3, (5, 7)), (2, 5, (4, 6)),
                                                  (1, 23, (4, 5))])
def test_torch_default_equals_conv3d_reference(impl, u, scope, size):
    torch.manual_seed(1)
    layer = LambdaLayer(6, 8, query_depth=3, heads=2, intra_depth=u, scope=scope, impl=impl,
                        pos_init="torch_default").double().eval()
    with torch.no_grad():
        layer.position_bias.normal_()  # a bias large enough to see
        x = torch.randn(2, 6, *size, dtype=torch.float64)
        torch.testing.assert_close(layer(x), conv3d_reference(layer, x), rtol=1e-10,
                                   atol=1e-10)


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"pos_init": "xavier"}, "pos_init 'xavier'"),
    ({"pos_init": "torch_default", "scope": None, "context_size": (4, 4)}, "scope None"),
])
def test_bad_pos_init(kwargs, needle):
    with pytest.raises(UserError) as err:
        LambdaLayer(8, 8, **kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)
