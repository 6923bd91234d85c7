"""The workflow's experiment grid: load, validate, expand into runs.

One function validates a config for both faces - the Snakefile (at DAG construction, before
any job) and `lambdapipe check-config` - so a typo'd key, a rate of 1.5, an empty grid or an
unknown model is one line naming the key and what is allowed, never a failed job an hour in.

Structure comes from the JSON schema in workflow/schemas/config.schema.yaml (which also fills
defaults); names the schema cannot know (registered models, recipe fields) are checked against
the registries that own them, so no list is kept twice.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from lambdapipe.errors import UserError

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run: the wildcards of its directory plus how to train it."""

    dataset: str
    noise: str  # tag, e.g. clean, symmetric-0.25
    model: str
    seed: int
    recipe: str
    overrides: tuple[tuple[str, Any], ...] = ()
    model_args: tuple[tuple[str, Any], ...] = ()
    grid: str = ""

    @property
    def path(self) -> str:
        return f"{self.dataset}/{self.noise}/{self.model}/{self.seed}"

    def settings(self) -> tuple:
        return (self.recipe, self.overrides, self.model_args)


def _path(parts: Iterable[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _describe(error) -> str:
    """One line per jsonschema error: the key, the bad value, what is allowed."""
    where = _path(error.absolute_path)
    schema, inst, kind = error.schema, error.instance, error.validator
    if kind == "additionalProperties":
        extra = sorted(set(inst) - set(schema.get("properties", {})))
        allowed = ", ".join(schema.get("properties", {})) or "none"
        key = f"{where}.{extra[0]}" if error.absolute_path else extra[0]
        return f"unknown config key {key!r}: expected one of {allowed}"
    if "propertyNames" in error.absolute_schema_path:
        return (f"invalid name {inst!r} in config key {where!r}: expected one of "
                + ", ".join(str(v) for v in schema.get("enum", [])))
    if kind == "enum":
        return (f"invalid config {where} {inst!r}: expected one of "
                + ", ".join(str(v) for v in error.validator_value))
    if kind == "required":
        missing = [k for k in error.validator_value if k not in inst]
        return f"missing config key {where}.{missing[0]}"
    if kind in ("minItems", "minProperties"):
        return f"config key {where!r} is empty: give at least {error.validator_value}"
    if kind in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        lo = schema.get("minimum", schema.get("exclusiveMinimum"))
        hi = schema.get("maximum", schema.get("exclusiveMaximum"))
        lo_s = "" if lo is None else ("> " if "exclusiveMinimum" in schema else ">= ") + f"{lo}"
        hi_s = "" if hi is None else ("< " if "exclusiveMaximum" in schema else "<= ") + f"{hi}"
        return f"invalid config {where} {inst!r}: expected a number " + " and ".join(
            s for s in (lo_s, hi_s) if s)
    if kind == "type":
        want = error.validator_value
        want = " or ".join(want) if isinstance(want, list) else want
        return f"invalid config {where} {inst!r}: expected {want}"
    if kind == "uniqueItems":
        return f"config key {where!r} has duplicate items: {inst!r}"
    return f"invalid config {where}: {error.message.splitlines()[0]}"


def _validator(schema: dict):
    import jsonschema

    base = jsonschema.Draft202012Validator

    def fill_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from base.VALIDATORS["properties"](validator, properties, instance, schema)

    return jsonschema.validators.extend(base, {"properties": fill_defaults})(schema)


def load_schema(path: Path | None = None) -> dict:
    path = Path(path or SCHEMA_PATH)
    if not path.is_file():
        raise UserError(f"config schema {path} not found: run from a lambdapipe checkout")
    return yaml.safe_load(path.read_text())


def load_config(path: str | Path) -> dict:
    """Read a YAML config and return it validated, with defaults filled in."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} not found")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"config file {str(path)!r} is not valid YAML: "
                        f"{str(exc).splitlines()[0]}") from None
    return check_config(cfg)


def check_config(cfg: Any, schema_path: Path | None = None) -> dict:
    """Validate `cfg` (schema + registries) and return a copy with defaults filled in."""
    if not isinstance(cfg, dict):
        raise UserError(f"the config must be a mapping of keys, got {type(cfg).__name__}")
    cfg = copy.deepcopy(cfg)
    validator = _validator(load_schema(schema_path))
    import jsonschema.exceptions

    error = jsonschema.exceptions.best_match(validator.iter_errors(cfg))
    if error is not None:
        raise UserError(_describe(error))
    expand_runs(cfg)  # registry checks, conflicting duplicates, dead exclusions
    return cfg


def noise_variants(cfg: dict, dataset: str) -> dict[str, dict[str, Any]]:
    """{tag: {kind, rate, seed}} of every noise variant a dataset's grids name."""
    from lambdapipe.noise import noise_spec

    out: dict[str, dict[str, Any]] = {}
    for grid in cfg["datasets"][dataset]["grids"]:
        for entry in grid["noise"]:
            for rate in entry["rates"]:
                spec = noise_spec(entry["kind"], rate, entry.get("seed", 0))
                out[spec.tag] = {"kind": spec.kind, "rate": spec.rate, "seed": spec.seed}
    return out


def _frozen(d: dict) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in d.items()))


def _check_models(names: set[str], where: dict[str, str]) -> None:
    from lambdapipe.models import list_models

    known = set(list_models())
    for name in sorted(names - known):
        raise UserError(f"invalid model {name!r} in config {where[name]}: expected a registered "
                        f"model (see `lambdapipe models`), e.g. "
                        + ", ".join(sorted(known)[:8]) + ", ...")


def expand_runs(cfg: dict) -> list[Run]:
    """Every run of the grid, minus exclusions, each once (in config order)."""
    from lambdapipe.noise import noise_spec
    from lambdapipe.recipes import get_recipe

    runs: dict[str, Run] = {}
    model_where: dict[str, str] = {}
    for dataset, dcfg in cfg["datasets"].items():
        for g, grid in enumerate(dcfg["grids"]):
            where = f"datasets.{dataset}.grids[{g}]"
            label = grid.get("name") or where
            try:
                get_recipe(grid["recipe"], grid.get("set") or {})
            except UserError as exc:
                raise UserError(f"config {where}.set: {exc}") from None
            for m, model in enumerate(grid["models"]):
                model_where.setdefault(model, f"{where}.models[{m}]")
            for entry in grid["noise"]:
                for rate in entry["rates"]:
                    tag = noise_spec(entry["kind"], rate, entry.get("seed", 0)).tag
                    for model in grid["models"]:
                        for seed in grid["seeds"]:
                            run = Run(dataset, tag, model, seed, grid["recipe"],
                                      _frozen(grid.get("set") or {}),
                                      _frozen(grid.get("model_args") or {}), label)
                            old = runs.get(run.path)
                            if old is not None and old.settings() != run.settings():
                                raise UserError(
                                    f"run {run.path} is in grids {old.grid!r} and {label!r} with "
                                    "different recipe, set or model_args: give it one setting")
                            runs.setdefault(run.path, run)
    _check_models(set(model_where), model_where)

    kept = list(runs.values())
    for i, pattern in enumerate(cfg.get("exclude") or []):
        def matches(run: Run, pattern=pattern) -> bool:
            return all(getattr(run, k) == v for k, v in pattern.items())

        if not any(matches(r) for r in runs.values()):
            raise UserError(f"config exclude[{i}] {pattern!r} matches no run of the grid: "
                            "check its spelling")
        kept = [r for r in kept if not matches(r)]
    if not kept:
        raise UserError("the config excludes every run: nothing to train")
    return kept


def run_args(run: Run) -> dict[str, str]:
    """CLI fragments for `lambdapipe train` (shell-quoted), for the Snakemake rule's params."""
    import shlex

    def kv(pairs: tuple[tuple[str, Any], ...], flag: str) -> str:
        parts = []
        for key, raw in pairs:
            value = json.loads(raw)
            text = "none" if value is None else (
                json.dumps(value) if isinstance(value, list | dict | bool) else str(value))
            if isinstance(value, bool):
                text = text.lower()
            parts.append(f"{flag} {shlex.quote(f'{key}={text}')}")
        return " ".join(parts)

    return {"recipe": run.recipe, "set": kv(run.overrides, "--set"),
            "model_args": kv(run.model_args, "--model-arg")}


def prepare_args(cfg: dict, dataset: str) -> str:
    """CLI options of `lambdapipe prepare` for a dataset's `prepare:` block."""
    opts = cfg["datasets"][dataset].get("prepare") or {}
    parts = [f"--split-seed {int(opts.get('split_seed', 0))}"]
    if opts.get("val_size") is not None:
        parts.append(f"--val-size {int(opts['val_size'])}")
    if opts.get("image_size") is not None:
        parts.append(f"--image-size {int(opts['image_size'])}")
    return " ".join(parts)
