"""Shared test setup: `gpu`-marked tests are skipped on machines without CUDA."""

from __future__ import annotations

import functools

import pytest


@functools.cache
def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not _has_cuda():
            item.add_marker(skip)


@pytest.fixture
def crash_at_write(monkeypatch):
    """`crash_at_write(n)`: the n-th atomic write_text/write_bytes from now raises
    KeyboardInterrupt, as a kill between two renames would stop the process there."""
    from lambdapipe import atomic

    def arm(crash_at: int) -> None:
        calls = {"n": 0}

        def counted(real):
            def write(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == crash_at:
                    raise KeyboardInterrupt("killed")
                return real(*args, **kwargs)
            return write

        monkeypatch.setattr(atomic, "write_text", counted(atomic.write_text))
        monkeypatch.setattr(atomic, "write_bytes", counted(atomic.write_bytes))

    return arm


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    the suite shares 2 cores with other jobs, and oversubscribed threads make a tiny model's
    step several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
