"""Imagenette crops from the whole image: the prepared layout (whole training images beside
resize-then-centre-crop views), the crop sampler over images of any shape (every border
reachable), the crop itself against grid_sample, exact replay on resume, the format bump, and
the report's split (train on all, validate on the val folder)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from fixtures_data import make_imagenette, use_archive

from lambdapipe import data, train
from lambdapipe.augment import (
    DeviceImages,
    augmented_batch,
    plan_epoch,
    resized_crop,
    resized_crop_boxes,
    whole_crop,
)
from lambdapipe.data.registry import resize_size
from lambdapipe.data.sources import centre_crop, decode_shorter_side
from lambdapipe.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest
RRC = ((0.08, 1.0), (3 / 4, 4 / 3))


def ragged(shapes: list[tuple[int, int]], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random images of the given (height, width) as (pixels, index) of WholeImages."""
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    sizes = [h * w for h, w in shapes]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    index = np.array([(s, h, w) for s, (h, w) in zip(starts, shapes, strict=True)],
                     dtype=np.int64)
    return np.concatenate([im.reshape(-1, 3) for im in images]), index


# --------------------------------------------------------------------------- the sampler
@pytest.mark.parametrize("shape", [(30, 47), (52, 21), (24, 24), (16, 90)])
def test_a_crop_can_reach_every_border(shape):
    """Over many draws, boxes lie inside the whole image and touch each of its four borders
    (a centre square cut at prepare time never let them)."""
    height, width = shape
    n = 4000
    extents = torch.tensor([shape] * n)
    top, left, h, w = resized_crop_boxes(n, 16, *RRC, torch.Generator().manual_seed(1),
                                         extents)
    assert bool(((top >= 0) & (left >= 0) & (h >= 1) & (w >= 1)).all())
    assert bool(((top + h <= height) & (left + w <= width)).all())
    assert int(top.min()) == 0 and int((top + h).max()) == height
    assert int(left.min()) == 0 and int((left + w).max()) == width
    area = (h * w).double() / (height * width)
    assert float(area.max()) <= 1.0 and float(area.min()) < 0.15


def test_boxes_follow_each_images_own_shape_in_one_batch():
    shapes = [(30, 47), (52, 21)] * 500
    top, left, h, w = resized_crop_boxes(len(shapes), 16, *RRC,
                                         torch.Generator().manual_seed(2),
                                         torch.tensor(shapes))
    tall = torch.arange(len(shapes)) % 2 == 1
    assert int((left + w)[tall].max()) == 21 and int((top + h)[tall].max()) == 52
    assert int((left + w)[~tall].max()) == 47 and int((top + h)[~tall].max()) == 30


def test_square_images_draw_the_stream_they_drew_before():
    """Runs on square data (CIFAR with random-resized crops) resume onto the same boxes: the
    extents of `size` x `size` images change nothing."""
    a = resized_crop_boxes(300, 32, *RRC, torch.Generator().manual_seed(3))
    b = resized_crop_boxes(300, 32, *RRC, torch.Generator().manual_seed(3),
                           torch.full((300, 2), 32))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_no_box_fits_gives_the_centre_crop_at_the_images_clamped_ratio():
    # a 20 x 60 image (ratio 3) with ratio (1, 2): the widest centred 2:1 box, 20 x 40
    top, left, h, w = resized_crop_boxes(4, 16, (1.0, 1.0), (1.0, 2.0),
                                         torch.Generator().manual_seed(0),
                                         torch.tensor([(20, 60)] * 4))
    assert set(h.tolist()) == {20} and set(w.tolist()) == {40}
    assert set(top.tolist()) == {0} and set(left.tolist()) == {10}


# --------------------------------------------------------------------------- the crop
def test_whole_crop_samples_as_grid_sample_does():
    """On square images the ragged crop and the grid_sample crop read the same points."""
    n, size = 24, 20
    pixels, index = ragged([(size, size)] * n)
    images = torch.from_numpy(pixels.reshape(n, size, size, 3)).permute(0, 3, 1, 2)
    top, left, h, w = resized_crop_boxes(n, size, *RRC, torch.Generator().manual_seed(4))
    flip = torch.arange(n) % 3 == 0
    ours = whole_crop(torch.from_numpy(pixels), torch.from_numpy(index), top, left, h, w,
                      flip, size)
    ref = resized_crop(images, top, left, h, w, flip)
    assert ours.shape == ref.shape == (n, 3, size, size) and ours.dtype == torch.uint8
    assert int((ours.int() - ref.int()).abs().max()) <= 1  # float rounding at .5 only


def test_a_box_at_the_far_corner_is_those_pixels():
    """Known answer: a size x size box in the bottom-right corner of a 30 x 47 image, at
    scale 1, is exactly its last 12 rows and columns; flipped, their mirror."""
    pixels, index = ragged([(30, 47), (52, 21)])
    image = pixels[:30 * 47].reshape(30, 47, 3)
    one = torch.ones(1, dtype=torch.int64)
    args = (torch.from_numpy(pixels), torch.from_numpy(index[:1]), 18 * one, 35 * one,
            12 * one, 12 * one)
    out = whole_crop(*args, torch.zeros(1, dtype=torch.bool), 12)
    want = torch.from_numpy(image[18:30, 35:47]).permute(2, 0, 1)
    assert torch.equal(out[0], want)
    mirrored = whole_crop(*args, torch.ones(1, dtype=torch.bool), 12)
    assert torch.equal(mirrored[0], want.flip(2))
    # the second image: its offset is honoured (its top-left 12 x 12)
    out = whole_crop(torch.from_numpy(pixels), torch.from_numpy(index[1:]), 0 * one, 0 * one,
                     12 * one, 12 * one, torch.zeros(1, dtype=torch.bool), 12)
    second = pixels[30 * 47:].reshape(52, 21, 3)
    assert torch.equal(out[0], torch.from_numpy(second[:12, :12]).permute(2, 0, 1))


def test_resume_replays_the_crops_exactly():
    """A resumed run rebuilds its epoch's plan from (seed, epoch) alone: the batches from a
    fresh plan equal the unbroken run's, step for step; other epochs differ."""
    shapes = [(30, 47), (52, 21), (24, 24), (40, 33)] * 6
    pixels, index = ragged(shapes)
    views = np.zeros((len(shapes), 16, 16, 3), np.uint8)
    labels = np.arange(len(shapes)) % 10
    dev = DeviceImages(views, labels, labels, "cpu", whole=(pixels, index))

    def batches(epoch):
        plan = plan_epoch(len(dev), 5, epoch, 0, True, "cpu", resized_crop=RRC, size=16,
                          extents=dev.extents)
        return [augmented_batch(dev, plan, s, 8) for s in range(3)]

    first, again = batches(1), batches(1)
    for (x, y, c), (x2, y2, c2) in zip(first, again, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(c, c2)
    assert first[0][0].shape == (8, 3, 16, 16)
    assert not torch.equal(torch.cat([b[0] for b in first]),
                           torch.cat([b[0] for b in batches(2)]))


# --------------------------------------------------------------------------- the eval view
def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")  # lossless: the known answer stays exact
    return buf.getvalue()


def test_eval_view_is_resize_then_centre_crop():
    """Known answer: a 40 x 80 image whose left and right quarters are black and middle
    white; resized to shorter side 27 (24 px / 0.875) it is 27 x 54, and the centre 24 x 24
    crop (rows 1-24, columns 15-38) lies inside the white half: all white. The crop of a
    resize is what evaluation sees (no resize-free centre square any more)."""
    assert resize_size(24) == 27 and resize_size(128) == 146 and resize_size(224) == 256
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 20:60] = 255
    whole = decode_shorter_side(_png(image), 27)
    assert whole.shape == (27, 54, 3)
    view = centre_crop(whole, 24)
    assert view.shape == (24, 24, 3) and int(view.min()) == 255
    assert np.array_equal(view, whole[1:25, 15:39])
    assert int(whole[:, :5].max()) == 0  # the black border survives in the whole image


# --------------------------------------------------------------------------- prepare
@pytest.fixture(scope="module")
def nette_archive(tmp_path_factory):
    path = tmp_path_factory.mktemp("raw") / "imagenette2-160.tgz"
    made = make_imagenette(path)
    return path, made


def _prepare(monkeypatch, archive, root, dataset="imagenette", **kw):
    path, made = archive
    use_archive(monkeypatch, dataset, path, made["num_train"])
    return data.prepare(dataset, root, mirror=path.parent, image_size=16, progress=False, **kw)


def test_prepare_keeps_training_images_whole(tmp_path, monkeypatch, nette_archive):
    prepared = _prepare(monkeypatch, nette_archive, tmp_path, val_size=10)
    manifest = data.load_manifest(tmp_path, "imagenette")
    assert manifest["format_version"] == 2
    assert manifest["params"] == {"val_count": 10, "split_seed": 0, "image_size": 16,
                                  "train_images": "whole", "resize": 18}
    train_split = data.load_split(tmp_path, "imagenette", "train")
    whole = train_split.whole
    assert whole is not None and whole.index.shape == (50, 3)
    assert train_split.images.shape == (50, 16, 16, 3)
    # every whole image has shorter side 18, keeps its aspect, and its centre crop is the
    # evaluation view stored beside it
    heights, widths = whole.index[:, 1], whole.index[:, 2]
    assert set(np.minimum(heights, widths).tolist()) == {18}
    assert (heights > widths).any() and (widths > heights).any()
    for i in range(50):
        assert np.array_equal(centre_crop(whole.image(i), 16), train_split.images[i])
    assert whole.pixels.shape == (int((heights * widths).sum()), 3)
    assert data.load_split(tmp_path, "imagenette", "val").whole is None
    # the run identity (provenance) reads the params: a new layout is a new run directory
    assert (prepared / "train_whole.npy").exists()


def test_training_crops_come_from_the_whole_images_and_resume_exactly(tmp_path, monkeypatch,
                                                                     nette_archive):
    _prepare(monkeypatch, nette_archive, tmp_path / "d", val_size=10)

    def cfg(out):
        return train.TrainConfig.build(
            model="resnet20x1", model_args={"base_width": 4}, dataset="imagenette",
            data_dir=tmp_path / "d", noise="clean", seed=0, out=out, recipe="demo",
            overrides={"iterations": 15, "eval_every": 5, "batch_size": 8,
                       "augment": "random-resized-crop", "flip": True},
            deterministic=True)

    unbroken = train.Run(cfg(tmp_path / "a"), "cpu")
    unbroken.start()
    assert unbroken.train_data.whole_pixels is not None  # crops cut from the whole images
    while unbroken.advance():
        pass
    done = unbroken.finish()

    class Interrupt(Exception):
        pass

    def stop_at_10(row):
        if row["iteration"] == 10:
            raise Interrupt

    with pytest.raises(Interrupt):
        train.run(cfg(tmp_path / "b"), callback=stop_at_10)
    resumed = train.run(cfg(tmp_path / "b"))
    timing = {"wall_time_s", "session_time_s", "iter_per_min"}
    assert ({k: v for k, v in resumed.items() if k not in timing}
            == {k: v for k, v in done.items() if k not in timing})


def test_old_prepared_imagenette_is_refused_in_one_line(tmp_path, monkeypatch, nette_archive):
    prepared = _prepare(monkeypatch, nette_archive, tmp_path, val_size=10)
    manifest = json.loads((prepared / "manifest.json").read_text())
    manifest["format_version"] = 1
    manifest["params"] = {"val_count": 10, "split_seed": 0, "image_size": 16}
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError) as err:
        _prepare(monkeypatch, nette_archive, tmp_path, val_size=10)
    message = str(err.value)
    assert "older lambdapipe" in message and "prepare` again" in message
    assert "\n" not in message


def test_the_reports_split_trains_on_all_and_validates_on_the_val_folder(
        tmp_path, monkeypatch, nette_archive):
    monkeypatch.setitem(data.registry.DATASETS, "imagenette_valfolder",
                        __import__("dataclasses").replace(
                            data.registry.DATASETS["imagenette_valfolder"], num_test=20))
    _prepare(monkeypatch, nette_archive, tmp_path, dataset="imagenette_valfolder")
    manifest = data.load_manifest(tmp_path, "imagenette_valfolder")
    assert manifest["splits"] == {"train": 60, "val": 20, "test": 20}
    assert manifest["params"]["val"] == "official val folder"
    val = data.load_split(tmp_path, "imagenette_valfolder", "val")
    test = data.load_split(tmp_path, "imagenette_valfolder", "test")
    assert np.array_equal(val.images, test.images)  # no separate test
    assert data.load_split(tmp_path, "imagenette_valfolder", "train").whole.index.shape[0] == 60
    with pytest.raises(UserError, match="official val folder"):
        _prepare(monkeypatch, nette_archive, tmp_path / "x", dataset="imagenette_valfolder",
                 val_size=10)


# --------------------------------------------------------------------------- the variants
# The report's split and the 224 px grid: 10 models x 4 rates x 1 seed = 40 runs each; 3 noise
# variants (5, 25, 50 %; clean is prepare's own); one explain per model and condition.
VARIANT_CONFIGS = {"imagenette_noisy_valfolder": "imagenette_valfolder",
                   "imagenette_noisy_224": "imagenette320"}
VARIANT_JOBS = {"download": 1, "prepare": 1, "noise": 3, "train": 40, "evaluate": 40,
                "explain": 40, "report": 1, "all": 1, "total": 127}


@pytest.mark.parametrize("name", VARIANT_CONFIGS)
def test_variant_configs_check(name):
    from click.testing import CliRunner
    from test_workflow import ROOT

    from lambdapipe.cli import main
    from lambdapipe.config import expand_runs, load_configs

    path = ROOT / "config" / f"{name}.yaml"
    res = CliRunner().invoke(main, ["check-config", "--configfile", str(path)])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[-1] == f"{path}: ok, 40 runs"
    runs = expand_runs(load_configs([path]))
    assert {r.dataset for r in runs} == {VARIANT_CONFIGS[name]}
    lc = [r for r in runs if r.model.endswith("_lc")]
    assert len(lc) == 16 and all(r.run_settings["model_args"] == {"pos_init": "torch_default"}
                                 for r in lc)


@pytest.mark.slow  # a Snakemake DAG of each grid
@pytest.mark.parametrize("name", VARIANT_CONFIGS)
def test_variant_configs_dry_run(tmp_path, name):
    from test_workflow import ROOT, job_counts, snakemake

    res = snakemake("-n", "--configfile", str(ROOT / "config" / f"{name}.yaml"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert job_counts(res.stdout + res.stderr) == VARIANT_JOBS
    assert not (tmp_path / "data").exists()


def test_the_tables_split_names_agree_with_the_data_registry():
    """The report may not import data/: its name of the report's split is pinned here."""
    from lambdapipe.data.registry import DATASETS
    from lambdapipe.report.published_tables import REPORT_SPLIT_DATASET, VAL_FOLDER_DATASETS

    assert set(VAL_FOLDER_DATASETS) == {n for n, i in DATASETS.items() if i.val_is_val_folder}
    assert REPORT_SPLIT_DATASET in VAL_FOLDER_DATASETS
    assert DATASETS[REPORT_SPLIT_DATASET].archive == DATASETS["imagenette"].archive


def test_the_reports_lc_init_adds_the_convolutions_bias():
    """pos_init torch_default: lucidrains' Conv3d bias, k = 16 values per lambda convolution
    (the default-init counts are tests/test_models.py's)."""
    from lambdapipe.models import count_params, create_model

    for name, lambda_layers in (("lr18_l3_lc", 1), ("lr34_l2_lc", 1)):
        ours = count_params(create_model(name, 10, 128))
        theirs = count_params(create_model(name, 10, 128, pos_init="torch_default"))
        assert theirs - ours == 16 * lambda_layers
