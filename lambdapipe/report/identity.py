"""Which runs to check before trusting a table: runs whose config.json disagrees with the
settings their directory names, runs that are not the config's (when the workflow says which
are), and runs of different code versions. Read from config.json alone (the run-directory
contract); the grammar of a run's identity is lambdapipe/provenance.py's."""

from __future__ import annotations

from pathlib import Path

from lambdapipe.provenance import code_label, split_model_dir
from lambdapipe.report.load import read_json_object


def audit(root: Path, run_dirs: list[Path], current: set[str] | None = None) -> list[str]:
    """One line per run directory (under `root`) to check, plus one naming the code versions
    when there is more than one. `current`: the run ids (paths under `root`) the config asks
    for; every other run directory is named as not the config's."""
    lines: list[str] = []
    versions: dict[str, int] = {}
    for d in sorted(run_dirs):
        rel = d.relative_to(root).as_posix()
        config = read_json_object(d / "config.json") if (d / "config.json").is_file() else {}
        if config:
            label = code_label(config.get("code"))
            versions[label] = versions.get(label, 0) + 1
        if current is not None and rel not in current:
            lines.append(f"{rel}: not a run of the config (its settings changed, or it left "
                         "the grid)")
        # A directory the workflow named (`<model>-<fingerprint>`) against the settings the
        # run recorded; hand-named directories and runs from before identities name none.
        named = split_model_dir(d.parent.name)[2]
        identity = config.get("identity")
        recorded = identity.get("fingerprint") if isinstance(identity, dict) else None
        if named is not None and recorded is not None and recorded != named:
            lines.append(f"{rel}: config.json records settings {recorded} but its directory "
                         f"names {named}")
    if len(versions) > 1:
        lines.append(f"runs of {len(versions)} code versions: " + ", ".join(
            f"{label} ({n} runs)" for label, n in sorted(versions.items())))
    return lines
