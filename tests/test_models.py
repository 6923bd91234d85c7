"""Registry, parameter counts pinned to the published tables, and every model's real-size pass."""

from __future__ import annotations

import pytest
import torch

from lambdapipe.errors import UserError
from lambdapipe.models import count_params, create_model, list_models

torch.set_num_threads(2)

# (model, classes, image size, extra args, published params in millions, printed decimals)
PUBLISHED_COUNTS = [
    ("resnet20x1", 10, 32, {}, 0.27, 2),
    ("resnet20x2", 10, 32, {}, 1.08, 2),
    ("resnet20x4", 10, 32, {}, 4.30, 2),
    ("resnet32x1", 10, 32, {}, 0.47, 2),
    ("resnet44x1", 10, 32, {}, 0.66, 2),
    ("resnet56x1", 10, 32, {}, 0.86, 2),
    ("resnet20x1", 100, 32, {}, 0.28, 2),
    ("resnet20x2", 100, 32, {}, 1.09, 2),
    ("resnet20x4", 100, 32, {}, 4.32, 2),
    ("resnet44x1", 100, 32, {}, 0.67, 2),
    ("resnet20x1", 200, 64, {}, 0.28, 2),
    ("resnet20x2", 200, 64, {}, 1.10, 2),
    ("resnet20x4", 200, 64, {}, 4.35, 2),
    ("resnet18", 10, 32, {}, 11.17, 2),
    ("resnet18", 100, 32, {}, 11.22, 2),
    ("resnet18", 200, 32, {}, 11.27, 2),
    ("resnet18", 200, 64, {}, 11.27, 2),
    ("resnet18", 1000, 224, {}, 11.69, 2),
    ("resnet34", 1000, 224, {}, 21.80, 2),
    ("resnet50", 1000, 224, {}, 25.56, 2),
    ("resnet18", 1000, 32, {}, 11.68, 2),  # ImageNet1k_x32 row: CIFAR stem
]


def millions(n: int, decimals: int, truncate: bool = False) -> float:
    scale = 10**decimals
    return (int(n / 1e6 * scale) if truncate else round(n / 1e6 * scale)) / scale


@pytest.mark.parametrize(("name", "classes", "size", "args", "published", "decimals"),
                         PUBLISHED_COUNTS)
def test_published_param_counts(name, classes, size, args, published, decimals):
    n = count_params(create_model(name, num_classes=classes, image_size=size, **args))
    assert millions(n, decimals) == published


def test_cifar_resnet50_printed_truncated():
    n = count_params(create_model("resnet50", num_classes=10, image_size=32))
    assert millions(n, 1, truncate=True) == 23.5 and millions(n, 2) == 23.52


def test_stem_defaults_and_override():
    small = create_model("resnet18", num_classes=10, image_size=64)
    big = create_model("resnet18", num_classes=10, image_size=96)
    forced = create_model("resnet18", num_classes=10, image_size=32, stem="imagenet")
    assert small.stem[0].kernel_size == (3, 3) and len(small.stem) == 3
    assert big.stem[0].kernel_size == (7, 7) and isinstance(big.stem[3], torch.nn.MaxPool2d)
    assert forced.stem[0].kernel_size == (7, 7)
    assert forced(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_list_models_glob():
    assert list_models("resnet20x*") == ["resnet20x1", "resnet20x2", "resnet20x4"]
    assert list_models() == sorted(list_models())
    assert list_models("nothing*") == []


@pytest.mark.parametrize(("name", "args", "needle"), [
    ("resnet19", {}, "resnet18"),
    ("resnet18", {"widht": 3}, "widht"),
    ("resnet18", {"stem": "tiny"}, "'tiny'"),
    ("resnet18", {"base_width": 0}, "base_width"),
    ("resnet20x1", {"base_width": -4}, "base_width"),
])
def test_bad_input_is_one_line_user_error(name, args, needle):
    with pytest.raises(UserError) as err:
        create_model(name, num_classes=10, image_size=32, **args)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg
