"""Fixtures for the Ray layer: one embedded 2-CPU Ray per test module that asks for it."""

from __future__ import annotations

import pytest

from clipscope.cluster.runtime import ray_runtime


@pytest.fixture(scope="module")
def ray_local(request):
    """An embedded Ray with 2 CPUs for the whole module; the module's own classes and functions are
    pickled by value, since Ray workers cannot import pytest's test modules."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(request.module)
    try:
        with ray_runtime(num_cpus=2, object_store_memory=200 * 1024 * 1024) as runtime:
            yield runtime
    finally:
        cloudpickle.unregister_pickle_by_value(request.module)
