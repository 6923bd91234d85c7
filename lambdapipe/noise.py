"""Label-noise generators (numpy only; knows nothing of models, training or file layout).

Two kinds, both corrupting *exactly* `round(rate * N)` training labels so the realised rate
is the requested one up to rounding, and every variant is reproducible from its spec alone:

* `symmetric`: each chosen label moves to a class drawn uniformly among the C - 1 *other*
  classes (never to itself), so the expected transition matrix is
  T = (1 - rate) I + rate / (C - 1) (1 - I).
* `pairflip`: each chosen label of class i moves to one fixed partner class pair(i).
  For the CIFAR-10 class names we follow the usual "asymmetric" convention
  (truck -> automobile, bird -> airplane, deer -> horse, cat <-> dog); the other five classes
  have no partner, so the round(rate * N) flipped samples are drawn uniformly among the
  samples of the five mapped classes, and rates above their share are refused.
  Any other class list uses pair(i) = (i + 1) mod C, so every sample may flip.

The random stream is seeded by a sha256 of (dataset, kind, rate, noise seed), never by
Python's salted `hash()`, so the same variant comes out in every process, and different
rates are independent draws (not nested subsets of each other).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

from lambdapipe.errors import UserError, bad_value

KINDS = ("symmetric", "pairflip")

# The CIFAR-10 "asymmetric" convention (Patrini et al., 2017), by class name.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
CIFAR10_PAIRS = {"truck": "automobile", "bird": "airplane", "deer": "horse",
                 "cat": "dog", "dog": "cat"}


@dataclass(frozen=True)
class NoiseSpec:
    """One noisy-label variant: `kind` at `rate`, drawn with noise seed `seed`."""

    kind: str
    rate: float
    seed: int = 0

    @property
    def is_clean(self) -> bool:
        return self.rate == 0

    @property
    def tag(self) -> str:
        """`clean`, `symmetric-0.25`, `pairflip-0.05-s3` (docs/architecture.md)."""
        if self.is_clean:
            return "clean"
        tag = f"{self.kind}-{self.rate:g}"
        return f"{tag}-s{self.seed}" if self.seed else tag


CLEAN = NoiseSpec("symmetric", 0.0, 0)


def noise_spec(kind: str, rate: float, seed: int = 0) -> NoiseSpec:
    """Validate and normalise a spec; rate 0 is `clean` whatever the kind and seed."""
    if kind not in KINDS:
        raise bad_value("noise kind", kind, KINDS)
    try:
        rate = float(rate)
    except (TypeError, ValueError):
        raise bad_value("noise rate", rate, "a number in [0, 1)") from None
    if not 0.0 <= rate < 1.0:  # also rejects NaN
        raise bad_value("noise rate", rate, "a number in [0, 1)")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise bad_value("noise seed", seed, "an integer >= 0")
    if rate == 0.0:
        return CLEAN
    return NoiseSpec(kind, rate, int(seed))


_TAG = re.compile(r"^(?P<kind>[a-z]+)-(?P<rate>[0-9.e+-]+?)(?:-s(?P<seed>\d+))?$")


def parse_noise_tag(tag: str) -> NoiseSpec:
    """Inverse of `NoiseSpec.tag`; refuses non-canonical spellings so one variant has one name."""
    if tag == "clean":
        return CLEAN
    m = _TAG.match(tag)
    allowed = "clean or <symmetric|pairflip>-<rate>[-s<seed>], e.g. symmetric-0.25"
    if m is None:
        raise bad_value("noise tag", tag, allowed)
    try:
        spec = noise_spec(m["kind"], float(m["rate"]), int(m["seed"] or 0))
    except (UserError, ValueError):
        raise bad_value("noise tag", tag, allowed) from None
    if spec.tag != tag:
        raise bad_value("noise tag", tag, f"its canonical spelling {spec.tag!r}")
    return spec


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from the parts' text: identical in every process and on every machine."""
    text = "\x1f".join(repr(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def pair_map(num_classes: int, classes: list[str] | tuple[str, ...] | None = None) -> np.ndarray:
    """pair(i) for pairflip; -1 marks a class without a partner (CIFAR-10 convention only)."""
    if classes is not None and tuple(classes) == CIFAR10_CLASSES:
        index = {c: i for i, c in enumerate(CIFAR10_CLASSES)}
        out = np.full(num_classes, -1, dtype=np.int64)
        for src, dst in CIFAR10_PAIRS.items():
            out[index[src]] = index[dst]
        return out
    return (np.arange(num_classes, dtype=np.int64) + 1) % num_classes


def max_rate(kind: str, num_classes: int, classes: list[str] | tuple[str, ...] | None = None
             ) -> float:
    """The highest rate `kind` can reach on a class-balanced split: pairflip moves only
    labels of classes that have a partner (5 of CIFAR-10's 10), symmetric any label."""
    if kind == "pairflip":
        return float(np.mean(pair_map(num_classes, classes) >= 0))
    return 1.0


def corrupt(labels: np.ndarray, num_classes: int, spec: NoiseSpec, *, key: str,
            classes: list[str] | tuple[str, ...] | None = None) -> np.ndarray:
    """Noisy copy of `labels` for `spec`; `key` (the dataset name) enters the seed."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim != 1 or (labels.size and (labels.min() < 0 or labels.max() >= num_classes)):
        raise ValueError(f"labels must be a 1-D array of class ids in [0, {num_classes})")
    noisy = labels.copy()
    if spec.is_clean:
        return noisy
    if num_classes < 2:
        raise UserError("label noise needs at least two classes")
    n_flip = round(spec.rate * labels.size)
    rng = np.random.default_rng(stable_seed(key, spec.kind, float(spec.rate), spec.seed))
    if spec.kind == "symmetric":
        idx = rng.choice(labels.size, size=n_flip, replace=False)
        # An offset in 1..C-1 is uniform over the other classes and never returns i itself.
        offset = rng.integers(1, num_classes, size=n_flip)
        noisy[idx] = (labels[idx] + offset) % num_classes
    elif spec.kind == "pairflip":
        pairs = pair_map(num_classes, classes)
        eligible = np.flatnonzero(pairs[labels] >= 0)
        if n_flip > eligible.size:
            max_rate = eligible.size / max(labels.size, 1)
            raise bad_value("pairflip noise rate", spec.rate,
                            f"at most {max_rate:.3g}: only classes with a partner can flip")
        idx = np.sort(rng.choice(eligible, size=n_flip, replace=False))
        noisy[idx] = pairs[labels[idx]]
    else:  # pragma: no cover - noise_spec guards the kind
        raise bad_value("noise kind", spec.kind, KINDS)
    return noisy


def transition_matrix(clean: np.ndarray, noisy: np.ndarray, num_classes: int) -> np.ndarray:
    """Realised T[i, j] = P(noisy = j | clean = i); rows of absent classes stay identity."""
    counts = np.zeros((num_classes, num_classes), dtype=np.float64)
    np.add.at(counts, (clean, noisy), 1.0)
    totals = counts.sum(axis=1, keepdims=True)
    out = np.divide(counts, totals, out=np.eye(num_classes), where=totals > 0)
    return out


def realised_rate(clean: np.ndarray, noisy: np.ndarray) -> float:
    return float(np.mean(clean != noisy)) if len(clean) else 0.0
