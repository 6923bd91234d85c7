"""The published sources we reproduce: where their tables live and how their names map to ours.

Plain data, no training or reporting code: `report` reads these tables beside finished runs,
and `project` reads them beside projected wall times.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

PUBLISHED_DIR = Path(__file__).resolve().parent / "published"
# Our dataset names -> the published baseline table's.
PUBLISHED_DATASET = {
    "cifar10": "CIFAR10_x32",
    "cifar100": "CIFAR100_x32",
    "tinyimagenet32": "TinyImageNet200_x32",
    "tinyimagenet64": "TinyImageNet200_x64",
}

# What a published table's rows were trained with, so a published value stands only beside
# runs trained alike (same dataset, image size, model, precision, recipe). Keys are the
# tables of report.load.PUBLISHED_FILES.
# - recipe: ours that reproduces the source's training (lambdapipe/recipes.yaml, whose
#   `provenance:` says which of its numbers the source states); a run under another recipe,
#   or with recipe fields changed (`--set`), is not like the published rows.
PUBLISHED_RECIPE = {"resnet": "sgdm", "lambda": "sgd-restarts", "imagenette": "adam-restarts"}
# - precision: the baseline table has a column; the other two sources do not state one, and
#   neither mentions mixed precision: fp32, PyTorch's default (inferred).
PUBLISHED_PRECISION = {"lambda": "fp32", "imagenette": "fp32"}
# - image size in pixels: the baseline table names it (x32, x64), the community table is
#   CIFAR-10 at 32 px; the Imagenette report does not state one (None: not compared).
PUBLISHED_IMAGE_SIZE = {"CIFAR10_x32": 32, "CIFAR100_x32": 32, "TinyImageNet200_x32": 32,
                        "TinyImageNet200_x64": 64, "lambda": 32, "imagenette": None}


def depth_width(model: str) -> tuple[int | None, int | None]:
    """resnet20x2 -> (20, 2); resnet18, lr18_l3_lc, lambda_resnet50_u4_r7 -> (18|50, 1)."""
    m = re.fullmatch(r"resnet(\d+)x(\d+)", model)
    if m:
        return int(m.group(1)), int(m.group(2))
    m = re.fullmatch(r"(?:resnet|lambda_resnet|lr)(\d+)(?:_\w+)?", model)
    if m:
        return int(m.group(1)), 1
    return None, None


def arch_key(architecture: str) -> str:
    """`LR18_L3(lc)` -> `lr18_l3_lc`, `ResNet18` -> `resnet18`: the published names as ours."""
    return architecture.lower().replace("(", "_").replace(")", "")


def read_table(filename: str, directory: Path | None = None) -> list[dict[str, str]]:
    with open(Path(directory or PUBLISHED_DIR) / filename, newline="") as f:
        return list(csv.DictReader(f))
