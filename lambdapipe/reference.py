"""The published sources we reproduce: where their tables live and how their names map to ours.

Plain data and the one like-for-like rule (`differences`), no training or reporting code:
`report` reads these tables beside finished runs, and `project` reads them beside projected
wall times.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PUBLISHED_DIR = Path(__file__).resolve().parent / "published"
# Our dataset names -> the published baseline table's.
PUBLISHED_DATASET = {
    "cifar10": "CIFAR10_x32",
    "cifar100": "CIFAR100_x32",
    "tinyimagenet32": "TinyImageNet200_x32",
    "tinyimagenet64": "TinyImageNet200_x64",
    "imagenet32": "ImageNet1k_x32",
    "imagenet64": "ImageNet1k_x64",
    "imagenet2012": "imagenet2012",
}

# What a published table's rows were trained with, so a published value stands only beside
# runs trained alike (`differences` below). Keys are the tables of report.load.PUBLISHED_FILES.
# - recipe: ours that reproduces the source's training (lambdapipe/recipes.yaml, whose
#   `provenance:` says which of its numbers the source states); a run under another recipe,
#   or with recipe fields changed (`--set`), is not like the published rows.
PUBLISHED_RECIPE = {"resnet": "sgdm", "lambda": "sgd-restarts", "imagenette": "adam-restarts"}
# The community table's Lambda-ResNet rows, each trained the fork's way (all 50,000 training
# images, the best epoch by TEST accuracy, the rate changed once an epoch) for the epochs the
# row names: each stands beside the recipe made its way only (recipes.yaml `-fork<epochs>`),
# never beside sgd-restarts (ours: 310 epochs, val held out and choosing), whose curve the
# lambda table reads at these epochs instead. A row without epochs (work in progress, no
# accuracy) is addressed to sgd-restarts, our reproduction.
FORK_RECIPES = {65: "sgd-restarts-fork65", 70: "sgd-restarts-fork70"}
# What chooses best.ckpt of runs under those recipes (the fork's protocol, protocol.py).
FORK_SELECTS_ON = "test"


def lambda_recipe(epochs: Any) -> str:
    """The recipe a community-table row was made with, from its `epochs` cell."""
    try:
        return FORK_RECIPES.get(int(float(epochs)), PUBLISHED_RECIPE["lambda"])
    except (TypeError, ValueError):  # an empty cell: no epochs stated
        return PUBLISHED_RECIPE["lambda"]


# The community table's ResNet baselines are kuangliu/pytorch-cifar's, trained with that
# repository's own recipe, of which we have no copy: no run of ours is like them.
KUANGLIU = "kuangliu/pytorch-cifar's own"
# - precision: the baseline table has a column; the other two sources do not state one, and
#   neither mentions mixed precision: fp32, PyTorch's default (inferred).
PUBLISHED_PRECISION = {"lambda": "fp32", "imagenette": "fp32"}
# - image size in pixels: the baseline table names it (x32, x64), the community table is
#   CIFAR-10 at 32 px. The Imagenette report states none: 128 px is the size our reproduction
#   trains at (the data registry's default for Imagenette; config/imagenette_noisy.yaml), so
#   a run at another size is another experiment (ours, not the source's: say so).
PUBLISHED_IMAGE_SIZE = {"CIFAR10_x32": 32, "CIFAR100_x32": 32, "TinyImageNet200_x32": 32,
                        "TinyImageNet200_x64": 64, "lambda": 32, "imagenette": 128,
                        "ImageNet1k_x32": 32, "ImageNet1k_x64": 64, "imagenet2012": 224}
# The baseline table's ImageNet rows have a recipe of their own (recipes.yaml sgdm-imagenet*):
# the downsampled tables one each, the 224 px table one per batch-iterations note of a row.
_IMAGENET_RECIPES = {"ImageNet1k_x32": "sgdm-imagenet32", "ImageNet1k_x64": "sgdm-imagenet64"}
_IMAGENET2012_RECIPES = {"b2048-64k": "sgdm-imagenet2012", "b4096-32k": "sgdm-imagenet2012-b4096",
                         "b1024-128k": "sgdm-imagenet2012-b1024"}
# Their `val_acc` is measured on the official ImageNet validation set: our test split (our
# val split is held out of the training set), so it stands beside our test accuracy.
PUBLISHED_VAL_IS_OUR_TEST = frozenset({"ImageNet1k_x32", "ImageNet1k_x64", "imagenet2012"})


def baseline_recipe(published_dataset: str, notes: str = "") -> str | None:
    """Our recipe that trains like a baseline-table row (None: a 224 px row whose batch and
    iterations we do not reproduce)."""
    if published_dataset == "imagenet2012":
        m = re.search(r"\bb\d+-\d+k\b", notes)
        return _IMAGENET2012_RECIPES.get(m.group(0)) if m else None
    return _IMAGENET_RECIPES.get(published_dataset, PUBLISHED_RECIPE["resnet"])
# The Imagenette sizes whose archives ship noisy_imagenette.csv (exact names, never a prefix):
# symmetric noise at one of its columns' rates with noise seed 0 is that column's labels
# (data.prepared; data.registry.IMAGENETTE_NOISE_COLUMNS, pinned by tests/test_reference.py).
IMAGENETTE_DATASETS = ("imagenette", "imagenette_valfolder", "imagenette320", "imagenettefull")
OFFICIAL_NOISE_RATES = (0.01, 0.05, 0.25, 0.5)
# The paper's Lambda-ResNet defaults, by the model factories' argument names: query depth
# k=16, heads h=4, intra-depth u=1, scope r=23 (pinned by tests/test_report_compare.py).
LAMBDA_DEFAULTS = {"k": 16, "heads": 4, "u": 1, "r": 23}
# Recipe fields whose change (summary.json `recipe_changes`) leaves the experiment the named
# recipe's: precision is compared on its own, the rest change speed or what is logged.
NOT_RECIPE = frozenset({"description", "precision", "channels_last", "compile", "tf32",
                        "track_test_every_eval", "loader_workers",
                        "jpeg_decode"})
# What a demo-size stand-in (config `shrink.set`) changes on purpose: budget and batch.
SHRUNK = frozenset({"iterations", "epochs", "eval_every", "eval_every_epochs", "batch_size"})
CLEAN, OFFICIAL_CSV, DRAWN = "clean", "official CSV column", "drawn"


def noise_source(dataset: str, kind: str, rate: float, seed: int) -> str:
    """Where a run's noisy labels came from: `clean`, Imagenette's `official CSV column`
    (symmetric, noise seed 0, at a column's rate), or `drawn` by lambdapipe.noise."""
    if rate == 0:
        return CLEAN
    official = (dataset in IMAGENETTE_DATASETS and kind == "symmetric" and seed == 0
                and any(math.isclose(rate, r) for r in OFFICIAL_NOISE_RATES))
    return OFFICIAL_CSV if official else DRAWN


def has_official_noise(dataset: str, kind: str, rate: float) -> bool:
    """Whether this dataset and noise have an official CSV column (a draw is then not it)."""
    return noise_source(dataset, kind, rate, 0) == OFFICIAL_CSV


def model_identity(model: str, args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A model as built: `lambda_resnet18_u4_r7` and `lambda_resnet18` with u=4, r=7 are one
    network, so a Lambda-ResNet's name and arguments fold into its base name with every one
    of k, heads, u, r resolved; any other model is its name and arguments as given."""
    m = re.fullmatch(r"(lambda_resnet\d+)(?:_u(\d+)_r(\d+))?", model)
    if not m:
        return model, dict(args)
    named = {"u": int(m.group(2)), "r": int(m.group(3))} if m.group(2) else {}
    return m.group(1), {**LAMBDA_DEFAULTS, **named, **args}


@dataclass(frozen=True)
class Setting:
    """What a run was trained with, or what a published row was, as far as like-for-like
    goes: the fields `differences` compares, and nothing else."""

    dataset: str
    image_size: int | None
    model: str
    model_args: tuple[tuple[str, Any], ...]  # sorted (name, value) pairs
    precision: str | None  # None: not known
    recipe: str | None
    recipe_changes: frozenset[str] = frozenset()  # changed fields that change the experiment
    noise: str = "clean"  # the condition: clean, symmetric-0.25, ...
    noise_source: str = CLEAN

    @staticmethod
    def args(model_args: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
        return tuple(sorted(model_args.items()))


def differences(ours: Setting, published: Setting, stand_in: bool = False) -> list[str]:
    """Why a run is not like a published row, field by field (empty: like). The one rule of
    every table: dataset (exact name), image size, model and its arguments, precision,
    recipe and its changes, noise and its source.

    A stand-in (a demo-size run of a published grid, config `report.published_as`) shrinks
    dataset, image size, widths, budget and batch on purpose: it is compared on the model's
    published arguments only, the recipe bar budget and batch, precision and noise rate."""
    out = []
    if not stand_in and ours.dataset != published.dataset:
        out.append(f"dataset {ours.dataset} (published: {published.dataset})")
    if (not stand_in and published.image_size is not None
            and ours.image_size != published.image_size):
        size = "unknown" if ours.image_size is None else f"{ours.image_size} px"
        out.append(f"image size {size} (published: {published.image_size} px)")
    model, args = model_identity(ours.model, dict(ours.model_args))
    pub_model, pub_args = model_identity(published.model, dict(published.model_args))
    if model != pub_model:
        out.append(f"model {ours.model} (published: {published.model})")
    keys = set(pub_args) if stand_in else set(args) | set(pub_args)
    changed = sorted(k for k in keys if args.get(k) != pub_args.get(k))
    if changed:
        def arg(where: dict[str, Any], key: str) -> str:
            return f"{where[key]}" if key in where else "default"

        out.append("model args " + ", ".join(f"{k}={arg(args, k)} (published: "
                                             f"{arg(pub_args, k)})" for k in changed))
    if published.precision is not None and ours.precision != published.precision:
        out.append(f"precision {ours.precision} (published: {published.precision})")
    if ours.recipe != published.recipe:
        out.append(f"recipe {ours.recipe} (published: {published.recipe})")
    changes = sorted(ours.recipe_changes - (SHRUNK if stand_in else frozenset()))
    if changes:
        out.append("recipe changed: " + ", ".join(changes))
    if ours.noise != published.noise:
        out.append(f"noise {ours.noise} (published: {published.noise})")
    elif not stand_in and ours.noise_source != published.noise_source:
        out.append(f"noise {ours.noise_source} (published: {published.noise_source})")
    return out


def resnet_name(depth: int, width: int) -> str:
    """The baseline table's depth x width as our model name: resnet20x1, resnet18."""
    return f"resnet{depth}" if depth in (18, 34, 50, 101, 152) else f"resnet{depth}x{width}"


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
