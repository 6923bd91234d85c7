"""Every status a run can end in, written by the real training code (`lambdapipe train`,
its summary writer), is read by `lambdapipe report` and by the workflow's report rule:
shown, named, left out of every mean, never a reason to stop the report."""

from __future__ import annotations

import csv
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from lambdapipe import data, evaluate, status
from lambdapipe.cli import main
from lambdapipe.config import check_config, expand_runs, run_args

ROOT = Path(__file__).resolve().parents[1]
STEPS = {"iterations": 8, "eval_every": 4}
GRID = {"models": ["resnet20x1"], "model_args": {"base_width": 4},
        "noise": [{"kind": "symmetric", "rates": [0]}], "recipe": "demo", "set": STEPS}
CONFIG = {"train": {"device": "cpu", "threads": 1},
          "datasets": {"digits": {"grids": [
              {"name": "plain", **GRID, "seeds": [0, 1]},
              # lr 1e8 without warm-up: the training loss is non-finite within a few steps.
              {"name": "hot", **GRID, "seeds": [0],
               "variants": {"hot": {"set": {"lr": 1.0e8, "warmup": 0}}}}]}}}
# How each status is brought about; a status added to lambdapipe.status without a way here
# fails test_every_status_is_exercised.
# Keyed by (variant, seed); run directories are wherever the workflow puts them (RUNS).
BY_RUN = {("", 0): status.OK,
          ("", 1): status.NON_FINITE,  # the test pass on best.ckpt gives a NaN loss
          ("hot", 0): status.DIVERGED}
RUNS = {r.path: r for r in expand_runs(check_config(CONFIG))}
EXPECTED = {path: BY_RUN[(r.variant, r.seed)] for path, r in RUNS.items()}

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def test_every_status_is_exercised():
    assert sorted(EXPECTED.values()) == sorted(status.STATUSES)


@pytest.fixture(scope="module")
def work(tmp_path_factory, one_thread) -> Path:
    """A workflow directory whose runs were trained by `lambdapipe train`, one per status."""
    work = tmp_path_factory.mktemp("statuses")
    (work / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    assert len(RUNS) == len(BY_RUN)
    data.prepare("digits", work / "data")
    real_scores = evaluate.checkpoint_scores

    def nan_test(*args):  # the final test pass overflows: status non-finite
        return {split: {**result, "nll": math.nan, "ece": math.nan}
                for split, result in real_scores(*args).items()}

    for path, run in RUNS.items():
        args = run_args(run)
        argv = ["train", "--model", args["model"], *shlex.split(args["model_args"]),
                "--dataset", run.dataset, "--data-dir", str(work / "data"), "--noise", "0",
                "--seed", str(run.seed), "--recipe", args["recipe"], *shlex.split(args["set"]),
                "--device", "cpu", "--no-progress", "--out", str(work / "results/runs" / path)]
        with pytest.MonkeyPatch.context() as mp:
            if EXPECTED[path] == status.NON_FINITE:
                mp.setattr(evaluate, "checkpoint_scores", nan_test)
            result = CliRunner().invoke(main, argv)
        assert result.exit_code == 0, result.output
        # The workflow's report rule also waits for evaluate and explain: their files exist.
        for name in ("eval_test.json", "explain_test.json"):
            (work / "results/runs" / path / name).write_text("{}")
    return work


def summaries(work: Path) -> dict[str, str]:
    return {path: json.loads((work / "results/runs" / path / "summary.json").read_text())
            ["status"] for path in EXPECTED}


def table(path: Path) -> list[dict[str, str]]:
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")), strict=True))
            for ln in lines[2:]]


def check_report(out: Path) -> None:
    """Each status named, the failed ones listed, only the ok run in the mean."""
    failed = {r["run"]: r["status"] for r in table(out / "tables" / "incomplete.md")}
    assert set(failed) == {p for p, s in EXPECTED.items() if s != status.OK}
    for path, wanted in EXPECTED.items():
        if wanted != status.OK:
            assert failed[path].partition("@")[0] == wanted, failed
    assert all(s != status.DIVERGED or failed[p].startswith("diverged@")
               for p, s in EXPECTED.items())
    rows = {r["model"]: r for r in table(out / "tables" / "noise_digits.md")}
    assert rows["resnet20x1 (base_width=4)"]["status"] == "1 ok, 1 non-finite"
    assert rows["resnet20x1 (base_width=4)"]["seeds"] == "1"
    assert rows["resnet20x1@hot (base_width=4)"]["status"].startswith("diverged@")
    with (out / "tables" / "noise_digits.csv").open() as fh:
        counts = {r["variant"]: (r["seeds"], r["diverged"], r["non_finite"])
                  for r in csv.DictReader(fh)}
    assert counts == {"": ("1", "0", "1"), "hot": ("0", "1", "0")}
    page = (out / "report.md").read_text()
    assert "3 finished runs (1 ok, 1 diverged, 1 non-finite)" in page
    metrics = json.loads((out / "metrics.json").read_text())
    assert {k: v["status"] for k, v in metrics.items()} == EXPECTED


@pytest.mark.cost(4)  # the module's runs, trained by `work`
def test_the_real_summary_writer_ends_in_each_status(work):
    assert summaries(work) == EXPECTED


def test_cli_report_shows_and_names_every_status(work, tmp_path):
    result = CliRunner().invoke(main, ["report", "--runs", str(work / "results/runs"),
                                       "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    check_report(tmp_path)


@pytest.mark.cost(5)  # a Snakemake process
def test_the_workflow_report_rule_reports_every_status(work):
    """The report rule alone (its inputs exist; no other rule may run)."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "workflow" / "Snakefile"),
           "-d", str(work), "--cores", "1", "--configfile", str(work / "config.yaml"),
           "--allowed-rules", "report", "--", "results/report.md"]
    res = subprocess.run(cmd, cwd=work, text=True, capture_output=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    check_report(work / "results")
