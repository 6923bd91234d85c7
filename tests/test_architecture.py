"""The import rules of docs/architecture.md, read from the source (no module is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lambdapipe"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names
                             if node.module == "lambdapipe")
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        out[_module(path)] = {m for m in found if m.split(".")[0] == "lambdapipe"}
    return out


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


TRAINING = ("lambdapipe.train", "lambdapipe.pack", "lambdapipe.evaluate", "lambdapipe.bench",
            "lambdapipe.project", "lambdapipe.explain", "lambdapipe.augment",
            "lambdapipe.recipes")
RULES = {  # modules under the key may not import modules under any of the values
    "lambdapipe.models": ("lambdapipe.data", "lambdapipe.noise", "lambdapipe.config",
                          "lambdapipe.report", "lambdapipe.cli", *TRAINING),
    "lambdapipe.data": ("lambdapipe.models", "lambdapipe.config", "lambdapipe.report",
                        "lambdapipe.cli", *TRAINING),
    "lambdapipe.noise": ("lambdapipe.models", "lambdapipe.data", "lambdapipe.config",
                         "lambdapipe.report", "lambdapipe.cli", *TRAINING),
    "lambdapipe.report": ("lambdapipe.models", "lambdapipe.data", "lambdapipe.noise",
                          "lambdapipe.config", "lambdapipe.cli", *TRAINING),
    "lambdapipe.reference": ("lambdapipe.models", "lambdapipe.data", "lambdapipe.report",
                             "lambdapipe.config", "lambdapipe.cli", *TRAINING),
}


@pytest.mark.parametrize("owner", RULES)
def test_imports_flow_one_way(owner):
    bad = [f"{mod} imports {dep}" for mod, deps in _imports().items() if _under(mod, (owner,))
           for dep in sorted(deps) if _under(dep, RULES[owner])]
    assert not bad, "; ".join(bad)


def test_shared_constants_are_leaves():
    """lambdapipe.status is what training writes and the report reads: it may import nothing
    of the package, or the report would reach training code through it."""
    graph = _imports()
    assert graph["lambdapipe.status"] == set()
    assert "lambdapipe.status" in graph["lambdapipe.train"]
    assert "lambdapipe.status" in graph["lambdapipe.report.load"]


def test_only_the_cli_is_the_face():
    users = [mod for mod, deps in _imports().items() if "lambdapipe.cli" in deps]
    assert users == ["lambdapipe.__main__"]  # `python -m lambdapipe`, the CLI itself


def test_the_checker_sees_imports():
    """A rule checker that finds nothing proves nothing: known edges must be seen."""
    graph = _imports()
    assert "lambdapipe.models" in graph["lambdapipe.train"]
    assert "lambdapipe.reference" in graph["lambdapipe.report.tables"]
    assert "lambdapipe.models.registry" in graph["lambdapipe.models.resnet"]
