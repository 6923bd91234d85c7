"""Every stored format fuzzed (issue 28.4): checkpoint resume parts, sidecars, summary and
config JSON, the data manifest and the run lock file. Each reader must either refuse in one
UserError line naming the file, or return something the code after it can use - never
another exception, never a hang. Examples: LAMBDAPIPE_FUZZ_EXAMPLES (default 60), derandomized."""

from __future__ import annotations

import collections
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lambdapipe import atomic, data, runlock, train
from lambdapipe.data.manifest import read_manifest
from lambdapipe.errors import UserError
from lambdapipe.evaluate import load_checkpoint, save_checkpoint
from lambdapipe.validate import sidecar_digests

# 60, or fewer under a Hypothesis profile of fewer (`make test-fast`: tests/conftest.py)
EXAMPLES = int(os.environ.get("LAMBDAPIPE_FUZZ_EXAMPLES", min(60, settings().max_examples)))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))
TALLY: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True), st.text(max_size=8),
                    st.sampled_from([-1, 0, 10**15, 2**63, 2**64, "\x00"]))
JSONISH = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12)
TENSORS = st.builds(lambda shape, dtype: torch.zeros(shape, dtype=dtype),
                    st.lists(st.integers(0, 5), max_size=3).map(tuple),
                    st.sampled_from([torch.float32, torch.int64, torch.uint8, torch.bool]))
VALUES = st.one_of(JSONISH, TENSORS)


def _one_line(exc: UserError, name: str, kind: str) -> None:
    assert "\n" not in str(exc) and name in str(exc), str(exc)
    TALLY[kind]["refused"] += 1


@pytest.fixture(scope="module")
def resumable(tmp_path_factory):
    """A run stopped at iteration 6 of 12 (config and a last.ckpt to resume)."""
    root = tmp_path_factory.mktemp("fuzz")
    data.prepare("digits", root / "data", progress=False)
    cfg = train.TrainConfig.build(model="resnet20x1", model_args={"base_width": 4},
                                  dataset="digits", data_dir=root / "data", noise="clean",
                                  seed=0, out=root / "run", recipe="demo",
                                  overrides={"iterations": 12, "eval_every": 3,
                                             "batch_size": 32})

    class Stop(Exception):
        pass

    def stop(row):
        if row["iteration"] == 6:
            raise Stop

    with pytest.raises(Stop):
        train.run(cfg, callback=stop)
    return cfg, load_checkpoint(cfg.out / "last.ckpt")


def _mutate(obj, path: list, how: str, value):
    """Replace, delete or add at the container reached by following `path` indices."""
    parent = obj
    if isinstance(parent, dict) and not parent:
        parent["extra"] = value
        return
    for step in path[:-1]:
        keys = list(parent) if isinstance(parent, dict) else list(range(len(parent)))
        child = parent[keys[step % len(keys)]]
        if not isinstance(child, dict | list) or not child:
            break
        parent = child
    if not isinstance(parent, dict | list) or not parent:
        return
    keys = list(parent) if isinstance(parent, dict) else list(range(len(parent)))
    key = keys[path[-1] % len(keys)]
    if how == "delete":
        del parent[key]
    elif how == "add" and isinstance(parent, dict):
        parent[f"extra{len(parent)}"] = value
    else:
        parent[key] = value


@settings(FUZZ)
@given(part=st.sampled_from(["optimizer", "scaler", "rng", "state", "iteration"]),
       path=st.lists(st.integers(0, 1000), min_size=1, max_size=4),
       how=st.sampled_from(["replace", "delete", "add", "whole"]), value=VALUES)
def test_fuzzed_resume_state_is_refused_in_one_line_or_resumes(resumable, tmp_path_factory,
                                                               part, path, how, value):
    import copy

    cfg, ckpt = resumable
    ckpt = copy.deepcopy(ckpt)
    if how == "whole" or not isinstance(ckpt[part], dict | list):
        ckpt[part] = value
    else:
        _mutate(ckpt[part], path, how, value)
    out = tmp_path_factory.mktemp("resume")
    shutil.copy(cfg.out / "config.json", out / "config.json")
    save_checkpoint(ckpt, out / "last.ckpt")
    run = train.Run(train.TrainConfig(**{**cfg.__dict__, "out": out}), "cpu")
    try:
        run.start()
    except UserError as exc:
        return _one_line(exc, "last.ckpt", "checkpoint parts")
    TALLY["checkpoint parts"]["resumed"] += 1
    assert 0 <= run.state.iteration <= run.total
    assert run.advance() in (True, False)  # a step runs on what was loaded


BYTES = st.one_of(st.binary(max_size=300), st.text(max_size=200).map(str.encode),
                  st.sampled_from([b"", b"   \n\t", b"\xff\xfe", b"{", b"[1, 2]", b"null",
                                   b"a" * 64 + b"  last.ckpt\n", b"[" * 5000 + b"]" * 5000]))


@settings(FUZZ)
@given(content=BYTES)
def test_fuzzed_sidecar_bytes(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("side") / "last.ckpt.sha256"
    path.write_bytes(content)
    try:
        digests = sidecar_digests(path)
    except UserError as exc:
        return _one_line(exc, "last.ckpt.sha256", "sidecar")
    TALLY["sidecar"]["read"] += 1
    assert all(len(d) == 64 and set(d) <= set("0123456789abcdef") for d in digests)


@settings(FUZZ)
@given(content=st.one_of(BYTES, JSONISH.map(lambda v: json.dumps(v).encode())))
def test_fuzzed_summary_and_config_json(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("json") / "summary.json"
    path.write_bytes(content)
    try:
        atomic.read_json(path, 1 << 20, "run summary")
    except UserError as exc:
        return _one_line(exc, "summary.json", "summary/config")
    TALLY["summary/config"]["read"] += 1


@settings(FUZZ)
@given(how=st.sampled_from(["replace", "delete", "add", "bytes"]),
       path=st.lists(st.integers(0, 1000), min_size=1, max_size=4), value=JSONISH,
       content=BYTES)
def test_fuzzed_manifest(resumable, tmp_path_factory, how, path, value, content):
    cfg, _ = resumable
    real = json.loads((cfg.data_dir / "prepared" / "digits" / "manifest.json").read_text())
    target = tmp_path_factory.mktemp("manifest") / "manifest.json"
    if how == "bytes":
        target.write_bytes(content)
    else:
        _mutate(real, path, how, value)
        target.write_text(json.dumps(real))
    try:
        manifest = read_manifest(target)
    except UserError as exc:
        return _one_line(exc, "manifest.json", "manifest")
    TALLY["manifest"]["read"] += 1
    assert len(manifest["classes"]) == manifest["num_classes"]
    assert all(".." not in Path(name).parts and not Path(name).is_absolute()
               for name in manifest["arrays"])


@settings(FUZZ)
@given(content=BYTES)
def test_fuzzed_lock_file(tmp_path_factory, content):
    out = tmp_path_factory.mktemp("lock")
    (out / runlock.LOCK_NAME).write_bytes(content)
    assert isinstance(runlock.holder(out), str)
    runlock.check_free(out)  # nobody holds it: the content does not matter
    with runlock.own(out):
        assert json.loads((out / runlock.LOCK_NAME).read_text())["pid"] == os.getpid()
    TALLY["lock file"]["taken"] += 1


def test_zz_print_tally():
    """Counts for docs/reliability.md (run with -s)."""
    print("stored-format fuzz:", json.dumps({k: dict(v) for k, v in TALLY.items()}))
