"""Configs that attack the parser (issue 28.5): read within limits of size, depth and alias
expansion, by check-config, by --set, and by the Snakefile for its default grid."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lambdapipe import config as cfgmod
from lambdapipe.cli import main
from lambdapipe.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

DEEP = "a: " + "[" * 100_000 + "]" * 100_000 + "\n"
LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 10) + "]\n"
    for i in range(9))
HOSTILE = {"deep": (DEEP, "nested deeper than"), "laughs": (LAUGHS, "expands to more than"),
           "big": ("a: " + "x" * (2 << 20) + "\n", "larger than"),
           "binary": ("\x00\x01\x02 not yaml", "not valid YAML")}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_check_config_refuses_parser_attacks_in_one_line(tmp_path, case):
    text, expected = HOSTILE[case]
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=expected) as exc:
        cfgmod.load_config(path)
    assert "\n" not in str(exc.value) and "c.yaml" in str(exc.value)
    result = CliRunner().invoke(main, ["check-config", "--configfile", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.output.strip().splitlines()[-1].startswith("Error: ") and expected in \
        result.output, result.output


def test_limits_leave_real_configs_alone():
    for name in ("demo.yaml", "config.yaml"):
        text = (ROOT / "config" / name).read_text()
        assert cfgmod.safe_yaml(text, name) == __import__("yaml").safe_load(text)
    assert cfgmod.safe_yaml("a: &x [1, 2]\nb: *x\n", "x") == {"a": [1, 2], "b": [1, 2]}


def test_a_set_value_is_read_within_the_limits(tmp_path):
    result = CliRunner().invoke(main, ["train", "--model", "resnet20x1", "--dataset", "digits",
                                       "--out", str(tmp_path / "r"), "--set",
                                       "iterations=" + "[" * 100_000 + "]" * 100_000])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "iterations=" in result.output and "nested deeper" in result.output


@pytest.mark.skipif(shutil.which("snakemake") is None and not any(
    (Path(p) / "snakemake").exists() for p in sys.path), reason="snakemake not installed")
def test_the_snakefile_reads_its_default_grid_within_the_limits(tmp_path):
    """A billion-laughs config/config.yaml in the working directory: one line from the
    Snakefile, not Snakemake's unbounded load."""
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(LAUGHS)
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "-s",
                           str(ROOT / "workflow" / "Snakefile"), "-d", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode != 0
    assert "expands to more than" in proc.stdout + proc.stderr, proc.stderr[-3000:]
