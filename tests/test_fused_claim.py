"""What is claimed of fused packs (issue 28.8): a fused seed is *statistically*, not
numerically, equal to the same seed trained alone. Same initial weights, data order and
update rule; float32 sums in another order (grouped convolutions), and these small networks
amplify such differences within tens of steps (tests/test_fuse.py measured it), so final
numbers differ by about as much as one seed differs from another. The bound below is what
docs/performance.md and `train --help` state."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from lambdapipe import data, train
from lambdapipe.cli import main
from lambdapipe.pack import run_packed

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
KW = {"iterations": 60, "eval_every": 30, "batch_size": 32}
BOUND = 0.15  # |val_acc fused - val_acc alone| per seed, as docs/performance.md states

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def test_help_and_docs_say_statistically_not_numerically():
    """The help said 'within float tolerance of each seed alone': not what a whole run gives."""
    result = CliRunner().invoke(main, ["train", "--help"])
    text = " ".join(result.output.split())
    assert "statistically, not numerically" in text and "float tolerance" not in text, text
    docs = " ".join((ROOT / "docs" / "performance.md").read_text().split())
    assert "statistically, not numerically, equal" in docs
    assert re.search(rf"within {BOUND:g} val(idation)? accuracy", docs)


@pytest.mark.slow  # a statistical claim over six whole runs; test_fuse pins the fused step
@pytest.mark.cost(11)  # three seeds trained alone, then fused
def test_a_fused_seed_lands_within_the_stated_bound_of_the_same_seed_alone(tmp_path):
    root = tmp_path / "data"
    data.prepare("digits", root, progress=False)

    def cfg(out: Path, seed: int) -> train.TrainConfig:
        return train.TrainConfig.build(model="resnet20x1", model_args={"base_width": 4},
                                       dataset="digits", data_dir=root, noise="clean",
                                       seed=seed, out=out, recipe="demo", overrides=KW,
                                       deterministic=True)

    alone = [train.run(cfg(tmp_path / f"alone{s}", s)) for s in SEEDS]
    fused = run_packed([cfg(tmp_path / f"fused{s}", s) for s in SEEDS], fuse=True)
    assert all("fused x3" in f["compile"] for f in fused), [f["compile"] for f in fused]
    diffs = [abs(a["val_acc"] - f["val_acc"]) for a, f in zip(alone, fused, strict=True)]
    spread = max(a["val_acc"] for a in alone) - min(a["val_acc"] for a in alone)
    print(f"fused - alone val_acc per seed: {diffs}; seed spread alone {spread:.4f}")
    assert max(diffs) <= BOUND, (diffs, spread)
