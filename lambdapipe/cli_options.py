"""The options, choices and error handling every `lambdapipe` verb shares (cli.py wires the
verbs). Nothing heavy is imported here: `lambdapipe --help` stays instant."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import click

from lambdapipe.errors import UserError

DATA_DIR_ENV = "LAMBDAPIPE_DATA_DIR"
MIRROR_ENV = "LAMBDAPIPE_MIRROR"


def user_errors(fn):
    """Bad input (`UserError`) becomes a click usage error (exit 2); a `StateError` or a
    failed artefact write (disk full) one `Error:` line with exit 1 and no usage block.
    Every command's messages are logged at $LAMBDAPIPE_LOG_LEVEL (checked here, first)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from lambdapipe import logs
        from lambdapipe.atomic import WriteError
        from lambdapipe.errors import StateError

        try:
            logs.configure()
            return fn(*args, **kwargs)
        except StateError as exc:  # not the command line's fault: no "Usage:" block
            raise click.ClickException(str(exc)) from None
        except UserError as exc:
            raise click.UsageError(str(exc)) from None
        except WriteError as exc:  # disk full, quota, read-only: the old artefact is intact
            raise click.ClickException(str(exc)) from None

    return wrapper


class RegistryChoice(click.Choice):
    """A `click.Choice` over a registry's names, read when a value or `--help` needs them,
    not when the CLI is imported: the dataset registry imports numpy, and `lambdapipe
    --help` stays instant. (click copies `choices` into a tuple in its constructor.)"""

    def __init__(self, names, case_sensitive: bool = True) -> None:
        self._names = names
        self.case_sensitive = case_sensitive

    @property
    def choices(self) -> tuple[str, ...]:  # read each time: tests register datasets
        return tuple(self._names())


def dataset_names() -> list[str]:
    from lambdapipe.data.registry import DATASETS

    return sorted(DATASETS)


def recipe_names() -> list[str]:
    from lambdapipe.recipes import list_recipes

    return list_recipes()


# The kinds of lambdapipe.noise.KINDS (tests/test_cli.py keeps them equal): spelt out here
# because importing lambdapipe.noise imports numpy.
NOISE_KINDS = ("symmetric", "pairflip")


class DeviceChoice(click.Choice):
    """auto, cpu, cuda or cuda:N: a Choice so `--help` and shell completion list them, with
    cuda:N for any N (lambdapipe.gpu checks N against the devices there are)."""

    def __init__(self) -> None:
        super().__init__(["auto", "cpu", "cuda", "cuda:N"])

    def convert(self, value, param, ctx):
        if isinstance(value, str) and re.fullmatch(r"cuda:\d+", value.strip()):
            return value.strip()
        return super().convert(value, param, ctx)

    def shell_complete(self, ctx, param, incomplete):
        from click.shell_completion import CompletionItem

        return [CompletionItem(c) for c in ("auto", "cpu", "cuda", "cuda:0")
                if c.startswith(incomplete)]


def device_option(help: str = "auto (a free GPU if any, else CPU), cpu, cuda (a free GPU, "
                              "an error without one), cuda:N."):
    return click.option("--device", type=DeviceChoice(), default="auto", show_default=True,
                        help=help)


def parse_key_values(values: tuple[str, ...], what: str) -> dict[str, object]:
    """`k=16 r=23 x=none` -> {"k": 16, "r": 23, "x": None}; YAML rules give the value types."""
    from lambdapipe.yamlfile import safe_yaml

    out: dict[str, object] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=what)
        try:  # within the config limits: a --set value is YAML too
            out[key.strip()] = safe_yaml(raw, "value") if raw.strip() else ""
        except UserError as exc:
            problem = str(exc).removeprefix("value is not valid YAML: ")
            raise click.BadParameter(f"{key.strip()}={raw[:80]!r}: value is not YAML "
                                     f"({problem}); quote it or use a number, word, list or "
                                     "mapping", param_hint=what) from None
    return out


# Options spelled the same on every verb.
DATASET_CHOICE = RegistryChoice(dataset_names)
dataset_option = click.option(
    "--dataset", type=DATASET_CHOICE, required=True, help="Dataset name."
)
gpu_lock_dir_option = click.option(
    "--gpu-lock-dir", type=click.Path(file_okay=False, path_type=Path),
    default=lambda: os.environ.get("LAMBDAPIPE_GPU_LOCK_DIR") or None,
    help="Where per-GPU lock files live, so concurrent jobs never share a GPU.")
data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=lambda: os.environ.get(DATA_DIR_ENV, "data"),
    show_default="data or $" + DATA_DIR_ENV,
    help="Root holding raw/ archives and prepared/ arrays.",
)
mirror_option = click.option(
    "--mirror",
    type=click.Path(file_okay=False, path_type=Path),
    default=lambda: os.environ.get(MIRROR_ENV) or None,
    help=f"Directory of pre-fetched archives, looked in before the network (or ${MIRROR_ENV}).",
)
noise_options = [
    click.option("--noise", "noise_rate", type=float, default=0.0, show_default=True,
                 help="Fraction of training labels to corrupt, in [0, 1)."),
    click.option("--noise-kind", type=click.Choice(NOISE_KINDS), default="symmetric",
                 show_default=True, help="How labels are corrupted."),
    click.option("--noise-seed", type=int, default=0, show_default=True,
                 help="Seed of the noise draw (independent of the training seed)."),
]


def with_noise_options(fn):
    for opt in reversed(noise_options):
        fn = opt(fn)
    return fn


def int_list(value: str, option: str, minimum: int, example: str) -> list[int]:
    """'1,2' -> [1, 2] for a comma-separated option, or one line naming the option."""
    try:
        numbers = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        numbers = []
    if not numbers or min(numbers) < minimum:
        raise UserError(f"invalid {option} {value!r}: expected integers >= {minimum}, "
                        f"e.g. {example}")
    return numbers
