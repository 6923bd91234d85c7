"""Prepared datasets (digits, offline): splits, manifest checksums, idempotency, loading, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from lambdapipe import data
from lambdapipe.cli import main
from lambdapipe.data.prepared import stratified_holdout
from lambdapipe.errors import UserError


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    prepared = data.prepare("digits", root, progress=False)
    data.make_noise(prepared, data.noise_spec("symmetric", 0.25))
    return root


def test_registry():
    info = data.dataset_info("cifar10")
    assert (info.num_classes, info.image_size, info.classes[9]) == (10, 32, "truck")
    assert data.dataset_info("tinyimagenet64").image_size == 64
    assert data.dataset_info("imagenette").image_size == 128
    assert data.dataset_info("digits").num_classes == 10
    with pytest.raises(UserError, match="invalid dataset 'mnist'.*cifar10"):
        data.dataset_info("mnist")


def test_digits_splits_and_arrays(digits_dir):
    manifest = data.load_manifest(digits_dir, "digits")
    assert manifest["splits"] == {"train": 1294, "val": 144, "test": 359}
    splits = {s: data.load_split(digits_dir, "digits", s) for s in ("train", "val", "test")}
    for s in splits.values():
        assert s.images.dtype == np.uint8 and s.images.shape[1:] == (16, 16, 3)
        assert s.labels.dtype == np.int64 and len(s.labels) == len(s.images)
        np.testing.assert_array_equal(s.labels, s.clean_labels)
    assert splits["train"].images.max() == 255
    # Stratified: every class's share in val/test within one sample of its share overall.
    total = np.bincount(np.concatenate([s.clean_labels for s in splits.values()]))
    for name in ("val", "test"):
        counts = np.bincount(splits[name].clean_labels, minlength=10)
        expected = total * len(splits[name]) / total.sum()
        assert np.all(np.abs(counts - expected) < 1.0 + 1e-9), name
    # Disjoint: no image appears in two splits.
    flat = {n: {s.tobytes() for s in sp.images} for n, sp in splits.items()}
    assert not flat["train"] & flat["test"] and not flat["val"] & flat["test"]


def test_stratified_holdout_sizes_and_seed():
    labels = np.repeat(np.arange(10), [5000] * 10)
    val = stratified_holdout(labels, 5000, seed=1)
    assert len(val) == 5000 and np.all(np.bincount(labels[val]) == 500)
    assert len(np.unique(val)) == 5000
    assert np.array_equal(val, stratified_holdout(labels, 5000, seed=1))
    assert not np.array_equal(val, stratified_holdout(labels, 5000, seed=2))
    odd = stratified_holdout(np.repeat(np.arange(3), [10, 20, 31]), 7, seed=0)
    assert len(odd) == 7


def test_val_size_and_split_seed(tmp_path):
    p = data.prepare("digits", tmp_path, val_size=300, split_seed=4, progress=False)
    m = json.loads((p / "manifest.json").read_text())
    assert m["splits"]["val"] == 300 and m["splits"]["train"] == 1438 - 300
    other = data.prepare("digits", tmp_path / "b", val_size=300, split_seed=5, progress=False)
    assert not np.array_equal(np.load(p / "val_labels.npy"), np.load(other / "val_labels.npy")) \
        or not np.array_equal(np.load(p / "val_images.npy"), np.load(other / "val_images.npy"))
    # The test split never depends on the split seed.
    assert np.array_equal(np.load(p / "test_images.npy"), np.load(other / "test_images.npy"))


def test_noisy_train_labels_only(digits_dir):
    train = data.load_split(digits_dir, "digits", "train", "symmetric-0.25")
    assert np.sum(train.labels != train.clean_labels) == round(0.25 * len(train))
    assert train.noise == "symmetric-0.25"
    val = data.load_split(digits_dir, "digits", "val", "symmetric-0.25")
    np.testing.assert_array_equal(val.labels, val.clean_labels)
    meta = json.loads((digits_dir / "prepared/digits/noise/symmetric-0.25.json").read_text())
    assert meta["num_flipped"] == round(0.25 * len(train))
    assert meta["realised_rate"] == pytest.approx(0.25, abs=1 / len(train))
    t = np.array(meta["transition_matrix"])
    assert t.shape == (10, 10) and np.allclose(t.sum(1), 1)
    assert np.all(np.diag(t) < 0.95)
    with pytest.raises(UserError, match="--noise 0.4 --noise-kind pairflip"):
        data.load_split(digits_dir, "digits", "train", "pairflip-0.4")


def test_idempotent_and_conflicting_params(digits_dir):
    target = digits_dir / "prepared/digits"
    mtime = (target / "train_images.npy").stat().st_mtime_ns
    assert data.prepare("digits", digits_dir, progress=False) == target
    assert (target / "train_images.npy").stat().st_mtime_ns == mtime
    # val_size equal to the default's count is the same split: accepted.
    assert data.prepare("digits", digits_dir, val_size=144, progress=False) == target
    with pytest.raises(UserError, match="other parameters.*val_count 144 -> 500"):
        data.prepare("digits", digits_dir, val_size=500, progress=False)
    with pytest.raises(UserError, match="split_seed 0 -> 1"):
        data.prepare("digits", digits_dir, split_seed=1, progress=False)
    npy = data.make_noise(target, data.noise_spec("symmetric", 0.25))
    assert npy.stat().st_mtime_ns == (target / "noise/symmetric-0.25.npy").stat().st_mtime_ns
    assert not list(target.parent.glob(".digits.*"))  # no temp dir left behind


def test_corrupted_array_caught(tmp_path):
    target = data.prepare("digits", tmp_path, progress=False)
    path = target / "val_images.npy"
    arr = np.load(path)
    arr[0, 0, 0, 0] ^= 1
    np.save(path, arr)
    with pytest.raises(UserError, match="corrupted prepared array .*val_images.npy"):
        data.load_split(tmp_path, "digits", "val")
    data.load_split(tmp_path, "digits", "train")  # other arrays still fine
    with pytest.raises(UserError, match="corrupted prepared array"):
        data.prepare("digits", tmp_path, progress=False)


def test_corrupted_noise_variant_caught(tmp_path):
    target = data.prepare("digits", tmp_path, progress=False)
    npy = data.make_noise(target, data.noise_spec("pairflip", 0.1))
    labels = np.load(npy)
    labels[0] = (labels[0] + 1) % 10
    np.save(npy, labels)
    with pytest.raises(UserError, match="corrupted prepared array .*pairflip-0.1.npy"):
        data.load_split(tmp_path, "digits", "train", "pairflip-0.1")
    # make_noise notices the mismatch and rewrites the variant.
    data.make_noise(target, data.noise_spec("pairflip", 0.1))
    data.load_split(tmp_path, "digits", "train", "pairflip-0.1")


def test_missing_dataset_and_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="lambdapipe prepare --dataset digits"):
        data.load_split(tmp_path, "digits", "train")
    with pytest.raises(UserError, match="invalid split"):
        data.load_split(tmp_path, "digits", "dev")
    for kwargs, match in [({"val_fraction": 1.0}, "val fraction"),
                          ({"val_size": 0}, "val size"),
                          ({"val_size": 10, "val_fraction": 0.1}, "not both"),
                          ({"image_size": 20}, "image size"),
                          ({"split_seed": -1}, "split seed")]:
        with pytest.raises(UserError, match=match):
            data.prepare("digits", tmp_path, progress=False, **kwargs)
    assert not (tmp_path / "prepared").exists()  # refused before any work


def test_cli_prepare_digits(tmp_path):
    result = CliRunner().invoke(main, ["prepare", "--dataset", "digits", "--noise", "0.25",
                                       "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "train_images.npy" in result.output and "1294 x 16 x 16 x 3" in result.output
    assert "splits: train 1294 / val 144 / test 359" in result.output
    assert "noise symmetric-0.25: 324 of 1294 train labels changed" in result.output
    assert (tmp_path / "prepared/digits/noise/symmetric-0.25.npy").exists()
    bad = CliRunner().invoke(main, ["prepare", "--dataset", "digits", "--noise", "1.0",
                                    "--data-dir", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "invalid noise rate 1.0" in bad.output
    assert not (tmp_path / "x").exists()


def test_concurrent_prepares_agree_and_are_deterministic(tmp_path):
    """Two processes preparing one dataset at once (parallel Snakemake jobs): both succeed,
    one directory wins, and its arrays equal a third, separate preparation bit for bit."""
    code = ("import sys; from pathlib import Path; from lambdapipe import data;"
            "p = data.prepare('digits', Path(sys.argv[1]), progress=False);"
            "data.make_noise(p, data.noise_spec('symmetric', 0.4, 2))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "shared")],
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    data.prepare("digits", tmp_path / "alone", progress=False)
    shared = data.load_manifest(tmp_path / "shared", "digits")
    alone = data.load_manifest(tmp_path / "alone", "digits")
    assert shared["arrays"] == alone["arrays"]
    assert [p.name for p in (tmp_path / "shared/prepared").iterdir()] == ["digits"]
    noisy = data.load_split(tmp_path / "shared", "digits", "train", "symmetric-0.4-s2")
    assert np.sum(noisy.labels != noisy.clean_labels) == round(0.4 * len(noisy))


@pytest.mark.parametrize("shape", [(0, 4, 4, 3), (7, 5, 5, 3), (3,)])
def test_reserved_memmap_writes_what_open_memmap_writes(tmp_path, shape):
    """Same header, same bytes as np.lib.format.open_memmap, so prepared arrays (and their
    sha256 in the manifest) do not change; and the blocks are allocated, not a sparse file
    that a store into a mapped page could fail to back (SIGBUS on a full disk)."""
    from lambdapipe.atomic import reserved_memmap

    rng = np.random.default_rng(0)
    values = rng.integers(0, 255, size=shape, dtype=np.uint8)
    ours = reserved_memmap(tmp_path / "ours.npy", np.uint8, shape)
    theirs = np.lib.format.open_memmap(tmp_path / "theirs.npy", mode="w+", dtype=np.uint8,
                                       shape=shape)
    ours[...] = values
    theirs[...] = values
    ours.flush()
    theirs.flush()
    del ours, theirs
    assert (tmp_path / "ours.npy").read_bytes() == (tmp_path / "theirs.npy").read_bytes()
    st = (tmp_path / "ours.npy").stat()
    assert st.st_blocks * 512 >= st.st_size
