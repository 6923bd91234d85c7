"""Datasets: official archives -> verified, split, memory-mappable arrays + noisy-label variants.

`prepare` turns an archive into `data/prepared/<dataset>/` (docs/architecture.md);
`make_noise` adds a noisy-label variant; `load_split` is what training and evaluation read.
Knows nothing of models or training.

Conventions (recorded in each manifest too):
* val: a stratified sample of the official training set (10 % unless `val_fraction` or
  `val_size`), drawn with `split_seed` alone, so it never moves with noise or training seed;
  test: the official test set (Tiny ImageNet and Imagenette: their labelled val sets).
* digits (scikit-learn's bundled 8x8 digits, offline): upscaled 2x to 16x16 RGB; it has no
  official test set, so a fixed seeded stratified 20 % is held out as test.
* Noise touches only train labels; `train_labels.npy` stays clean. Imagenette's symmetric
  variants at the published rates (1, 5, 25, 50 %, noise seed 0) are the columns of the
  official noisy_imagenette.csv; every other variant comes from `lambdapipe.noise`.
* Archives are read in memory, never extracted; a member that could escape an extraction
  directory (`..`, absolute path, outside link, device) makes the whole archive refused.
"""

from lambdapipe.data.download import download
from lambdapipe.data.prepared import (
    Split,
    describe,
    load_manifest,
    load_split,
    make_noise,
    prepare,
    prepared_dir,
)
from lambdapipe.data.registry import DATASETS, DatasetInfo, dataset_info
from lambdapipe.noise import NoiseSpec, noise_spec, parse_noise_tag

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "NoiseSpec",
    "Split",
    "dataset_info",
    "describe",
    "download",
    "load_manifest",
    "load_split",
    "make_noise",
    "noise_spec",
    "parse_noise_tag",
    "prepare",
    "prepared_dir",
]
