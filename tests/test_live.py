"""DVCLive-format curves beside metrics.csv: what `dvc plots` and `dvc metrics` read."""

from __future__ import annotations

import json
import math

from lambdapipe import live
from lambdapipe.rundir import METRIC_COLUMNS


def rows(n: int) -> list[dict[str, float]]:
    out = []
    for i in range(1, n + 1):
        row = {c: float(i) for c in METRIC_COLUMNS}
        row.update(iteration=50 * i, val_loss=math.nan if i == 2 else 1 / i, val_acc=0.1 * i)
        out.append(row)
    return out


def test_dvclive_layout_values_and_rewrite_on_resume(tmp_path):
    live.write(tmp_path, rows(3))
    base = tmp_path / "dvclive"
    assert sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file()) == [
        "metrics.json", "plots/metrics/lr.tsv", "plots/metrics/train/acc.tsv",
        "plots/metrics/train/clean_acc.tsv", "plots/metrics/train/loss.tsv",
        "plots/metrics/val/acc.tsv", "plots/metrics/val/loss.tsv"]
    # DVCLive's columns (less its timestamp): the step, then the metric's leaf name.
    assert (base / "plots/metrics/val/acc.tsv").read_text() == (
        "step\tacc\n50\t0.1\n100\t0.2\n150\t0.30000000000000004\n")
    # A non-finite point is left out of its curve, not written as text DVC cannot plot.
    assert (base / "plots/metrics/val/loss.tsv").read_text() == (
        "step\tloss\n50\t1.0\n150\t0.3333333333333333\n")
    latest = json.loads((base / "metrics.json").read_text())
    assert latest == {"step": 150, "lr": 3.0,
                      "train": {"loss": 3.0, "acc": 3.0, "clean_acc": 3.0},
                      "val": {"loss": 1 / 3, "acc": 0.30000000000000004}}
    # A resumed run rewrites the whole history: no duplicated steps, no torn files.
    live.write(tmp_path, rows(4))
    live.write(tmp_path, rows(4))
    steps = [ln.split("\t")[0] for ln in
             (base / "plots/metrics/train/loss.tsv").read_text().splitlines()[1:]]
    assert steps == ["50", "100", "150", "200"]
    assert not list(base.rglob("*.tmp"))
    live.write(tmp_path / "empty", [])
    assert not (tmp_path / "empty").exists()
