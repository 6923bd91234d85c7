"""Lambda-ResNets: the ResNets of `resnet.py` with lambda layers in place of 3x3 convolutions.

Stride: a lambda layer has none, so a strided block runs its lambda layer at the block's input
resolution and then downsamples with 3x3 average pooling (stride 2, padding 1), before the BN.

- `lr{18,34}_l{2,3}_{rpe,lc}` (the Imagenette noisy-label study): ResNet-18/34 with ONE lambda
  layer (k=16, h=4, u=1) in stage 2 (`layer2`, 128 channels) or stage 3 (`layer3`, 256
  channels): the first 3x3 conv of the stage's last block ("We replace only one layer of ResNet
  in the second and third layer"; docs/models.md says why this conv). `lambda_blocks=first`
  puts it in the first (strided) block, `all` in every block (the cost reference's layout).
  `lc` is a lambda convolution of scope r=23, `rpe` uses global relative position embeddings.
  `lc` takes `pos_init` (normal | torch_default: started as the report's lucidrains code).
- `lambda_resnet{18,50,152,200}*` (LambdaNetworks paper, and its community CIFAR table):
  bottleneck ResNets whose every 3x3 conv is a lambda convolution (k=16, h=4, u=1, r=23 by
  default; the `_u4_r7`/`_u4_r5` variants set u and r).
"""

from __future__ import annotations

from torch import nn

from lambdapipe.models.lambda_layer import LambdaLayer
from lambdapipe.models.registry import ModelError, register_model
from lambdapipe.models.resnet import (
    BasicBlock,
    Bottleneck,
    ResNet,
    SpatialFactory,
    conv3x3,
    default_stem,
)


def lambda_spatial(k: int, heads: int, u: int, r: int | None, impl: str,
                   pos_init: str = "normal") -> SpatialFactory:
    """A factory of lambda layers (then 3x3/2 average pooling where the block strides)."""

    def factory(in_ch: int, out_ch: int, stride: int, size: int) -> nn.Module:
        layer = LambdaLayer(in_ch, out_ch, query_depth=k, heads=heads, intra_depth=u, scope=r,
                            context_size=(size, size) if r is None else None, impl=impl,
                            pos_init=pos_init)
        if stride == 1:
            return layer
        return nn.Sequential(layer, nn.AvgPool2d(3, stride=stride, padding=1))

    return factory


LAMBDA_BLOCKS = ("last", "first", "all")


def _study_model(depth: int, stage: int, position: str):
    layers = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}[depth]
    kind = "lambda convolution (scope r)" if position == "lc" else "global relative positions"

    def build(num_classes, image_size, base_width, stem, k, heads, u, r, impl, drop_rate,
              lambda_blocks, zero_init_residual, pos_init="normal"):
        if lambda_blocks not in LAMBDA_BLOCKS:
            raise ModelError(f"invalid lambda_blocks {lambda_blocks!r}: expected one of "
                             f"{', '.join(LAMBDA_BLOCKS)}")
        n = layers[stage - 1]
        lam = lambda_spatial(k, heads, u, r, impl, pos_init)
        per_block = {"last": [conv3x3] * (n - 1) + [lam], "first": [lam] + [conv3x3] * (n - 1),
                     "all": [lam] * n}[lambda_blocks]
        spatial: list = [conv3x3] * 4
        spatial[stage - 1] = per_block
        return ResNet(BasicBlock, layers, num_classes, image_size,
                      default_stem(image_size, stem), base_width, spatial, drop_rate,
                      zero_init_residual=zero_init_residual)

    if position == "lc":
        def factory(num_classes: int, image_size: int, base_width: int = 64,
                    stem: str | None = None, k: int = 16, heads: int = 4, u: int = 1,
                    r: int = 23, impl: str = "auto", drop_rate: float = 0.0,
                    lambda_blocks: str = "last", zero_init_residual: bool = False,
                    pos_init: str = "normal") -> nn.Module:
            return build(num_classes, image_size, base_width, stem, k, heads, u, r, impl,
                         drop_rate, lambda_blocks, zero_init_residual, pos_init)
    else:
        def factory(num_classes: int, image_size: int, base_width: int = 64,
                    stem: str | None = None, k: int = 16, heads: int = 4, u: int = 1,
                    impl: str = "auto", drop_rate: float = 0.0, lambda_blocks: str = "last",
                    zero_init_residual: bool = False) -> nn.Module:
            return build(num_classes, image_size, base_width, stem, k, heads, u, None, impl,
                         drop_rate, lambda_blocks, zero_init_residual)

    factory.__name__ = f"lr{depth}_l{stage}_{position}"
    factory.__doc__ = (f"ResNet-{depth} with ONE lambda layer ({kind}) in stage {stage}: the "
                       f"first 3x3 conv of its last block (lambda_blocks=first|all: of the "
                       f"first block | of every block).")
    return factory


for _depth in (18, 34):
    for _stage in (2, 3):
        for _position in ("rpe", "lc"):
            register_model(_study_model(_depth, _stage, _position))


def lambda_bottleneck_resnet(layers: list[int], num_classes: int, image_size: int,
                             base_width: int, stem: str | None, k: int, heads: int, u: int,
                             r: int, impl: str, drop_rate: float,
                             zero_init_residual: bool = True) -> ResNet:
    """Bottleneck ResNet with every 3x3 conv a lambda convolution. Zero-initialised residual
    branches by default: a lambda layer is quadratic in its input, so with every block's
    branch live, eval-mode outputs overflow at init (docs/models.md, "Eval-mode scale")."""
    spatial = [lambda_spatial(k, heads, u, r, impl)] * 4
    return ResNet(Bottleneck, layers, num_classes, image_size, default_stem(image_size, stem),
                  base_width, spatial, drop_rate, zero_init_residual=zero_init_residual)


def _lambda_resnet(name: str, layers: list[int], u_default: int, r_default: int,
                   drop_default: float, doc: str):
    def factory(num_classes: int, image_size: int, base_width: int = 64,
                stem: str | None = None, k: int = 16, heads: int = 4, u: int = u_default,
                r: int = r_default, impl: str = "auto", drop_rate: float = drop_default,
                zero_init_residual: bool = True) -> nn.Module:
        return lambda_bottleneck_resnet(layers, num_classes, image_size, base_width, stem, k,
                                        heads, u, r, impl, drop_rate, zero_init_residual)

    factory.__name__ = name
    factory.__doc__ = doc
    return factory


# The community CIFAR table trained its LambdaResNet-18/50 with dropout 0.3 before the head.
for _name, _layers, _u, _r, _drop, _doc in [
    ("lambda_resnet18", [2, 2, 2, 2], 1, 23, 0.3, "Community LambdaResNet-18 (bottleneck)."),
    ("lambda_resnet18_u4_r7", [2, 2, 2, 2], 4, 7, 0.3, "Community LambdaResNet-18, u=4 r=7."),
    ("lambda_resnet18_u4_r5", [2, 2, 2, 2], 4, 5, 0.3, "Community LambdaResNet-18, u=4 r=5."),
    ("lambda_resnet50_u4_r7", [3, 4, 6, 3], 4, 7, 0.3, "Community LambdaResNet-50, u=4 r=7."),
    ("lambda_resnet50", [3, 4, 6, 3], 1, 23, 0.0, "LambdaResNet-50 of the paper (15.0M)."),
    ("lambda_resnet152", [3, 8, 36, 3], 1, 23, 0.0, "Bottleneck ResNet-152, all 3x3 lambda."),
    ("lambda_resnet200", [3, 24, 36, 3], 1, 23, 0.0, "Bottleneck ResNet-200, all 3x3 lambda."),
]:
    register_model(_lambda_resnet(_name, _layers, _u, _r, _drop, _doc))
