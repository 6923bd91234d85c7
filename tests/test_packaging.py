"""environment.yml (conda) lists exactly pyproject's dependencies; the Makefile's torch pin
satisfies pyproject's range."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_requirements() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for group in project["optional-dependencies"].values():
        reqs += [r for r in group if not r.startswith("lambdapipe")]
    return {str(Requirement(r)) for r in reqs}


def test_environment_yml_matches_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {str(Requirement(r)) for r in pip if not r.startswith("-e")}
    assert listed == _pyproject_requirements()
    assert "-e ." in pip
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert python.removeprefix("python") == requires


def test_makefile_torch_pin_is_within_pyproject_range():
    pins = dict(re.findall(r"(torch|torchvision)==([\d.]+)", (ROOT / "Makefile").read_text()))
    assert set(pins) == {"torch", "torchvision"}
    for req in map(Requirement, _pyproject_requirements()):
        if req.name in pins:
            assert Version(pins[req.name]) in req.specifier, (req, pins[req.name])
