"""Files read back as input are read bounded, as regular files: a noise variant's JSON
(data/prepared.py) and the run files the report reads (report/load.py). A FIFO there used to
hang the command, an oversized file to be read whole."""

from __future__ import annotations

import os

import pytest

from lambdapipe import data
from lambdapipe.data import prepared
from lambdapipe.errors import UserError
from lambdapipe.report import build_report, load


def _one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    target = data.prepare("digits", root, progress=False)
    spec = data.noise_spec("pairflip", 0.1)
    data.make_noise(target, spec)
    return root, target, spec


@pytest.mark.timeout(120)  # the unbounded read hung on the FIFO
@pytest.mark.parametrize("kind", ["fifo", "oversized", "not an object"])
def test_a_noise_variants_json_is_read_bounded(digits, kind):
    root, target, spec = digits
    meta = target / "noise" / f"{spec.tag}.json"
    saved = meta.read_bytes()
    meta.unlink()
    if kind == "fifo":
        os.mkfifo(meta)
    elif kind == "oversized":
        with open(meta, "wb") as fh:
            fh.truncate(prepared.VARIANT_MAX + 1)  # sparse: costs no disk
    else:
        meta.write_text("[1, 2]")
    try:
        if kind != "not an object":
            with pytest.raises(UserError) as exc:
                data.load_split(root, "digits", "train", spec.tag)
            assert str(meta) in _one_line(exc) and "noise variant" in str(exc.value)
            with pytest.raises(UserError):
                prepared.describe(target, spec)
        data.make_noise(target, spec)  # prepare writes the variant anew over what is there
        assert meta.read_bytes() == saved
        data.load_split(root, "digits", "train", spec.tag)
    finally:
        if not meta.is_file() or meta.stat().st_size != len(saved):  # never read a FIFO
            meta.unlink(missing_ok=True)
            meta.write_bytes(saved)


def _run(root):
    """A finished run as train leaves it (the fields the report needs)."""
    d = root / "cifar10" / "clean" / "resnet20x1" / "0"
    d.mkdir(parents=True)
    (d / "config.json").write_text('{"model": "resnet20x1", "model_args": {}, "data": '
                                   '{"image_size": 32}}')
    (d / "metrics.csv").write_text("iteration,train_loss,val_acc\n100,1.0,0.5\n200,0.5,0.7\n")
    (d / "summary.json").write_text(
        '{"model": "resnet20x1", "dataset": "cifar10", "noise": "clean", "seed": 0, '
        '"status": "ok", "tst_acc": 0.9, "val_acc": 0.9, "params": 272474, '
        '"image_size": 32}')
    return d


@pytest.mark.parametrize("name", ["summary.json", "metrics.csv", "config.json"])
def test_the_reports_run_files_are_read_bounded(tmp_path, monkeypatch, name):
    d = _run(tmp_path / "runs")
    build_report(tmp_path / "runs", tmp_path / "ok")  # the run as written is fine
    limit = 4096
    monkeypatch.setattr(load, "JSON_MAX", limit)
    monkeypatch.setattr(load, "CSV_MAX", limit)
    with open(d / name, "ab") as fh:
        fh.truncate(limit + 1)
    with pytest.raises(UserError) as exc:
        build_report(tmp_path / "runs", tmp_path / "out")
    assert str(d / name) in _one_line(exc) and f"larger than {limit:,} bytes" in str(exc.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(120)
def test_explain_arrays_are_read_bounded_by_what_they_expand_to(tmp_path, monkeypatch):
    import numpy as np

    path = tmp_path / "explain_test.npz"
    np.savez_compressed(path, gradcam=np.zeros((64, 64), np.float32), indices=np.arange(4))
    arrays = load.read_explain(path)
    assert arrays["gradcam"].shape == (64, 64) and list(arrays["indices"]) == [0, 1, 2, 3]

    # 16 KB of zeros compress to ~100 bytes: under the limit on disk, over it inflated
    monkeypatch.setattr(load, "EXPLAIN_MAX", 4096)
    assert path.stat().st_size < 4096
    with pytest.raises(UserError) as exc:
        load.read_explain(path)
    assert str(path) in _one_line(exc) and "expand to" in str(exc.value)

    path.write_bytes(b"not a zip")
    with pytest.raises(UserError) as exc:
        load.read_explain(path)
    assert _one_line(exc).startswith(f"malformed {path}")

    path.unlink()
    os.mkfifo(path)
    with pytest.raises(UserError) as exc:
        load.read_explain(path)
    assert "not a regular file" in _one_line(exc)
