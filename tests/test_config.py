"""The workflow config: shipped configs valid, bad ones refused in one line naming the key."""

from __future__ import annotations

import copy
import itertools
import re

import pytest
import yaml
from click.testing import CliRunner

from lambdapipe import config as cfgmod
from lambdapipe.cli import main
from lambdapipe.errors import UserError

# Its tests take a tenth of a CPU-second or less, not the default 1 s: under pytest-xdist
# this short work unit goes out last, filling in around the long ones (tests/conftest.py).
pytestmark = pytest.mark.cost(0.1)

ROOT = cfgmod.SCHEMA_PATH.parents[2]
DEMO = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
FULL = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


def expected_runs(cfg):
    """Runs counted straight from the YAML (independent of expand_runs)."""
    keys = set()
    for ds, d in cfg["datasets"].items():
        for g in d["grids"]:
            rates = [r for n in g["noise"] for r in n["rates"]]
            for rate, model, seed in itertools.product(rates, g["models"], g["seeds"]):
                keys.add((ds, rate, model, seed))
    return keys


@pytest.mark.parametrize("cfg", [DEMO, FULL], ids=["demo", "full"])
def test_shipped_configs_expand_to_their_grid(cfg):
    checked = cfgmod.check_config(cfg)
    runs = cfgmod.expand_runs(checked)
    assert len(runs) == len(expected_runs(cfg))
    assert len({r.path for r in runs}) == len(runs)
    assert checked["train"]["device"] in ("auto", "cpu")  # defaults filled


def test_demo_is_small():
    runs = cfgmod.expand_runs(cfgmod.check_config(DEMO))
    assert {r.dataset for r in runs} == {"digits"} and len(runs) == 8
    assert {r.recipe for r in runs} == {"demo"}


def _bad(mutate):
    cfg = copy.deepcopy(DEMO)
    mutate(cfg)
    return cfg


GRID = ("datasets", "digits", "grids", 0)


def _at(cfg, path):
    for p in path:
        cfg = cfg[p]
    return cfg


BAD = {
    "unknown model": (lambda c: _at(c, GRID)["models"].append("resnet19"),
                      r"invalid model 'resnet19' in config datasets\.digits\.grids\[0\]\.models"),
    "rate 1.5": (lambda c: _at(c, GRID)["noise"][0]["rates"].append(1.5),
                 r"datasets\.digits\.grids\[0\]\.noise\[0\]\.rates\[2\] 1\.5: expected a number"
                 r" >= 0 and < 1"),
    "empty models": (lambda c: _at(c, GRID).update(models=[]),
                     r"'datasets\.digits\.grids\[0\]\.models' is empty"),
    "empty grids": (lambda c: c["datasets"]["digits"].update(grids=[]),
                    r"'datasets\.digits\.grids' is empty"),
    "no datasets": (lambda c: c.update(datasets={}), r"'datasets' is empty"),
    "key typo": (lambda c: _at(c, GRID).update(sedes=[0]),
                 r"unknown config key 'datasets\.digits\.grids\[0\]\.sedes': expected one of"
                 r" name, models"),
    "top-level typo": (lambda c: c.update(datsets={}), r"unknown config key 'datsets'"),
    "unknown dataset": (lambda c: c["datasets"].update(mnist=c["datasets"]["digits"]),
                        r"invalid name 'mnist' in config key 'datasets': expected one of .*digits"),
    "bad recipe": (lambda c: _at(c, GRID).update(recipe="fast"),
                   r"invalid config datasets\.digits\.grids\[0\]\.recipe 'fast': expected one"),
    "bad override": (lambda c: _at(c, GRID).update(set={"lr_typo": 1}),
                     r"config datasets\.digits\.grids\[0\]\.set: invalid recipe field 'lr_typo'"),
    "bad precision": (lambda c: _at(c, GRID).update(set={"precision": "fp8"}),
                      r"\.set\.precision 'fp8': expected one of fp32, bf16, fp16"),
    "bad noise kind": (lambda c: _at(c, GRID)["noise"].append({"kind": "flip", "rates": [0.1]}),
                       r"noise\[1\]\.kind 'flip': expected one of symmetric, pairflip"),
    "dead exclusion": (lambda c: c.update(exclude=[{"model": "resnet200"}]),
                       r"exclude\[0\] .* matches no run"),
    "conflicting grids": (
        lambda c: c["datasets"]["digits"]["grids"].append(
            {**_at(c, GRID), "name": "other", "recipe": "sgdm"}),
        r"in grids 'demo' and 'other' with different recipe"),
    "missing key": (lambda c: _at(c, GRID).pop("seeds"), r"missing config key .*seeds"),
    "pairflip past CIFAR-10's pairs": (
        lambda c: c["datasets"].update(cifar10=_pairflip(c, 0.6)),
        r"invalid pairflip noise rate 0\.6 for cifar10 in config datasets\.cifar10\.grids\[0\]"
        r"\.noise\[0\]: expected at most 0\.5"),
}


def _pairflip(cfg, rate):
    dataset = copy.deepcopy(cfg["datasets"]["digits"])
    dataset["grids"][0]["noise"] = [{"kind": "pairflip", "rates": [rate]}]
    return dataset


def test_pairflip_rates_are_capped_by_the_dataset_pairs():
    """CIFAR-10's convention pairs 5 of 10 classes; other datasets pair every class."""
    for dataset, rate in (("cifar10", 0.5), ("cifar100", 0.9), ("digits", 0.9)):
        cfg = copy.deepcopy(DEMO)
        cfg["datasets"][dataset] = _pairflip(cfg, rate)
        assert any(r.noise == f"pairflip-{rate:g}" and r.dataset == dataset
                   for r in cfgmod.expand_runs(cfgmod.check_config(cfg)))


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_config_is_one_line_naming_the_key(case):
    mutate, pattern = BAD[case]
    with pytest.raises(UserError, match=pattern) as info:
        cfgmod.check_config(_bad(mutate))
    assert "\n" not in str(info.value)


def test_exclusion_removes_runs():
    cfg = _bad(lambda c: c.update(exclude=[{"model": "lr18_l3_lc", "seed": 1}]))
    runs = cfgmod.expand_runs(cfgmod.check_config(cfg))
    assert len(runs) == 6 and not any(r.model == "lr18_l3_lc" and r.seed == 1 for r in runs)


def test_run_args_are_cli_options():
    cfg = _bad(lambda c: _at(c, GRID).update(set={"precision": "bf16", "lr": 0.01,
                                                  "grad_clip": None, "flip": True}))
    run = cfgmod.expand_runs(cfgmod.check_config(cfg))[0]
    args = cfgmod.run_args(run)
    assert args["recipe"] == "demo"
    assert args["set"] == ("--set flip=true --set grad_clip=none --set lr=0.01"
                           " --set precision=bf16")
    assert args["model_args"] == "--model-arg base_width=8"


def test_check_config_cli(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(DEMO))
    res = CliRunner().invoke(main, ["check-config", "--configfile", str(good)])
    assert res.exit_code == 0 and "ok, 8 runs" in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_bad(BAD["rate 1.5"][0])))
    res = CliRunner().invoke(main, ["check-config", "--configfile", str(bad)])
    assert res.exit_code == 2 and "rates[2] 1.5" in res.output


def _walk(schema, path="schema"):
    if isinstance(schema, dict):
        if schema.get("type") == "object" and "properties" in schema:
            yield path, schema
        for k, v in schema.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(schema, list):
        for i, v in enumerate(schema):
            yield from _walk(v, f"{path}[{i}]")


def test_schema_documents_every_key_and_refuses_unknown_ones():
    schema = cfgmod.load_schema()
    for path, obj in _walk(schema):
        for name, sub in obj["properties"].items():
            assert sub.get("description"), f"{path}.{name} has no description"
        if not path.endswith(".set"):  # recipe fields are checked by the recipe registry
            assert obj.get("additionalProperties") is False, path


def test_schema_enums_match_the_registries():
    from lambdapipe.data.registry import DATASETS
    from lambdapipe.noise import KINDS
    from lambdapipe.recipes import PRECISIONS, list_recipes

    s = cfgmod.load_schema()
    assert set(s["properties"]["datasets"]["propertyNames"]["enum"]) == set(DATASETS)
    assert set(s["$defs"]["grid"]["properties"]["recipe"]["enum"]) == set(list_recipes())
    assert set(s["$defs"]["noise"]["properties"]["kind"]["enum"]) == set(KINDS)
    prec = s["$defs"]["grid"]["properties"]["set"]["properties"]["precision"]["enum"]
    assert set(prec) == set(PRECISIONS)


def test_readme_documents_every_key():
    text = (ROOT / "config" / "README.md").read_text()
    for _, obj in _walk(cfgmod.load_schema()):
        for name in obj["properties"]:
            assert re.search(rf"`([\w<>]+\.)*{name}`", text), f"config/README.md lacks {name}"
