"""Tables a researcher reads at a glance: no empty columns, one unit per quantity, plain
names, parameter counts that tell models apart, and speed apart from the results."""

from __future__ import annotations

import json

import pytest
from test_report import csv_rows, md_rows, pick, write_run

from lambdapipe.report import build_report
from lambdapipe.report.tables import MISSING, Table, hms, params_digits


def test_markdown_drops_columns_empty_in_every_row_and_escapes_pipes():
    table = Table("t", "T", [{"model": "a|b", "empty": MISSING, "blank": "", "acc": "0.70"},
                             {"model": "c", "empty": MISSING, "blank": "", "acc": "—"}],
                  [{"model": "a|b", "empty": None, "blank": "", "acc": 0.7}])
    text = table.markdown()
    assert "empty" not in text and "blank" not in text
    rows = [ln for ln in text.splitlines() if ln.startswith("|")]
    assert len(rows) == 4 and rows[1].startswith("|:")  # header, rule, two rows
    assert "a\\|b" in rows[2]
    assert "| 0.70 " in rows[2]  # tabulate left the formatted number as it was (not 0.7)
    assert "empty" in table.csv().splitlines()[0]  # the CSV keeps every column


@pytest.mark.parametrize("seconds, text", [(0, "0:00:00"), (59.6, "0:01:00"),
                                           (2520, "0:42:00"), (17792, "4:56:32"),
                                           (90061, "25:01:01")])
def test_one_form_for_every_duration(seconds, text):
    assert hms(seconds) == text


@pytest.mark.parametrize("millions, digits", [
    ([11.17, 0.27], 2),                   # the published precision suffices
    ([0.176522, 0.178102], 3),            # both 0.18 at two decimals
    ([0.176522, 0.176912], 4),
    ([0.272474, 0.017534], 3),            # 0.02 would be one significant digit
    ([0.5, 0.5, float("nan")], 2),
])
def test_params_digits_tell_every_model_apart(millions, digits):
    assert params_digits(millions) == digits


def test_demo_size_models_and_units_in_the_report(tmp_path):
    """Two demo-size models whose counts both round to 0.18 M, a noisy rate, a width set by
    the model args: what the tables show of them."""
    runs = tmp_path / "runs"
    for model, params in (("resnet18", 176_522), ("lr18_l3_lc", 178_102)):
        for seed in (0, 1):
            write_run(runs, "digits", "clean", model, seed, params=params,
                      tst_acc=0.9 + seed / 100, model_args={"base_width": 8},
                      wall_time_s=125.0 + seed, iter_per_min=900.0 + 10 * seed)
    out = tmp_path / "out"
    build_report(runs, out)
    base = md_rows(out / "tables" / "baselines_digits.md")
    assert {r["params (M)"] for r in base} == {"0.177", "0.178"}
    r18 = pick(base, model="resnet18 (base_width=8)")
    assert r18["test acc (%)"] == "90.50 ± 0.71" and r18["val acc (%)"] == "90.00 ± 0.00"
    # No column of '—' in every row (published values, width beside base_width=8, ...).
    assert all(any(r[c] != "—" for r in base) for c in base[0]), base[0].keys()
    assert "width" not in base[0] and "depth" in base[0]
    assert not any(name in "".join(base[0]) for name in ("tst", "iter/min", "time"))
    speed = pick(md_rows(out / "tables" / "speed_digits.md"), model="resnet18 (base_width=8)")
    assert speed["iter/min"] == "905 ± 7"
    assert speed["training time (h:mm:ss)"] == "0:02:06 ± 0:00:01"
    assert float(pick(csv_rows(out / "tables" / "speed_digits.csv"),
                      model="resnet18")["training_time_s_mean"]) == pytest.approx(125.5)
    # The machine-readable files in the same unit, named so.
    csv_row = pick(csv_rows(out / "tables" / "baselines_digits.csv"), model="resnet18")
    assert float(csv_row["test_acc_pct_mean"]) == pytest.approx(90.5)
    assert not [c for c in csv_row if "acc" in c and "pct" not in c]
    per_model = json.loads((out / "metrics" / "digits" / "resnet18_base_width=8.json")
                           .read_text())
    assert per_model["test_acc_pct"] == {"clean": 90.5}
    for path in (out / "tables").glob("*.md"):  # no table shows a column of nothing
        if "(none)" in path.read_text():
            continue
        rows = md_rows(path)
        assert all(any(r[c] not in ("—", "") for r in rows) for c in rows[0]), path
    page = (out / "report.md").read_text()
    assert "tst/" not in page and "val/" not in page and "fraction" not in page
    assert "## digits: training speed" in page


def test_fp16_runs_show_their_skipped_steps_beside_the_published_nan_grads_mark(tmp_path):
    """The ImageNet 32 px rows were trained in fp16 with the source's `nan-grads` mark; our
    fp16 runs count the steps the loss scaler skipped (summary.json skipped_steps). Both
    stand in the baseline table for fp16 groups only (fp32 trains without a scaler)."""
    runs = tmp_path / "runs"
    for seed, skipped in ((0, 3), (1, 5)):
        write_run(runs, "imagenet32", "clean", "resnet18", seed, config_size=32,
                  params=11_681_832, precision="fp16", recipe="sgdm-imagenet32",
                  skipped_steps=skipped, val_acc=..., tst_acc=0.55)
        write_run(runs, "cifar10", "clean", "resnet18", seed, precision="fp16",
                  recipe="sgdm", skipped_steps=2 * seed, params=11_173_962)
        write_run(runs, "cifar10", "clean", "resnet20x1", seed)
    out = tmp_path / "out"
    build_report(runs, out)
    row = pick(md_rows(out / "tables" / "baselines_imagenet32.md"), model="resnet18")
    assert row["published test acc (%)"] == "54.60"  # the ImageNet1k_x32 ResNet-18 row
    assert (row["skipped steps"], row["published nan-grads"]) == ("4 ± 1", "yes")
    assert "'skipped steps' counts the steps the loss scaler skipped" in (
        out / "tables" / "baselines_imagenet32.md").read_text()
    cell = pick(csv_rows(out / "tables" / "baselines_imagenet32.csv"), model="resnet18")
    assert float(cell["skipped_steps_mean"]) == 4.0 and cell["nan_grads_published"] == "True"
    cifar = md_rows(out / "tables" / "baselines_cifar10.md")
    r18 = pick(cifar, model="resnet18")  # the source's fp16 ResNet-18 had no inf/nan grads
    assert (r18["skipped steps"], r18["published nan-grads"]) == ("1 ± 1", "no")
    r20 = pick(cifar, model="resnet20x1")  # fp32: no scaler, nothing to count
    assert (r20["skipped steps"], r20["published nan-grads"]) == ("—", "—")
    fp32_only = tmp_path / "fp32"
    write_run(fp32_only, "cifar10", "clean", "resnet20x1", 0)
    build_report(fp32_only, tmp_path / "out32")
    assert "skipped steps" not in md_rows(tmp_path / "out32" / "tables"
                                          / "baselines_cifar10.md")[0]
