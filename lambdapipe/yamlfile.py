"""YAML read as input (configs, `--set` and `--model-arg` values): bounded in size, depth and
alias expansion before PyYAML composes it, each limit one line naming the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lambdapipe.atomic import read_small_bytes
from lambdapipe.errors import UserError

# Limits for YAML we read (configs, --set values): far above any real config (ours are a few
# KB, 5 levels deep, and use no aliases), far below what hurts. PyYAML's parser is iterative
# but its composer recurses (10^5 nested brackets: RecursionError) and aliases expand
# without bound (a "billion laughs" document: 10 aliases per level, 9 levels), so the event
# stream is checked first and only a document within the limits is composed.
YAML_MAX_BYTES = 1 << 20
YAML_MAX_DEPTH = 64
YAML_MAX_NODES = 100_000  # after alias expansion


def safe_yaml(text: str, where: str) -> Any:
    """`yaml.safe_load(text)` within YAML_MAX_BYTES, YAML_MAX_DEPTH and YAML_MAX_NODES;
    anything beyond, or invalid YAML, is one UserError line naming `where`."""
    if len(text) > YAML_MAX_BYTES:
        raise UserError(f"{where} is larger than {YAML_MAX_BYTES:,} bytes: expected a config")
    sizes: dict[str, int] = {}
    stack: list[list] = []  # [nodes so far, anchor] per open collection
    total = 0

    def add(n: int) -> None:
        nonlocal total
        total += n
        if total > YAML_MAX_NODES:
            raise UserError(f"{where} expands to more than {YAML_MAX_NODES:,} values (through "
                            "aliases?): expected a config")
        if stack:
            stack[-1][0] += n

    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                add(sizes.get(event.anchor, 1))
            elif isinstance(event, yaml.ScalarEvent):
                add(1)
                if event.anchor:
                    sizes[event.anchor] = 1
            elif isinstance(event, yaml.CollectionStartEvent):
                if len(stack) >= YAML_MAX_DEPTH:
                    raise UserError(f"{where} is nested deeper than {YAML_MAX_DEPTH} levels: "
                                    "expected a config")
                stack.append([0, event.anchor])
                add(1)
            elif isinstance(event, yaml.CollectionEndEvent):
                n, anchor = stack.pop()
                if anchor:
                    sizes[anchor] = n
                if stack:
                    stack[-1][0] += n
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"{where} is not valid YAML: {str(exc).splitlines()[0]}") from None


def read_yaml_file(path: str | Path) -> Any:
    """A YAML file's document: a regular file, bounded (not a FIFO, not /dev/zero), UTF-8,
    within the limits above."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} not found")
    try:  # bytes first: a non-UTF-8 file is one line with the byte offset
        text = read_small_bytes(path, YAML_MAX_BYTES, "config file").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"config file {str(path)!r} is not UTF-8 text (byte {exc.start}): "
                        "expected a YAML file") from None
    except UserError as exc:
        raise UserError(f"{exc}: expected a YAML file") from None
    return safe_yaml(text, f"config file {str(path)!r}")


def read_config_file(path: str | Path) -> dict:
    """A config file for the Snakefile's `config`, read within the limits above (Snakemake's
    own `configfile:` would load it unbounded before our check)."""
    config = read_yaml_file(path)
    if not isinstance(config, dict):
        raise UserError(f"config file {str(path)!r} is not a mapping of keys: expected a "
                        "config like config/demo.yaml")
    return config
