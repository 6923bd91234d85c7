"""The lambda layer (Bello, "LambdaNetworks", ICLR 2021), self-context form over a 2-D map.

With n query positions and m context positions (here the same H x W map):
queries Q = BN(W_q X) split into h heads of query depth k, keys K = W_k X of depth k per
intra-depth index u, values V = BN(W_v X) of depth v = dim_out / h per u. Then (paper eq. 1-4)

    content lambda    lambda^c   = sum_u softmax_m(K)^T V            (k x v, shared by all n)
    position lambdas  lambda^p_n = sum_u E_n^T V,  e_nm = R[m - n]   (k x v, one per n)
    output            y_n        = (lambda^c + lambda^p_n)^T q_n      (per head, heads concat)

R holds one k x u embedding per relative offset: over all (2H-1) x (2W-1) offsets of a fixed
map for the global `rpe` form (`scope=None`, needs `context_size`), or over an r x r window for
the lambda convolution (`lc`, scope r). No output projection and no biases, as in the paper.

The position term has three implementations that compute the same function (`impl`):
- 'conv':   lambda^p as a 2-D convolution of the values, (b*v, u, H, W) * (k, u, r', r'),
            with the kernel cropped to r' = min(r, 2H-1) x min(r, 2W-1); n*r'^2*k*u*v MACs.
- 'lambda': the paper's order with a dense (n, k, u, m) table of e_nm gathered from R (zero
            outside the scope) times V as one GEMM; n*m*k*u*v MACs, table n*m*k*u floats.
- 'logit':  a_nm = q_n . e_nm per head, then a @ V; n*m*h*u*(k+v) MACs, but it stores a
            (b, h, u, n, m) tensor.
'auto' follows a fixed rule per device kind (`rule_impl`), chosen before training by
`choose_impls` (`chosen`, never inside forward): on CUDA a GEMM order, the lambda order where
its table fits the limits below, else the logit order (measured on an H200 the two GEMM orders
were within 10 % of each other and the conv order 1.3-11x slower: docs/performance.md); on a
CPU the fewest MACs. A run records each layer's choice (config.json's runtime.lambda_impls)
and a resume runs the recorded one.

The forward is a pure function of its input and parameters: it stores nothing on the module
(torch.compile and CUDA graphs replay it; a tensor kept from one replay is overwritten by the
next), and e_nm is cut from the padded R by `unfold`, with no index table to cache.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lambdapipe.models.registry import ModelError, check_int

IMPLS = ("auto", "conv", "lambda", "logit")
# How R starts (`pos_init`): 'normal' draws N(0, 1/k), so q_n . e_nm has unit variance;
# 'torch_default' starts a lambda convolution as lucidrains/lambda-networks does (the
# Imagenette report's lambda convolution code): there R is an nn.Conv3d(u, k, (1, r, r)) left
# at PyTorch's default init, kaiming_uniform(a=sqrt(5)), i.e. U(+-1/sqrt(u r^2)), and the
# convolution has a bias of k values drawn from the same range (docs/models.md, "Position
# init").
POS_INITS = ("normal", "torch_default")
# 'auto' limits: logit order when n*m <= 2**16 (a 16x16 map: the (b, h, u, n, m) logits are
# 67M elements at batch 256, h=4), lambda order when its table n*m*k*u <= 2**25 elements.
LOGIT_MAX_NM = 2**16
LAMBDA_MAX_TABLE = 2**25


class LambdaLayer(nn.Module):
    """Lambda layer mapping (b, dim, H, W) to (b, dim_out, H, W).

    query_depth k, heads h, intra_depth u, scope r (odd; None for global relative position
    embeddings over a map of `context_size` (H, W)).
    """

    def __init__(self, dim: int, dim_out: int, query_depth: int = 16, heads: int = 4,
                 intra_depth: int = 1, scope: int | None = 23,
                 context_size: tuple[int, int] | None = None, impl: str = "auto",
                 pos_init: str = "normal"):
        super().__init__()
        check_int("input channels", dim)
        check_int("query depth k", query_depth)
        check_int("heads", heads)
        check_int("intra-depth u", intra_depth)
        if check_int("output channels", dim_out) % heads:
            raise ModelError(f"invalid heads {heads!r}: expected a divisor of the {dim_out} "
                             "output channels")
        if impl not in IMPLS:
            raise ModelError(f"invalid impl {impl!r}: expected one of {', '.join(IMPLS)}")
        if pos_init not in POS_INITS:
            raise ModelError(f"invalid pos_init {pos_init!r}: expected one of "
                             f"{', '.join(POS_INITS)}")
        if pos_init == "torch_default" and scope is None:
            raise ModelError("invalid pos_init 'torch_default' with scope None: it is the "
                             "lambda convolution's init (scope r); global embeddings start "
                             "normal")
        if scope is None:
            if context_size is None:
                raise ModelError("invalid scope None: global relative position embeddings "
                                 "need context_size=(H, W)")
            height, width = (check_int("context size", int(s)) for s in context_size)
            shape = (2 * height - 1, 2 * width - 1)
            self.context_size: tuple[int, int] | None = (height, width)
        else:
            if check_int("scope r", scope) % 2 == 0:
                raise ModelError(f"invalid scope r {scope!r}: expected an odd integer >= 1")
            shape = (scope, scope)
            self.context_size = None
        self.query_depth, self.heads, self.intra_depth = query_depth, heads, intra_depth
        self.value_depth = dim_out // heads
        self.scope, self.impl, self.pos_init = scope, impl, pos_init
        k, u, v = query_depth, intra_depth, self.value_depth
        self.to_queries = nn.Sequential(nn.Conv2d(dim, k * heads, 1, bias=False),
                                        nn.BatchNorm2d(k * heads))
        self.to_keys = nn.Conv2d(dim, k * u, 1, bias=False)
        self.to_values = nn.Sequential(nn.Conv2d(dim, v * u, 1, bias=False),
                                       nn.BatchNorm2d(v * u))
        # R: one k x u embedding per relative offset; std k^-1/2 gives q_n . e_nm unit variance.
        # In place: on the meta device (config checks) `/` runs a Python decomposition that
        # imports torch._dynamo, a second or more in every Snakefile parse; div_ does not.
        self.rel_embedding = nn.Parameter(torch.randn(k, u, *shape).div_(math.sqrt(k)))
        self.position_bias: nn.Parameter | None = None
        if pos_init == "torch_default":
            # nn.Conv3d(u, k, (1, r, r)).reset_parameters() on a (k, u, r, r) weight: the fan-in
            # u * r^2 is the same, so these are that layer's two draws (weight, then bias).
            nn.init.kaiming_uniform_(self.rel_embedding, a=math.sqrt(5))
            bound = 1 / math.sqrt(u * shape[0] * shape[1])
            self.position_bias = nn.Parameter(torch.empty(k).uniform_(-bound, bound))
        # (height, width, impl) chosen before training for 'auto' (`choose_impls`); plain
        # Python values, so torch.compile specialises on them instead of breaking the graph.
        self.chosen: tuple[int, int, str] | None = None

    def extra_repr(self) -> str:
        where = f"scope={self.scope}" if self.scope else f"context_size={self.context_size}"
        return (f"query_depth={self.query_depth}, heads={self.heads}, "
                f"intra_depth={self.intra_depth}, {where}, impl={self.impl!r}, "
                f"pos_init={self.pos_init!r}")

    # ------------------------------------------------------------------ geometry and cost
    def kernel_size(self, height: int, width: int) -> tuple[int, int]:
        """The embedding window that can reach any position of an H x W map."""
        ry, rx = self.rel_embedding.shape[-2:]
        return min(ry, 2 * height - 1), min(rx, 2 * width - 1)

    def position_macs(self, height: int, width: int, impl: str) -> int:
        """Multiply-accumulates of the position term for one image (applying q included)."""
        n = m = height * width
        k, u, v, h = self.query_depth, self.intra_depth, self.value_depth, self.heads
        if impl == "conv":
            ry, rx = self.kernel_size(height, width)
            return n * ry * rx * k * u * v + n * h * k * v
        if impl == "lambda":
            return n * m * k * u * v + n * h * k * v
        if impl == "logit":
            return n * m * h * u * (k + v)
        raise ValueError(f"no MAC count for impl {impl!r}")

    def macs(self, height: int, width: int) -> int:
        """MACs of one image beyond the 1x1 projections: lambda^c, its use, the position term."""
        n = height * width
        k, u, v, h = self.query_depth, self.intra_depth, self.value_depth, self.heads
        content = n * k * u * v + n * h * k * v
        return content + self.position_macs(height, width, self.resolve_impl(height, width))

    def resolve_impl(self, height: int, width: int) -> str:
        """The implementation this layer runs for an H x W map: the requested one, else the
        one chosen before training (`chosen`), else the CPU `rule_impl`."""
        if self.impl != "auto":
            return self.impl
        if self.chosen is not None and self.chosen[:2] == (height, width):
            return self.chosen[2]
        return self.rule_impl(height, width)

    def candidate_impls(self, height: int, width: int) -> list[str]:
        """The implementations whose dense tensors stay within the fixed limits."""
        n = height * width
        candidates = ["conv"]
        if n * n * self.query_depth * self.intra_depth <= LAMBDA_MAX_TABLE:
            candidates.append("lambda")
        if n * n <= LOGIT_MAX_NM:
            candidates.append("logit")
        return candidates

    def rule_impl(self, height: int, width: int, device: str = "cpu") -> str:
        """The fixed rule for `device`'s kind: on CUDA the first GEMM order that fits (MACs
        are not time there: docs/performance.md), elsewhere the fewest MACs."""
        candidates = self.candidate_impls(height, width)
        if torch.device(device).type == "cuda":
            return "lambda" if "lambda" in candidates else candidates[-1]
        best, best_macs = "conv", self.position_macs(height, width, "conv")
        for impl in self.candidate_impls(height, width)[1:]:
            macs = self.position_macs(height, width, impl)
            if macs < best_macs:
                best, best_macs = impl, macs
        return best

    # ------------------------------------------------------------------ embeddings
    def _cropped_embedding(self, height: int, width: int) -> Tensor:
        """R restricted to the offsets an H x W map can use (centre kept; sizes are odd)."""
        ry, rx = self.rel_embedding.shape[-2:]
        ty, tx = self.kernel_size(height, width)
        cy, cx = (ry - ty) // 2, (rx - tx) // 2
        return self.rel_embedding[..., cy:cy + ty, cx:cx + tx]

    def dense_embeddings(self, height: int, width: int) -> Tensor:
        """e_nm as a (k, u, n, m) table: R[m - n] inside the scope, zero outside."""
        emb = self._cropped_embedding(height, width)
        py, px = height - 1 - emb.shape[-2] // 2, width - 1 - emb.shape[-1] // 2
        emb = F.pad(emb, (px, px, py, py))  # now over all (2H-1) x (2W-1) offsets
        # windows[a, b, y', x'] = emb[a + y', b + x']; e_nm for n = (y, x) is the window at
        # (a, b) = (H-1-y, W-1-x), hence the flip. A view until the reshape copies it once.
        windows = emb.unfold(2, height, 1).unfold(3, width, 1).flip(2, 3)
        k, u = emb.shape[:2]
        return windows.reshape(k, u, height * width, height * width)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        b, _, height, width = x.shape
        if self.context_size is not None and (height, width) != self.context_size:
            raise ValueError(f"lambda layer built for a {self.context_size} map got "
                             f"{(height, width)}: global embeddings fix the map size")
        n, h, k = height * width, self.heads, self.query_depth
        u, v = self.intra_depth, self.value_depth
        queries = self.to_queries(x).reshape(b, h, k, n)
        keys = self.to_keys(x).reshape(b, u, k, n)
        values = self.to_values(x).reshape(b, u, v, n)
        # Softmax over context positions in at least fp32: half precision would lose mass.
        keys = keys.softmax(dim=-1, dtype=torch.promote_types(keys.dtype, torch.float32))
        content_lambda = torch.einsum("bukm,buvm->bkv", keys.to(values.dtype), values)
        out = torch.einsum("bhkn,bkv->bhvn", queries, content_lambda)
        impl = self.resolve_impl(height, width)
        if impl == "conv":
            out = out + self._position_conv(queries, values, height, width)
        elif impl == "lambda":
            out = out + self._position_lambda_order(queries, values, height, width)
        else:
            out = out + self._position_logit_order(queries, values, height, width)
        if self.position_bias is not None:
            # The convolution's bias adds b_k to every entry of lambda^p_n, so q_n adds
            # sum_k q_nk b_k to each of its v outputs, whichever order computed the rest.
            out = out + torch.einsum("bhkn,k->bhn", queries,
                                     self.position_bias.to(queries.dtype))[:, :, None]
        return out.reshape(b, h * v, height, width)

    def _position_conv(self, queries: Tensor, values: Tensor, height: int, width: int) -> Tensor:
        b, u, v, n = values.shape
        kernel = self._cropped_embedding(height, width)
        ctx = values.reshape(b, u, v, height, width).transpose(1, 2).reshape(b * v, u, height,
                                                                               width)
        pad = (kernel.shape[-2] // 2, kernel.shape[-1] // 2)
        position_lambdas = F.conv2d(ctx, kernel, padding=pad).reshape(b, v, -1, n)
        return torch.einsum("bhkn,bvkn->bhvn", queries, position_lambdas)

    def _position_lambda_order(self, queries: Tensor, values: Tensor, height: int,
                               width: int) -> Tensor:
        b, u, v, n = values.shape
        k = self.query_depth
        table = self.dense_embeddings(height, width).permute(2, 0, 1, 3).reshape(n * k, u * n)
        ctx = values.permute(1, 3, 0, 2).reshape(u * n, b * v)
        position_lambdas = (table @ ctx).reshape(n, k, b, v)
        return torch.einsum("bhkn,nkbv->bhvn", queries, position_lambdas)

    def _position_logit_order(self, queries: Tensor, values: Tensor, height: int,
                              width: int) -> Tensor:
        b, u, v, n = values.shape
        h = self.heads
        logits = torch.einsum("bhkn,kunm->bhnum", queries, self.dense_embeddings(height, width))
        out = logits.reshape(b, h, n, u * n) @ values.permute(0, 1, 3, 2).reshape(b, 1, u * n, v)
        return out.transpose(2, 3)


# ---------------------------------------------------------------------- a model's choice
def lambda_layers(model: nn.Module) -> list[tuple[str, LambdaLayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LambdaLayer)]


def map_sizes(model: nn.Module, image_size: int) -> dict[str, tuple[int, int]]:
    """Each lambda layer's input map (height, width) for `image_size` px images, read from
    one forward pass on the meta device (no memory, no arithmetic, no random draw)."""
    sizes: dict[str, tuple[int, int]] = {}
    if not lambda_layers(model):
        return sizes
    shadow = copy.deepcopy(model).to("meta")
    hooks = [layer.register_forward_pre_hook(
        lambda _m, args, name=name: sizes.__setitem__(name, tuple(args[0].shape[2:])))
        for name, layer in lambda_layers(shadow)]
    try:
        with torch.no_grad():
            shadow.eval()(torch.empty(1, 3, image_size, image_size, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return sizes


def choose_impls(model: nn.Module, image_size: int, device: str,
                 recorded: dict[str, str] | None = None) -> dict[str, str]:
    """Set `chosen` on every 'auto' lambda layer of `model` and return, per layer name, the
    implementation it runs: `recorded` (a resumed run's config.json) where it names one,
    else `device`'s rule."""
    sizes, impls = map_sizes(model, image_size), {}
    for name, layer in lambda_layers(model):
        height, width = sizes[name]
        impl = (recorded or {}).get(name)
        if layer.impl != "auto":
            impls[name] = layer.impl
            continue
        if impl not in IMPLS[1:]:
            impl = layer.rule_impl(height, width, device)
        layer.chosen = (height, width, impl)
        impls[name] = impl
    return impls
