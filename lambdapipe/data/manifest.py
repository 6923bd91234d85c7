"""A prepared dataset's manifest.json read as input: bounded, and every field the loaders use
checked before use, in one line naming the file."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lambdapipe.atomic import read_json
from lambdapipe.errors import UserError

MANIFEST_MAX = 16 << 20  # a prepared dataset's manifest.json is a few KB


def read_manifest(path: Path) -> dict[str, Any]:
    """A prepared dataset's manifest.json, read bounded and checked before use: the fields
    prepare, noise and the loaders read (a corrupt one was a KeyError/JSON traceback)."""
    manifest = read_json(path, MANIFEST_MAX, "data manifest")

    def bad(what: str) -> UserError:
        return UserError(f"corrupt data manifest {path}: {what}; remove {Path(path).parent} "
                         "and run `lambdapipe prepare` again")

    if not isinstance(manifest, dict):
        raise bad("not a mapping")
    for key in ("dataset", "params", "arrays", "num_classes", "classes"):
        if key not in manifest:
            raise bad(f"no {key!r}")
    n = manifest["num_classes"]
    if not isinstance(manifest["dataset"], str) or not isinstance(manifest["params"], dict):
        raise bad("dataset or params of the wrong type")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise bad(f"num_classes {n!r} is not an integer >= 1")
    classes = manifest["classes"]
    if not (isinstance(classes, list) and len(classes) == n
            and all(isinstance(c, str) for c in classes)):
        raise bad(f"classes is not a list of {n} names")
    arrays = manifest["arrays"]
    if not isinstance(arrays, dict) or not arrays:
        raise bad("arrays is not a mapping of file names to digests")
    for name, entry in arrays.items():
        if not re.fullmatch(r"[A-Za-z0-9_]+(/[A-Za-z0-9_]+)*\.npy", name):
            raise bad(f"array name {name[:60]!r} is not a .npy file inside the directory")
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])):
            raise bad(f"array {name} has no sha256 digest")
    return manifest
