"""Datasets: official archives -> verified, split, memory-mappable arrays + noisy-label variants.

`prepare` turns an archive into `data/prepared/<dataset>/` (docs/architecture.md);
`make_noise` adds a noisy-label variant; `load_split` is what training and evaluation read.
Knows nothing of models or training.
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
