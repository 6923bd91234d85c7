"""A timm-style model registry: the registered name is the public API and never changes meaning.

Factories have the signature `fn(num_classes, image_size, **hyperparameters)`; every keyword is
explicit so `create_model` can reject an unknown one before building anything.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import inspect
from collections.abc import Callable, Iterator
from unittest import mock

import torch
from torch import nn

from lambdapipe.errors import UserError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


class ModelError(UserError):
    """Unknown model name or invalid hyperparameter (one line)."""


def check_int(what: str, value: object, minimum: int = 1) -> int:
    """`value` if it is an integer >= minimum, else a one-line ModelError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ModelError(f"invalid {what} {value!r}: expected an integer >= {minimum}")
    return value


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register `fn` under its own `__name__`; a name may be registered once."""
    name = fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching the fnmatch glob `pattern`, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def model_hyperparameters(name: str) -> dict[str, object]:
    """The keyword arguments (with defaults) that `name` accepts besides classes and size."""
    params = inspect.signature(_lookup(name)).parameters
    return {k: p.default for k, p in params.items() if k not in ("num_classes", "image_size")}


def _lookup(name: str) -> Callable[..., nn.Module]:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "see `lambdapipe models`"
        raise ModelError(f"unknown model {name!r}: {hint}") from None


def create_model(name: str, num_classes: int, image_size: int, **model_args) -> nn.Module:
    """Build the registered model `name` for `num_classes` classes of `image_size` px images."""
    fn = _lookup(name)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"invalid num_classes {num_classes!r}: expected an integer >= 1")
    if not isinstance(image_size, int) or image_size < 8:
        raise ModelError(f"invalid image_size {image_size!r}: expected an integer >= 8")
    allowed = model_hyperparameters(name)
    unknown = sorted(set(model_args) - set(allowed))
    if unknown:
        raise ModelError(f"invalid model argument {unknown[0]!r} for {name}: expected one of "
                         f"{', '.join(sorted(allowed)) or '(none)'}")
    return fn(num_classes=num_classes, image_size=image_size, **model_args)


def check_model(name: str, num_classes: int, image_size: int,
                model_args: dict[str, object]) -> nn.Module:
    """`name` built with these arguments on the meta device (shapes, no storage): every check
    its factory makes, at no memory cost whatever the arguments ask for (a base_width of 4096
    is 17 G parameters). Any failure is one ModelError line naming the model and its args."""
    import torch

    if not isinstance(model_args, dict) or not all(isinstance(k, str) for k in model_args):
        raise ModelError(f"invalid model args {model_args!r} for {name}: expected a mapping "
                         "of names to values")
    try:  # initialisers skipped: nothing to fill, and some import torch._dynamo on meta
        with torch.device("meta"), _no_init():
            return create_model(name, num_classes=num_classes, image_size=image_size,
                                **model_args)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a factory raises on bad arguments
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"cannot build model {name!r} with args {model_args}: "
                         f"{msg}") from None


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def param_count(name: str, num_classes: int, image_size: int, **model_args) -> int:
    """`count_params(create_model(...))` without initialising a weight, so without touching
    its memory: initialisers are skipped and `torch.empty` pages are never written, so the
    build costs neither time nor resident memory, whatever the model's size.

    Not on the meta device: there a lambda layer's scalar division at construction runs as a
    Python decomposition that imports torch._dynamo, slower and bigger than this build.
    """
    with _no_init():
        return count_params(create_model(name, num_classes, image_size, **model_args))


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    def keep(tensor, *args, **kwargs):
        return tensor

    with contextlib.ExitStack() as stack:
        for fn in dir(nn.init):
            if fn.endswith("_") and not fn.startswith("_"):
                stack.enter_context(mock.patch.object(nn.init, fn, keep))
        for method in ("normal_", "uniform_", "zero_", "fill_"):
            stack.enter_context(mock.patch.object(torch.Tensor, method, keep))
        yield
