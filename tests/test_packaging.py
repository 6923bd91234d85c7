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


CONDA_NAMES = {"pytorch": "torch", "matplotlib-base": "matplotlib"}


def _env_requirements(path: Path) -> dict[str, str]:
    """{pip name: specifier} of a conda env file, conda and pip entries alike."""
    deps = yaml.safe_load(path.read_text())["dependencies"]
    entries = [d for d in deps if isinstance(d, str)]
    entries += [p for d in deps if isinstance(d, dict) for p in d.get("pip", [])]
    out = {}
    for entry in entries:
        if entry in ("pip",) or entry.startswith("-"):
            continue
        req = Requirement(entry)
        out[CONDA_NAMES.get(req.name, req.name)] = str(req.specifier)
    return out


def test_rule_environments_match_pyproject_and_install_no_package():
    """workflow/envs: what `--software-deployment-method conda` builds per rule. Ranges as in
    pyproject; no `-e .` (rules run the checkout's package from PYTHONPATH); the training
    env carries every runtime dependency, the report's no torch."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {Requirement(r).name: str(Requirement(r).specifier)
               for r in project["dependencies"]}
    runtime["python"] = project["requires-python"]
    envs = {p.stem: _env_requirements(p) for p in (ROOT / "workflow" / "envs").glob("*.yaml")}
    assert set(envs) == {"lambdapipe", "report"}
    assert envs["lambdapipe"] == runtime
    assert envs["report"].items() <= runtime.items() and "torch" not in envs["report"]
    for path in (ROOT / "workflow" / "envs").glob("*.yaml"):
        assert "-e ." not in path.read_text().replace("# ", "")
    rules = "".join(p.read_text() for p in (ROOT / "workflow" / "rules").glob("*.smk"))
    used = set(re.findall(r'"\.\./envs/([\w.]+)\.yaml"', rules))
    assert used == set(envs)


def test_snakefile_min_version_is_pyprojects_snakemake_floor():
    snakefile = (ROOT / "workflow" / "Snakefile").read_text()
    (floor,) = re.findall(r'min_version\("([\d.]+)"\)', snakefile)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (req,) = [Requirement(r) for r in project["optional-dependencies"]["pipeline"]
              if Requirement(r).name == "snakemake"]
    assert str(req.specifier) == f">={floor}"
