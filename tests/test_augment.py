"""On-device augmentation: the random-resized crop (boxes, identity, replay) and the recipes'
`augment` field."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lambdapipe.augment import (
    DeviceImages,
    augmented_batch,
    plan_epoch,
    resized_crop,
    resized_crop_boxes,
)
from lambdapipe.errors import UserError
from lambdapipe.recipes import get_recipe

# Its tests take a tenth of a CPU-second or less, not the default 1 s: under pytest-xdist
# this short work unit goes out last, filling in around the long ones (tests/conftest.py).
pytestmark = pytest.mark.cost(0.05)

RRC = ((0.08, 1.0), (3 / 4, 4 / 3))


def pattern_images(n: int, size: int) -> np.ndarray:
    """Images a reader can check by eye: four coloured quadrants (so crops show which part of
    the image they took), an off-centre white bar (so a flip is visible) and a per-image
    brightness ramp (so images differ)."""
    ys, xs = np.mgrid[0:size, 0:size]
    out = np.zeros((n, size, size, 3), dtype=np.uint8)
    half = size // 2
    for i in range(n):
        img = out[i]
        img[:half, :half] = (200, 40, 40)
        img[:half, half:] = (40, 200, 40)
        img[half:, :half] = (40, 40, 200)
        img[half:, half:] = (200, 200, 40)
        img[(xs >= size // 8) & (xs < size // 8 + max(1, size // 16))] = 255
        img[...] = np.clip(img.astype(int) + (ys * (i % 5) // 4)[..., None], 0, 255)
    return out


def _data(n: int = 40, size: int = 32) -> DeviceImages:
    return DeviceImages(pattern_images(n, size), np.arange(n) % 10, np.arange(n) % 10, "cpu")


def test_boxes_lie_inside_the_image_with_the_drawn_area_and_ratio():
    g = torch.Generator().manual_seed(0)
    size = 32
    top, left, h, w = resized_crop_boxes(5000, size, *RRC, g)
    assert all(t.dtype == torch.int64 for t in (top, left, h, w))
    assert bool(((top >= 0) & (left >= 0) & (h >= 1) & (w >= 1)).all())
    assert bool(((top + h <= size) & (left + w <= size)).all())
    area = (h * w).double() / size**2
    # Rounding a box to whole pixels moves its area by up to about one row and one column.
    slack = 2 / size + 1 / size**2
    assert float(area.min()) >= 0.08 - slack and float(area.max()) <= 1.0
    ratio = w.double() / h.double()
    fitted = (h < size) & (w < size)  # boxes not clipped by the image edge
    rounding = 1 / (0.25 * size)  # a one-pixel change of a side at least size / 4 long
    assert float(ratio[fitted].min()) >= 3 / 4 * (1 - rounding)
    assert float(ratio[fitted].max()) <= 4 / 3 * (1 + rounding)
    # Both the small and the large end of the scale range are reached.
    assert float(area.min()) < 0.15 and float(area.max()) > 0.9


def test_no_box_fits_gives_the_centre_crop_at_the_clamped_ratio():
    g = torch.Generator().manual_seed(0)
    top, left, h, w = resized_crop_boxes(8, 20, (1.0, 1.0), (2.0, 2.0), g)  # w = 1.41 * 20
    assert set(w.tolist()) == {20} and set(h.tolist()) == {10}
    assert set(top.tolist()) == {5} and set(left.tolist()) == {0}


def test_full_box_without_flip_is_the_identity_and_with_flip_the_mirror():
    data = _data()
    plan = plan_epoch(len(data), 3, 0, 0, False, "cpu", resized_crop=((1.0, 1.0), (1.0, 1.0)),
                      size=data.size)
    x, y, y_clean = augmented_batch(data, plan, 1, 16)
    idx = plan.order[16:32]
    assert torch.equal(x, data.images[idx])
    assert torch.equal(y, data.labels[idx]) and torch.equal(y_clean, data.clean_labels[idx])
    plan = plan_epoch(len(data), 3, 0, 0, True, "cpu", resized_crop=((1.0, 1.0), (1.0, 1.0)),
                      size=data.size)
    x, _, _ = augmented_batch(data, plan, 0, 16)
    flip = plan.flip[:16]
    assert 0 < int(flip.sum()) < 16
    ref = data.images[plan.order[:16]]
    assert torch.equal(x, torch.where(flip[:, None, None, None], ref.flip(3), ref))


def test_a_box_is_that_region_resized():
    """Each box is its region of the image resized: bilinear resizing of the cropped region
    (interpolate) samples the same points, except in the outermost output pixels, where
    grid_sample reads the image's pixels just outside the box and interpolate clamps."""
    data = _data(4, 32)
    x = data.images[:4]
    top, left = torch.tensor([0, 8, 16, 4]), torch.tensor([0, 16, 8, 12])
    h = w = torch.tensor([16, 16, 16, 16])
    out = resized_crop(x, top, left, h, w, torch.zeros(4, dtype=torch.bool))
    for i in range(4):
        region = x[i:i + 1, :, top[i]:top[i] + 16, left[i]:left[i] + 16].float()
        ref = torch.nn.functional.interpolate(region, size=(32, 32), mode="bilinear",
                                              align_corners=False)
        inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))
        diff = (out[i:i + 1].float() - ref.round())[inner].abs()
        assert float(diff.max()) <= 1.0


def test_output_is_uint8_of_the_training_size():
    data = _data(20, 24)
    plan = plan_epoch(len(data), 0, 0, 0, True, "cpu", resized_crop=RRC, size=data.size)
    x, y, _ = augmented_batch(data, plan, 0, 8)
    assert x.shape == (8, 3, 24, 24) and x.dtype == torch.uint8 and y.shape == (8,)
    assert not torch.equal(x, data.images[plan.order[:8]])  # the crop changed the images


def test_the_epoch_plan_replays_exactly_and_differs_across_epochs_and_seeds():
    data = _data()

    def batches(seed, epoch):
        plan = plan_epoch(len(data), seed, epoch, 0, True, "cpu", resized_crop=RRC,
                          size=data.size)
        return [augmented_batch(data, plan, s, 8)[0] for s in range(len(data) // 8)]

    first = batches(7, 2)
    # A resumed run rebuilds the plan of its epoch from (seed, epoch) alone.
    again = batches(7, 2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(torch.stack(first), torch.stack(batches(7, 3)))
    assert not torch.equal(torch.stack(first), torch.stack(batches(8, 2)))


def test_pad_crop_plans_are_unchanged_by_the_new_augment():
    """Old runs resume onto the batches they saw: the pad-and-crop stream is the one drawn
    before random-resized crops existed (order, dy, dx, flips from one generator)."""
    from lambdapipe.augment import epoch_seed

    plan = plan_epoch(50, 1, 4, 4, True, "cpu")
    g = torch.Generator().manual_seed(epoch_seed(1, 4))
    assert torch.equal(plan.order, torch.randperm(50, generator=g))
    assert torch.equal(plan.dy, torch.randint(0, 9, (50,), generator=g))
    assert torch.equal(plan.dx, torch.randint(0, 9, (50,), generator=g))
    assert torch.equal(plan.flip, torch.rand(50, generator=g) < 0.5)
    assert plan.h is None and plan.w is None


def test_adam_restarts_uses_the_random_resized_crop_and_none_stays_reachable():
    r = get_recipe("adam-restarts")
    assert (r.augment, r.crop_padding, r.flip) == ("random-resized-crop", 0, True)
    assert r.resized_crop == ((0.08, 1.0), (0.75, pytest.approx(4 / 3)))
    assert "As for image augmentation, we use the same configuration" in r.description
    none = get_recipe("adam-restarts", {"augment": "none"})  # clears the flip too
    assert (none.augment, none.crop_padding, none.flip, none.resized_crop) == (
        "none", 0, False, None)
    assert get_recipe("adam-restarts", {"augment": None}) == none  # YAML null reads as none
    # On a CIFAR recipe, the resized crop drops the padding but keeps the flip.
    rrc = get_recipe("sgdm", {"augment": "random-resized-crop"})
    assert (rrc.crop_padding, rrc.flip) == (0, True)
    assert get_recipe("sgdm").augment == "crop"


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"augment": "cutout"}, "invalid augment 'cutout': expected one of crop, "
                            "random-resized-crop, none"),
    ({"augment": "none", "flip": True}, "invalid flip True: expected false with augment none"),
    ({"augment": "random-resized-crop", "crop_padding": 4},
     "invalid crop_padding 4: expected 0 with augment random-resized-crop"),
    ({"crop_scale": [0.5, 0.1]}, "invalid crop_scale [0.5, 0.1]: expected two fractions"),
    ({"crop_scale": [0.0, 1.0]}, "invalid crop_scale [0.0, 1.0]"),
    ({"crop_scale": [0.08, 1.5]}, "invalid crop_scale [0.08, 1.5]"),
    ({"crop_ratio": [1.5, 0.5]}, "invalid crop_ratio [1.5, 0.5]: expected two aspect ratios"),
    ({"crop_ratio": "wide"}, "invalid recipe field crop_ratio 'wide': expected a list"),
])
def test_bad_augment_fields_are_one_line(overrides, needle):
    with pytest.raises(UserError) as err:
        get_recipe("adam-restarts", overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_config_saved_before_augment_existed_resumes():
    """A missing recipe field in an old run's config means the behaviour from before it."""
    from lambdapipe.rundir import differences as _differences

    new = {"recipe": get_recipe("sgdm").to_dict()}
    old = {"recipe": {k: v for k, v in new["recipe"].items()
                      if k not in ("augment", "crop_scale", "crop_ratio")}}
    assert _differences(old, new) == []
    changed = {"recipe": get_recipe("sgdm", {"augment": "random-resized-crop"}).to_dict()}
    assert any(d.startswith("recipe.augment: None -> 'random-resized-crop'")
               for d in _differences(old, changed))


def test_ratio_range_is_log_uniform():
    """Half of the fitted boxes are wider than tall: the ratio is drawn in log space."""
    g = torch.Generator().manual_seed(1)
    _, _, h, w = resized_crop_boxes(20000, 256, (0.08, 0.5), (3 / 4, 4 / 3), g)
    wider = float((w > h).double().mean())
    taller = float((w < h).double().mean())
    assert abs(wider - taller) < 0.05 and math.isclose(wider + taller, 1.0, abs_tol=0.05)
