"""What `prepare` will make of a dataset before it reads any archive: the train/val counts and
the manifest `params` (part of every run's identity), shared by prepare, check-config and
the projections."""

from __future__ import annotations

from lambdapipe.data.registry import DatasetInfo
from lambdapipe.errors import UserError, bad_value

DEFAULT_VAL_FRACTION = 0.1


def split_sizes(info: DatasetInfo, val_fraction: float | None = None,
                val_size: int | None = None) -> tuple[int, int]:
    """(train, val) image counts that `prepare` will make with these options."""
    val, _ = resolve_val_count(info, val_fraction, val_size)
    return (info.num_train if info.val_is_val_folder else info.num_train - val), val


def prepare_params(info: DatasetInfo, image_size: int, split_seed: int, val_count: int) -> dict:
    """manifest.json `params`: what makes the prepared arrays, part of every run's identity."""
    return {"val_count": val_count, "split_seed": split_seed, "image_size": image_size,
            **info.layout_params(image_size)}


def resolve_val_count(info: DatasetInfo, val_fraction: float | None,
                      val_size: int | None) -> tuple[int, dict]:
    """(val image count, the request as the manifest records it); bad values in one line."""
    if val_fraction is not None and val_size is not None:
        raise UserError("give --val-fraction or --val-size, not both")
    if info.val_is_val_folder:
        if val_fraction is not None or val_size is not None:
            raise bad_value(f"val split of {info.name}", val_fraction or val_size,
                            "none: it validates on the official val folder")
        return info.num_test, {"val": "official val folder"}
    n = info.num_train
    if val_size is not None:
        if isinstance(val_size, bool) or not isinstance(val_size, int) or not 0 < val_size < n:
            raise bad_value(f"val size for {info.name}", val_size, f"an integer in [1, {n})")
        return val_size, {"val_size": val_size}
    frac = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
    if not isinstance(frac, int | float) or not 0.0 < frac < 1.0:
        raise bad_value("val fraction", val_fraction, "a number in (0, 1)")
    count = round(frac * n)
    if not 0 < count < n:
        raise bad_value(f"val fraction for {info.name}", frac,
                        f"a share leaving at least one image in train and in val ({n} images)")
    return count, {"val_fraction": float(frac)}
