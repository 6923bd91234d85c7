"""What a run is and what ran it.

A run's identity is its directory, `<dataset>/<noise tag>/<model>[@<variant>]-<fingerprint>/
<seed>`: the fingerprint is a short hash of every setting that changes the run's result and
is not already in the path (the model's arguments, the training recipe as resolved - every
field but the speed settings - and the prepared data's split and image size). A changed
setting is therefore a new directory - missing, so trained - in every clone, with or without
Snakemake's metadata, and an unchanged config names the same directories, so nothing
reruns. The old directory is left alone (a finished run is never overwritten) and
`check-config` and `report` name it.

Each run also records the code it ran (`code_version`: git commit and whether the package's
files differed from it) and the GPU it held (`gpu.Claim.record`), in config.json.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import subprocess
from pathlib import Path
from typing import Any

FINGERPRINT_CHARS = 8  # 32 bits: runs of one cell with different settings never collide
_MODEL_DIR = re.compile(r"^(?P<model>[A-Za-z0-9_.]+)(?:@(?P<variant>[A-Za-z0-9.-]+?))?"
                        rf"-(?P<fingerprint>[0-9a-f]{{{FINGERPRINT_CHARS}}})$")
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def run_settings(model: str, model_args: dict[str, Any], recipe: dict[str, Any],
                 data: dict[str, Any] | None) -> dict:
    """The settings that make a run's result, in one canonical JSON form.

    `data`: the prepared data's parameters (manifest.json `params`: image size, split seed,
    val count). `recipe` is the resolved recipe (`Recipe.to_dict()`). Left out: its name and
    description
    (two names for the same fields train the same run), the speed settings (SPEED_FIELDS:
    they change how fast, not what; train resumes across them too), and a field added after
    runs existed while it holds the value that reproduces the behaviour from before
    (ADDED_FIELDS), so adding a recipe field does not rename every run.
    """
    from lambdapipe.recipes import ADDED_FIELDS, SPEED_FIELDS, field_default

    fields = {k: v for k, v in recipe.items()
              if k not in ("name", "description", *SPEED_FIELDS)
              and not (k in ADDED_FIELDS and v == field_default(k))}
    return json.loads(json.dumps({"model": model, "model_args": dict(model_args),
                                  "recipe": fields, "data": data}, sort_keys=True, default=str))


def fingerprint(settings: dict) -> str:
    """A short hex digest of `run_settings(...)`: the last part of a run's model directory."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:FINGERPRINT_CHARS]


def model_dir(model: str, variant: str, settings: dict) -> str:
    """`resnet18-3f9a2c1e`, `resnet18@fp16-0b7d44e2`: one directory holds one setting."""
    return f"{model}@{variant}-{fingerprint(settings)}" if variant else (
        f"{model}-{fingerprint(settings)}")


def split_model_dir(name: str) -> tuple[str, str, str | None]:
    """(model, variant, fingerprint) of a model directory; a directory from before run
    identities (no fingerprint) gives None for it."""
    m = _MODEL_DIR.match(name)
    if m:
        return m["model"], m["variant"] or "", m["fingerprint"]
    model, _, variant = name.partition("@")
    return model, variant, None


def differences(recorded: dict, wanted: dict, prefix: str = "") -> list[str]:
    """`key: recorded -> wanted` for every setting that differs (nested keys dotted)."""
    out = []
    for key in sorted(set(recorded) | set(wanted)):
        old, new = recorded.get(key), wanted.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out += differences(old, new, f"{prefix}{key}.")
        elif old != new:
            out.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return out


@functools.cache
def code_version(root: Path = PACKAGE_ROOT) -> dict[str, Any]:
    """{"commit": sha, "dirty": bool} of the checkout the package runs from; dirty when a
    file of the package differs from that commit (untracked ones count: they are imported
    too). Nulls outside a git checkout of this package (an installed wheel, no git, a tree
    copied without .git): a run never fails for want of its provenance."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                              text=True, check=True, timeout=30).stdout.strip()

    try:
        top = git("rev-parse", "--show-toplevel")
        if Path(top).resolve() != root.resolve():  # an enclosing repository, not ours
            return {"commit": None, "dirty": None}
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--", Path(__file__).parent.name))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def record(model: str, model_args: dict[str, Any], recipe: dict[str, Any], data_dir: Path,
           dataset: str) -> dict[str, Any]:
    """config.json's provenance keys: `identity` (settings, with those of the prepared data
    the run reads, and their fingerprint), `code`, `gpu` (the GPU claim this process holds;
    None on a CPU)."""
    from lambdapipe import gpu

    manifest = _read(Path(data_dir) / "prepared" / dataset / "manifest.json") or {}
    settings = run_settings(model, model_args, recipe, manifest.get("params"))
    claim = gpu.current()
    return {"identity": {"fingerprint": fingerprint(settings), "settings": settings},
            "code": code_version(),
            "gpu": claim.record() if claim is not None and claim.index is not None else None}


def _read(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def recorded_settings(config: dict) -> dict:
    """The settings a config.json says its run was trained with: its `identity` block, or
    for a run from before run identities, rebuilt from its model, model_args and recipe."""
    identity = config.get("identity")
    if isinstance(identity, dict) and isinstance(identity.get("settings"), dict):
        return identity["settings"]
    return run_settings(config.get("model"), config.get("model_args") or {},
                        config.get("recipe") or {}, None)


def code_label(code: Any) -> str:
    """`3f9a2c1e0b7d` / `3f9a2c1e0b7d+dirty` / `unknown` for config.json's `code`."""
    if not isinstance(code, dict) or not code.get("commit"):
        return "unknown"
    return str(code["commit"])[:12] + ("+dirty" if code.get("dirty") else "")


def audit(runs: list, root: Path) -> list[str]:
    """One line per run directory under `root` whose config.json disagrees with the config
    whose runs are `runs` (lambdapipe.config.Run): a run of the config trained with other
    settings, or a directory the config no longer names (its settings changed, or it left
    the grid) - then with what changed against the config's run of the same key. Plus one
    line naming the code versions, when the runs were trained by more than one."""
    root = Path(root)
    if not root.is_dir():
        return []
    wanted = {run.path: run for run in runs}
    by_key = {run.key: run for run in runs}
    lines, versions = [], {}
    for path in sorted(root.rglob("config.json")):
        run_dir = path.parent
        rel = run_dir.relative_to(root).as_posix()
        config = _read(path)
        if config is None:
            lines.append(f"{root / rel}: config.json is unreadable")
            continue
        label = code_label(config.get("code"))
        versions.setdefault(label, []).append(rel)
        parts = rel.split("/")
        run = wanted.get(rel)
        if run is not None:
            diffs = differences(recorded_settings(config), run.run_settings)
            if diffs:
                lines.append(f"{root / rel}: config.json disagrees with the config "
                             f"({'; '.join(diffs[:4])})")
            continue
        if len(parts) != 4:
            lines.append(f"{root / rel}: not a run of this config")
            continue
        model, variant, _ = split_model_dir(parts[2])
        key = "/".join([parts[0], parts[1], f"{model}@{variant}" if variant else model,
                        parts[3]])
        twin = by_key.get(key)
        if twin is None:
            lines.append(f"{root / rel}: not a run of this config (none of its runs is "
                         f"{key})")
        else:
            diffs = differences(recorded_settings(config), twin.run_settings)
            why = "; ".join(diffs[:4]) or "trained before run identities"
            lines.append(f"{root / rel}: not a run of this config, whose {key} is "
                         f"{root / twin.path} ({why})")
    if len(versions) > 1:
        lines.append("runs of " + str(len(versions)) + " code versions: " + ", ".join(
            f"{label} ({len(rels)} runs)" for label, rels in sorted(versions.items())))
    return lines
