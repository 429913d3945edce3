"""Every reduction job has the same anatomy (pipelines/jobs/__init__.py):

- ``Settings``: a frozen dataclass subclassing ``clipscope.params.Validated``;
- ``run(store, settings, executor=None)`` (further parameters keyword-only, with defaults);
- ``Result`` with ``write`` and a classmethod ``read(store, settings)``;
- a ``report`` module with its ``format_…`` (and ``plot_…``) functions;

and ``Result.read(store, settings)`` after ``run`` gives back exactly what ``run`` returned.
Every job listed by ``list_jobs()`` needs an entry in EXAMPLES: settings for the session store.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import numbers
import shutil
from types import ModuleType
from typing import Any, Callable

import numpy as np
import pytest

from clipscope.params import Validated
from clipscope.pipelines.jobs import get_job, list_jobs
from clipscope.storage.store import RunStore

LAYER = 1  # the session store's second-order layer


def _textspan(store: RunStore) -> Any:
    return get_job("textspan").Settings(layers=(2, 3), pool="shapes-colours", basis_size=3)


def _curve(store: RunStore) -> Any:
    textspan = get_job("textspan")
    textspan.run(store, _textspan(store))
    return get_job("textspan --curve").Settings(layers=(2, 3), task="shapes-shape", basis_sizes=(1, 2, 3))


def _neurons(store: RunStore) -> Any:
    from clipscope.pipelines.texts.pools import get_pool

    second_order = get_job("second-order")
    second_order.run(store, second_order.Settings(layer=LAYER, top_k=4))
    pool = get_pool("shapes-colours")
    # the accuracy (its read-back is checked in test_neurons_job) needs labels of a task: not this store's
    return get_job("neurons").Settings(layer=LAYER, texts=tuple(pool.texts), pool_name=pool.name, m=(1, 2),
                                       accuracy=False)


def _concepts(store: RunStore) -> Any:  # the applications
    get_job("neurons").run(store, _neurons(store))
    return get_job("concepts").Settings(layer=LAYER, top=3)


def _cues(store: RunStore) -> Any:  # the applications
    get_job("neurons").run(store, _neurons(store))
    return get_job("cues").Settings(true="red", wrong="blue", layers=(LAYER,), neurons=5, words=3)


def _worst_group(store: RunStore) -> Any:  # the session store's samples get groups first
    import pyarrow as pa
    import pyarrow.parquet as pq

    samples = store.read_samples()
    rows = samples.column("row").to_numpy()
    for column, values in (("group", rows % 2), ("label", rows // 2 % 2)):  # 2 classes × 2 groups
        samples = samples.set_column(samples.column_names.index(column), column, pa.array(values, pa.int64()))
    pq.write_table(samples, f"{store.url}/samples.parquet")
    return get_job("worst-group").Settings(task="shapes-spurious", heads=("L3H0",), keep_last=1)


def _roles(store: RunStore) -> Any:  # CLIP-InterpreT
    get_job("textspan").run(store, _textspan(store))
    return get_job("roles").Settings()


def _segment(store: RunStore) -> Any:  # the session store has no masks; add some
    from clipscope.storage import schema

    store.add_arrays([schema.MASKS.spec((64, 64))])
    masks = np.random.default_rng(0).integers(0, 3, (store.n_rows, 64, 64)).astype(np.uint8)
    store.write_rows(0, {schema.MASKS.path(): masks}, None)
    return get_job("segment").Settings(method="random", task="shapes-colour")


# job NAME → settings for a copy of the session store (running what the job needs first)
EXAMPLES: dict[str, Callable[[RunStore], Any]] = {
    "concepts": _concepts,
    "roles": _roles,
    "segment": _segment,
    "cues": _cues,
    "worst-group": _worst_group,
    "means": lambda store: get_job("means").Settings(),
    "textspan": _textspan,
    "textspan --curve": _curve,
    "neurons": _neurons,
    "evaluate": lambda store: get_job("evaluate").Settings(task="imagenet-simple", keep_last=(1,)),
    "second-order": lambda store: get_job("second-order").Settings(layer=LAYER, top_k=4, task="imagenet-simple"),
    # Rosetta: the store's CLIP activation maps against themselves (a store is row-aligned with itself)
    "rosetta": lambda store: get_job("rosetta").Settings(others=(store.url,), k=2, self_k=2, tile=64, examples=3),
}


def test_jobs_are_discovered():
    jobs = list_jobs()
    assert {"means", "textspan", "textspan --curve"} <= set(jobs)
    for name in jobs:
        assert get_job(name).NAME == name
    # every package under pipelines/jobs except extraction (rows, not a reduction) is a job
    import pkgutil

    import clipscope.pipelines.jobs as jobs_package

    packages = {info.name for info in pkgutil.iter_modules(jobs_package.__path__) if info.ispkg}
    named = {get_job(name).__name__.split(".")[3] for name in jobs}
    assert packages - named == {"extract", "maps"}  # maps: per-sample rows through extraction's driver


@pytest.mark.parametrize("name", list_jobs())
def test_job_anatomy(name):
    job = get_job(name)
    settings = job.Settings
    assert dataclasses.is_dataclass(settings) and issubclass(settings, Validated)
    assert settings.__dataclass_params__.frozen
    params = list(inspect.signature(job.run).parameters.values())
    assert [p.name for p in params[:3]] == ["store", "settings", "executor"]
    assert params[2].default is None
    assert all(p.kind is p.KEYWORD_ONLY and p.default is not p.empty for p in params[3:])
    result = job.Result
    assert dataclasses.is_dataclass(result) and callable(getattr(result, "write", None))
    assert isinstance(inspect.getattr_static(result, "read"), classmethod)
    assert isinstance(job.report, ModuleType)
    assert job.report is importlib.import_module(f"{job.__name__}.report")
    assert any(attr.startswith("format_") for attr in vars(job.report)), "the report has no format_… function"
    assert name in EXAMPLES, f"add settings for the job {name!r} to EXAMPLES"


def _assert_same(a: Any, b: Any, where: str) -> None:
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        assert type(a) is type(b), where
        for f in dataclasses.fields(a):
            _assert_same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, numbers.Number) and not isinstance(a, bool):
        assert isinstance(b, numbers.Number) and not isinstance(b, bool) and a == b, f"{where}: {a!r} != {b!r}"
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("name", list_jobs())
def test_result_read_equals_what_run_returned(name, split_store, tmp_path):
    path = tmp_path / "store.zarr"
    shutil.copytree(split_store, path)
    store = RunStore.open(str(path), "r+")
    job = get_job(name)
    settings = EXAMPLES[name](store)
    returned = job.run(store, settings)
    assert isinstance(returned, job.Result)
    _assert_same(returned, job.Result.read(RunStore.open(str(path), "r"), settings), name)
