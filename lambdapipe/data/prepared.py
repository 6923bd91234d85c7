"""Prepared datasets: stratified splits, checksummed arrays, noisy-label variants, loading.

`prepare` builds `prepared/<dataset>` in a temporary sibling directory and renames the whole
directory into place at the end, so a directory with that name is always complete; its
`manifest.json` records the parameters, and a second `prepare` with other parameters is
refused rather than silently overwriting arrays that finished runs were trained on.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lambdapipe import __version__
from lambdapipe.atomic import (
    NO_SPACE,
    WriteError,
    no_space,
    pid_alive,
    read_json,
    reserved_memmap,
    sha256_file,
    write_json,
    write_with,
)
from lambdapipe.data import sources
from lambdapipe.data import imagenet
from lambdapipe.data.download import ensure_archive
from lambdapipe.data.imagenet2012 import read_ilsvrc2012
from lambdapipe.data.manifest import read_manifest
from lambdapipe.data.registry import IMAGENETTE_NOISE_COLUMNS, DatasetInfo, dataset_info
from lambdapipe.data.sources import stratified_holdout
from lambdapipe.data.splits import prepare_params, resolve_val_count
from lambdapipe.data.splits import split_sizes as split_sizes  # project, config read it here
from lambdapipe.data.whole import ARRAYS as WHOLE_ARRAYS
from lambdapipe.data.whole import WholeImages, load_whole, save_whole
from lambdapipe.errors import StateError, UserError, bad_value
from lambdapipe.noise import (
    CLEAN,
    NoiseSpec,
    corrupt,
    parse_noise_tag,
    realised_rate,
    transition_matrix,
)

SPLITS = ("train", "val", "test")
# Sets made of several archives that users download themselves (data/imagenet.py).
IMAGENET_READERS = {"imagenet-downsampled": imagenet.read_downsampled,
                    "ilsvrc2012": read_ilsvrc2012}
# 2: Imagenette keeps training images whole (data/whole.py), its params gained `train_images`
# and `resize`: a format-1 directory is refused in one line, its runs get new identities.
FORMAT_VERSION = 2


def prepared_dir(data_dir: Path, dataset: str) -> Path:
    return Path(data_dir) / "prepared" / dataset


# --------------------------------------------------------------------------- prepare
def prepare(dataset: str, data_dir: Path, *, mirror: Path | None = None,
            val_fraction: float | None = None, val_size: int | None = None, split_seed: int = 0,
            image_size: int | None = None, progress: bool = True, url: str | None = None) -> Path:
    """Make `data_dir/prepared/<dataset>` (idempotent); return its path.

    The val split is a stratified sample of the official training set drawn with
    `split_seed` only, so it is the same for every noise variant and training seed.
    """
    info = dataset_info(dataset)
    val_count, val_request = resolve_val_count(info, val_fraction, val_size)
    size = info.check_image_size(image_size)
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
        raise bad_value("split seed", split_seed, "an integer >= 0")
    params = prepare_params(info, size, split_seed, val_count)

    target = prepared_dir(data_dir, dataset)
    if target.exists():
        _check_existing(target, dataset, params)
        return target

    archive = None
    if info.url is not None:
        archive = ensure_archive(info, Path(data_dir) / "raw", mirror=mirror, url=url,
                                 progress=progress)
    elif info.source in IMAGENET_READERS:  # users' own copies, from raw/ or the mirror
        archive = imagenet.locate(info, Path(data_dir) / "raw", mirror)
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_orphans(target.parent, dataset)
        with _signals_raise():
            try:
                tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(dataset), suffix=".tmp",
                                            dir=target.parent))
                # mkdtemp's 0700 would hide the data from other users of a shared dir
                tmp.chmod(0o755)
                _build(info, archive, tmp, params, val_request, progress)
                try:
                    os.rename(tmp, target)
                except OSError:
                    if not (target / "manifest.json").exists():
                        raise
                    # Another process finished the same dataset first: keep theirs if it
                    # agrees.
                    _check_existing(target, dataset, params)
            finally:
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        if exc.errno in NO_SPACE and not isinstance(exc, WriteError):
            raise no_space(exc.filename or tmp or target, None, exc) from None
        raise
    return target


# --------------------------------------------------------------------------- temporaries
# `.<dataset>.<pid>@<host>.<random>.tmp`: the owner is in the name from the moment mkdtemp
# creates it, so no later prepare can mistake a directory still being filled for a leftover.
_TMP_RE = re.compile(r"^\.(?P<dataset>[^.]+)\.(?P<pid>\d+)@(?P<host>.+)\.[^.]+\.tmp$")


def _tmp_prefix(dataset: str) -> str:
    return f".{dataset}.{os.getpid()}@{socket.gethostname()}."


def remove_orphans(parent: Path, dataset: str) -> list[Path]:
    """Remove `parent/.<dataset>.*.tmp` directories whose owner (pid, this host) is gone: a
    SIGKILLed or power-cut prepare leaves one behind, possibly filling the disk. A directory
    of another host, or of a live process, is left alone; so is any name we did not make."""
    removed = []
    host = socket.gethostname()
    for path in Path(parent).glob(f".{dataset}.*.tmp"):
        m = _TMP_RE.match(path.name)
        if (m is None or m["dataset"] != dataset or m["host"] != host
                or int(m["pid"]) == os.getpid() or pid_alive(int(m["pid"]))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


class Terminated(BaseException):
    """SIGTERM or SIGINT while a prepare holds a temporary directory (which `finally`
    removes, where the default SIGTERM action would kill the process on the spot)."""

    def __init__(self, signum: int):
        super().__init__(f"{signal.Signals(signum).name}: prepare interrupted")
        self.signum = signum


@contextlib.contextmanager
def _signals_raise():
    """SIGTERM (SLURM preemption, `kill`) and SIGINT raise `Terminated` for the duration, so
    the temporary directory is removed; the process then dies of the same signal, as its
    parent expects. Handlers can only be set in the main thread: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        for sig in wanted:  # a second signal must not interrupt the cleanup of the first
            signal.signal(sig, signal.SIG_IGN)
        raise Terminated(signum)

    wanted = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}
    previous = {sig: signal.getsignal(sig) for sig in wanted}
    for sig, default in wanted.items():
        if previous[sig] is default:  # leave an ignored (nohup) or custom handler alone
            signal.signal(sig, handler)
    try:
        yield
    except Terminated as exc:
        for sig, old in previous.items():
            signal.signal(sig, old)
        if exc.signum == signal.SIGINT:
            raise KeyboardInterrupt from None
        signal.signal(exc.signum, signal.SIG_DFL)
        os.kill(os.getpid(), exc.signum)
        raise SystemExit(128 + exc.signum) from None  # not reached unless blocked
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _check_existing(target: Path, dataset: str, params: dict) -> None:
    manifest_path = target / "manifest.json"
    if not manifest_path.exists():
        raise UserError(f"{target} exists but has no manifest.json (not made by `lambdapipe "
                        f"prepare`?): remove it and run `lambdapipe prepare --dataset {dataset}`")
    manifest = read_manifest(manifest_path)
    old = manifest["params"]
    if manifest.get("format_version", 1) < FORMAT_VERSION and old != params:
        raise UserError(f"{target} was prepared by an older lambdapipe (data format "
                        f"{manifest.get('format_version', 1)}, now {FORMAT_VERSION}: "
                        "Imagenette training crops now come from whole images): remove the "
                        "directory and run `lambdapipe prepare` again")
    if old != params:
        diff = ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in params.items()
                         if old.get(k) != v)
        raise UserError(f"{target} was prepared with other parameters ({diff}); refusing to "
                        f"overwrite it: remove the directory to re-prepare, or pass the old values")
    _verify_arrays(target, manifest)


def _build(info: DatasetInfo, archive: Path | None, out: Path, params: dict, val_request: dict,
           progress: bool) -> None:
    scratch = out / ".scratch"
    scratch.mkdir()
    official = sources.read(info, archive, scratch, params["image_size"], progress,
                            IMAGENET_READERS.get(info.source))
    classes = list(official.classes)
    if len(classes) != info.num_classes:
        raise UserError(f"archive {archive} has {len(classes)} classes, expected "
                        f"{info.num_classes} for {info.name}: not the official archive")
    n_train = len(official.train_labels)
    if params["val_count"] >= n_train:
        raise bad_value(f"val size for {info.name}", params["val_count"], f"< {n_train}")
    if info.val_is_val_folder:  # the report's split: val is the val folder, test the same
        train_idx = np.arange(n_train)
        val_part = (official.test_images, official.test_labels, None)
    else:
        val_idx = stratified_holdout(official.train_labels, params["val_count"],
                                     _split_seed(info.name, params["split_seed"]))
        train_idx = np.setdiff1d(np.arange(n_train), val_idx)
        val_part = (official.train_images, official.train_labels, val_idx)
    parts = {
        "train": (official.train_images, official.train_labels, train_idx),
        "val": val_part,
        "test": (official.test_images, official.test_labels, None),
    }
    arrays: dict[str, dict] = {}
    counts: dict[str, list[int]] = {}
    for split, (images, labels, idx) in parts.items():
        labels = np.asarray(labels, dtype=np.int64)
        if idx is not None:
            labels = labels[idx]
        _save(out / f"{split}_images.npy", images, idx)
        _save(out / f"{split}_labels.npy", labels, None)
        counts[split] = np.bincount(labels, minlength=info.num_classes).tolist()
    for split, (images, labels) in official.extra_tests.items():
        labels = np.asarray(labels, dtype=np.int64)
        _save(out / f"{split}_images.npy", images, None)
        _save(out / f"{split}_labels.npy", labels, None)
        counts[split] = np.bincount(labels, minlength=info.num_classes).tolist()
    if official.train_whole is not None:
        save_whole(out, official.train_whole, train_idx)
    extra_noise = {}
    for rate, noisy in official.noisy_train_labels.items():
        name = f"official_noise/{IMAGENETTE_NOISE_COLUMNS[rate]}.npy"
        (out / "official_noise").mkdir(exist_ok=True)
        _save(out / name, np.asarray(noisy, dtype=np.int64)[train_idx], None)
        extra_noise[f"{rate:g}"] = name
    shutil.rmtree(scratch)
    for path in sorted(out.rglob("*.npy")):
        arr = np.load(path, mmap_mode="r")
        arrays[path.relative_to(out).as_posix()] = {
            "sha256": sha256_file(path), "shape": list(arr.shape), "dtype": str(arr.dtype)}
    manifest = {
        "format_version": FORMAT_VERSION,
        "dataset": info.name,
        "num_classes": info.num_classes,
        "classes": classes,
        "image_size": params["image_size"],
        "params": params,
        "requested": {**val_request, "split_seed": params["split_seed"],
                      "image_size": params["image_size"]},
        "source": official.source,
        "splits": {s: int(sum(c)) for s, c in counts.items()},
        "class_counts": counts,
        "arrays": arrays,
        "official_noise": extra_noise,
        "extra_tests": sorted(official.extra_tests),
        "notes": info.note,
        "lambdapipe_version": __version__,
    }
    write_json(out / "manifest.json", manifest)
    _write_variant(out, manifest, CLEAN)


def _split_seed(dataset: str, split_seed: int) -> int:
    from lambdapipe.noise import stable_seed

    return stable_seed(dataset, "val-split", split_seed)


def _save(path: Path, source: np.ndarray, idx: np.ndarray | None, chunk: int = 4096) -> None:
    """np.save of `source[idx]` in chunks, so memory-mapped sources never load whole."""
    n = len(source) if idx is None else len(idx)
    out = reserved_memmap(path, source.dtype, (n, *source.shape[1:]))
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        out[start:stop] = source[start:stop] if idx is None else source[idx[start:stop]]
    out.flush()
    del out


# --------------------------------------------------------------------------- verification
_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _sha256_cached(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


def _verify_file(path: Path, expected: str) -> None:
    if not path.exists():
        raise StateError(f"missing prepared array {path}: remove {path.parent} and run "
                        "`lambdapipe prepare` again")
    if _sha256_cached(path) != expected:
        raise StateError(f"corrupted prepared array {path} (sha256 differs from the manifest): "
                        f"remove {path.parent} and run `lambdapipe prepare` again")


def _verify_arrays(target: Path, manifest: dict, names: list[str] | None = None) -> None:
    for name, entry in manifest["arrays"].items():
        if names is None or name in names:
            _verify_file(target / name, entry["sha256"])


def load_manifest(data_dir: Path, dataset: str) -> dict:
    dataset_info(dataset)
    path = prepared_dir(data_dir, dataset) / "manifest.json"
    if not path.exists():
        raise StateError(f"dataset {dataset!r} is not prepared in {Path(data_dir)}: run "
                        f"`lambdapipe prepare --dataset {dataset} --data-dir {data_dir}`")
    return read_manifest(path)


# --------------------------------------------------------------------------- noise variants
VARIANT_MAX = 64 << 20  # noise/<tag>.json, read bounded: its c x c matrix, ~10 bytes a cell


def _variant_paths(prepared: Path, spec: NoiseSpec) -> tuple[Path, Path]:
    return prepared / "noise" / f"{spec.tag}.npy", prepared / "noise" / f"{spec.tag}.json"


def make_noise(prepared: Path, spec: NoiseSpec) -> Path:
    """Write `noise/<tag>.{npy,json}` for the train split (idempotent); return the .npy path."""
    prepared = Path(prepared)
    manifest = read_manifest(prepared / "manifest.json")
    npy, meta = _variant_paths(prepared, spec)
    if npy.exists() and meta.exists():
        with contextlib.suppress(ValueError, KeyError, TypeError):  # else: written anew
            if read_json(meta, VARIANT_MAX, "noise variant")["sha256"] == sha256_file(npy):
                return npy
    _verify_arrays(prepared, manifest, ["train_labels.npy"])
    return _write_variant(prepared, manifest, spec)


def _official_column(manifest: dict, spec: NoiseSpec) -> str | None:
    """Imagenette's published noisy labels stand for symmetric noise at their rates (seed 0)."""
    if spec.kind != "symmetric" or spec.seed != 0:
        return None
    return manifest.get("official_noise", {}).get(f"{spec.rate:g}")


def _write_variant(prepared: Path, manifest: dict, spec: NoiseSpec) -> Path:
    clean = np.load(prepared / "train_labels.npy")
    c = manifest["num_classes"]
    official = _official_column(manifest, spec)
    if official is not None:
        noisy = np.load(prepared / official)
        how = f"official noisy_imagenette.csv column ({official})"
    else:
        noisy = corrupt(clean, c, spec, key=manifest["dataset"], classes=manifest["classes"])
        how = "generated by lambdapipe.noise"
    npy, meta = _variant_paths(prepared, spec)
    write_with(npy, lambda fh: np.save(fh, noisy))
    flips = int(np.sum(noisy != clean))
    write_json(meta, {
        "tag": spec.tag, "kind": spec.kind, "rate": spec.rate, "seed": spec.seed,
        "dataset": manifest["dataset"], "source": how, "num_train": int(len(clean)),
        "num_flipped": flips, "realised_rate": realised_rate(clean, noisy),
        "transition_matrix": transition_matrix(clean, noisy, c).round(6).tolist(),
        "train_labels_sha256": manifest["arrays"]["train_labels.npy"]["sha256"],
        "sha256": sha256_file(npy),
    })
    return npy


# --------------------------------------------------------------------------- reading
@dataclass
class Split:
    """One split as training/evaluation sees it; `labels` are noisy only for `train`."""

    dataset: str
    split: str
    noise: str
    images: np.ndarray  # uint8 N x H x W x 3, memory-mapped read-only
    labels: np.ndarray  # int64
    clean_labels: np.ndarray  # int64
    num_classes: int
    classes: list[str]
    # train of a dataset kept whole (Imagenette): the images before any crop, memory-mapped
    whole: WholeImages | None = None

    def __len__(self) -> int:
        return len(self.labels)


def load_split(data_dir: Path, dataset: str, split: str, noise: str = "clean",
               verify: bool = True) -> Split:
    """Read one split; `noise` (a tag) replaces the labels of the train split only.

    val and test always carry clean labels, whatever `noise` says: model selection and the
    reported test accuracy are measured against the truth.
    """
    if split not in SPLITS:
        extra: tuple[str, ...] = ()
        with contextlib.suppress(StateError):  # an extra test set (ImageNet-V2) when prepared
            extra = tuple(load_manifest(data_dir, dataset).get("extra_tests", ()))
        if split not in extra:
            raise bad_value("split", split, (*SPLITS, *extra))
    spec = parse_noise_tag(noise)
    manifest = load_manifest(data_dir, dataset)
    if manifest["source"].get("storage") == "jpeg-index":
        raise UserError(f"{dataset} is prepared as an index of JPEGs in its archives, not as "
                        "arrays: read it with lambdapipe.data.stream.open_split (train and "
                        "evaluate stream it: lambdapipe/feed.py)")
    root = prepared_dir(data_dir, dataset)
    names = [f"{split}_images.npy", f"{split}_labels.npy"]
    whole_kept = split == "train" and WHOLE_ARRAYS[0] in manifest["arrays"]
    names += list(WHOLE_ARRAYS) if whole_kept else []
    if verify:
        _verify_arrays(root, manifest, names)
    images = np.load(root / names[0], mmap_mode="r")
    whole = load_whole(root) if whole_kept else None
    clean = np.load(root / names[1])
    labels = clean
    if split == "train" and not spec.is_clean:
        npy, meta = _variant_paths(root, spec)
        if not (npy.exists() and meta.exists()):
            raise StateError(
                f"noise variant {spec.tag!r} of {dataset} is not prepared: run `lambdapipe "
                f"prepare --dataset {dataset} --noise {spec.rate:g} --noise-kind {spec.kind}"
                + (f" --noise-seed {spec.seed}`" if spec.seed else "`"))
        info = read_json(meta, VARIANT_MAX, "noise variant")
        if verify:
            _verify_file(npy, info["sha256"])
        labels = np.load(npy)
        if len(labels) != len(clean) or info.get("dataset") != dataset:
            raise UserError(f"noise variant {npy} does not belong to {dataset}'s train split: "
                            f"remove it and run `lambdapipe prepare` again")
    if split != "train":
        assert labels is clean  # noise never reaches val/test
    return Split(dataset=dataset, split=split, noise=spec.tag if split == "train" else "clean",
                 images=images, labels=labels, clean_labels=clean,
                 num_classes=manifest["num_classes"], classes=list(manifest["classes"]),
                 whole=whole)


# --------------------------------------------------------------------------- reporting
def describe(prepared: Path, spec: NoiseSpec) -> list[str]:
    """What `prepare` wrote, for the terminal: arrays, split sizes, realised noise."""
    prepared = Path(prepared)
    manifest = read_manifest(prepared / "manifest.json")
    req = manifest["requested"]
    val = (f"val_size {req['val_size']}" if "val_size" in req
           else f"val_fraction {req['val_fraction']:g}")
    lines = [f"prepared {manifest['dataset']} in {prepared} "
             f"({manifest['num_classes']} classes, {manifest['image_size']} px)"]
    for name, entry in manifest["arrays"].items():
        shape = " x ".join(str(s) for s in entry["shape"])
        lines.append(f"  {name:<34} {entry['dtype']:<6} {shape}")
    s = manifest["splits"]
    lines.append(f"splits: train {s['train']} / val {s['val']} / test {s['test']} "
                 f"(stratified val, {val}, split seed {manifest['params']['split_seed']})")
    npy, meta = _variant_paths(prepared, spec)
    if meta.exists():
        info = read_json(meta, VARIANT_MAX, "noise variant")
        lines.append(f"noise {spec.tag}: {info['num_flipped']} of {info['num_train']} train "
                     f"labels changed (realised rate {info['realised_rate']:.4f}; "
                     f"{info['source']}) -> {npy.relative_to(prepared)}")
    return lines
