"""Sizes checked before allocating (issue 28.6): a model too large for this machine is
refused on the meta device by train's pre-start check and by check-config; recipe integers
stay integers (no float round trip) within sane upper bounds."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from lambdapipe.cli import main
from lambdapipe.errors import UserError
from lambdapipe.recipes import INT_MAX, get_recipe
from lambdapipe.validate import check_model, check_model_size

HUGE = 100_000


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from lambdapipe import data

    root = tmp_path_factory.mktemp("data")
    data.prepare("digits", root, progress=False)
    return root


def test_train_refuses_a_model_too_large_before_building_it(data_dir, tmp_path, monkeypatch):
    """The pre-start check built the model for real (360 GB asked for at base_width 100000);
    now it is refused on the meta device, in one line, before --out exists. build_model
    must not be reached at all."""
    from lambdapipe import evaluate

    def never(*args, **kwargs):
        raise AssertionError("built for real")

    monkeypatch.setattr(evaluate, "build_model", never)
    result = CliRunner().invoke(main, [
        "train", "--model", "resnet20x1", "--model-arg", f"base_width={HUGE}", "--dataset",
        "digits", "--data-dir", str(data_dir), "--out", str(tmp_path / "r"), "--recipe",
        "demo", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "is too large" in last and "GiB" in last, last
    assert not (tmp_path / "r").exists()


def test_check_config_refuses_a_model_too_large(tmp_path):
    from lambdapipe.config import SCHEMA_PATH

    root = SCHEMA_PATH.parents[2]
    cfg = yaml.safe_load((root / "config" / "demo.yaml").read_text())
    ds = next(iter(cfg["datasets"]))
    cfg["datasets"][ds]["grids"][0]["model_args"] = {"base_width": HUGE}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(main, ["check-config", "--configfile", str(path)])
    assert result.exit_code == 2 and "is too large" in result.output, result.output


def test_the_size_check_counts_what_training_holds():
    meta = check_model("resnet20x1", 10, 32, {"base_width": 4})
    check_model_size(meta, "small", copies=4)  # a small model passes
    with pytest.raises(UserError, match="too large"):
        check_model_size(meta, "small", copies=10**12)  # the factor is applied


@pytest.mark.parametrize("value", [99999999999999999999999, "99999999999999999999999", 1e23,
                                   INT_MAX["iterations"] + 1])
def test_integer_fields_stay_integers_within_bounds(value):
    with pytest.raises(UserError, match="at most 1,000,000,000"):
        get_recipe("demo", {"iterations": value})
    assert get_recipe("demo", {"iterations": INT_MAX["iterations"]}).iterations == 10**9
    assert type(get_recipe("demo", {"iterations": 12.0}).iterations) is int


def test_set_with_a_23_digit_iteration_count_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["train", "--model", "resnet20x1", "--dataset", "digits",
                                       "--out", str(tmp_path / "r"), "--set",
                                       "iterations=99999999999999999999999"])
    assert result.exit_code == 2 and "iterations" in result.output, result.output
    assert "at most" in result.output
