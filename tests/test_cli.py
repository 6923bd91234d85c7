"""The CLI's contract with a shell: exit codes as click uses them, and options with a fixed
set of values that `--help` lists and shell completion offers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.shell_completion import ShellComplete
from click.testing import CliRunner

from lambdapipe import cli_options, noise
from lambdapipe.cli import main
from lambdapipe.data.registry import DATASETS
from lambdapipe.recipes import list_recipes

ROOT = Path(__file__).resolve().parents[1]


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), prog_name="lambdapipe")


def usage_error(result) -> str:
    """Exit 2, click's usage block, and the error as the last line."""
    assert result.exit_code == 2, result.output
    assert result.output.startswith("Usage: "), result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: "), result.output
    return last


def runtime_error(result) -> str:
    """Exit 1, one `Error:` line, no usage block and no traceback."""
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_fixed_value_options_are_listed_by_help():
    help_text = " ".join(invoke("train", "--help").output.split())
    assert "--dataset [" + "|".join(sorted(DATASETS)) + "]" in help_text
    assert "--noise-kind [symmetric|pairflip]" in help_text
    assert "--recipe [" + "|".join(list_recipes()) + "]" in help_text
    assert "--device [auto|cpu|cuda|cuda:N]" in help_text
    for verb in ("evaluate", "explain", "bench"):
        assert "--device [auto|cpu|cuda|cuda:N]" in invoke(verb, "--help").output
    assert cli_options.NOISE_KINDS == noise.KINDS  # spelt out there: --help stays numpy-free


def test_group_help_imports_no_numpy():
    code = ("import sys; from lambdapipe.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize(("args", "needle"), [
    (["train", "--model", "resnet20x1", "--dataset", "mnist", "--out", "x"],
     "'mnist' is not one of 'cifar10'"),
    (["prepare", "--dataset", "digits", "--noise-kind", "gaussian"],
     "'gaussian' is not one of 'symmetric', 'pairflip'"),
    (["train", "--model", "resnet20x1", "--dataset", "digits", "--out", "x", "--recipe",
      "nope"], "'nope' is not one of 'adam-restarts'"),
    (["evaluate", "--ckpt", "x.ckpt", "--device", "gpu"], "'gpu' is not one of 'auto'"),
    (["models", "--pattern", "nothing-like-this"], "no model matches pattern"),  # UserError
])
def test_bad_command_line_input_exits_2_with_usage(args, needle):
    assert needle in usage_error(invoke(*args))


def test_cuda_index_is_a_device_choice():
    device = next(p for p in main.commands["evaluate"].params if p.name == "device")
    assert device.type.convert("cuda:3", device, None) == "cuda:3"
    assert device.type.convert("cpu", device, None) == "cpu"


def test_runtime_failures_exit_1_with_one_error_line(tmp_path):
    empty = tmp_path / "data"
    line = runtime_error(invoke("train", "--model", "resnet20x1", "--dataset", "digits",
                                "--data-dir", str(empty), "--out", str(tmp_path / "run"),
                                "--recipe", "demo", "--device", "cpu", "--no-progress"))
    assert "dataset 'digits' is not prepared" in line
    assert not (tmp_path / "run").exists()

    ckpt = tmp_path / "best.ckpt"
    ckpt.write_bytes(b"not a checkpoint")
    line = runtime_error(invoke("evaluate", "--ckpt", str(ckpt), "--data-dir", str(empty),
                                "--device", "cpu"))
    assert f"corrupted checkpoint {ckpt}" in line


def test_shell_completion_offers_the_choices():
    def complete(args: list[str], incomplete: str) -> list[str]:
        comp = ShellComplete(main, {}, "lambdapipe", "_LAMBDAPIPE_COMPLETE")
        return [c.value for c in comp.get_completions(args, incomplete)]

    assert complete(["train", "--dataset"], "ci") == ["cifar10", "cifar100"]
    assert complete(["train", "--device"], "c") == ["cpu", "cuda", "cuda:0"]
    assert complete(["prepare", "--noise-kind"], "") == ["symmetric", "pairflip"]
