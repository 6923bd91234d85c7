"""DVC over the Snakemake targets, for real in a temp git repo: repro, no-op repro, a config
change re-running only what depends on it, push to a local remote and pull into a clone."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COPY = ["Snakefile", "workflow", "config", "profiles", "lambdapipe", "dvc.yaml", ".dvcignore",
        "environment.yml",
        ".gitignore", "pyproject.toml"]

pytestmark = pytest.mark.slow


def sh(*cmd, cwd, check=True):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1"}
    res = subprocess.run(cmd, cwd=cwd, env=env, text=True, capture_output=True, timeout=900)
    if check:
        assert res.returncode == 0, f"{cmd}: {res.stdout[-2000:]}{res.stderr[-3000:]}"
    return res


def digests(root: Path, sub: str) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((root / sub).rglob("*")) if p.is_file()}


def test_dvc_repro_push_pull(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, repo / name)
    # One small grid: 1 model, clean labels, 1 seed; few steps.
    cfg = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    grid = cfg["datasets"]["digits"]["grids"][0]
    grid.update(models=[grid["models"][0]], seeds=[0], set={"iterations": 60, "eval_every": 30})
    grid["noise"] = [{"kind": "symmetric", "rates": [0]}]
    cfg["train"]["device"] = "cpu"
    (repo / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    sh("git", "init", "-q", cwd=repo)
    sh("dvc", "init", "-q", cwd=repo)
    remote = tmp_path / "remote"
    sh("dvc", "remote", "add", "-d", "local", str(remote), cwd=repo)

    sh("dvc", "repro", cwd=repo)
    first = digests(repo, "results/runs")
    assert any(k.endswith("summary.json") for k in first)
    assert (repo / "results" / "metrics.json").is_file()
    assert "metrics.json" in sh("dvc", "metrics", "show", cwd=repo).stdout

    again = sh("dvc", "repro", cwd=repo).stdout
    assert again.count("didn't change, skipping") == 3, again

    # A new noise rate: data makes one variant, train only the new run, report redone.
    grid["noise"] = [{"kind": "symmetric", "rates": [0, 0.25]}]
    (repo / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = sh("dvc", "repro", cwd=repo).stdout
    second = digests(repo, "results/runs")
    assert {k: second[k] for k in first} == first  # the finished run is untouched
    new = {k for k in second if k not in first}
    assert any("symmetric-0.25" in k and k.endswith("summary.json") for k in new)
    assert "Running stage 'train'" in out and "Running stage 'report'" in out

    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-q", "-m", "results", cwd=repo)
    sh("dvc", "push", cwd=repo)
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(repo), str(clone), cwd=tmp_path)
    sh("dvc", "pull", cwd=clone)
    for sub in ("results/runs", "results/tables", "results/figures", "data/prepared"):
        assert digests(clone, sub) == digests(repo, sub), sub
    assert "didn't change" in sh("dvc", "status", cwd=clone).stdout or \
        "up to date" in sh("dvc", "status", cwd=clone).stdout
