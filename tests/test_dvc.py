"""DVC over the Snakemake targets, for real in a temp git repo made of this checkout's files:
repro with the config as a DVC parameter (no `dvc init`: the project files are committed),
no-op repro, a config change re-running only what depends on it, `dvc metrics show` and
`dvc plots show`, push to a local remote and pull into a fresh clone, where Snakemake then
has nothing to rerun."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from forkserver import ForkServer

ROOT = Path(__file__).resolve().parents[1]
# The project as a clone has it (tests and docs aside): committed plus new, unignored files.
SKIP = ("tests/", "docs/")



def sh(*cmd, cwd, check=True, env=None):
    env = {**(env or os.environ), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1"}
    res = subprocess.run(cmd, cwd=cwd, env=env, text=True, capture_output=True, timeout=900)
    if check:
        assert res.returncode == 0, f"{cmd}: {res.stdout[-2000:]}{res.stderr[-3000:]}"
    return res


def digests(root: Path, sub: str) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((root / sub).rglob("*"))
            if p.is_file() and p.name != ".snakemake_timestamp"}  # .dvcignore'd: not data


def project_files() -> list[str]:
    out = sh("git", "ls-files", "-co", "--exclude-standard", cwd=ROOT).stdout.splitlines()
    return [f for f in out if not f.startswith(SKIP) and (ROOT / f).is_file()]


def test_plots_titled_one_format_each_and_offline(tmp_path):
    """`dvc plots show` with the project's dvc.yaml and .dvc/ on hand-written report files:
    a curve plot has a title and axis labels (not its file path), each figure appears once
    (PNG; the SVG copies live elsewhere), and the HTML page loads nothing from the network."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp"))
    shutil.copy2(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy2(ROOT / ".dvcignore", repo / ".dvcignore")
    (repo / "params.yaml").write_text("configfile: config/demo.yaml\n")
    sh("git", "init", "-q", cwd=repo)
    results = repo / "results"
    for metric in ("train_loss", "val_loss", "train_acc", "val_acc"):
        (results / "curves" / metric).mkdir(parents=True)
        (results / "curves" / metric / "digits.tsv").write_text(
            f"run\tstep\t{metric}\ndigits/clean/resnet18/0\t10\t0.5\n"
            "digits/clean/resnet18/0\t20\t0.6\n")
    for sub, suffix in (("figures", "png"), ("figures-svg", "svg")):
        (results / sub).mkdir()
        (results / sub / f"loss_digits.{suffix}").write_bytes(
            (ROOT / "docs" / "demo_acc_vs_noise.png").read_bytes() if suffix == "png"
            else b'<svg xmlns="http://www.w3.org/2000/svg"/>')
    plots = json.loads(sh("dvc", "plots", "show", "--json", cwd=repo).stdout)
    assert not plots.get("errors"), plots.get("errors")
    assert [k for k in plots["data"] if k.startswith("results/figures")] == [
        "results/figures/loss_digits.png"]
    spec = plots["data"]["results/curves/val_acc/digits.tsv"][0]["content"]
    assert spec["title"] == "Validation accuracy, one line per run"
    assert spec["encoding"]["x"]["title"] == "iteration (optimizer steps)"
    assert spec["encoding"]["y"]["title"] == "accuracy (fraction)"
    sh("dvc", "plots", "show", "-o", "page", cwd=repo)
    html = (repo / "page" / "index.html").read_text()
    assert "vegaEmbed" in html and "function" in html  # the libraries, inlined
    assert "<script src=" not in html and "cdn.jsdelivr" not in html


@pytest.mark.slow
@pytest.mark.cost(220)
def test_dvc_repro_push_pull(tmp_path, request):
    repo = tmp_path / "repo"
    for name in project_files():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, repo / name)
    assert (repo / ".dvc" / "config").is_file()  # committed: no `dvc init` in a clone
    # The stages' `python -m lambdapipe` (the rules run this copy's package) are children of
    # a fork server that imported this copy's package (tests/forkserver.py); DVC, Snakemake
    # and the rules are the real ones.
    server = ForkServer(env={**os.environ, "PYTHONPATH": str(repo)}, cwd=repo)
    request.addfinalizer(server.close)
    forked = server.env()
    # One small grid: 1 model, clean labels, 1 seed; few steps (what DVC versions is the
    # same for 20 as for 400). Its own file, named by the `configfile` DVC parameter (what
    # `dvc exp run -S configfile=...` sets).
    cfg = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    grid = cfg["datasets"]["digits"]["grids"][0]
    grid.update(models=[grid["models"][0]], seeds=[0], set={"iterations": 20, "eval_every": 10})
    grid["noise"] = [{"kind": "symmetric", "rates": [0]}]
    cfg["train"]["device"] = "cpu"
    small = repo / "config" / "small.yaml"
    small.write_text(yaml.safe_dump(cfg, sort_keys=False))
    (repo / "params.yaml").write_text("configfile: config/small.yaml\n")
    sh("git", "init", "-q", cwd=repo)
    remote = tmp_path / "remote"
    sh("dvc", "remote", "add", "-d", "local", str(remote), cwd=repo)

    sh("dvc", "repro", cwd=repo, env=forked)
    first = digests(repo, "results/runs")
    assert any(k.endswith("summary.json") for k in first)
    # Each run's DVCLive-format curves come along with it.
    assert any(k.endswith("dvclive/plots/metrics/val/acc.tsv") for k in first)

    again = sh("dvc", "repro", cwd=repo, env=forked).stdout
    assert again.count("didn't change, skipping") == 3, again
    # Package code is not a train dep: a change retrains nothing, so the stage must not run
    # and dvc.lock must not call the results current for code they were not computed with.
    lock = (repo / "dvc.lock").read_text()
    with open(repo / "lambdapipe" / "train.py", "a") as f:
        f.write("\n# an edit\n")
    code = sh("dvc", "repro", cwd=repo, env=forked).stdout
    assert "Stage 'train' didn't change, skipping" in code, code
    assert (repo / "dvc.lock").read_text() == lock

    # A new noise rate: data makes one variant, train only the new run, report redone.
    grid["noise"] = [{"kind": "symmetric", "rates": [0, 0.25]}]
    small.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = sh("dvc", "repro", cwd=repo, env=forked).stdout
    second = digests(repo, "results/runs")
    assert {k: second[k] for k in first} == first  # the finished run is untouched
    new = {k for k in second if k not in first}
    assert any("symmetric-0.25" in k and k.endswith("summary.json") for k in new)
    assert "Running stage 'train'" in out and "Running stage 'report'" in out

    # `dvc metrics show`: one compact row per dataset and model, a column per noise rate.
    metrics = json.loads(sh("dvc", "metrics", "show", "--json", cwd=repo).stdout)
    (workspace,) = metrics.values()
    rows = workspace["data"]
    model = grid["models"][0]
    assert len(rows) == 1 and next(iter(rows)).startswith(f"results/metrics/digits/{model}")
    row = next(iter(rows.values()))["data"]
    assert set(row) == {"test_acc_pct", "runs", "diverged", "non_finite"} and row["runs"] == 2
    assert set(row["test_acc_pct"]) == {"clean", "symmetric-0.25"}
    assert all(1 < v <= 100 for v in row["test_acc_pct"].values())  # percent, as the tables
    # `dvc plots show`: curves per run from results/curves, the figures, and no error
    # (Snakemake's .snakemake_timestamp in directory outputs is .dvcignore'd).
    plots = json.loads(sh("dvc", "plots", "show", "--json", cwd=repo).stdout)
    assert not plots.get("errors"), plots.get("errors")
    assert "results/curves/val_acc/digits.tsv" in plots["data"]
    spec = json.dumps(plots["data"]["results/curves/val_acc/digits.tsv"])
    from lambdapipe.config import check_config, expand_runs

    model_dir = expand_runs(check_config(cfg))[0].model_dir  # <model>-<fingerprint>
    assert f'"run": "digits/symmetric-0.25/{model_dir}/0"' in spec
    assert f'"run": "digits/clean/{model_dir}/0"' in spec
    assert any(k.startswith("results/figures/") for k in plots["data"])
    shutil.rmtree(repo / "dvc_plots", ignore_errors=True)  # written by show without --json
    assert "dvc_plots" in (repo / ".gitignore").read_text()

    # A model argument changed: a new run directory for each run, trained; the old untouched.
    grid["model_args"] = {"base_width": 4}
    small.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = sh("dvc", "repro", cwd=repo, env=forked).stdout
    third = digests(repo, "results/runs")
    assert {k: third[k] for k in second} == second
    assert len([k for k in third if k.endswith("summary.json")]) == 4
    assert "Running stage 'train'" in out

    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-q", "-m", "results", cwd=repo)
    sh("dvc", "push", cwd=repo)
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(repo), str(clone), cwd=tmp_path)
    sh("dvc", "pull", cwd=clone)
    for sub in ("results/runs", "results/tables", "results/figures", "data/prepared"):
        assert digests(clone, sub) == digests(repo, sub), sub
    # After a pull nothing reruns, whatever order the files arrived in: timestamps are
    # ignored (workflow/rules/common.smk), so no run, evaluation or report is rewritten.
    dry = [sys.executable, "-m", "snakemake", "-n", "--configfile", "config/small.yaml"]
    for newer in (None, "data/prepared", "results/runs"):
        if newer:
            for path in (clone / newer).rglob("*"):
                os.utime(path)
        res = sh(*dry, cwd=clone)
        assert "Nothing to be done" in res.stdout + res.stderr, (newer, res.stdout[-3000:])
    assert "up to date" in sh("dvc", "status", cwd=clone).stdout
    # Snakemake's provenance (.snakemake/metadata) does not travel with DVC: one --touch
    # records it for the pulled files (README), and the "missing provenance" note is gone.
    assert "missing provenance" in res.stdout + res.stderr
    sh(sys.executable, "-m", "snakemake", "--touch", "--forceall", "--cores", "1",
       "--configfile", "config/small.yaml", cwd=clone)
    res = sh(*dry, cwd=clone)
    assert "Nothing to be done" in res.stdout + res.stderr
    assert "provenance" not in res.stdout + res.stderr, res.stdout[-3000:]
    assert "up to date" in sh("dvc", "status", cwd=clone).stdout
    assert digests(clone, "results/runs") == digests(repo, "results/runs")
