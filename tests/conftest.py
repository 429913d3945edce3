"""Shared test setup: offline hubs, deterministic torch, cached tiny models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import functools  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


# The real loader, bound before any fixture patches `loading.load_model` with this cache (calling
# the patched one from here would recurse when the cache is first filled under the patch).
from clipscope.pipelines.models.loading import load_model as _load_model  # noqa: E402


@functools.lru_cache(maxsize=None)
def _cached_model(name: str, seed: int = 0):
    return _load_model(name, "none", seed=seed)


@pytest.fixture(scope="session")
def model_cache():
    """`model_cache(name)` → a random-init LoadedModel, loaded once per session. Do not mutate."""
    return _cached_model


@pytest.fixture(scope="module")
def one_thread():
    """Torch computes with one thread here, as 1-CPU Ray actors and subprocess workers do, so float
    results of a reference run and of the run under test agree bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
