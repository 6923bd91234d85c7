"""The ImageNet tables' ResNets: the published parameter counts, exact, and one real step.

Counts are computed on the meta device (shapes only, no memory), so ResNet-152 at 224 px costs
nothing here; the published table rounds to 0.01 M, the exact counts are torchvision's.
"""

from __future__ import annotations

import csv

import pytest
import torch

from lambdapipe.models import create_model
from lambdapipe.models.registry import count_params
from lambdapipe.reference import PUBLISHED_DIR

# (published dataset, model, image size) -> exact trainable parameters, 1000 classes.
EXACT = {
    ("imagenet2012", "resnet18", 224): 11_689_512,
    ("imagenet2012", "resnet34", 224): 21_797_672,
    ("imagenet2012", "resnet50", 224): 25_557_032,
    ("imagenet2012", "resnet101", 224): 44_549_160,
    ("imagenet2012", "resnet152", 224): 60_192_808,
    # 32 and 64 px: the 3x3 stride-1 stem without max-pool (our `cifar` stem, the default at
    # <= 64 px); the 7x7 ImageNet stem would add 7,680 weights (11.69 M for ResNet-18).
    ("ImageNet1k_x32", "resnet18", 32): 11_681_832,
    ("ImageNet1k_x32", "resnet34", 32): 21_789_992,
    ("ImageNet1k_x32", "resnet50", 32): 25_549_352,
    ("ImageNet1k_x64", "resnet50", 64): 25_549_352,
}


def meta_count(name: str, size: int, **args) -> int:
    with torch.device("meta"):
        return count_params(create_model(name, num_classes=1000, image_size=size, **args))


@pytest.mark.parametrize(("table", "name", "size"), sorted(EXACT))
def test_exact_counts(table, name, size):
    assert meta_count(name, size) == EXACT[(table, name, size)]


def test_counts_match_every_published_imagenet_row():
    """Every ImageNet row of the shipped table rounds our exact count to its params_m."""
    sizes = {"ImageNet1k_x32": 32, "ImageNet1k_x64": 64, "imagenet2012": 224}
    with open(PUBLISHED_DIR / "published_resnet_baselines.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["dataset"] in sizes]
    assert len(rows) == 11
    for row in rows:
        key = (row["dataset"], f"resnet{row['depth']}", sizes[row["dataset"]])
        assert f"{EXACT[key] / 1e6:.2f}" == row["params_m"], (key, row["params_m"])


def test_imagenet_stem_at_32px_is_not_the_published_count():
    """The stem is what tells the downsampled table from the 224 px one: forcing the 7x7
    stem at 32 px gives the 224 px count, not the published 11.68 M."""
    assert meta_count("resnet18", 32, stem="imagenet") == 11_689_512


def test_lambda_resnet50_at_224_beside_resnet50():
    assert meta_count("lambda_resnet50", 224) == 14_995_592  # the paper's 15.0 M


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_one_training_step_at_32px(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=1000, image_size=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.4, momentum=0.9, weight_decay=1e-4)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 1000, (4,))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


def test_resnet152_224_forward_shape_on_meta():
    with torch.device("meta"):
        model = create_model("resnet152", num_classes=1000, image_size=224)
        out = model(torch.empty(2, 3, 224, 224))
    assert out.shape == (2, 1000)
