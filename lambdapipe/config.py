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
import functools
import itertools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from lambdapipe.errors import UserError
from lambdapipe.yamlfile import read_config_file, safe_yaml  # noqa: F401 - the Snakefile's and cli's
from lambdapipe.yamlfile import read_yaml_file as _read_yaml

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
    variant: str = ""  # a grid's named setting (fp16, lr0.001): its own run directory
    data: tuple[tuple[str, Any], ...] = ()  # the prepared data's params (data_settings)

    @property
    def path(self) -> str:
        """The run's identity (docs/architecture.md): where its results live."""
        return f"{self.dataset}/{self.noise}/{self.model_dir}/{self.seed}"

    @property
    def key(self) -> str:
        """The run as the config names it (no fingerprint): one setting per key."""
        name = f"{self.model}@{self.variant}" if self.variant else self.model
        return f"{self.dataset}/{self.noise}/{name}/{self.seed}"

    @property
    def model_dir(self) -> str:
        """`resnet18-3f9a2c1e`, `resnet18@fp16-0b7d44e2` for a variant: the fingerprint of
        the run's settings (lambdapipe/provenance.py), so one directory holds one setting."""
        from lambdapipe.provenance import model_dir

        return model_dir(self.model, self.variant, self.run_settings)

    @functools.cached_property
    def run_settings(self) -> dict:
        """What `lambdapipe train` will record as this run's settings (config.json
        `identity.settings`): the values as the CLI receives them from `run_args`."""
        from lambdapipe.provenance import run_settings

        args = {k: _as_received(v) for k, v in self.model_args}
        return run_settings(self.model, args, _resolved_recipe(self.recipe, self.overrides),
                            dict(self.data) or None)

    def settings(self) -> tuple:
        return (self.recipe, self.overrides, self.model_args)


def _arg_text(value: Any) -> str:
    """A config value as text on the `train` command line (`--set k=TEXT`)."""
    text = "none" if value is None else (
        json.dumps(value) if isinstance(value, list | dict | bool) else str(value))
    return text.lower() if isinstance(value, bool) else text


def _as_received(frozen: str) -> Any:
    """A frozen config value as `lambdapipe train` parses its text (YAML rules, cli.py)."""
    text = _arg_text(json.loads(frozen))
    return yaml.safe_load(text) if text.strip() else ""


@functools.lru_cache(maxsize=4096)
def _resolved_recipe(name: str, overrides: tuple[tuple[str, str], ...]) -> dict:
    """The recipe `train` resolves from `--recipe name --set ...` (a grid's runs share one)."""
    from lambdapipe.recipes import get_recipe

    return get_recipe(name, {k: _as_received(v) for k, v in overrides}).to_dict()


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
    if "propertyNames" in error.absolute_schema_path and "pattern" in schema:
        return (f"invalid name {inst!r} in config key {where!r}: expected letters, digits, "
                "'.' and '-' only")
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
    return check_config(_read_yaml(path))


def load_configs(paths: Iterable[str | Path]) -> dict:
    """Several YAML configs merged as `snakemake --configfile A B` merges them (later files
    update earlier ones key by key, nested mappings recursively), then validated."""
    merged: dict = {}
    for path in paths:
        cfg = _read_yaml(path) or {}
        if not isinstance(cfg, dict):
            raise UserError(f"config file {str(path)!r} must be a mapping of keys")
        _update(merged, cfg)
    return check_config(merged)


def _update(base: dict, over: dict) -> None:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _update(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


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
    if cfg.get("mirror") is not None:
        from lambdapipe.validate import check_path_text

        check_path_text(cfg["mirror"], "config mirror")
    cfg = apply_shrink(cfg)
    expand_runs(cfg)  # registry checks, conflicting duplicates, dead exclusions
    return cfg


def apply_shrink(cfg: dict) -> dict:
    """The demo-size stand-in of a published grid (`shrink:`, usually a second --configfile).

    Each dataset named in `shrink.datasets` keeps its grids but trains them on the mapped
    dataset (e.g. cifar10 -> digits); every other dataset is dropped. Model args and recipe
    overrides are merged into each grid, seeds, models and rates narrowed, and
    `report.published_as` records which source table the stand-in runs are read against.
    Idempotent: the result has no `shrink` key, so the Snakefile may check twice.
    """
    shrink = cfg.pop("shrink", None)
    if not shrink:
        return cfg
    datasets: dict[str, Any] = {}
    for source, target in shrink["datasets"].items():
        if source not in cfg["datasets"]:
            raise UserError(f"config shrink.datasets names {source!r}, which the config does not "
                            "train: expected one of " + ", ".join(cfg["datasets"]))
        if target in datasets:
            raise UserError(f"config shrink.datasets maps two datasets onto {target!r}: "
                            "map one source dataset per stand-in")
        grids = []
        for grid in copy.deepcopy(cfg["datasets"][source]["grids"]):
            grid["model_args"] = {**grid.get("model_args", {}), **shrink.get("model_args", {})}
            grid["set"] = _merge_set(grid.get("set", {}), shrink.get("set", {}))
            for extra in (grid.get("variants") or {}).values():
                extra["set"] = _merge_set(extra.get("set", {}), shrink.get("set", {}))
            if shrink.get("seeds"):
                grid["seeds"] = list(shrink["seeds"])
            if shrink.get("models"):
                grid["models"] = [m for m in grid["models"] if m in shrink["models"]]
            if shrink.get("rates"):
                for entry in grid["noise"]:
                    entry["rates"] = [r for r in entry["rates"] if r in shrink["rates"]]
                grid["noise"] = [e for e in grid["noise"] if e["rates"]]
            if grid["models"] and grid["noise"]:
                grids.append(grid)
        if not grids:
            raise UserError(f"config shrink leaves no run of dataset {source!r}: "
                            "check shrink.models and shrink.rates")
        datasets[target] = {"prepare": shrink.get("prepare", {"split_seed": 0}), "grids": grids}
        cfg.setdefault("report", {}).setdefault("published_as", {})[target] = source
    cfg["datasets"] = datasets
    kept = []
    for pattern in cfg.get("exclude") or []:
        if "dataset" in pattern and pattern["dataset"] not in shrink["datasets"]:
            continue
        pattern = dict(pattern)
        if "dataset" in pattern:
            pattern["dataset"] = shrink["datasets"][pattern["dataset"]]
        kept.append(pattern)
    cfg["exclude"] = [p for p in kept if _matches_any(cfg, p)]
    return cfg


def _merge_set(base: dict, over: dict) -> dict:
    """Recipe overrides `over` on `base`; a budget or interval in one unit clears the other."""
    from lambdapipe.recipes import EXCLUSIVE_PAIRS

    cleared = {EXCLUSIVE_PAIRS[k] for k in over if k in EXCLUSIVE_PAIRS}
    return {**{k: v for k, v in base.items() if k not in cleared}, **over}


def _matches_any(cfg: dict, pattern: dict) -> bool:
    """An exclusion whose runs the shrink removed is dropped rather than reported as dead."""
    probe = copy.deepcopy(cfg)
    probe["exclude"] = []
    return any(all(getattr(r, k) == v for k, v in pattern.items()) for r in expand_runs(probe))


def data_settings(cfg: dict, dataset: str) -> dict[str, Any]:
    """The `params` that `lambdapipe prepare` will record in the dataset's manifest.json for
    its `prepare:` block (image size, split seed, val count): part of every run's identity."""
    from lambdapipe.data import dataset_info
    from lambdapipe.data.splits import prepare_params, split_sizes

    info = dataset_info(dataset)
    opts = cfg["datasets"][dataset].get("prepare") or {}
    params = prepare_params(info, info.check_image_size(opts.get("image_size")),
                            int(opts.get("split_seed", 0)),
                            split_sizes(info, None, opts.get("val_size"))[1])
    return dict(sorted(params.items()))


def stale_prepared(cfg: dict, data_dir: Path) -> list[str]:
    """One line per dataset whose prepared data (manifest.json `params`) is not what the
    config asks for. Snakemake would not prepare it again in a clone without its metadata,
    and runs would train on data other than their identity says."""
    lines = []
    for dataset in cfg["datasets"]:
        manifest = Path(data_dir) / "prepared" / dataset / "manifest.json"
        try:
            params = json.loads(manifest.read_text()).get("params")
        except (OSError, ValueError, AttributeError):
            continue  # not prepared yet (or unreadable: prepare's own check says so)
        wanted = data_settings(cfg, dataset)
        if params != wanted:
            lines.append(f"{manifest.parent} was prepared with {params}, the config asks for "
                         f"{wanted}: delete {manifest.parent} to prepare it again")
    return lines


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


def _check_rate(dataset: str, kind: str, rate: float, where: str) -> None:
    """A rate the noise step would refuse after the data is prepared, refused now."""
    from lambdapipe.data import dataset_info
    from lambdapipe.noise import max_rate

    info = dataset_info(dataset)
    top = max_rate(kind, info.num_classes, info.classes)
    if rate > top:
        raise UserError(f"invalid {kind} noise rate {rate!r} for {dataset} in config {where}: "
                        f"expected at most {top:g} (only classes with a {kind} partner can "
                        "flip)")


def _check_model_args(cfg: dict, at: str, dataset: str, model: str, args: dict) -> None:
    """The checks `train` makes on a model and its args (the registry's, on the meta device,
    at the dataset's classes and prepared image size), so check-config accepts nothing that
    train would refuse."""
    from lambdapipe.data import dataset_info
    from lambdapipe.validate import check_model

    info = dataset_info(dataset)
    try:
        size = info.check_image_size((cfg["datasets"][dataset].get("prepare") or {})
                                     .get("image_size"))
    except UserError as exc:
        raise UserError(f"config datasets.{dataset}.prepare.image_size: {exc}") from None
    try:
        check_model(model, info.num_classes, size, args)
    except UserError as exc:
        raise UserError(f"config {at} for model {model} on {dataset} ({size} px): "
                        f"{exc}") from None


def _variants(grid: dict) -> list[tuple[str, dict]]:
    """(name, {set, model_args}) per variant; a grid without `variants` is one unnamed one."""
    return list((grid.get("variants") or {"": {}}).items())


def expand_runs(cfg: dict) -> list[Run]:
    """Every run of the grid, minus exclusions, each once (in config order)."""
    from lambdapipe.distributed import check, check_train
    from lambdapipe.noise import noise_spec
    from lambdapipe.protocol import check_noise
    from lambdapipe.recipes import get_recipe
    from lambdapipe.validate import check_seed

    world = check_train(cfg.get("train") or {})  # train.gpus
    runs: dict[str, Run] = {}
    model_where: dict[str, str] = {}
    data: dict[str, tuple] = {}
    builds: dict[tuple, tuple[str, str, str, dict]] = {}  # model x args x dataset -> where
    for dataset, dcfg in cfg["datasets"].items():
        for g, grid in enumerate(dcfg["grids"]):
            where = f"datasets.{dataset}.grids[{g}]"
            label = grid.get("name") or where
            for name, extra in _variants(grid):
                at = f"{where}.variants.{name}.set" if name else f"{where}.set"
                try:
                    recipe = get_recipe(grid["recipe"], {**(grid.get("set") or {}),
                                                         **extra.get("set", {})})
                    check(world, recipe.batch_size, recipe.drop_last, recipe.compile)
                    for entry in grid["noise"]:  # before any job: train+val needs clean labels
                        for rate in entry["rates"]:
                            check_noise(recipe, noise_spec(entry["kind"], rate,
                                                           entry.get("seed", 0)).tag)
                except UserError as exc:
                    raise UserError(f"config {at}: {exc}") from None
            for m, model in enumerate(grid["models"]):
                model_where.setdefault(model, f"{where}.models[{m}]")
                for name, extra in _variants(grid):
                    args = {**(grid.get("model_args") or {}), **extra.get("model_args", {})}
                    at = (f"{where}.variants.{name}.model_args" if extra.get("model_args")
                          else f"{where}.model_args")
                    builds.setdefault((dataset, model, json.dumps(args, sort_keys=True,
                                                                  default=repr)),
                                      (at, dataset, model, args))
            for s, seed in enumerate(grid["seeds"]):
                check_seed(seed, f"seed in config {where}.seeds[{s}]")
            if dataset not in data:
                try:
                    data[dataset] = tuple(sorted(data_settings(cfg, dataset).items()))
                except UserError as exc:
                    raise UserError(f"config datasets.{dataset}.prepare: {exc}") from None
            for n, entry in enumerate(grid["noise"]):
                for rate in entry["rates"]:
                    tag = noise_spec(entry["kind"], rate, entry.get("seed", 0)).tag
                    _check_rate(dataset, entry["kind"], rate, f"{where}.noise[{n}]")
                    for model, seed, (variant, extra) in itertools.product(
                            grid["models"], grid["seeds"], _variants(grid)):
                        run = Run(dataset, tag, model, seed, grid["recipe"],
                                  _frozen({**(grid.get("set") or {}),
                                           **extra.get("set", {})}),
                                  _frozen({**(grid.get("model_args") or {}),
                                           **extra.get("model_args", {})}),
                                  label, variant, data[dataset])
                        old = runs.get(run.key)
                        if old is not None and old.settings() != run.settings():
                            raise UserError(
                                f"run {run.key} is in grids {old.grid!r} and {label!r} with "
                                "different recipe, set or model_args: give it one setting")
                        runs.setdefault(run.key, run)
    _check_models(set(model_where), model_where)
    for at, dataset, model, args in builds.values():
        _check_model_args(cfg, at, dataset, model, args)

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


def pack_cells(runs: Iterable[Run]) -> list[tuple[str, list[Run]]]:
    """The seeds of each grid cell, for `train: {pack: seeds}`: one (cell directory, runs by
    seed) per (dataset, noise, model, recipe, variant), so that one job trains them together.
    Runs of one directory with different settings (from two grids) are two cells."""
    cells: dict[tuple, list[Run]] = {}
    for run in runs:
        cells.setdefault((run.dataset, run.noise, run.model_dir, run.settings()), []).append(run)
    return [(f"{d}/{n}/{m}", sorted(rs, key=lambda r: r.seed))
            for (d, n, m, _), rs in cells.items()]


def run_args(run: Run) -> dict[str, str]:
    """CLI fragments for `lambdapipe train` (shell-quoted), for the Snakemake rule's params."""
    import shlex

    def kv(pairs: tuple[tuple[str, Any], ...], flag: str) -> str:
        return " ".join(f"{flag} {shlex.quote(f'{key}={_arg_text(json.loads(raw))}')}"
                        for key, raw in pairs)

    return {"model": run.model, "recipe": run.recipe, "set": kv(run.overrides, "--set"),
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


def published_as_args(cfg: dict) -> str:
    """`lambdapipe report --published-as STANDIN=SOURCE ...` from `report.published_as`."""
    pairs = (cfg.get("report") or {}).get("published_as") or {}
    return " ".join(f"--published-as {k}={v}" for k, v in sorted(pairs.items()))
