"""Reading what runs wrote: summary.json, metrics.csv, config.json, and the published CSVs.

Everything is read and validated before a single artefact is written, so a malformed file
stops the report with one line naming it instead of leaving half a report behind. Only the
run-directory contract (docs/architecture.md) is relied on; no training code is imported.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from lambdapipe.atomic import keep_read_only, read_small_bytes
from lambdapipe.errors import UserError
from lambdapipe.reference import PUBLISHED_DIR
from lambdapipe.status import STATUSES, finite

PUBLISHED_FILES = {
    "resnet": ("published_resnet_baselines.csv",
               ("dataset", "depth", "width", "params_m", "val_acc", "test_acc", "test_nll",
                "iter_per_min", "training_time_h", "precision")),
    "lambda": ("published_lambda_cifar10.csv",
               ("model", "k", "h", "u", "m", "params_m", "test_acc_pct", "epochs")),
    "imagenette": ("published_imagenette_noisy_report.csv",
                   ("architecture", "noise_pct", "best_train_loss", "best_val_loss",
                    "training_time_s")),
}

# The summary.json fields in contract order; runs.csv keeps this order, then any extras.
SUMMARY_FIELDS = (
    "model", "dataset", "noise", "seed", "params", "val_acc", "tst_acc", "tst_nll", "ece",
    "wall_time_s", "iter_per_min", "iterations", "status", "diverged_at", "skipped_steps",
    "precision", "recipe", "best_train_loss", "best_val_loss", "train_clean_acc",
)
REQUIRED_SUMMARY = ("model", "dataset", "noise", "seed", "status")
NUMERIC_SUMMARY = (
    "params", "val_acc", "tst_acc", "tst_nll", "ece", "wall_time_s", "iter_per_min",
    "iterations", "diverged_at", "skipped_steps", "best_train_loss", "best_val_loss",
    "train_clean_acc",
)
TEXT_SUMMARY = ("model", "dataset", "noise", "precision", "recipe")
METRIC_COLUMNS = (
    "iteration", "epoch", "lr", "train_loss", "train_acc", "train_clean_acc", "val_loss",
    "val_acc", "images_per_s", "elapsed_s",
)
# Files whose presence marks a directory as a run (finished or not).
RUN_MARKERS = ("summary.json", "config.json", "metrics.csv")

_NOISE_TAG = re.compile(r"^(?P<kind>[a-z]+)-(?P<rate>[0-9.eE+-]+?)(?:-s(?P<seed>\d+))?$")


@dataclass(frozen=True)
class Noise:
    """A parsed noise tag; `condition` drops the noise seed so its draws pool like seeds."""

    kind: str
    rate: float
    seed: int

    @property
    def condition(self) -> str:
        return "clean" if self.rate == 0 else f"{self.kind}-{self.rate:g}"


def parse_noise_tag(tag: str) -> Noise:
    """`clean`, `symmetric-0.25`, `pairflip-0.05-s3` -> Noise; the grammar of data.noise_spec."""
    clean = re.fullmatch(r"clean(?:-s(\d+))?", tag)
    if clean:
        return Noise("clean", 0.0, int(clean.group(1) or 0))
    m = _NOISE_TAG.match(tag)
    if not m:
        raise ValueError(tag)
    rate = float(m.group("rate"))
    if not 0 <= rate < 1:
        raise ValueError(tag)
    return Noise("clean" if rate == 0 else m.group("kind"), rate, int(m.group("seed") or 0))


@dataclass
class Run:
    """One finished run: its summary, resolved model args and (possibly empty) metrics."""

    run_id: str
    path: Path
    summary: dict
    noise: Noise
    model_args: dict
    metrics: pd.DataFrame | None


@dataclass
class Incomplete:
    """A run directory without summary.json: still running, crashed, or interrupted."""

    run_id: str
    path: Path
    model: str
    dataset: str
    noise: str
    seed: str
    last_iteration: float | None
    elapsed_s: float | None


@dataclass
class Collection:
    runs: list[Run] = field(default_factory=list)
    incomplete: list[Incomplete] = field(default_factory=list)


def _malformed(path: Path, why: str) -> UserError:
    return UserError(f"malformed {path}: {why}")


# Every file the report reads is input (a pulled or copied run directory): read bounded, as
# a regular file (a FIFO would hang the report, a link to /dev/zero never end it).
JSON_MAX = 16 << 20  # a run's summary.json or config.json is a few KB
CSV_MAX = 512 << 20  # a long run's metrics.csv is a few MB


def _csv(path: Path) -> io.BytesIO:
    return io.BytesIO(read_small_bytes(path, CSV_MAX, "CSV table"))


EXPLAIN_MAX = 256 << 20  # `explain --images 8` writes ~100 KB; a few hundred 224 px images fit


def read_explain(path: Path) -> dict:
    """The arrays of an explain_<split>.npz, read bounded: the file, and what its members
    expand to (an .npz is a zip: a small file can inflate without end), at most EXPLAIN_MAX."""
    import zipfile

    import numpy as np

    buf = io.BytesIO(read_small_bytes(path, EXPLAIN_MAX, "explain arrays"))
    try:
        with zipfile.ZipFile(buf) as zf:
            inflated = sum(info.file_size for info in zf.infolist())
    except (OSError, zipfile.BadZipFile) as exc:
        raise _malformed(path, str(exc)) from None
    if inflated > EXPLAIN_MAX:
        raise UserError(f"refusing {path}: its arrays expand to {inflated:,} bytes, more than "
                        f"{EXPLAIN_MAX:,}; expected the file `lambdapipe explain` wrote")
    buf.seek(0)
    try:
        with np.load(buf, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise _malformed(path, str(exc)) from None


def read_json_object(path: Path) -> dict:
    try:
        obj = json.loads(read_small_bytes(path, JSON_MAX, "run file").decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise _malformed(path, f"not JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _malformed(path, f"unreadable ({exc})") from None
    except RecursionError:
        raise _malformed(path, "JSON nested too deep") from None
    if not isinstance(obj, dict):
        raise _malformed(path, f"expected a JSON object, found {type(obj).__name__}")
    return obj


def read_summary(path: Path) -> tuple[dict, Noise]:
    """Strict on the identity fields and on types; a missing optional field is just absent."""
    s = read_json_object(path)
    for key in REQUIRED_SUMMARY:
        if s.get(key) is None:
            raise _malformed(path, f"missing key {key!r}")
    for key in TEXT_SUMMARY:
        if s.get(key) is not None and not isinstance(s[key], str):
            raise _malformed(path, f"{key} must be a string, found {s[key]!r}")
    if not isinstance(s["seed"], int) or isinstance(s["seed"], bool):
        raise _malformed(path, f"seed must be an integer, found {s['seed']!r}")
    if s["status"] not in STATUSES:
        raise _malformed(path, f"status {s['status']!r} is not one of {', '.join(STATUSES)}")
    for key in NUMERIC_SUMMARY:
        value = s.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise _malformed(path, f"{key} must be a number or null, found {value!r}")
    try:
        noise = parse_noise_tag(s["noise"])
    except ValueError:
        raise _malformed(path, f"noise tag {s['noise']!r} is not clean or <kind>-<rate>"
                               "[-s<seed>]") from None
    return s, noise


def read_metrics(path: Path) -> pd.DataFrame:
    """metrics.csv as numbers; unknown extra columns are kept, non-numeric known ones refused."""
    try:
        df = pd.read_csv(_csv(path))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _malformed(path, f"not a CSV table ({reason})") from None
    if "iteration" not in df.columns:
        raise _malformed(path, "no 'iteration' column")
    for col in METRIC_COLUMNS:
        if col in df.columns:
            try:
                df[col] = pd.to_numeric(df[col])
            except (ValueError, TypeError):
                raise _malformed(path, f"column {col!r} is not numeric") from None
    return df


def _config_image_size(config_path: Path) -> int | None:
    """The training resolution config.json records (`data.image_size`), None if it does not."""
    if not config_path.is_file():
        return None
    size = (read_json_object(config_path).get("data") or {}).get("image_size")
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def _model_args(summary: dict, summary_path: Path, config_path: Path) -> dict:
    """The run's model overrides: from summary.json (train writes them there), else config."""
    if "model_args" in summary:
        args, source = summary["model_args"] or {}, summary_path
    elif config_path.is_file():
        args, source = read_json_object(config_path).get("model_args") or {}, config_path
    else:
        return {}
    if not isinstance(args, dict):
        raise _malformed(source, f"model_args must be an object, found {args!r}")
    return args


def collect_runs(root: Path) -> Collection:
    """Every run directory under `root`: finished ones (summary.json) and incomplete ones."""
    if not root.is_dir():
        raise UserError(f"runs directory {root} does not exist")
    run_dirs = sorted({p.parent for marker in RUN_MARKERS for p in root.rglob(marker)
                       if p.is_file()})
    out = Collection()
    for d in run_dirs:
        run_id = d.relative_to(root).as_posix() if d != root else "."
        metrics_path = d / "metrics.csv"
        metrics = read_metrics(metrics_path) if metrics_path.is_file() else None
        if (d / "summary.json").is_file():
            keep_read_only(d / "summary.json")  # a pulled or copied run: protected again
            summary, noise = read_summary(d / "summary.json")
            args = _model_args(summary, d / "summary.json", d / "config.json")
            if summary.get("image_size") is None:  # runs from before train wrote it there
                summary["image_size"] = _config_image_size(d / "config.json")
            out.runs.append(Run(run_id, d, summary, noise, args, metrics))
        else:
            out.incomplete.append(_incomplete(root, d, run_id, metrics))
    if not out.runs:
        extra = f" ({len(out.incomplete)} incomplete)" if out.incomplete else ""
        raise UserError(f"no finished runs under {root}{extra}: a run is finished once its "
                        "summary.json exists")
    return out


def _incomplete(root: Path, d: Path, run_id: str, metrics: pd.DataFrame | None) -> Incomplete:
    cfg = read_json_object(d / "config.json") if (d / "config.json").is_file() else {}
    parts = d.relative_to(root).parts
    # <dataset>/<noise tag>/<model>/<seed> when the standard layout is used.
    from_path = dict(zip(("dataset", "noise", "model", "seed"), parts[-4:], strict=False)) \
        if len(parts) >= 4 else {}

    def ident(key: str) -> str:
        value = cfg.get(key, from_path.get(key))
        return "—" if value is None else str(value)

    last_it = elapsed = None
    if metrics is not None and len(metrics):
        last_it = finite(metrics["iteration"].iloc[-1])
        if "elapsed_s" in metrics.columns:
            elapsed = finite(metrics["elapsed_s"].iloc[-1])
    return Incomplete(run_id, d, ident("model"), ident("dataset"), ident("noise"),
                      ident("seed"), last_it, elapsed)


def read_published(directory: Path | None) -> dict[str, pd.DataFrame]:
    """The three published reference tables, checked for the columns the report matches on."""
    directory = PUBLISHED_DIR if directory is None else Path(directory)
    if not directory.is_dir():
        raise UserError(f"published directory {directory} does not exist")
    tables = {}
    for key, (name, columns) in PUBLISHED_FILES.items():
        path = directory / name
        if not path.is_file():
            raise UserError(f"published directory {directory} lacks {name}: expected "
                            + ", ".join(n for n, _ in PUBLISHED_FILES.values()))
        try:
            df = pd.read_csv(_csv(path))
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise _malformed(path, f"not a CSV table ({type(exc).__name__})") from None
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise _malformed(path, "missing column(s) " + ", ".join(missing))
        tables[key] = df
    return tables
