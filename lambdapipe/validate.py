"""One validator per concept, shared by every face that reads that concept.

`check-config` (lambdapipe/config.py), `train` (cli.py, train.py) and the checkpoint check
(evaluate.py) all call these, so a value one of them accepts is never refused by another
later - after a job started, or after a file was written. Each raises one `UserError` line
naming the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

from lambdapipe.errors import UserError, bad_value

# A training seed is stored in summary.json and read back into int64 columns by the report,
# and torch.manual_seed takes at most 64 bits: refuse what would overflow either.
SEED_MAX = 2**63 - 1

# How an optimizer runs on its device, not its state: left out of checkpoints (step.py)
DEVICE_FLAGS = frozenset({"capturable", "fused"})


def check_seed(value: Any, what: str = "seed") -> int:
    """A training seed: an integer in [0, SEED_MAX] (numpy integers accepted)."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
            or not 0 <= int(value) <= SEED_MAX:
        raise bad_value(what, value, f"an integer in [0, {SEED_MAX}]")
    return int(value)


def check_path_text(value: Any, what: str) -> str:
    """A path given as text (config `mirror:`, `--out`): not empty, no NUL byte, which no
    system call accepts."""
    text = os.fspath(value) if isinstance(value, str | os.PathLike) else value
    if not isinstance(text, str) or not text or "\x00" in text:
        raise bad_value(what, value, "a non-empty path without NUL bytes")
    return text


def check_out_dir(out: Path) -> None:
    """`--out` can become a run directory: a directory or nothing yet (not a file, not a
    dangling symlink), whose nearest existing ancestor is writable (not read-only)."""
    out = Path(check_path_text(out, "--out"))
    if out.is_symlink() and not out.exists():
        raise UserError(f"invalid --out {str(out)!r}: a symbolic link to "
                        f"{os.readlink(out)!r}, which does not exist; expected a directory "
                        "or a path that does not exist yet")
    if out.exists() and not out.is_dir():
        raise UserError(f"invalid --out {str(out)!r}: it is a file; expected a directory or a "
                        "path that does not exist yet")
    probe = out if out.exists() else next(
        (p for p in out.absolute().parents if p.exists()), Path("/"))
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"invalid --out {str(out)!r}: {probe} is not writable (read-only "
                        "filesystem or permissions); expected a writable directory")


def check_model(name: Any, num_classes: int, image_size: int, model_args: Any,
                copies: int | None = None):
    """The registry's checks of a model name and its args, run on the meta device, and its
    size against the memory this machine has (`check_model_size`, `copies` of the weights:
    TRAINING_COPIES by default, 1 to evaluate): nothing is allocated."""
    from lambdapipe.models import check_model as registry_check

    if not isinstance(name, str):
        raise bad_value("model", name, "a registered model name (see `lambdapipe models`)")
    meta = registry_check(name, num_classes, image_size, model_args)
    check_model_size(meta, f"model {name} {model_args}", copies or TRAINING_COPIES)
    return meta


# Training holds the weights, their gradients and up to two optimizer moments (Adam): 4x.
TRAINING_COPIES = 4


def memory_available() -> int | None:
    """Bytes this process could still allocate: the kernel's MemAvailable, capped by the
    address-space limit (RLIMIT_AS) less what is mapped; None where neither is known."""
    import resource

    limits = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        try:
            size = next(int(line.split()[1]) * 1024 for line in
                        Path("/proc/self/status").read_text().splitlines()
                        if line.startswith("VmSize:"))
            limits.append(max(soft - size, 0))
        except (OSError, StopIteration, ValueError):
            limits.append(soft)
    return min(limits) if limits else None


def check_model_size(meta_model: Any, what: str, copies: int = 4) -> None:
    """Refuse, in one line, a model (built on the meta device) whose weights, gradients and
    optimizer state alone exceed the memory available; checked before anything is built
    for real (base_width 100000 asked for 360 GB in the pre-start check)."""
    import itertools

    tensors = itertools.chain(meta_model.parameters(), meta_model.buffers())
    weights = sum(t.numel() * t.element_size() for t in tensors)
    need, have = weights * copies, memory_available()
    if have is not None and need > have:
        raise UserError(f"{what} is too large: {weights / 2**30:.1f} GiB of weights, "
                        f"{need / 2**30:.1f} GiB to use, {have / 2**30:.1f} GiB of memory "
                        "available; expected a smaller model (base_width, depth)")


def _finite_numbers(value: Any, n: int) -> bool:
    return (isinstance(value, list) and len(value) == n and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        for v in value))


def check_data_fields(data: Any, where: str) -> dict[str, Any]:
    """The `data` block of a run config: classes, image size, channel mean and std."""
    if not isinstance(data, dict):
        raise UserError(f"invalid {where}.data {data!r}: expected a mapping")
    n, size = data.get("num_classes"), data.get("image_size")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise bad_value(f"{where}.data.num_classes", n, "an integer >= 1")
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise bad_value(f"{where}.data.image_size", size, "an integer >= 8")
    classes = data.get("classes")
    if not (isinstance(classes, list) and len(classes) == n
            and all(isinstance(c, str) for c in classes)):
        raise bad_value(f"{where}.data.classes", classes, f"a list of {n} class names")
    if not _finite_numbers(data.get("mean"), 3):
        raise bad_value(f"{where}.data.mean", data.get("mean"), "a list of 3 finite numbers")
    if not _finite_numbers(data.get("std"), 3) or min(data["std"]) <= 0:
        raise bad_value(f"{where}.data.std", data.get("std"),
                        "a list of 3 finite numbers > 0")
    return data


def check_run_config(config: Any, where: str) -> dict[str, Any]:
    """A run config as `train` writes it (config.json, and inside every checkpoint), with the
    validators `train` applies to its input: recipe, model + args, dataset, noise, seed, data.
    `where` names the file in the message."""
    from lambdapipe.data import dataset_info
    from lambdapipe.noise import parse_noise_tag
    from lambdapipe.recipes import ADDED_FIELDS, Recipe, get_recipe

    RECIPE_FIELDS = [f.name for f in dataclasses.fields(Recipe)]  # noqa: N806

    if not isinstance(config, dict):
        raise UserError(f"invalid run config in {where}: expected a mapping, got "
                        f"{type(config).__name__}")
    missing = [k for k in ("model", "model_args", "dataset", "noise", "seed", "recipe", "data")
               if k not in config]
    if missing:
        raise UserError(f"invalid run config in {where}: missing {', '.join(missing)}")
    try:
        if not isinstance(config["dataset"], str):
            raise bad_value("dataset", config["dataset"], "a dataset name")
        dataset_info(config["dataset"])
        if not isinstance(config["noise"], str):
            raise bad_value("noise tag", config["noise"], "a noise tag, e.g. symmetric-0.25")
        parse_noise_tag(config["noise"])
        check_seed(config["seed"])
        recipe = config["recipe"]
        if not isinstance(recipe, dict) or not isinstance(recipe.get("name"), str):
            raise bad_value("recipe", recipe, "a mapping of recipe fields with a name")
        missing = sorted(set(RECIPE_FIELDS) - set(recipe) - set(ADDED_FIELDS))
        if missing:  # train writes every field; evaluate reads them without defaults
            # (a config older than ADDED_FIELDS lacks those: their defaults are its behaviour)
            raise bad_value("recipe", recipe["name"], "every recipe field (missing "
                            + ", ".join(missing) + ")")
        get_recipe(recipe["name"], {k: v for k, v in recipe.items() if k != "name"})
        data = check_data_fields(config["data"], "config")
        check_model(config["model"], data["num_classes"], data["image_size"],
                    config["model_args"], copies=1)  # evaluation; the file proves the size
    except UserError as exc:
        raise UserError(f"invalid run config in {where}: {exc}") from None
    return config


# --------------------------------------------------------------------------- resuming
# A checkpoint with a matching sidecar is intact, not sane: what a resume loads into the
# optimizer, the scaler, the RNGs and the loop state is checked against what this run
# would have written itself, so a tampered part is one line naming the file and the part
# (it was a KeyError/TypeError/RuntimeError traceback, or, for iteration 10**15, a run
# reported finished with the weights of iteration 20).
_NUMBER = (int, float)


def _is_number(value: Any) -> bool:
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool
    return isinstance(value, _NUMBER) and not isinstance(value, bool)


def _same_kind(have: Any, want: Any) -> bool:
    """`have` is the kind of value `want` is (numbers interchangeable, tuples as lists)."""
    import torch

    if isinstance(want, bool) or want is None:  # flags (fused, foreach): the device's choice
        return have is None or isinstance(have, bool)
    if isinstance(want, _NUMBER) or isinstance(want, torch.Tensor) and want.numel() == 1:
        return _is_number(have) and math.isfinite(float(have))
    if isinstance(want, list | tuple):
        return (isinstance(have, list | tuple) and len(have) == len(want)
                and all(_same_kind(h, w) for h, w in zip(have, want, strict=True)))
    if isinstance(want, str):
        return isinstance(have, str)
    return type(have) is type(want)


def _check_optimizer(saved: Any, optimizer: Any) -> str | None:
    import torch

    fresh = optimizer.state_dict()
    if not isinstance(saved, dict) or set(saved) != {"state", "param_groups"}:
        return "not a mapping of state and param_groups"
    groups = saved["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(fresh["param_groups"]):
        return f"{len(fresh['param_groups'])} param group(s) expected"
    shapes = {}
    for have, want, live in zip(groups, fresh["param_groups"], optimizer.param_groups,
                                strict=True):
        # older checkpoints carry DEVICE_FLAGS, new ones leave them out: never a difference
        if not isinstance(have, dict) or set(have) - DEVICE_FLAGS != set(want) - DEVICE_FLAGS:
            return "param group keys differ from the recipe's optimizer"
        if not isinstance(have["params"], list) or have["params"] != want["params"]:
            return "param group parameters differ from the model's"
        for key, value in want.items():
            if key != "params" and key in have and not _same_kind(have[key], value):
                return f"param group {key} {have[key]!r} is not like {value!r}"
        shapes.update({i: tuple(p.shape) for i, p in zip(want["params"], live["params"],
                                                          strict=True)})
    state = saved["state"]
    if not isinstance(state, dict) or not set(state) <= set(shapes):
        return "state is not keyed by the model's parameters"
    for i, entry in state.items():
        if not isinstance(entry, dict) or not all(isinstance(k, str) for k in entry):
            return f"state of parameter {i} is not a mapping"
        for key, value in entry.items():
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                return f"state {i}.{key} is not a tensor"
            if tuple(value.shape) not in (shapes[i], ()):
                return (f"state {i}.{key} has shape {list(value.shape)}, the parameter "
                        f"{list(shapes[i])}")
            if not value.is_floating_point():
                return f"state {i}.{key} is not floating point"
    return None


def _check_rng(rng: Any) -> str | None:
    import torch

    if not isinstance(rng, dict) or not {"python", "numpy", "torch"} <= set(rng) \
            or not set(rng) <= {"python", "numpy", "torch", "cuda"}:
        return "rng is not a mapping of python, numpy, torch (and cuda)"
    py = rng["python"]
    if not (isinstance(py, list | tuple) and len(py) == 3 and type(py[0]) is int
            and isinstance(py[1], list | tuple) and len(py[1]) == 625
            and all(type(v) is int and 0 <= v < 2**32 for v in py[1][:624])
            and type(py[1][624]) is int and 0 <= py[1][624] <= 624
            and (py[2] is None or type(py[2]) is float)):
        return "rng.python is not a Mersenne Twister state"
    npy = rng["numpy"]
    if not (isinstance(npy, list | tuple) and len(npy) == 5 and isinstance(npy[0], str)
            and npy[0] == "MT19937"
            and isinstance(npy[1], torch.Tensor) and tuple(npy[1].shape) == (624,)
            and npy[1].dtype == torch.int64 and bool(((npy[1] >= 0) & (npy[1] < 2**32)).all())
            and type(npy[2]) is int and 0 <= npy[2] <= 624 and type(npy[3]) is int
            and npy[3] in (0, 1) and type(npy[4]) is float):
        return "rng.numpy is not a Mersenne Twister state"
    want = torch.get_rng_state()
    for key in ("torch", "cuda"):
        t = rng.get(key, want if key == "torch" else None)
        if t is None:
            continue
        if not (isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1
                and (key == "cuda" or t.shape == want.shape)):
            return f"rng.{key} is not a generator state"
    return None


def _check_state(state: Any, fields: dict[str, Any], total: int, iteration: Any
                 ) -> str | None:
    if not isinstance(state, dict) or set(state) != set(fields):
        return f"state is not a mapping of exactly {', '.join(sorted(fields))}"
    it = state["iteration"]
    if type(it) is not int or not 0 <= it <= total:
        return f"state.iteration {it!r} is not an integer in [0, {total}]"
    if type(iteration) is not int or iteration != it:
        return f"iteration {iteration!r} differs from state.iteration {it}"
    for key in ("best_iteration", "skipped_steps"):
        if type(state[key]) is not int or not -1 <= state[key] <= it:
            return f"state.{key} {state[key]!r} is not an integer in [-1, {it}]"
    for key in ("best_val_acc", "elapsed_s"):
        if not _is_number(state[key]) or not math.isfinite(state[key]):
            return f"state.{key} {state[key]!r} is not a finite number"
    rows = state["rows"]
    if not isinstance(rows, list) or len(rows) > it or not all(
            isinstance(r, dict) and all(isinstance(k, str) and _is_number(v)
                                        for k, v in r.items()) for r in rows):
        return f"state.rows is not a list of at most {it} rows of numbers"
    if rows and (not isinstance(rows[-1].get("iteration"), int | float)
                 or rows[-1]["iteration"] != it):
        return f"state.rows ends at iteration {rows[-1].get('iteration')!r}, not {it}"
    return None


def check_resume(ckpt: dict[str, Any], path: Path, *, optimizer: Any, scaler: Any,
                 total: int, state_fields: dict[str, Any]) -> None:
    """Everything a resume loads from `ckpt` besides the config and weights (checked by
    `evaluate.check_checkpoint`): optimizer and scaler state against this run's own, the
    RNG states, and the loop state with its iteration in [0, total]."""
    problem = None
    missing = [k for k in ("optimizer", "scaler", "rng", "state", "iteration") if k not in ckpt]
    if missing:
        problem = f"missing {', '.join(missing)}"
    else:
        scaler_state, fresh = ckpt["scaler"], scaler.state_dict()
        problem = (_check_optimizer(ckpt["optimizer"], optimizer) or _check_rng(ckpt["rng"])
                   or _check_state(ckpt["state"], state_fields, total, ckpt["iteration"]))
        if problem is None and not (isinstance(scaler_state, dict)
                                    and set(scaler_state) == set(fresh)
                                    and all(_same_kind(scaler_state[k], v)
                                            for k, v in fresh.items())):
            problem = "scaler state is not the recipe's grad scaler state"
    if problem:  # one line, short, whatever the reprs of tampered values (tensors) are
        problem = " ".join(problem.split())
        problem = problem if len(problem) <= 200 else problem[:200] + "..."
        raise UserError(f"checkpoint {path} cannot be resumed: {problem}; remove it (and "
                        "its .sha256) to start the run afresh")


SIDECAR_MAX = 4096  # two `sha256sum` lines of a checkpoint name are ~200 bytes


def sidecar_digests(path: Path) -> list[str]:
    """The sha256 digests a checkpoint's sidecar accepts (one or two `sha256sum` lines);
    a sidecar that is not a small regular UTF-8 file of such lines is one line naming it.
    Empty (or whitespace only) gives [], which the caller reports as missing."""
    import re

    from lambdapipe.atomic import read_small

    text = read_small(path, SIDECAR_MAX, "checkpoint sidecar")
    digests = []
    for line in text.splitlines():
        if not line.strip():
            continue
        m = re.fullmatch(r"([0-9a-f]{64})\s+\*?\S.*", line.strip())
        if m is None:
            raise UserError(f"refusing checkpoint sidecar {path}: {line[:40]!r} is not a "
                            "`sha256sum` line (64 hex digits, two spaces, a file name)")
        digests.append(m.group(1))
    return digests
