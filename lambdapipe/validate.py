"""One validator per concept, shared by every face that reads that concept.

`check-config` (lambdapipe/config.py), `train` (cli.py, train.py) and the checkpoint check
(evaluate.py) all call these, so a value one of them accepts is never refused by another
later - after a job started, or after a file was written. Each raises one `UserError` line
naming the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

from lambdapipe.errors import UserError, bad_value

# A training seed is stored in summary.json and read back into int64 columns by the report,
# and torch.manual_seed takes at most 64 bits: refuse what would overflow either.
SEED_MAX = 2**63 - 1


def check_seed(value: Any, what: str = "seed") -> int:
    """A training seed: an integer in [0, SEED_MAX] (numpy integers accepted)."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
            or not 0 <= int(value) <= SEED_MAX:
        raise bad_value(what, value, f"an integer in [0, {SEED_MAX}]")
    return int(value)


def check_path_text(value: Any, what: str) -> str:
    """A path given as text (config `mirror:`, `--out`): not empty, no NUL byte, which no
    system call accepts."""
    text = os.fspath(value) if isinstance(value, str | os.PathLike) else value
    if not isinstance(text, str) or not text or "\x00" in text:
        raise bad_value(what, value, "a non-empty path without NUL bytes")
    return text


def check_out_dir(out: Path) -> None:
    """`--out` can become a run directory: a directory or nothing yet (not a file, not a
    dangling symlink), whose nearest existing ancestor is writable (not read-only)."""
    out = Path(check_path_text(out, "--out"))
    if out.is_symlink() and not out.exists():
        raise UserError(f"invalid --out {str(out)!r}: a symbolic link to "
                        f"{os.readlink(out)!r}, which does not exist; expected a directory "
                        "or a path that does not exist yet")
    if out.exists() and not out.is_dir():
        raise UserError(f"invalid --out {str(out)!r}: it is a file; expected a directory or a "
                        "path that does not exist yet")
    probe = out if out.exists() else next(
        (p for p in out.absolute().parents if p.exists()), Path("/"))
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"invalid --out {str(out)!r}: {probe} is not writable (read-only "
                        "filesystem or permissions); expected a writable directory")


def check_model(name: Any, num_classes: int, image_size: int, model_args: Any):
    """The registry's checks of a model name and its args, run on the meta device."""
    from lambdapipe.models import check_model as registry_check

    if not isinstance(name, str):
        raise bad_value("model", name, "a registered model name (see `lambdapipe models`)")
    return registry_check(name, num_classes, image_size, model_args)


def _finite_numbers(value: Any, n: int) -> bool:
    return (isinstance(value, list) and len(value) == n and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        for v in value))


def check_data_fields(data: Any, where: str) -> dict[str, Any]:
    """The `data` block of a run config: classes, image size, channel mean and std."""
    if not isinstance(data, dict):
        raise UserError(f"invalid {where}.data {data!r}: expected a mapping")
    n, size = data.get("num_classes"), data.get("image_size")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise bad_value(f"{where}.data.num_classes", n, "an integer >= 1")
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise bad_value(f"{where}.data.image_size", size, "an integer >= 8")
    classes = data.get("classes")
    if not (isinstance(classes, list) and len(classes) == n
            and all(isinstance(c, str) for c in classes)):
        raise bad_value(f"{where}.data.classes", classes, f"a list of {n} class names")
    if not _finite_numbers(data.get("mean"), 3):
        raise bad_value(f"{where}.data.mean", data.get("mean"), "a list of 3 finite numbers")
    if not _finite_numbers(data.get("std"), 3) or min(data["std"]) <= 0:
        raise bad_value(f"{where}.data.std", data.get("std"),
                        "a list of 3 finite numbers > 0")
    return data


def check_run_config(config: Any, where: str) -> dict[str, Any]:
    """A run config as `train` writes it (config.json, and inside every checkpoint), with the
    validators `train` applies to its input: recipe, model + args, dataset, noise, seed, data.
    `where` names the file in the message."""
    from lambdapipe.data import dataset_info
    from lambdapipe.noise import parse_noise_tag
    from lambdapipe.recipes import ADDED_FIELDS, Recipe, get_recipe

    RECIPE_FIELDS = [f.name for f in dataclasses.fields(Recipe)]  # noqa: N806

    if not isinstance(config, dict):
        raise UserError(f"invalid run config in {where}: expected a mapping, got "
                        f"{type(config).__name__}")
    missing = [k for k in ("model", "model_args", "dataset", "noise", "seed", "recipe", "data")
               if k not in config]
    if missing:
        raise UserError(f"invalid run config in {where}: missing {', '.join(missing)}")
    try:
        if not isinstance(config["dataset"], str):
            raise bad_value("dataset", config["dataset"], "a dataset name")
        dataset_info(config["dataset"])
        if not isinstance(config["noise"], str):
            raise bad_value("noise tag", config["noise"], "a noise tag, e.g. symmetric-0.25")
        parse_noise_tag(config["noise"])
        check_seed(config["seed"])
        recipe = config["recipe"]
        if not isinstance(recipe, dict) or not isinstance(recipe.get("name"), str):
            raise bad_value("recipe", recipe, "a mapping of recipe fields with a name")
        missing = sorted(set(RECIPE_FIELDS) - set(recipe) - set(ADDED_FIELDS))
        if missing:  # train writes every field; evaluate reads them without defaults
            # (a config older than ADDED_FIELDS lacks those: their defaults are its behaviour)
            raise bad_value("recipe", recipe["name"], "every recipe field (missing "
                            + ", ".join(missing) + ")")
        get_recipe(recipe["name"], {k: v for k, v in recipe.items() if k != "name"})
        data = check_data_fields(config["data"], "config")
        check_model(config["model"], data["num_classes"], data["image_size"],
                    config["model_args"])
    except UserError as exc:
        raise UserError(f"invalid run config in {where}: {exc}") from None
    return config
