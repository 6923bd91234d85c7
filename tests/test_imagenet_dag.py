"""The imagenet2012 table's DAG end to end on the CPU: config/imagenet2012.yaml with a
demo-size `shrink:` of itself (ResNet-18 of the b2048-64k grid and ResNet-152 of the
b1024-128k grid at width 4, 4 steps of 2 images, seed 0) over tiny ILSVRC2012 archives in the
official layout (train tar of per-class tars, 9 images; flat val tar, 8; devkit; ImageNet-V2
matched-frequency, 8) served from a mirror directory: prepare -> train -> evaluate -> explain ->
report, through Snakemake's local executor.

The generated archives have 9 training images and no published md5, so every Python process
of the workflow (Snakemake's own, each job's) loads a test-only sitecustomize that swaps
ImageNet-2012's registry entry and archive md5s for theirs, explicitly (as
tests/test_imagenet_data.py does in-process); nothing in the product skips a check.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from test_imagenet_data import make_ilsvrc
from test_workflow import ROOT, SNAKEFILE, job_counts

SITE = '''"""Test-only (tests/test_imagenet_dag.py): ImageNet-2012 as the tiny archives."""
import dataclasses

from lambdapipe.data import imagenet, registry

registry.DATASETS["imagenet2012"] = dataclasses.replace(
    registry.DATASETS["imagenet2012"], num_train=9)
imagenet.ARCHIVES["imagenet2012"] = tuple(
    dataclasses.replace(a, md5=None) for a in imagenet.ARCHIVES["imagenet2012"])
'''
SHRINK = {"datasets": {"imagenet2012": "imagenet2012"}, "models": ["resnet18", "resnet152"],
          "model_args": {"base_width": 4}, "seeds": [0],
          "set": {"iterations": 4, "eval_every": 2, "batch_size": 2, "loader_workers": 0},
          "prepare": {"val_size": 3, "split_seed": 0}}


@pytest.mark.slow  # Snakemake and 7 jobs, each a fresh interpreter
@pytest.mark.cost(150)
def test_imagenet2012_table_end_to_end_from_a_mirror(tmp_path):
    mirror, work, site = tmp_path / "mirror", tmp_path / "work", tmp_path / "site"
    for d in (mirror, work, site):
        d.mkdir()
    make_ilsvrc(mirror, val_classes=(999, 0, 5, 5, 0, 999, 5, 0))  # explain takes 8
    (site / "sitecustomize.py").write_text(SITE)
    cfg = yaml.safe_load((ROOT / "config" / "imagenet2012.yaml").read_text())
    cfg.update(mirror=str(mirror), shrink=SHRINK)
    cfg["train"].update(threads=1, mem_mb=2000, runtime=30, device="cpu")
    (tmp_path / "table.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{site}", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d",
                           str(work), "--configfile", str(tmp_path / "table.yaml"),
                           "--cores", "2"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert job_counts(proc.stdout + proc.stderr) == {
        "prepare": 1, "train": 2, "evaluate": 2, "explain": 2, "report": 1, "all": 1,
        "total": 9}  # no download job: users bring the archives

    manifest = json.loads((work / "data" / "prepared" / "imagenet2012" / "manifest.json")
                          .read_text())
    assert manifest["splits"] == {"train": 6, "val": 3, "test": 8, "test_v2": 8}
    summaries = {p.parent.parent.name.split("-")[0]: json.loads(p.read_text())
                 for p in (work / "results" / "runs").rglob("summary.json")}
    assert sorted(summaries) == ["resnet152", "resnet18"]
    for model, s in summaries.items():
        assert s["status"] == "ok" and s["iterations"] == 4 and s["image_size"] == 224, model
        for key in ("val_acc", "tst_acc", "test_v2_acc"):  # ImageNet-V2: the extra test set
            assert 0.0 <= s[key] <= 1.0, (model, key)
        run = next((work / "results" / "runs").rglob(f"{model}-*/0"))
        evaluated = json.loads((run / "eval_test.json").read_text())
        assert evaluated["n"] == 8 and evaluated["accuracy"] == s["tst_acc"]
        assert (run / "explain_test.json").exists()
    assert {s["recipe"] for s in summaries.values()} == {"sgdm-imagenet2012",
                                                       "sgdm-imagenet2012-b1024"}
    # the report's table of the ImageNet-2012 rows: the published val acc (the official
    # validation set, our test split) beside each stand-in run, matched on model and recipe
    tables = work / "results" / "tables"
    table = pd.read_csv(tables / "baselines_imagenet2012.csv").set_index("model")
    assert table.loc["resnet18", "test_acc_pct_published"] == pytest.approx(70.2)
    assert table.loc["resnet152", "test_acc_pct_published"] == pytest.approx(79.2)
    for model, s in summaries.items():
        assert table.loc[model, "test_acc_pct_mean"] == pytest.approx(100 * s["tst_acc"])
        assert table.loc[model, "test_v2_acc_pct_mean"] == pytest.approx(100 * s["test_v2_acc"])
        assert table.loc[model, "image_size"] == 224 and table.loc[model, "precision"] == "fp16"
    note = (tables / "baselines_imagenet2012.md").read_text()
    assert re.search(r"\| ImageNet-V2 acc \(%\) +\|", note.splitlines()[2]), note
    assert "demo-size stand-in for imagenet2012" in note
