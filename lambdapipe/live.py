"""Live training curves in DVCLive's file format, beside metrics.csv.

`<run>/dvclive/` holds what `dvclive.Live` would write for this run - `metrics.json` (the
latest values and their step) and `plots/metrics/<split>/<name>.tsv` (one curve per metric,
step = optimizer iteration) - so `dvc plots show RUN/dvclive/plots/metrics`, DVC's VS Code
extension and Studio read a run while it trains. The files are written here rather than with
the dvclive package: training then needs no DVC install (dvclive pulls in dvc, gto, scmrepo),
each file is replaced atomically like every artefact (dvclive appends in place), and a resumed
run rewrites its whole history from the checkpoint's rows instead of appending duplicates.
DVCLive's `timestamp` column is left out: a resumed run has no true wall time for its earlier
rows. metrics.csv stays the report's contract; these files are a view of the same rows.
"""

from __future__ import annotations

from pathlib import Path

from lambdapipe import atomic
from lambdapipe.status import finite

LIVE_DIR = "dvclive"
# metrics.csv column -> DVCLive metric name (a "/" nests it, as dvclive.Live.log_metric does).
CURVES = {"train_loss": "train/loss", "val_loss": "val/loss", "train_acc": "train/acc",
          "val_acc": "val/acc", "train_clean_acc": "train/clean_acc", "lr": "lr"}


def write(run_dir: Path, rows: list[dict[str, float]]) -> None:
    """Rewrite `run_dir/dvclive` from every metrics row so far (non-finite points left out
    of the curves, null in metrics.json)."""
    if not rows:
        return
    base = Path(run_dir) / LIVE_DIR
    latest: dict = {"step": int(rows[-1]["iteration"])}
    for column, name in CURVES.items():
        leaf = name.rpartition("/")[2]
        points = [(int(r["iteration"]), finite(r.get(column))) for r in rows]
        lines = [f"step\t{leaf}", *(f"{step}\t{v!r}" for step, v in points if v is not None)]
        atomic.write_text(base / "plots" / "metrics" / f"{name}.tsv", "\n".join(lines) + "\n")
        node = latest
        *parents, _ = name.split("/")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = points[-1][1]
    atomic.write_json(base / "metrics.json", latest)
