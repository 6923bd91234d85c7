"""Bad configuration, generated: random mutations of config/demo.yaml through
`lambdapipe check-config`, random options of train / prepare / evaluate through the CLI, and
random mutations of the run config inside a checkpoint (with a valid sidecar) through
`lambdapipe evaluate`. Every case either validates (exit 0) or fails with exit 1/2 and ONE
error line naming the key or option - never a traceback, never a huge allocation. Example
counts: LAMBDAPIPE_FUZZ_EXAMPLES (default 60)."""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lambdapipe import data
from lambdapipe.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
# 60, or fewer under a Hypothesis profile of fewer (`make test-fast`: tests/conftest.py)
EXAMPLES = int(os.environ.get("LAMBDAPIPE_FUZZ_EXAMPLES", min(60, settings().max_examples)))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
COUNTS: dict[str, dict[int, int]] = {}

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12),
    st.sampled_from(["", "-1", "0", "1e999", "nan", "none", "cuda:9", "../x", "resnet18",
                     "demo", "fp8", "symmetric", "digits", "{a: 1}", "[1, 2]",
                     "1" * 23, "a\x00b"]),
    st.sampled_from([-8, 4096, 10**9, 2**63, 2**64]),  # widths and seeds of issue 17
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=5)


def paths(node, prefix=()):
    """Every (path, value) in a nested config, the root included."""
    yield prefix, node
    items = node.items() if isinstance(node, dict) else (
        enumerate(node) if isinstance(node, list) else ())
    for key, child in items:
        yield from paths(child, (*prefix, key))


ALL_PATHS = [p for p, _ in paths(DEMO)]


def mutate(cfg, path, action, value, new_key):
    if not path:
        return value if action == "replace" else cfg
    parent = cfg
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if action == "replace":
        parent[key] = value
    elif action == "delete":
        del parent[key]
    elif isinstance(parent[key], dict):
        parent[key][new_key] = value
    elif isinstance(parent[key], list):
        parent[key].append(value)
    else:
        parent[key] = [parent[key], value]
    return cfg


def record(kind: str, code: int) -> None:
    COUNTS.setdefault(kind, {}).setdefault(code, 0)
    COUNTS[kind][code] += 1


def assert_clean_outcome(result, names: list[str]) -> str | None:
    """Exit 0, or exit 1/2 with one `Error:` line at the end that names something given."""
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        repr(result.exception), result.output)
    assert result.exit_code in (0, 1, 2), result.output
    if result.exit_code == 0:
        return None
    lines = result.output.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("Error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    line = errors[0].lower()
    assert any(n.lower() in line for n in names), (names, errors[0])
    return errors[0]


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    print(f"\nfuzz counts (kind: {{exit code: examples}}): {COUNTS}")


# --------------------------------------------------------------------------- configs
@FUZZ
@given(path=st.sampled_from(ALL_PATHS),
       action=st.sampled_from(["replace", "delete", "add"]),
       value=values, new_key=st.text(min_size=1, max_size=8))
def test_mutated_demo_config_validates_or_names_the_key(tmp_path_factory, path, action,
                                                        value, new_key):
    cfg = mutate(copy.deepcopy(DEMO), path, action, value, new_key)
    configfile = tmp_path_factory.mktemp("cfg") / "config.yaml"
    configfile.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    result = CliRunner().invoke(main, ["check-config", "--configfile", str(configfile)])
    record("config", result.exit_code)
    # The error names the mutated key, one of its parents, or (deleting) what went missing.
    names = [str(p) for p in path] + [new_key] + ([] if path else ["config"])
    assert_clean_outcome(result, names)


# --------------------------------------------------------------------------- CLI options
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    prepared = data.prepare("digits", root, progress=False)
    data.make_noise(prepared, data.noise_spec("symmetric", 0.25, 0))
    return root


def text_of(value) -> str:
    return value if isinstance(value, str) else yaml.safe_dump(value).strip().removesuffix(
        "\n...")


option_values = st.one_of(scalars.map(text_of),
                          st.sampled_from(["resnet20x1", "symmetric", "pairflip", "0.25",
                                           "cpu", "cuda", "auto", "test", "val"]))
TRAIN_OPTIONS = ["--model", "--model-arg", "--dataset", "--noise", "--noise-kind",
                 "--noise-seed", "--seed", "--recipe", "--set", "--device"]
RECIPE_KEYS = ["lr", "batch_size", "iterations", "epochs", "eval_every", "precision",
               "optimizer", "schedule", "warmup", "grad_clip", "momentum", "colour"]


@FUZZ
@given(chosen=st.lists(st.tuples(st.sampled_from(TRAIN_OPTIONS), option_values,
                                 st.sampled_from(RECIPE_KEYS)), min_size=1, max_size=3))
def test_train_options_validate_or_name_the_option(data_dir, tmp_path_factory, monkeypatch,
                                                   chosen):
    from lambdapipe import train

    # Validation is what is fuzzed: a config that passes every check "trains" instantly.
    monkeypatch.setattr(train.Run, "train", lambda self: {
        "status": "ok", "diverged_at": None, "val_acc": None, "tst_acc": None})
    out = tmp_path_factory.mktemp("run")
    args = ["train", "--model", "resnet20x1", "--model-arg", "base_width=4", "--dataset",
            "digits", "--data-dir", str(data_dir), "--out", str(out), "--recipe", "demo",
            "--device", "cpu", "--no-progress"]
    names = []
    for option, value, key in chosen:
        if option in ("--set", "--model-arg"):
            value = f"{key if option == '--set' else 'k'}={value}"
            names += [key, "k", "set", "model-arg", "model argument"]
        args += [option, value]
        names += [option, option.strip("-").replace("-", " "), option.strip("-").replace(
            "-", "_"), value]
    result = CliRunner().invoke(main, args)
    record("train", result.exit_code)
    assert_clean_outcome(result, names)


PREPARE_OPTIONS = ["--noise", "--noise-kind", "--noise-seed", "--val-fraction", "--val-size",
                   "--split-seed", "--image-size", "--dataset"]


@settings(FUZZ, max_examples=max(EXAMPLES // 2, 1))
@given(chosen=st.lists(st.tuples(st.sampled_from(PREPARE_OPTIONS), option_values),
                       min_size=1, max_size=2))
def test_prepare_options_validate_or_name_the_option(tmp_path_factory, chosen):
    root = tmp_path_factory.mktemp("prep")
    args = ["prepare", "--dataset", "digits", "--data-dir", str(root)]
    names = ["dataset", "noise", "rate", "kind", "seed", "val", "image", "size"]
    for option, value in chosen:
        args += [option, value]
        names += [option, value]
    result = CliRunner().invoke(main, args)
    record("prepare", result.exit_code)
    assert_clean_outcome(result, names)


@pytest.fixture(scope="module")
def checkpoint(data_dir, tmp_path_factory) -> Path:
    from lambdapipe import train

    out = tmp_path_factory.mktemp("ckpt")
    train.run(train.TrainConfig.build(
        model="resnet20x1", model_args={"base_width": 4}, dataset="digits",
        data_dir=data_dir, noise="clean", seed=0, out=out, recipe="demo",
        overrides={"iterations": 3, "eval_every": 3, "batch_size": 32}))
    return out / "best.ckpt"


@settings(FUZZ, max_examples=max(EXAMPLES // 2, 1))
@given(split=option_values, device=option_values,
       ckpt=st.sampled_from(["good", "missing", "garbage", "directory"]))
def test_evaluate_options_validate_or_name_the_option(checkpoint, data_dir, tmp_path_factory,
                                                      split, device, ckpt):
    where = tmp_path_factory.mktemp("eval")
    path = {"good": checkpoint, "missing": where / "none.ckpt",
            "garbage": where / "garbage.ckpt", "directory": where}[ckpt]
    if ckpt == "garbage":
        path.write_bytes(b"\x80\x02garbage")
    result = CliRunner().invoke(main, [
        "evaluate", "--ckpt", str(path), "--split", split, "--data-dir", str(data_dir),
        "--device", device, "--out", str(where / "eval.json")])
    record("evaluate", result.exit_code)
    assert_clean_outcome(result, ["--ckpt", "--split", "--device", split, device, "checkpoint",
                                  "cuda", "device"])


# --------------------------------------------------------------------------- checkpoint contents
@contextlib.contextmanager
def memory_cap(headroom: int = 3 << 30):
    """RLIMIT_AS at this process's size plus `headroom`: a model built at the size a mutated
    config asks for fails here (and the test with it) instead of filling the machine."""
    import resource

    size = int(next(line.split()[1] for line in Path("/proc/self/status").read_text()
                    .splitlines() if line.startswith("VmSize:"))) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = size + headroom if hard == resource.RLIM_INFINITY else min(size + headroom, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture(scope="module")
def checkpoint_state(checkpoint):
    from lambdapipe.evaluate import load_checkpoint

    return load_checkpoint(checkpoint)


@settings(FUZZ, max_examples=EXAMPLES)
@given(data=st.data(), action=st.sampled_from(["replace", "delete", "add"]), value=values,
       new_key=st.text(min_size=1, max_size=8))
def test_checkpoint_contents_validate_or_name_the_key(checkpoint_state, data_dir,
                                                      tmp_path_factory, data, action, value,
                                                      new_key):
    """A checkpoint that loads with weights_only and matches its sidecar, whose embedded run
    config had one key replaced, deleted or added (model_args, data.mean, recipe.precision,
    the whole config, ...): `evaluate` exits 0 or names the checkpoint in one line."""
    from lambdapipe.evaluate import save_checkpoint

    ckpt = copy.deepcopy(checkpoint_state)
    path = data.draw(st.sampled_from([p for p, _ in paths(ckpt["config"])]), label="path")
    ckpt["config"] = mutate(ckpt["config"], path, action, value, new_key)
    where = tmp_path_factory.mktemp("hostile")
    save_checkpoint(ckpt, where / "best.ckpt")
    with memory_cap():
        result = CliRunner().invoke(main, [
            "evaluate", "--ckpt", str(where / "best.ckpt"), "--data-dir", str(data_dir),
            "--device", "cpu", "--out", str(where / "eval.json")])
    record("checkpoint", result.exit_code)
    line = assert_clean_outcome(result, [str(where / "best.ckpt")])
    if line is not None:
        assert not (where / "eval.json").exists()
