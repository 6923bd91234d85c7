"""environment.yml (conda) lists exactly pyproject's dependencies; the Makefile's torch pin
satisfies pyproject's range."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
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
CONDA_PIN = re.compile(r"^([\w.-]+)==([\w.]+)(?:=(\S+))?$")  # name==version[=build]


def _env_pins(path: Path) -> dict[str, tuple[str, str | None]]:
    """{pip name: (version, build)} of a conda env file, conda and pip entries alike; every
    entry but `pip` itself an exact pin."""
    deps = yaml.safe_load(path.read_text())["dependencies"]
    entries = [d for d in deps if isinstance(d, str)]
    entries += [p for d in deps if isinstance(d, dict) for p in d.get("pip", [])]
    out = {}
    for entry in entries:
        if entry == "pip":
            continue
        match = CONDA_PIN.match(entry)
        assert match, f"{path.name}: {entry!r} is not an exact pin (name==version)"
        name, version, build = match.groups()
        out[CONDA_NAMES.get(name, name)] = (version, build)
    return out


def test_rule_environments_are_pinned_within_pyproject_and_install_no_package():
    """workflow/envs: what `--software-deployment-method conda` builds per rule. Exact pins
    (a solve on another day gives the same software) inside pyproject's ranges, torch as
    the Makefile pins it and as a CUDA build; no `-e .` (rules run the checkout's package
    from PYTHONPATH); the training env carries every runtime dependency, the report's the
    same pins and no torch."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {Requirement(r).name: Requirement(r).specifier for r in project["dependencies"]}
    envs = {p.stem: _env_pins(p) for p in (ROOT / "workflow" / "envs").glob("*.yaml")}
    assert set(envs) == {"lambdapipe", "report"}
    assert set(envs["lambdapipe"]) == {*runtime, "python"}
    for name, (version, _) in envs["lambdapipe"].items():
        if name == "python":
            assert Version(version) in SpecifierSet(project["requires-python"])
        else:
            assert Version(version) in runtime[name], (name, version, runtime[name])
    assert envs["report"].items() <= envs["lambdapipe"].items()
    assert "torch" not in envs["report"]
    make = dict(re.findall(r"(torch|torchvision)==([\d.]+)", (ROOT / "Makefile").read_text()))
    assert {k: envs["lambdapipe"][k][0] for k in make} == make
    assert envs["lambdapipe"]["torch"][1] == "cuda*"
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


def test_docs_name_no_absolute_path_of_a_machine():
    """Paths in the docs are relative to the repository (`../shared/...`), or placeholders
    a reader replaces (/path/to, /shared/...); never a path of the machine they were
    written on."""
    machine = re.compile(r"(?<![\w.~/])/(?:work|home|root|Users|tmp|scratch|mnt)/[\w.-]+")
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
                 *sorted((ROOT / "config").glob("*.md"))]:
        hits = machine.findall(path.read_text())
        assert not hits, (path.name, hits)
