"""A run's identity (issue 22, point 2): every setting that changes a result is in the run's
directory, train records the settings, code and GPU it ran with, and check-config and report
name run directories that disagree with the config."""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from lambdapipe import config as cfgmod
from lambdapipe import data, provenance
from lambdapipe.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())


def paths(cfg: dict) -> dict[str, str]:
    """run key (as the config names it) -> run directory."""
    return {r.key: r.path for r in cfgmod.expand_runs(cfgmod.check_config(cfg))}


def edited(edit) -> dict:
    cfg = copy.deepcopy(DEMO)
    edit(cfg["datasets"]["digits"]["grids"][0], cfg["datasets"]["digits"])
    return cfg


def test_unchanged_config_names_the_same_run_directories():
    first, again = paths(DEMO), paths(copy.deepcopy(DEMO))
    assert first == again and len(first) == 8
    assert all(re.fullmatch(r"digits/(clean|symmetric-0\.25)/(resnet18|lr18_l3_lc)-[0-9a-f]{8}"
                            r"/[01]", p) for p in first.values())


@pytest.mark.parametrize("edit, changed", [
    (lambda g, d: g.update(model_args={"base_width": 4}), 8),  # the measurement
    (lambda g, d: g.update(set={"lr": 0.01}), 8),
    (lambda g, d: g.update(set={"iterations": 100}), 8),
    (lambda g, d: d.update(prepare={"split_seed": 1}), 8),
    (lambda g, d: d.update(prepare={"split_seed": 0, "val_size": 200}), 8),
    (lambda g, d: g.update(set={"compile": False, "channels_last": False, "tf32": False}), 0),
    (lambda g, d: d.update(prepare={"split_seed": 0, "image_size": 16}), 0),  # the default
], ids=["base_width", "lr", "iterations", "split_seed", "val_size", "speed-only",
        "default-spelled-out"])
def test_a_changed_setting_is_a_new_directory_for_exactly_its_runs(edit, changed):
    before, after = paths(DEMO), paths(edited(edit))
    assert before.keys() == after.keys()
    moved = [k for k in before if before[k] != after[k]]
    assert len(moved) == changed
    for k in moved:  # dataset, noise and seed stay; the model directory's fingerprint moves
        assert before[k].split("/")[::3] == after[k].split("/")[::3]


def test_a_setting_of_one_grid_moves_only_that_grids_runs():
    cfg = copy.deepcopy(DEMO)
    grid = cfg["datasets"]["digits"]["grids"][0]
    grid["models"] = ["resnet18"]
    cfg["datasets"]["digits"]["grids"].append({**copy.deepcopy(grid), "name": "lam",
                                               "models": ["lr18_l3_lc"]})
    before = paths(cfg)
    cfg["datasets"]["digits"]["grids"][1]["model_args"] = {"base_width": 4}
    after = paths(cfg)
    moved = sorted(k for k in before if before[k] != after[k])
    assert len(moved) == 4 and all("/lr18_l3_lc/" in k for k in moved)


def test_model_directory_grammar_round_trips():
    settings = {"model": "resnet18", "model_args": {}, "recipe": {}, "data": None}
    fp = provenance.fingerprint(settings)
    assert provenance.split_model_dir(provenance.model_dir("resnet18", "", settings)) == (
        "resnet18", "", fp)
    assert provenance.split_model_dir(provenance.model_dir("resnet18", "lr-0.001", settings)) \
        == ("resnet18", "lr-0.001", fp)
    assert provenance.split_model_dir("resnet18@fp16") == ("resnet18", "fp16", None)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    data.prepare("digits", root, progress=False)
    return root


def _train_as_the_workflow_does(run: cfgmod.Run, data_dir: Path, out: Path, env: dict):
    """`lambdapipe train` with the rule's options (config.run_args), in-process."""
    args = cfgmod.run_args(run)
    cmd = (f"train --model {args['model']} {args['model_args']} --dataset {run.dataset} "
           f"--data-dir {data_dir} --noise 0 --seed {run.seed} --out {out} "
           f"--recipe {args['recipe']} {args['set']} --device auto --no-progress")
    res = CliRunner().invoke(main, shlex.split(cmd), env=env)
    assert res.exit_code == 0, res.output


def test_train_records_the_identity_code_and_gpu_the_config_names(data_dir, tmp_path):
    cfg = copy.deepcopy(DEMO)
    grid = cfg["datasets"]["digits"]["grids"][0]
    grid.update(models=["resnet20x1"], seeds=[0], model_args={"base_width": 4},
                noise=[{"kind": "symmetric", "rates": [0]}],
                set={"iterations": 8, "eval_every": 8, "grad_clip": None, "lr": 0.01})
    (run,) = cfgmod.expand_runs(cfgmod.check_config(cfg))
    out = tmp_path / "runs" / run.path
    # Two fake GPUs, GPU 0 taken by hand: the run holds GPU 1 and records it.
    locks = tmp_path / "locks"
    locks.mkdir()
    import fcntl

    with open(locks / "gpu0.slot0.lock", "w") as busy:
        fcntl.flock(busy, fcntl.LOCK_EX)
        _train_as_the_workflow_does(run, data_dir, out, env={
            "LAMBDAPIPE_FAKE_GPUS": "2", "LAMBDAPIPE_GPU_LOCK_DIR": str(locks),
            "CUDA_VISIBLE_DEVICES": None, "SLURM_JOB_ID": None})
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["identity"]["settings"] == run.run_settings
    assert recorded["identity"]["settings"]["data"] == {"image_size": 16, "split_seed": 0,
                                                        "val_count": 144}
    assert out.parent.name == f"resnet20x1-{recorded['identity']['fingerprint']}"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    if head.returncode == 0 and provenance.code_version()["commit"] is not None:
        assert recorded["code"]["commit"] == head.stdout.strip()
        assert isinstance(recorded["code"]["dirty"], bool)
    else:
        assert recorded["code"] == {"commit": None, "dirty": None}
    assert recorded["gpu"]["physical_index"] == 1
    assert recorded["gpu"]["cuda_visible_devices"] == "1"
    # The workflow's check agrees: nothing to name.
    res = CliRunner().invoke(main, ["check-config", "--configfile", str(_dump(cfg, tmp_path)),
                                    "--runs", str(tmp_path / "runs"), "--data-dir",
                                    str(data_dir)])
    assert res.exit_code == 0 and res.output.strip().endswith("ok, 1 runs"), res.output


def _dump(cfg: dict, where: Path) -> Path:
    path = where / f"cfg{abs(hash(json.dumps(cfg, sort_keys=True)))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_code_version_is_null_outside_a_checkout_and_without_git(tmp_path, monkeypatch):
    assert provenance.code_version(tmp_path) == {"commit": None, "dirty": None}
    # a directory inside some other repository is not our checkout either
    subprocess.run(["git", "init", "-q", str(tmp_path / "other")], check=True)
    (tmp_path / "other" / "pkg").mkdir()
    assert provenance.code_version(tmp_path / "other" / "pkg") == {"commit": None,
                                                                    "dirty": None}
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert provenance.code_version.__wrapped__(ROOT) == {"commit": None, "dirty": None}


def _config_json(d: Path, settings: dict, commit: str | None, **extra) -> None:
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({
        "model": settings["model"], "model_args": settings["model_args"],
        "identity": {"settings": settings, "fingerprint": provenance.fingerprint(settings)},
        "code": {"commit": commit, "dirty": False}, **extra}))


def test_check_config_names_every_run_that_disagrees(tmp_path):
    old = cfgmod.expand_runs(cfgmod.check_config(DEMO))  # base_width 8
    new_cfg = edited(lambda g, d: g.update(model_args={"base_width": 4}))
    new = {r.key: r for r in cfgmod.expand_runs(cfgmod.check_config(new_cfg))}
    runs = tmp_path / "runs"
    for r in old[:2]:  # trained under the old config: other directories now
        _config_json(runs / r.path, r.run_settings, "a" * 40)
    agree = new[old[2].key]
    _config_json(runs / agree.path, agree.run_settings, "b" * 40)
    wrong = new[old[3].key]  # the config's directory, other settings recorded in it
    _config_json(runs / wrong.path, {**wrong.run_settings, "model_args": {"base_width": 2}},
                 "b" * 40)
    legacy = runs / "digits/clean/resnet18/0"  # from before run identities
    legacy.mkdir(parents=True)
    (legacy / "config.json").write_text(json.dumps({
        "model": "resnet18", "model_args": {"base_width": 4},
        "recipe": {"name": "demo", "lr": 0.05}}))
    gone = tmp_path / "runs/digits/clean/resnet50-0123abcd/0"  # left the grid
    _config_json(gone, {"model": "resnet50", "model_args": {}}, "b" * 40)

    res = CliRunner().invoke(main, ["check-config", "--configfile", str(_dump(new_cfg, tmp_path)),
                                    "--runs", str(runs), "--data-dir", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()[2:]
    named = {line.split(":")[0] for line in lines}
    assert named == {str(runs / r.path) for r in old[:2]} | {
        str(runs / wrong.path), str(legacy), str(gone), "runs of 3 code versions"}
    for r in old[:2]:
        (line,) = [ln for ln in lines if ln.startswith(str(runs / r.path))]
        assert f"not a run of this config, whose {r.key} is {runs / new[r.key].path}" in line
        assert "model_args.base_width: 8 -> 4" in line
    (line,) = [ln for ln in lines if ln.startswith(str(runs / wrong.path))]
    assert "disagrees with the config (model_args.base_width: 2 -> 4)" in line
    assert any(ln.startswith(str(gone)) and "none of its runs is digits/clean/resnet50/0" in ln
               for ln in lines)
    assert "aaaaaaaaaaaa (2 runs), bbbbbbbbbbbb (3 runs), unknown (1 runs)" in lines[-1]


def test_check_config_names_prepared_data_the_config_did_not_ask_for(tmp_path):
    manifest = tmp_path / "d" / "prepared" / "digits" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"params": {"image_size": 16, "split_seed": 1,
                                               "val_count": 144}}))
    res = CliRunner().invoke(main, ["check-config", "--configfile", str(_dump(DEMO, tmp_path)),
                                    "--runs", str(tmp_path / "none"), "--data-dir",
                                    str(tmp_path / "d")])
    assert res.exit_code == 0
    assert (f"{manifest.parent} was prepared with {{'image_size': 16, 'split_seed': 1, "
            "'val_count': 144}, the config asks for {'image_size': 16, 'split_seed': 0, "
            f"'val_count': 144}}: delete {manifest.parent}") in res.output


def _finished(d: Path, settings: dict, commit: str, fingerprint: str | None = None) -> Path:
    _config_json(d, settings, commit)
    if fingerprint is not None:
        cfg = json.loads((d / "config.json").read_text())
        cfg["identity"]["fingerprint"] = fingerprint
        (d / "config.json").write_text(json.dumps(cfg))
    (d / "summary.json").write_text(json.dumps({
        "model": settings["model"], "dataset": "digits", "noise": "clean",
        "seed": int(d.name), "status": "ok", "val_acc": 0.9, "tst_acc": 0.9,
        "model_args": settings["model_args"], "recipe": "demo"}))
    return d / "summary.json"


def test_report_names_runs_not_of_the_config_and_of_other_code(tmp_path):
    """The workflow hands `report` the config's summaries: every other run directory is
    named, so is a run whose config.json records other settings than its directory names,
    and so are the code versions, in the CLI's output and in report.md."""
    runs = tmp_path / "runs"
    new = {"model": "resnet18", "model_args": {"base_width": 4}, "recipe": {}, "data": None}
    old = {**new, "model_args": {"base_width": 8}}
    cell = f"digits/clean/{provenance.model_dir('resnet18', '', new)}"
    current = [_finished(runs / cell / "0", new, "a" * 40),
               _finished(runs / cell / "1", new, "b" * 40, fingerprint="0badf00d")]
    stale = runs / "digits/clean" / provenance.model_dir("resnet18", "", old) / "0"
    _finished(stale, old, "a" * 40)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["report", "--runs", str(runs), "--out", str(out),
                                    *map(str, current)])
    assert res.exit_code == 0, res.output
    rel = stale.relative_to(runs).as_posix()
    checks = [f"{rel}: not a run of the config (its settings changed, or it left the grid)",
              f"{cell}/1: config.json records settings 0badf00d but its directory names "
              f"{provenance.fingerprint(new)}",
              "runs of 2 code versions: aaaaaaaaaaaa (2 runs), bbbbbbbbbbbb (1 runs)"]
    for line in checks:
        assert line in res.output.splitlines(), res.output
    page = (out / "report.md").read_text()
    assert "## Runs to check" in page and all(f"- {line}" in page for line in checks)
    # By hand, without the config's list: only what the run directories themselves say.
    res = CliRunner().invoke(main, ["report", "--runs", str(runs), "--out", str(out)])
    assert res.exit_code == 0 and checks[0] not in res.output and checks[1] in res.output
