"""ResNet baselines: the CIFAR ResNets (He et al. 2016, sec. 4.2) and ResNet-18/34/50/101/152.

Blocks take a `spatial` factory for the convolution that carries the receptive field (the
first 3x3 of a basic block, the 3x3 of a bottleneck) so that the Lambda-ResNets reuse these
exact networks and differ only in that factory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from lambdapipe.models.registry import ModelError, check_int, register_model

# (in_channels, out_channels, stride, input_size) -> module whose output has out_channels
# channels at size down(input_size) when stride is 2.
SpatialFactory = Callable[[int, int, int, int], nn.Module]


def down(size: int) -> int:
    """Output size of a 3x3 (or 7x7 pad 3) stride-2 window with 'same' padding."""
    return (size - 1) // 2 + 1


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, size: int = 0) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def projection(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    """1x1 conv + BN shortcut, used wherever the residual changes shape."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_ch))


class BasicBlock(nn.Module):
    """Two 3x3 convs; `spatial` builds the first (it carries the stride)."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int, size: int,
                 spatial: SpatialFactory = conv3x3):
        super().__init__()
        self.conv1 = spatial(in_ch, planes, stride, size)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = (projection(in_ch, planes, stride)
                         if stride != 1 or in_ch != planes else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 -> `spatial` (3x3, carries the stride as in torchvision's v1.5) -> 1x1 (x4)."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int, size: int,
                 spatial: SpatialFactory = conv3x3):
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = spatial(planes, planes, stride, size)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = (projection(in_ch, out_ch, stride)
                         if stride != 1 or in_ch != out_ch else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A four-stage ResNet (widths w, 2w, 4w, 8w).

    `stem='cifar'`: one 3x3 stride-1 conv, no max-pool; `'imagenet'`: 7x7/2 conv + 3x3/2
    max-pool. `spatial[i]` builds the receptive-field conv of every block in stage i (or is
    a list, one factory per block); the feature-map size each block sees is tracked so
    global-context layers can size themselves. `zero_init_residual` starts the last BN scale
    of every residual branch at zero, so each block starts as its shortcut.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int],
                 num_classes: int, image_size: int, stem: str, base_width: int = 64,
                 spatial: Sequence[SpatialFactory | Sequence[SpatialFactory]] | None = None,
                 drop_rate: float = 0.0, zero_init_residual: bool = False):
        super().__init__()
        check_int("base_width", base_width)
        if isinstance(drop_rate, bool) or not isinstance(drop_rate, int | float) \
                or not 0.0 <= drop_rate < 1.0:
            raise ModelError(f"invalid drop_rate {drop_rate!r}: expected a float in [0, 1)")
        spatial = list(spatial or [conv3x3] * 4)
        size = image_size
        if stem == "cifar":
            self.stem = nn.Sequential(nn.Conv2d(3, base_width, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(base_width), nn.ReLU(inplace=True))
        elif stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(3, base_width, 7, stride=2, padding=3, bias=False),
                                      nn.BatchNorm2d(base_width), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, stride=2, padding=1))
            size = down(down(size))
        else:
            raise ModelError(f"invalid stem {stem!r}: expected 'cifar' or 'imagenet'")
        in_ch = base_width
        stages = []
        for i, (n_blocks, factory) in enumerate(zip(layers, spatial, strict=True)):
            planes = base_width * 2**i
            per_block = list(factory) if isinstance(factory, list | tuple) else [factory] * n_blocks
            blocks = []
            for j in range(n_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(in_ch, planes, stride, size, per_block[j]))
                in_ch = planes * block.expansion
                size = down(size) if stride == 2 else size
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Linear(in_ch, num_classes)
        if not isinstance(zero_init_residual, bool):
            raise ModelError(f"invalid zero_init_residual {zero_init_residual!r}: expected "
                             "true or false")
        init_weights(self, zero_init_residual=zero_init_residual)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.dropout(self.pool(x).flatten(1)))


class CifarResNet(nn.Module):
    """The 6n+2-layer CIFAR ResNet: a 16-channel 3x3 stem, then stages of 16w/32w/64w.

    The stem keeps `base_width` (16) channels at every width multiplier w: that is what the
    published counts pin (20x4 is 4.30M on CIFAR-10; a 64-channel stem would give 4.33M).
    Projection (1x1 conv + BN) shortcuts wherever the shape changes, option B of the paper.
    """

    def __init__(self, depth: int, width: int, num_classes: int, base_width: int = 16):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ModelError(f"invalid depth {depth!r}: expected 6n+2 with n >= 1")
        check_int("base_width", base_width)
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(3, base_width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(base_width), nn.ReLU(inplace=True))
        in_ch, stages = base_width, []
        for i in range(3):
            planes = base_width * width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_ch, planes, 2 if i > 0 and j == 0 else 1, 0))
                in_ch = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights(self, zero_init_residual=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


def init_weights(model: nn.Module, zero_init_residual: bool) -> None:
    """He-normal convs, unit BN; optionally zero the last BN of each residual branch."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)


def default_stem(image_size: int, stem: str | None) -> str:
    """CIFAR stem for small images (<= 64 px), ImageNet stem above, unless overridden."""
    return stem if stem is not None else ("cifar" if image_size <= 64 else "imagenet")


# --------------------------------------------------------------------------- registered
def _cifar(depth: int, width: int):
    def factory(num_classes: int, image_size: int, base_width: int = 16) -> nn.Module:
        return CifarResNet(depth, width, num_classes, base_width=base_width)

    factory.__name__ = f"resnet{depth}x{width}"
    factory.__doc__ = f"CIFAR ResNet-{depth} (basic blocks), widths x{width}."
    return factory


for _depth in (20, 32, 44, 56, 110):
    for _width in (1, 2, 4):
        register_model(_cifar(_depth, _width))


@register_model
def resnet18(num_classes: int, image_size: int, base_width: int = 64, stem: str | None = None,
             drop_rate: float = 0.0) -> nn.Module:
    """ResNet-18: basic blocks [2, 2, 2, 2]."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, image_size,
                  default_stem(image_size, stem), base_width, drop_rate=drop_rate)


@register_model
def resnet34(num_classes: int, image_size: int, base_width: int = 64, stem: str | None = None,
             drop_rate: float = 0.0) -> nn.Module:
    """ResNet-34: basic blocks [3, 4, 6, 3]."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, image_size,
                  default_stem(image_size, stem), base_width, drop_rate=drop_rate)


@register_model
def resnet50(num_classes: int, image_size: int, base_width: int = 64, stem: str | None = None,
             drop_rate: float = 0.0) -> nn.Module:
    """ResNet-50: bottleneck blocks [3, 4, 6, 3], stride on the 3x3 (v1.5)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, image_size,
                  default_stem(image_size, stem), base_width, drop_rate=drop_rate)


@register_model
def resnet101(num_classes: int, image_size: int, base_width: int = 64, stem: str | None = None,
              drop_rate: float = 0.0) -> nn.Module:
    """ResNet-101: bottleneck blocks [3, 4, 23, 3], stride on the 3x3 (v1.5)."""
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes, image_size,
                  default_stem(image_size, stem), base_width, drop_rate=drop_rate)


@register_model
def resnet152(num_classes: int, image_size: int, base_width: int = 64, stem: str | None = None,
              drop_rate: float = 0.0) -> nn.Module:
    """ResNet-152: bottleneck blocks [3, 8, 36, 3], stride on the 3x3 (v1.5)."""
    return ResNet(Bottleneck, [3, 8, 36, 3], num_classes, image_size,
                  default_stem(image_size, stem), base_width, drop_rate=drop_rate)
