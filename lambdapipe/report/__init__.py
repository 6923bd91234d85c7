"""`lambdapipe report`: tables and figures from finished run directories.

Units, the same in every table and metric file: accuracies in percent (CSV columns and
metric keys end in `_pct`), durations as h:mm:ss in markdown and seconds in CSV (`_s`).

Reads only what runs wrote (summary.json, metrics.csv, config.json; the contract in
docs/architecture.md) and the published reference CSVs; it imports no training, model or
data code, so a report can be built anywhere the results were copied to.

Writes under OUT:
  tables/baselines_<dataset>.{md,csv}   ours (mean ± std over seeds) beside published ResNets
                                        (a published value only beside like runs:
                                        reference.differences, one rule for every table)
  tables/noise_<dataset>.{md,csv}       model x noise rate
  tables/speed_<dataset>.{md,csv}       iteration rates and training times, apart from the
                                        results (they measure the machine)
  tables/lambda_cifar10.{md,csv}        Lambda-ResNets beside the community CIFAR-10 table
  tables/imagenette_noisy.{md,csv}      the Imagenette noisy-label study beside its report
  tables/variants.{md,csv}              named variants (fp16, an lr sweep) side by side on val
  tables/reproduced.{md,csv}            each published value beside like runs: our mean, 95 %
                                        t interval over seeds, verdict (consistent/below/above)
  tables/lambda_vs_resnet.{md,csv}      Lambda-ResNet minus ResNet, paired by seed and noise
                                        draw, with its 95 % interval
  tables/incomplete.{md,csv}            runs that are no result: without summary.json, or
                                        finished diverged / non-finite
  tables/runs.csv                       every finished run, every summary field
  figures/<kind>_<dataset>.png          loss, acc_vs_noise, acc_vs_params, memorisation,
                                        attention (runs' explain_test.npz side by side),
                                        position (a lambda layer's learned embeddings)
  figures-svg/<kind>_<dataset>.svg      the same figures as SVG
  metrics.json                          per-run test_acc_pct, val_acc_pct, test_nll, status
  metrics/<dataset>/<model>.json        mean test_acc_pct per noise variant, runs, diverged: one
                                        compact row per dataset and model (`dvc metrics show`)
  curves/<metric>/<dataset>.tsv         run, step, value of every run (`dvc plots show/diff`)
  report.md                             every table, figure links, what was skipped and
                                        which runs to check (report/identity.py)
"""

from __future__ import annotations

from pathlib import Path

from lambdapipe.atomic import remove_temporaries, write_json, write_text
from lambdapipe.reference import PUBLISHED_DATASET
from lambdapipe.report import compare, figures, published_tables, tables
from lambdapipe.report.load import collect_runs, read_published
from lambdapipe.status import STATUSES

__all__ = ["VECTOR_DIR", "Written", "build_report"]

VECTOR_DIR = "figures-svg"  # under OUT, beside figures/ (PNG): each figure once in dvc plots


class Written(list):
    """The written paths (a list of Path), with `notes`: what was skipped and why, and
    `checks`: runs whose provenance to check (report/identity.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.notes: list[str] = []
        self.checks: list[str] = []


def build_report(runs: Path, out: Path, published: Path | None = None,
                 published_as: dict[str, str] | None = None,
                 current: set[str] | None = None) -> Written:
    """Build every table and figure under `out` from the finished runs under `runs`.

    `published_as` ({stand-in dataset: source dataset}) reads demo-size runs against the
    source's published rows (config `report.published_as`, set by `shrink`). `current`:
    the run ids the config asks for (the workflow's), so that the others are named.
    """
    runs, out = Path(runs), Path(out)
    remove_temporaries(out, recursive=True, owned=False)  # a killed report's (dead pid)
    pub = read_published(published)
    collection = collect_runs(runs)  # validates every file before anything is written
    df = tables.runs_frame(collection, published_as)
    colours = figures.palette(list(df["series"]))
    written = Written()

    all_tables: list[tables.Table] = []
    cells: list[compare.PublishedCell] = []  # every published value beside like runs
    for dataset in sorted(df["dataset"].unique()):
        sub = df[df["dataset"] == dataset]
        all_tables += [published_tables.baseline_table(dataset, sub, pub["resnet"], cells),
                       tables.noise_table(dataset, sub),
                       published_tables.speed_table(dataset, sub, pub)]
    for extra in (published_tables.lambda_table(df, pub["lambda"], cells),
                  published_tables.imagenette_table(df, pub["imagenette"], cells),
                  compare.paired_table(df), tables.variants_table(df)):
        if extra is not None:
            all_tables.append(extra)
    all_tables.insert(0, compare.verdict_table(cells))
    all_tables.append(tables.incomplete_table(collection))
    for table in all_tables:
        for suffix, text in ((".md", "# " + table.markdown()[3:]), (".csv", table.csv())):
            path = out / "tables" / f"{table.name}{suffix}"
            write_text(path, text)
            written.append(path)
    path = out / "tables" / "runs.csv"
    write_text(path, tables.runs_table(df))
    written.append(path)
    path = out / "metrics.json"
    write_json(path, tables.metrics_json(df))
    written.append(path)
    written += _write_tree(out / "metrics", {name: _json_text(obj) for name, obj
                                             in tables.model_metrics(df).items()})
    written += _write_tree(out / "curves", tables.curves(collection, df))

    figure_links: list[str] = []
    for dataset in sorted(df["dataset"].unique()):
        sub = df[df["dataset"] == dataset]
        resnet = pub["resnet"]
        source = (published_as or {}).get(dataset, dataset)
        pub_rows = resnet[(resnet["dataset"] == PUBLISHED_DATASET.get(source))
                          & resnet["test_acc"].notna()]
        built = {
            "loss": (figures.loss_curves(dataset, sub, collection, colours),
                     "no metrics.csv with train and val loss"),
            "acc_vs_noise": (figures.acc_vs_noise(dataset, sub, colours),
                             "no model with ok runs at two or more noise rates"),
            "acc_vs_params": (figures.acc_vs_params(dataset, sub, colours, pub_rows, source),
                              "fewer than two model sizes at any noise rate"),
            "memorisation": (figures.memorisation(dataset, sub, collection, colours),
                             "no noisy-label run with train_acc and train_clean_acc curves"),
        }
        explained = _explained(sub, collection)
        built["attention"] = (
            figures.attention_grid(explained, explained[0][1]["meta"]["classes"] if explained
                                   else [], f"{dataset}: FullGrad and Grad-CAM of the same "
                                   "test images, run by run")
            if len(explained) >= 2 else None,
            "fewer than two runs with explain_test.npz on the same images "
            "(`lambdapipe explain --ckpt RUN/best.ckpt`)")
        lam = [(label, arrays) for label, arrays in explained if "position" in arrays]
        built["position"] = (
            figures.position_panels(lam[0][1]["position"], lam[0][1]["meta"]["position"]["kind"],
                                    f"{dataset}: {lam[0][0]}, seed {lam[0][1]['seed']}",
                                    lam[0][1]["meta"]["position"].get("feature_map"),
                                    lam[0][1]["meta"]["position"].get("layer"))
            if lam else None,
            "no explained run with a lambda layer")
        for kind, (fig, why) in built.items():
            base = out / "figures" / f"{kind}_{dataset}"
            if fig is None:
                written.notes.append(f"skipped figure {base.name}: {why}")
                _remove_stale(base, out / VECTOR_DIR)
                continue
            paths = figures.save(fig, base, out / VECTOR_DIR)
            written += paths
            figure_links.append(f"![{base.name}](figures/{paths[0].name})")

    from lambdapipe.report.identity import audit

    written.checks = audit(runs, [r.path for r in collection.runs]
                           + [r.path for r in collection.incomplete], current)
    page = ["# lambdapipe report", "",
            f"{len(df)} finished runs ({_status_counts(df)}), "
            f"{len(collection.incomplete)} running/incomplete, from `{runs}`.", ""]
    page += [t.markdown() for t in all_tables]
    page += ["## Figures", "", *(f"{link}\n" for link in figure_links)]
    if written.notes:
        page += ["## Skipped", "", *(f"- {n}" for n in written.notes), ""]
    if written.checks:
        page += ["## Runs to check", "", *(f"- {c}" for c in written.checks)]
    path = out / "report.md"
    write_text(path, "\n".join(page).rstrip() + "\n")
    written.append(path)
    return written


def _status_counts(df) -> str:
    """`2 ok, 1 diverged, 0 non-finite`: every status a run can end in, named."""
    return ", ".join(f"{int((df['status'] == s).sum())} {s}" for s in STATUSES)


def _explained(sub, collection) -> list[tuple[str, dict]]:
    """(model label, explain_test.npz arrays + its json) of one run per model, on the same
    images; `lambdapipe explain` wrote them, the report only reads (no torch here)."""
    import numpy as np

    from lambdapipe.report.load import read_explain, read_json_object

    paths = {run.run_id: run.path for run in collection.runs}
    found: dict[str, dict] = {}
    for row in sub.sort_values(["model_label", "condition", "seed"]).itertuples():
        path = paths[row.run_id] / "explain_test.npz"
        label = f"{row.model_label}, noise: {row.condition}"  # clean columns say so too
        if label in found or not path.is_file():
            continue
        arrays = read_explain(path)
        arrays["meta"] = read_json_object(path.with_suffix(".json"))
        arrays["seed"] = row.seed
        found[label] = arrays
    if not found:
        return []
    first = next(iter(found.values()))["indices"]
    return [(label, a) for label, a in found.items() if np.array_equal(a["indices"], first)]


def _json_text(obj) -> str:
    import json

    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def _write_tree(base: Path, files: dict[str, str]) -> list[Path]:
    """Write `files` (relative path -> text) under `base` and remove the files an earlier
    report left there that this one no longer writes (a dropped model's row)."""
    written = []
    for rel, text in files.items():
        write_text(base / rel, text)
        written.append(base / rel)
    if base.is_dir():
        for path in base.rglob("*"):
            if path.is_file() and path.suffix in (".json", ".tsv") and path not in written:
                path.unlink()
    return written


def _remove_stale(base: Path, vector_dir: Path) -> None:
    """A figure skipped now must not survive from an earlier report and be read as current."""
    for directory in (base.parent, vector_dir):
        for fmt in figures.FORMATS:
            (directory / f"{base.name}.{fmt}").unlink(missing_ok=True)
