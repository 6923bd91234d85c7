"""`lambdapipe report` on fake run directories with realistic values (no torch needed)."""

from __future__ import annotations

import csv
import itertools
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from lambdapipe.cli import main
from lambdapipe.errors import UserError
from lambdapipe.reference import depth_width
from lambdapipe.report import build_report
from lambdapipe.report.load import parse_noise_tag

R20_CLEAN_TST = [0.921, 0.925, 0.926]
R20_NOISY_TST = [0.850, 0.862]
IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "imagenette": 128, "imagenette_valfolder": 128}
REPORT_LC = "lr18_l3_lc (pos_init=torch_default)"  # the md label of the report's LR18_L3(lc)


def write_run(root: Path, dataset: str, noise: str, model: str, seed: int, *,
              finished: bool = True, model_args: dict | None = None,
              config_size: int | None = ..., **summary) -> Path:
    """A run directory as `lambdapipe train` leaves it: config, metrics, maybe a summary.
    config.json holds the image size (`config_size`), as runs from before summary.json carried
    it wrote it."""
    d = root / dataset / noise / model / str(seed)
    d.mkdir(parents=True)
    size = IMAGE_SIZE.get(dataset) if config_size is ... else config_size
    (d / "config.json").write_text(json.dumps(
        {"model": model, "model_args": model_args or {}, "dataset": dataset, "noise": noise,
         "seed": seed} | ({"data": {"image_size": size}} if size is not None else {})))
    rate = parse_noise_tag(noise).rate
    lines = ["iteration,epoch,lr,train_loss,train_acc,train_clean_acc,val_loss,val_acc,"
             "images_per_s,elapsed_s"]
    for i in range(1, 9):
        clean_acc = 0.3 + 0.08 * i + 0.005 * seed
        # Noisy-label accuracy climbs past 1 - rate late in training: memorisation.
        noisy_acc = clean_acc * (1 - rate) + rate * max(0.0, (i - 5) / 4)
        lines.append(f"{i * 100},{i / 2},{0.1 / i:.4f},{2.3 / i + rate:.4f},{noisy_acc:.4f},"
                     f"{clean_acc:.4f},{2.3 / i ** 0.5 + rate:.4f},{clean_acc - 0.02:.4f},"
                     f"5000,{i * 12.5}")
    (d / "metrics.csv").write_text("\n".join(lines) + "\n")
    if finished:
        base = {"model": model, "dataset": dataset, "noise": noise, "seed": seed,
                "params": 272_474, "val_acc": 0.9, "tst_acc": 0.9, "tst_nll": 0.3, "ece": 0.02,
                "wall_time_s": 100.0, "iter_per_min": 4500.0, "iterations": 800,
                "status": "ok", "diverged_at": None, "skipped_steps": 0, "precision": "fp32",
                "recipe": "sgdm", "best_train_loss": 0.2, "best_val_loss": 0.3,
                "train_clean_acc": 0.95}
        base.update(summary)
        (d / "summary.json").write_text(json.dumps({k: v for k, v in base.items()
                                                    if v is not ...}))
    return d


def make_runs(root: Path) -> Path:
    for seed, acc in enumerate(R20_CLEAN_TST):
        write_run(root, "cifar10", "clean", "resnet20x1", seed, tst_acc=acc,
                  val_acc=acc - 0.001, tst_nll=0.27 + seed / 100)
    for seed, acc in enumerate(R20_NOISY_TST):
        write_run(root, "cifar10", "symmetric-0.25", "resnet20x1", seed, tst_acc=acc,
                  best_train_loss=1.1 + seed / 10, wall_time_s=120.0 + seed)
    write_run(root, "cifar10", "symmetric-0.25", "resnet20x1", 2, finished=False)
    for seed in (0, 1):
        write_run(root, "cifar10", "clean", "lr18_l3_lc", seed, params=8_010_000,
                  tst_acc=0.94 + seed / 100, precision="bf16")
    write_run(root, "cifar10", "symmetric-0.25", "lr18_l3_lc", 0, params=8_010_000,
              precision="bf16", status="diverged", diverged_at=1200, tst_acc=0.1,
              tst_nll=float("nan"))
    write_run(root, "cifar10", "clean", "lambda_resnet18_u4_r7", 0, params=8_600_000,
              tst_acc=0.930, recipe="sgd-restarts-fork65", select_on="test")
    # A summary without the optional iter_per_min and ece: shown as '—', not a crash.
    write_run(root, "cifar10", "clean", "resnet18", 0, params=11_173_962, tst_acc=0.950,
              iter_per_min=..., ece=..., wall_time_s=2520.0)
    # ResNet-18 under the community recipe: beside the community table, not the baselines.
    write_run(root, "cifar10", "clean", "resnet18", 1, params=11_173_962, tst_acc=0.940,
              recipe="sgd-restarts")
    # on the report's split, its lambda convolution started as the report's code does
    write_run(root, "imagenette_valfolder", "symmetric-0.25", "lr18_l3_lc", 0,
              params=8_010_000, best_train_loss=1.8, best_val_loss=2.4, wall_time_s=15000.0,
              tst_acc=0.61, recipe="adam-restarts", model_args={"pos_init": "torch_default"})
    return root


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, Path, list[Path]]:
    root = make_runs(tmp_path_factory.mktemp("runs"))
    out = tmp_path_factory.mktemp("out")
    return root, out, build_report(root, out)


def md_rows(path: Path) -> list[dict[str, str]]:
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")), strict=True))
            for ln in lines[2:]]


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def pick(rows, **match):
    hits = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(hits) == 1, (match, rows)
    return hits[0]


def test_baseline_table_means_stds_and_published(report):
    _, out, _ = report
    rows = csv_rows(out / "tables" / "baselines_cifar10.csv")
    r20 = pick(rows, model="resnet20x1", noise="clean")
    assert r20["seeds"] == "3" and r20["depth"] == "20" and r20["width"] == "1"
    # Accuracy in percent everywhere, the CSV column named so; the published fraction too.
    assert float(r20["test_acc_pct_mean"]) == pytest.approx(100 * statistics.mean(R20_CLEAN_TST))
    assert float(r20["test_acc_pct_std"]) == pytest.approx(100 * statistics.stdev(R20_CLEAN_TST))
    assert float(r20["test_acc_pct_published"]) == pytest.approx(92.4)  # CIFAR10_x32 20x1 fp32
    assert float(r20["params_m_published"]) == pytest.approx(0.27)

    md = md_rows(out / "tables" / "baselines_cifar10.md")
    r20_md = pick(md, model="resnet20x1", noise="clean")
    assert r20_md["test acc (%)"] == "92.40 ± 0.26"
    assert r20_md["published test acc (%)"] == "92.40"
    assert r20_md["test NLL"] == "0.280 ± 0.010"
    # Noisy runs and non-ResNets have no published row; bf16 has none either.
    assert pick(md, model="resnet20x1", noise="symmetric-0.25")["published test acc (%)"] == "—"
    lr = pick(md, model="lr18_l3_lc", noise="clean")
    assert lr["published test acc (%)"] == "—" and lr["depth"] == "18"
    assert lr["test acc (%)"] == "94.50 ± 0.71" and lr["precision"] == "bf16"
    r18 = pick(md, model="resnet18", noise="clean", recipe="sgdm")
    assert r18["published test acc (%)"] == "94.80" and r18["test acc (%)"] == "95.00"
    # The same model under another recipe is not the baseline table's: no published value.
    other = pick(md, model="resnet18", noise="clean", recipe="sgd-restarts")
    assert other["test acc (%)"] == "94.00" and other["published test acc (%)"] == "—"
    assert other["published params (M)"] == "—"
    # Rates and times measure the machine: the speed table, not the results.
    assert not {"iter/min", "training time (h:mm:ss)"} & set(r20_md)


def test_speed_table_apart_one_time_unit(report):
    _, out, _ = report
    md = md_rows(out / "tables" / "speed_cifar10.md")
    assert pick(md, model="resnet20x1", noise="clean")["published iter/min"] == "4545"
    r18 = pick(md, model="resnet18", noise="clean", recipe="sgdm")
    assert r18["iter/min"] == "—"  # missing optional key
    # Ours and the tables' hours in one form: 2520 s = 0:42:00 beside 0.6 h = 0:36:00.
    assert r18["training time (h:mm:ss)"] == "0:42:00"
    assert r18["published training time (h:mm:ss)"] == "0:36:00"
    assert pick(md, model="resnet20x1", noise="clean")[
        "published training time (h:mm:ss)"] == "—"
    rows = csv_rows(out / "tables" / "speed_cifar10.csv")
    r18_csv = pick(rows, model="resnet18", recipe="sgdm")
    assert float(r18_csv["training_time_s_mean"]) == pytest.approx(2520)
    assert float(r18_csv["training_time_s_published"]) == pytest.approx(2160)
    # The results tables say where the times went; no table shows hours or seconds.
    for table in (out / "tables").glob("*.md"):
        assert "(h)" not in table.read_text() and "(s)" not in table.read_text(), table


def test_noise_table_and_diverged(report):
    _, out, _ = report
    md = md_rows(out / "tables" / "noise_cifar10.md")
    noisy = pick(md, model="resnet20x1", noise="symmetric", rate="0.25")
    assert noisy["test acc (%)"] == "85.60 ± 0.85"
    assert noisy["best train loss (CE on the training labels)"] == "1.150 ± 0.071"
    assert noisy["seeds"] == "2"  # the incomplete seed 2 is not a result
    div = pick(md, model="lr18_l3_lc", noise="symmetric", rate="0.25")
    assert div["test acc (%)"] == "diverged@1200"
    assert div["best val loss (CE)"] == "diverged@1200"
    assert div["status"] == "diverged@1200"
    assert pick(md, model="lr18_l3_lc", noise="clean", rate="0")["status"] == "ok"
    rows = csv_rows(out / "tables" / "noise_cifar10.csv")
    d = pick(rows, model="lr18_l3_lc", noise="symmetric-0.25")
    assert d["test_acc_pct_mean"] == "" and d["diverged"] == "1" and d["seeds"] == "0"


def test_incomplete_listed_never_results(report):
    _, out, _ = report
    inc = md_rows(out / "tables" / "incomplete.md")
    # The unfinished run first, then the finished run that is no result, named by status.
    assert [r["run"] for r in inc] == ["cifar10/symmetric-0.25/resnet20x1/2",
                                       "cifar10/symmetric-0.25/lr18_l3_lc/0"]
    assert inc[0]["status"] == "running/incomplete" and inc[0]["last iteration"] == "800"
    assert inc[1]["status"] == "diverged@1200" and inc[1]["model"] == "lr18_l3_lc"
    run_ids = [r["run_id"] for r in csv_rows(out / "tables" / "runs.csv")]
    assert len(run_ids) == 12 and "cifar10/symmetric-0.25/resnet20x1/2" not in run_ids
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == set(run_ids)
    assert metrics["cifar10/clean/resnet20x1/1"]["test_acc_pct"] == 92.5  # percent, as tables
    assert metrics["cifar10/symmetric-0.25/lr18_l3_lc/0"]["status"] == "diverged"
    assert metrics["cifar10/symmetric-0.25/lr18_l3_lc/0"]["test_nll"] is None


def test_runs_csv_has_every_summary_field(report):
    _, out, _ = report
    rows = csv_rows(out / "tables" / "runs.csv")
    row = pick(rows, run_id="cifar10/clean/resnet18/0")
    for key in ("model", "dataset", "noise", "seed", "params", "tst_acc", "wall_time_s",
                "status", "diverged_at", "precision", "recipe", "best_val_loss"):
        assert key in row
    assert row["iter_per_min"] == "" and row["params"] == "11173962"


def test_lambda_and_imagenette_tables(report):
    _, out, _ = report
    lam = md_rows(out / "tables" / "lambda_cifar10.md")
    lr = pick(lam, model="lambda_resnet18_u4_r7")
    assert (lr["k"], lr["h"], lr["u"], lr["r"]) == ("16", "4", "4", "7")
    assert lr["test acc (%)"] == "93.00" and lr["published test acc (%)"] == "93.20"
    # kuangliu's ResNet-18 (93.02) used its own recipe: not beside our sgd-restarts run.
    r18 = pick(lam, model="resnet18", recipe="sgd-restarts")
    assert r18["published test acc (%)"] == "—"
    assert r18["unlike published"] == ("recipe sgd-restarts (published: kuangliu/pytorch-cifar's "
                                       "own)")
    # ResNet-18 under sgdm is in the table (ours), but not beside the community value.
    assert pick(lam, model="resnet18", recipe="sgdm")["published test acc (%)"] == "—"
    assert {r["model"] for r in lam} == {"lambda_resnet18_u4_r7", "resnet18"}
    img = pick(md_rows(out / "tables" / "imagenette_noisy.md"), model=REPORT_LC)
    loss = "best train loss (CE on the training labels)"
    assert img[f"published {loss}"] == "1.904"  # LR18_L3(lc) at 25 %
    assert img[loss] == "1.800" and "training time (h:mm:ss)" not in img
    # 15000 s beside the report's 4 h 56 min 32 s, in one form, in the speed table.
    assert img["val loss on"] == "val folder (= test)"
    speed = pick(md_rows(out / "tables" / "speed_imagenette_valfolder.md"), model=REPORT_LC)
    assert speed["training time (h:mm:ss)"] == "4:10:00"
    assert speed["published training time (h:mm:ss)"] == "4:56:32"
    assert float(pick(csv_rows(out / "tables" / "speed_imagenette_valfolder.csv"),
                      model="lr18_l3_lc")
                 ["training_time_s_published"]) == 17792


# One run per case, each in its own runs tree; whether the published value stands beside it.
LIKE_CASES = {
    "as published": ({}, True),
    "another recipe": ({"recipe": "sgd-restarts"}, False),
    "a changed recipe field": ({"recipe_changes": {"lr": 0.05}}, False),
    "a speed-only change": ({"recipe_changes": {"compile": True, "channels_last": True}}, True),
    "another precision": ({"precision": "bf16"}, False),
    "another image size": ({"config_size": 64}, False),
    "an unknown image size": ({"config_size": None}, False),
    "the image size in summary.json": ({"config_size": None, "image_size": 32}, True),
    "summary.json's size wins": ({"image_size": 64}, False),
}


@pytest.mark.parametrize("case", LIKE_CASES)
def test_a_published_value_stands_only_beside_like_runs(tmp_path, case):
    """Same dataset, image size, model, precision and recipe (unchanged), or '—'."""
    change, published = LIKE_CASES[case]
    runs = tmp_path / "runs"
    write_run(runs, "cifar10", "clean", "resnet20x1", 0, tst_acc=0.92, **change)
    build_report(runs, tmp_path / "out")
    row = pick(md_rows(tmp_path / "out" / "tables" / "baselines_cifar10.md"), model="resnet20x1")
    assert row["test acc (%)"] == "92.00"
    # A column empty in every row is left out of the markdown (the CSV keeps it).
    assert row.get("published test acc (%)", "—") == ("92.40" if published else "—"), row
    csv_row = pick(csv_rows(tmp_path / "out" / "tables" / "baselines_cifar10.csv"),
                   model="resnet20x1")
    assert csv_row["test_acc_pct_published"] == ("92.4" if published else ""), csv_row
    if case == "a changed recipe field":
        assert row["recipe"] == "sgdm (lr=0.05)"


@pytest.mark.parametrize("recipe, published", [("adam-restarts", "2.363"), ("sgdm", "—")])
def test_imagenette_published_only_under_the_report_recipe(tmp_path, recipe, published):
    runs = tmp_path / "runs"
    write_run(runs, "imagenette_valfolder", "symmetric-0.25", "lr18_l3_lc", 0, recipe=recipe,
              best_val_loss=2.4, model_args={"pos_init": "torch_default"})
    build_report(runs, tmp_path / "out")
    row = pick(md_rows(tmp_path / "out" / "tables" / "imagenette_noisy.md"), model=REPORT_LC)
    assert row.get("published best val loss (CE)", "—") == published
    assert row["best val loss (CE)"] == "2.400"


def test_figures_written_readable_and_skips_noted(report):
    _, out, written = report
    for kind in ("loss", "acc_vs_noise", "acc_vs_params", "memorisation"):
        for sub, fmt in (("figures", "png"), ("figures-svg", "svg")):
            path = out / sub / f"{kind}_cifar10.{fmt}"
            assert path in written and path.stat().st_size > 15_000, path
    with Image.open(out / "figures" / "acc_vs_noise_cifar10.png") as im:
        width, height = im.size
    assert 600 < width < 4000 and 300 < height < 3000 and width > height
    # imagenette_valfolder has one noise rate and one model: those figures are skipped, and
    # said so.
    assert not (out / "figures" / "acc_vs_noise_imagenette_valfolder.png").exists()
    assert any("acc_vs_noise_imagenette_valfolder" in n for n in written.notes)
    assert not list((out / "figures").glob(".*tmp"))
    assert "acc_vs_noise_imagenette_valfolder" in (out / "report.md").read_text()


def test_report_imports_no_training_code(report, tmp_path):
    root, _, _ = report
    code = (
        "import sys; from lambdapipe.report import build_report; "
        f"build_report({str(root)!r}, {str(tmp_path)!r}); "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith("
        "('lambdapipe.train', 'lambdapipe.models', 'lambdapipe.data', 'lambdapipe.evaluate')));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Same runs, same bytes: DVC sees no change when nothing changed.
    _, out, _ = report
    for rel in ("metrics.json", "tables/noise_cifar10.md", "figures-svg/loss_cifar10.svg",
                "figures/acc_vs_noise_cifar10.png"):
        assert (tmp_path / rel).read_bytes() == (out / rel).read_bytes(), rel


@pytest.mark.parametrize("content, why", [
    ("{not json", "not JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"model": "resnet20x1", "dataset": "cifar10", "noise": "clean", "seed": 0}',
     "missing key 'status'"),
    ('{"model": "m", "dataset": "d", "noise": "clean", "seed": 0, "status": "great"}',
     "status 'great'"),
    ('{"model": "m", "dataset": "d", "noise": "clean", "seed": 0, "status": "ok", '
     '"tst_acc": "high"}', "tst_acc must be a number"),
    ('{"model": "m", "dataset": "d", "noise": "gaussian", "seed": 0, "status": "ok"}',
     "noise tag 'gaussian'"),
])
def test_malformed_summary_is_one_line_naming_the_file(tmp_path, content, why):
    write_run(tmp_path / "runs", "cifar10", "clean", "resnet20x1", 0)
    bad = write_run(tmp_path / "runs", "cifar10", "clean", "resnet20x1", 1) / "summary.json"
    bad.write_text(content)
    with pytest.raises(UserError) as exc:
        build_report(tmp_path / "runs", tmp_path / "out")
    msg = str(exc.value)
    assert "\n" not in msg and str(bad) in msg and why in msg
    assert not (tmp_path / "out").exists()  # nothing written before the check


def test_malformed_metrics_csv(tmp_path):
    d = write_run(tmp_path / "runs", "cifar10", "clean", "resnet20x1", 0)
    (d / "metrics.csv").write_text("iteration,train_loss\n100,abc\n")
    with pytest.raises(UserError, match=r"metrics\.csv: column 'train_loss' is not numeric"):
        build_report(tmp_path / "runs", tmp_path / "out")


def test_no_finished_runs(tmp_path):
    (tmp_path / "runs").mkdir()
    with pytest.raises(UserError, match="no finished runs under"):
        build_report(tmp_path / "runs", tmp_path / "out")
    write_run(tmp_path / "runs", "cifar10", "clean", "resnet20x1", 0, finished=False)
    with pytest.raises(UserError, match=r"no finished runs under .* \(1 incomplete\)"):
        build_report(tmp_path / "runs", tmp_path / "out")
    with pytest.raises(UserError, match="does not exist"):
        build_report(tmp_path / "nowhere", tmp_path / "out")


def test_cli_report(tmp_path):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        write_run(runs, "cifar100", "clean", "resnet20x1", seed, tst_acc=0.66 + seed / 100)
    # Train writes the model overrides into summary.json; a narrowed model is not published.
    d = write_run(runs, "cifar100", "clean", "resnet20x1", 2, params=17_534,
                  model_args={"base_width": 64})
    summary = json.loads((d / "summary.json").read_text())
    (d / "summary.json").write_text(json.dumps(summary | {"model_args": {"base_width": 4}}))
    result = CliRunner().invoke(main, ["report", "--runs", str(runs), "--out",
                                       str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 'out' / 'tables' / 'baselines_cifar100.md'}" in result.output
    # A finished run read by the report is write-protected again (as after a `dvc pull`).
    assert not (d / "summary.json").stat().st_mode & 0o222
    assert "skipped figure acc_vs_noise_cifar100" in result.output
    row = pick(md_rows(tmp_path / "out" / "tables" / "baselines_cifar100.md"), model="resnet20x1")
    assert row["test acc (%)"] == "66.50 ± 0.71" and row["published test acc (%)"] == "66.20"
    # As many decimals as the table's smallest model needs, the same in every row.
    assert row["params (M)"] == "0.272" and row["seeds"] == "2" and row["width"] == "1"
    narrow = pick(md_rows(tmp_path / "out" / "tables" / "baselines_cifar100.md"),
                  model="resnet20x1 (base_width=4)")  # summary.json wins over config.json
    assert narrow["published test acc (%)"] == "—" and narrow["params (M)"] == "0.018"
    assert narrow["width"] == "—"  # the name's x1 says nothing beside base_width=4
    empty = CliRunner().invoke(main, ["report", "--runs", str(tmp_path / "none"), "--out",
                                      str(tmp_path / "o2")])
    assert empty.exit_code == 2 and "does not exist" in empty.output


def test_published_dir_must_hold_the_tables(tmp_path):
    write_run(tmp_path / "runs", "cifar10", "clean", "resnet20x1", 0)
    (tmp_path / "pub").mkdir()
    with pytest.raises(UserError, match="lacks published_resnet_baselines.csv"):
        build_report(tmp_path / "runs", tmp_path / "out", published=tmp_path / "pub")


@pytest.mark.parametrize("model, expected", [
    ("resnet20x2", (20, 2)), ("resnet18", (18, 1)), ("lr18_l3_lc", (18, 1)),
    ("lambda_resnet50_u4_r7", (50, 1)), ("vit_tiny", (None, None)),
])
def test_depth_width_from_model_name(model, expected):
    assert depth_width(model) == expected


def test_noise_tags():
    assert parse_noise_tag("clean").rate == 0
    n = parse_noise_tag("pairflip-0.05-s3")
    assert (n.kind, n.rate, n.seed, n.condition) == ("pairflip", 0.05, 3, "pairflip-0.05")
    assert math.isclose(parse_noise_tag("symmetric-1e-05").rate, 1e-5)
    for bad in ("symmetric", "symmetric-1.5", "symmetric-x"):
        with pytest.raises(ValueError):
            parse_noise_tag(bad)


def _x_tick_labels(fig, ax) -> list:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ticks = ax.xaxis.get_major_ticks() + ax.xaxis.get_minor_ticks()
    return [(t.label1.get_text(), t.label1.get_window_extent(renderer)) for t in ticks
            if t.label1.get_visible() and t.label1.get_text()
            and ax.get_xlim()[0] <= t.get_loc() <= ax.get_xlim()[1]]


@pytest.mark.parametrize("params", [(272_474, 612_000), (272_474, 11_173_962),
                                    (90_000, 110_000)], ids=["half-decade", "1.6-decades",
                                                             "narrow"])
def test_acc_vs_params_x_ticks_readable_in_millions(tmp_path, params):
    """Plain numbers under an axis labelled in millions (no 'M' on each tick), never
    overlapping, at least two per panel whatever the span; a log scale only where the sizes
    differ by a factor of 3 or more (a log axis spanning under a decade has no major tick:
    minor ones then carry the labels)."""
    import pandas as pd

    from lambdapipe.report import figures, tables
    from lambdapipe.report.load import collect_runs

    for model, n in zip(("resnet20x1", "lr18_l3_lc"), params, strict=True):
        for seed in (0, 1):
            write_run(tmp_path, "digits", "clean", model, seed, params=n, tst_acc=0.9)
    df = tables.runs_frame(collect_runs(tmp_path), None)
    fig = figures.acc_vs_params("digits", df, figures.palette(list(df["series"])),
                                pd.DataFrame())
    ax = fig.axes[0]
    labels = _x_tick_labels(fig, ax)
    assert len(labels) >= 2, labels
    assert all(float(text.replace("\N{MINUS SIGN}", "-")) > 0 for text, _ in labels), labels
    wide = max(params) / min(params) >= 3
    assert ax.get_xscale() == ("log" if wide else "linear")
    assert ax.get_xlabel() == ("parameters (millions, log scale)" if wide
                               else "parameters (millions)")
    boxes = sorted((box for _, box in labels), key=lambda b: b.x0)
    assert all(a.x1 < b.x0 for a, b in itertools.pairwise(boxes)), [t for t, _ in labels]


def test_saliency_and_position_figures_have_colour_bars_and_a_grid():
    import numpy as np

    from lambdapipe.report import figures

    rng = np.random.default_rng(0)
    arrays = {"indices": np.arange(3), "labels": np.arange(3), "predicted": np.arange(3),
              "images": rng.integers(0, 255, (3, 16, 16, 3), dtype=np.uint8),
              "fullgrad": rng.random((3, 16, 16)), "gradcam": rng.random((3, 16, 16))}
    fig = figures.attention_grid([("a", arrays), ("b", arrays)], list("0123"), "t")
    bars = [ax for ax in fig.axes if "saliency" in ax.get_ylabel()]
    assert len(bars) == 1 and bars[0].get_ylim() == (0.0, 1.0)

    position = rng.normal(size=(16, 1, 23, 23))
    fig = figures.position_panels(position, "lc", "t", (8, 8))
    bars = [ax for ax in fig.axes if ax.get_ylabel() == "embedding value"]
    assert len(bars) == 1
    low, high = bars[0].get_ylim()
    assert low == -high == -np.abs(position[:, :, 4:19, 4:19]).max()  # one symmetric scale
    width, height = fig.get_size_inches()
    assert width / height < 2  # a grid, not a 16-panel strip
    panels = [ax for ax in fig.axes if ax.get_images()]
    assert len(panels) == 16


def test_figures_say_what_they_show(tmp_path):
    """acc_vs_noise ticks only at the rates trained (dodged points are no rate of their own)
    with runs drawn large enough to see; the loss key has no "diverged at" when nothing
    diverged and no colour key repeating the row titles; the position figure names its run,
    seed and layer in two title lines and labels its offset axes; every attention column
    header names its noise, clean included."""
    import numpy as np

    from lambdapipe.report import figures, tables
    from lambdapipe.report.load import collect_runs

    for noise in ("clean", "symmetric-0.25"):
        for model in ("resnet20x1", "lr18_l3_lc"):
            for seed in (0, 1):
                write_run(tmp_path, "digits", noise, model, seed, tst_acc=0.9 - seed / 100)
    collection = collect_runs(tmp_path)
    df = tables.runs_frame(collection, None)
    colours = figures.palette(list(df["series"]))

    fig = figures.acc_vs_noise("digits", df, colours)
    ax = fig.axes[0]
    assert list(ax.get_xticks()) == [0.0, 25.0]
    low, high = ax.get_xlim()
    assert low < 0 and high > 25
    dots = [c for c in ax.collections if len(c.get_offsets()) == 4]  # a model's 4 runs
    assert len(dots) == 2
    assert all(c.get_sizes()[0] >= 25 and c.get_alpha() >= 0.7 for c in dots)
    x = np.concatenate([c.get_offsets()[:, 0] for c in dots])
    assert (np.minimum(abs(x), abs(x - 25)) < 0.3 * 25 / 2).all()  # in a band at its rate

    fig = figures.loss_curves("digits", df, collection, colours)
    key = [t.get_text() for t in fig.legends[0].get_texts()]
    assert key == ["train loss (noisy labels)", "validation loss"]

    rng = np.random.default_rng(0)
    fig = figures.position_panels(rng.normal(size=(16, 1, 23, 23)), "lc",
                                  "digits: lr18_l3_lc, noise: clean, seed 0", (4, 4),
                                  "layer3.0.conv2")
    title = fig.get_suptitle().splitlines()
    assert len(title) == 2 and "seed 0" in title[0] and "layer3.0.conv2" in title[0]
    assert "centre 7x7 of 23x23" in title[1]
    assert "column offset" in fig.get_supxlabel() and "row offset" in fig.get_supylabel()
    panel = next(ax for ax in fig.axes if ax.get_images())
    assert list(panel.get_xticks()) == [-3, 0, 3]

    arrays = {"indices": np.arange(2), "labels": np.arange(2), "predicted": np.arange(2),
              "images": rng.integers(0, 255, (2, 16, 16, 3), dtype=np.uint8),
              "fullgrad": rng.random((2, 16, 16)), "gradcam": rng.random((2, 16, 16))}
    fig = figures.attention_grid([("resnet20x1, noise: clean", arrays),
                                  ("resnet20x1, noise: symmetric-0.25", arrays)], list("01"),
                                 "t")
    heads = [ax.title for ax in fig.axes[1:5]]
    assert ["noise: clean" in h.get_text() for h in heads] == [True, True, False, False]
    assert all(h.get_fontsize() >= 10 for h in heads)


def test_acc_vs_params_draws_only_like_published_points_as_like(tmp_path):
    """The tables' like-for-like rule holds in the figure too: a published ResNet trained like
    one of our runs (resnet20x1, fp32, sgdm, 32 px CIFAR-10) is drawn dark; the others (our
    resnet56x1 ran bf16; the rest have no run of ours) faint and dotted, the legend says so."""
    from matplotlib.colors import to_rgba

    from lambdapipe.report import figures, tables
    from lambdapipe.report.load import collect_runs, read_published

    write_run(tmp_path, "cifar10", "clean", "resnet20x1", 0, params=272_474, tst_acc=0.92)
    write_run(tmp_path, "cifar10", "clean", "resnet56x1", 0, params=855_770, tst_acc=0.93,
              precision="bf16")
    df = tables.runs_frame(collect_runs(tmp_path), None)
    pub = read_published(None)["resnet"]
    pub = pub[(pub["dataset"] == "CIFAR10_x32") & pub["test_acc"].notna()]
    fig = figures.acc_vs_params("cifar10", df, figures.palette(list(df["series"])), pub,
                                "cifar10")
    ax = fig.axes[0]
    dark, faint = (to_rgba(c) for c in ("dimgrey", "silver"))
    drawn = {}
    for coll in ax.collections:
        edge = tuple(coll.get_edgecolor()[0]) if len(coll.get_edgecolor()) else None
        if edge in (dark, faint):
            drawn[edge] = drawn.get(edge, 0) + len(coll.get_offsets())
    assert drawn == {dark: 1, faint: len(pub) - 1}, drawn
    labels = {t.get_text(): to_rgba(t.get_color()) for t in ax.texts}
    assert labels.pop("R20x1 fp32") == dark
    assert labels.pop("R56x1 fp32") == faint and set(labels.values()) == {faint}
    legend = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert "published ResNet, trained like ours" in legend
    assert "published ResNet, not like ours (tables say why)" in legend
    fig.savefig(tmp_path / "acc_vs_params.png")
