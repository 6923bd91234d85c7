"""Train logs through `logging`: every stderr line of a run says when and how severe."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from datetime import datetime

import pytest
from click.testing import CliRunner

from lambdapipe import data, logs
from lambdapipe.cli import main

LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}) (DEBUG|INFO|WARNING|ERROR) (.*)$")


@pytest.fixture(autouse=True)
def fresh_logger(monkeypatch):
    """Each test starts as a new process would: no handler, no level."""
    monkeypatch.delenv(logs.LEVEL_ENV, raising=False)
    saved = logs.LOGGER.handlers[:], logs.LOGGER.level, logs.LOGGER.propagate
    logs.LOGGER.handlers.clear()
    # A CLI command earlier in this process left propagate off; pytest then hangs its own
    # capture handlers on the logger for each phase, which `emit` would take for a caller's.
    logs.LOGGER.setLevel(logging.NOTSET)
    logs.LOGGER.propagate = True
    yield
    logs.LOGGER.handlers[:], logs.LOGGER.level, logs.LOGGER.propagate = saved


def test_a_library_users_lines_carry_time_and_level(capsys):
    logs.emit("resuming runs/x at iteration 3 of 12")
    logs.emit("recipe demo\n  lr 0.1, batch 32", level="warning")
    err = capsys.readouterr().err.splitlines()
    assert [LINE.match(ln).group(2, 3) for ln in err] == [
        ("INFO", "resuming runs/x at iteration 3 of 12"), ("WARNING", "recipe demo"),
        ("WARNING", "  lr 0.1, batch 32")]
    when = datetime.strptime(LINE.match(err[0]).group(1), logs.DATE_FORMAT)
    assert abs((when - datetime.now(when.tzinfo)).total_seconds()) < 60


def test_the_level_filters_and_a_callers_own_handler_wins(capsys, monkeypatch):
    logs.configure("warning")
    logs.emit("an info line")
    logs.emit("a warning line", level="warning")
    assert [LINE.match(ln).group(3) for ln in capsys.readouterr().err.splitlines()] == [
        "a warning line"]
    logs.LOGGER.handlers.clear()
    logs.LOGGER.setLevel(logging.INFO)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logs.LOGGER.addHandler(handler)
    logs.emit("to the caller's handler")
    assert [r.getMessage() for r in records] == ["to the caller's handler"]
    assert capsys.readouterr().err == ""
    logs.LOGGER.handlers.clear()
    monkeypatch.setenv(logs.LEVEL_ENV, "loud")  # a library user's bad level: info, and why
    logs.emit("still said")
    err = capsys.readouterr().err.splitlines()
    assert "invalid $LAMBDAPIPE_LOG_LEVEL 'loud'" in err[0] and err[1].endswith(" still said")


def test_the_cli_sets_the_level_from_its_variable_first():
    args = ["models", "--dataset", "digits", "--pattern", "resnet20x1"]
    bad = CliRunner(env={logs.LEVEL_ENV: "loud"}).invoke(main, args)
    assert bad.exit_code == 2, bad.output
    assert bad.output.strip().splitlines()[-1] == (
        "Error: invalid $LAMBDAPIPE_LOG_LEVEL 'loud': expected one of debug, info, warning, "
        "error")
    assert "resnet20x1" not in bad.output  # refused before the command ran
    ok = CliRunner(env={logs.LEVEL_ENV: "WARNING"}).invoke(main, args)
    assert ok.exit_code == 0 and "resnet20x1" in ok.output, ok.output
    assert logs.LOGGER.level == logging.WARNING


@pytest.mark.cost(7)  # two `lambdapipe train` processes
def test_a_training_logs_every_line_with_its_time(tmp_path):
    """The real command, as a Snakemake job runs it: each stderr line parses, in time order."""
    data.prepare("digits", tmp_path / "data", progress=False)
    cmd = [sys.executable, "-m", "lambdapipe", "train", "--model", "resnet20x1", "--model-arg",
           "base_width=4", "--dataset", "digits", "--data-dir", str(tmp_path / "data"),
           "--out", str(tmp_path / "run"), "--recipe", "demo", "--set", "iterations=6",
           "--set", "eval_every=3", "--set", "batch_size=32", "--device", "cpu",
           "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(logs.LEVEL_ENV, None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    parsed = [LINE.match(ln) for ln in lines]
    assert all(parsed), [ln for ln, m in zip(lines, parsed, strict=True) if not m]
    messages = [m.group(3) for m in parsed]
    assert any(m.startswith("recipe demo") for m in messages), messages
    assert sum("iter 3/6 " in m for m in messages) == 1, messages
    stamps = [datetime.strptime(m.group(1), logs.DATE_FORMAT) for m in parsed]
    assert stamps == sorted(stamps)
    quiet = subprocess.run(cmd, capture_output=True, text=True,
                           env={**env, logs.LEVEL_ENV: "warning"}, timeout=600)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr[-3000:]
