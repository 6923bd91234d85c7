"""Label-noise generators: exact counts, never-the-same-class, determinism, independence."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lambdapipe.errors import UserError
from lambdapipe.noise import (
    CIFAR10_CLASSES,
    corrupt,
    noise_spec,
    pair_map,
    parse_noise_tag,
    realised_rate,
    transition_matrix,
)

# Its tests take a tenth of a CPU-second or less, not the default 1 s: under pytest-xdist
# this short work unit goes out last, filling in around the long ones (tests/conftest.py).
pytestmark = pytest.mark.cost(0.05)

LABELS = np.repeat(np.arange(10), 101)  # 1010 samples, 10 classes


@pytest.mark.parametrize("kind", ["symmetric", "pairflip"])
@pytest.mark.parametrize("rate", [0.01, 0.2, 0.25, 0.45, 0.8])
def test_exact_number_flipped(kind, rate):
    noisy = corrupt(LABELS, 10, noise_spec(kind, rate), key="t")
    assert np.sum(noisy != LABELS) == round(rate * LABELS.size)
    assert noisy.dtype == np.int64 and noisy.min() >= 0 and noisy.max() < 10


def test_symmetric_never_same_class_and_spread_over_all_others():
    noisy = corrupt(LABELS, 10, noise_spec("symmetric", 0.9), key="t")
    changed = noisy != LABELS
    assert changed.sum() == 909  # every selected sample really changed class
    t = transition_matrix(LABELS, noisy, 10)
    off = t[~np.eye(10, dtype=bool)]
    assert off.min() > 0.03  # each of the 9 other classes received flips from each class
    np.testing.assert_allclose(t.sum(axis=1), 1.0)


def test_pairflip_generic_goes_to_next_class():
    noisy = corrupt(LABELS, 10, noise_spec("pairflip", 0.3), key="t")
    changed = noisy != LABELS
    assert np.all(noisy[changed] == (LABELS[changed] + 1) % 10)


def test_pairflip_cifar10_convention():
    pairs = pair_map(10, CIFAR10_CLASSES)
    name = dict(enumerate(CIFAR10_CLASSES))
    mapping = {name[i]: name[int(j)] for i, j in enumerate(pairs) if j >= 0}
    assert mapping == {"truck": "automobile", "bird": "airplane", "deer": "horse",
                       "cat": "dog", "dog": "cat"}
    noisy = corrupt(LABELS, 10, noise_spec("pairflip", 0.3), key="c", classes=CIFAR10_CLASSES)
    changed = noisy != LABELS
    assert changed.sum() == round(0.3 * LABELS.size)
    assert np.all(noisy[changed] == pairs[LABELS[changed]])
    # Half the samples have no partner, so a rate above their share is refused.
    with pytest.raises(UserError, match="at most 0.5"):
        corrupt(LABELS, 10, noise_spec("pairflip", 0.6), key="c", classes=CIFAR10_CLASSES)


def test_deterministic_and_keyed():
    spec = noise_spec("symmetric", 0.25)
    a = corrupt(LABELS, 10, spec, key="digits")
    np.testing.assert_array_equal(a, corrupt(LABELS, 10, spec, key="digits"))
    assert not np.array_equal(a, corrupt(LABELS, 10, spec, key="cifar10"))
    assert not np.array_equal(a, corrupt(LABELS, 10, noise_spec("symmetric", 0.25, 1),
                                         key="digits"))


def test_deterministic_across_processes():
    code = ("import numpy as np, json; from lambdapipe.noise import corrupt, noise_spec;"
            "y = np.repeat(np.arange(10), 101);"
            "print(json.dumps(corrupt(y, 10, noise_spec('symmetric', 0.25, 3), key='d').tolist()))")
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={"PYTHONHASHSEED": str(h), "PATH": ""}).stdout
            for h in (1, 2)]
    assert outs[0] == outs[1]
    here = corrupt(LABELS, 10, noise_spec("symmetric", 0.25, 3), key="d")
    assert json.loads(outs[0]) == here.tolist()


def test_rates_drawn_independently():
    """A higher rate is a fresh draw, not the lower rate's flips plus some more."""
    low = corrupt(LABELS, 10, noise_spec("symmetric", 0.2), key="t") != LABELS
    high = corrupt(LABELS, 10, noise_spec("symmetric", 0.4), key="t") != LABELS
    overlap = np.sum(low & high)
    # Nested draws would give overlap == low.sum() (202); independent ones about 0.2 * 0.4 * N.
    assert overlap < 0.75 * low.sum()
    assert abs(overlap - 0.2 * 0.4 * LABELS.size) < 40


def test_clean_is_identity():
    spec = noise_spec("pairflip", 0.0, 5)
    assert spec.tag == "clean" and spec == noise_spec("symmetric", 0)
    np.testing.assert_array_equal(corrupt(LABELS, 10, spec, key="t"), LABELS)
    assert realised_rate(LABELS, LABELS) == 0


@pytest.mark.parametrize(("kind", "rate", "seed", "tag"), [
    ("symmetric", 0.25, 0, "symmetric-0.25"),
    ("pairflip", 0.05, 0, "pairflip-0.05"),
    ("symmetric", 0.5, 3, "symmetric-0.5-s3"),
    ("symmetric", 0.0, 0, "clean"),
])
def test_tags_round_trip(kind, rate, seed, tag):
    spec = noise_spec(kind, rate, seed)
    assert spec.tag == tag
    assert parse_noise_tag(tag) == spec


@pytest.mark.parametrize(("kind", "rate", "match"), [
    ("symmetric", 1.0, "noise rate"), ("symmetric", -0.1, "noise rate"),
    ("symmetric", float("nan"), "noise rate"), ("gaussian", 0.2, "noise kind"),
])
def test_bad_specs(kind, rate, match):
    with pytest.raises(UserError, match=match):
        noise_spec(kind, rate)


@pytest.mark.parametrize("tag", ["noisy", "symmetric-1.5", "symmetric-0.250", "foo-0.2",
                                 "symmetric-0.2-s0", "pairflip-0.2-sX"])
def test_bad_tags(tag):
    with pytest.raises(UserError, match="noise tag"):
        parse_noise_tag(tag)


@settings(max_examples=min(60, settings().max_examples), deadline=None)  # conftest
@given(n=st.integers(1, 400), c=st.integers(2, 12), rate=st.floats(0.0, 0.99),
       kind=st.sampled_from(["symmetric", "pairflip"]), seed=st.integers(0, 5))
def test_exact_counts_property(n, c, rate, kind, seed):
    labels = np.random.default_rng(seed).integers(0, c, size=n)
    spec = noise_spec(kind, rate, seed)
    noisy = corrupt(labels, c, spec, key="prop")
    assert np.sum(noisy != labels) == round(spec.rate * n)
    t = transition_matrix(labels, noisy, c)
    np.testing.assert_allclose(t.sum(axis=1), 1.0)


def test_prepare_refuses_a_pairflip_rate_before_touching_the_archive(tmp_path):
    from click.testing import CliRunner

    from lambdapipe.cli import main

    result = CliRunner().invoke(main, ["prepare", "--dataset", "cifar10", "--noise", "0.6",
                                       "--noise-kind", "pairflip", "--data-dir",
                                       str(tmp_path / "data")])
    assert result.exit_code == 2
    assert ("invalid pairflip noise rate for cifar10 0.6: expected at most 0.5"
            in result.output)
    assert not (tmp_path / "data").exists()  # no download was attempted
