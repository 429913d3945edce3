"""A run store opens in xarray: root and subgroups as Datasets, the whole tree as a DataTree."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr
from storage_helpers import ATTRS, SPECS, filled_store

from clipscope.storage.query import open_xarray

# Plain xarray/zarr warn once per non-zarr entry at a group level (manifest/, samples/, samples.parquet);
# open_xarray silences exactly that warning.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Object at .* is not recognized as a component of a Zarr hierarchy"
)


@pytest.fixture
def store(tmp_path):
    store = filled_store(str(tmp_path / "run.zarr"))
    store.write_result("reductions/mean", np.arange(6.0), ("embed",))
    store.write_samples_part(0, [{"row": 0, "key": "a", "shard": "s"}])  # non-zarr files next to the arrays
    store.mark_shard_done(0, {"url": "s", "count": 1, "valid": 1, "errors": 0, "seconds": 0.1, "checksum": "x"})
    store.merge_samples()
    return store


def test_open_zarr_root_has_named_dims_and_attrs(store):
    ds = xr.open_zarr(store.url, consolidated=False)
    assert set(ds.data_vars) == {"image_embedding", "valid"}
    assert ds["image_embedding"].dims == ("sample", "embed")
    assert ds.sizes["sample"] == store.n_rows
    assert ds.attrs["code_version"] == ATTRS["code_version"] and ds.attrs["config"] == ATTRS["config"]
    # zarr v3 fill value 0 is not a missing-value mask: zeros (padding rows) stay zeros
    np.testing.assert_array_equal(ds["image_embedding"].values, store.read("image_embedding"))
    assert ds["valid"].dtype == bool and int(ds["valid"].sum()) == int(store.read_valid().sum())


def test_open_zarr_subgroups(store):
    direct = xr.open_zarr(store.url, group="direct", consolidated=False)
    assert direct["heads"].dims == ("sample", "layer", "head", "embed")
    np.testing.assert_array_equal(direct["heads"].values, store.read("direct/heads"))
    second = xr.open_zarr(store.url, group="second_order/layer_0", consolidated=False)
    assert second["weights"].dims == ("sample", "later_layer", "head", "neuron")
    assert second["directions"].dims == ("later_layer", "head", "neuron", "embed")
    reductions = open_xarray(store.url, group="reductions")
    np.testing.assert_array_equal(reductions["mean"].values, np.arange(6.0))


def test_open_datatree_sees_every_array_with_consistent_dims(store):
    tree = xr.open_datatree(store.url, engine="zarr", consolidated=False)
    found = {f"{node.path.strip('/')}/{name}".strip("/") for node in tree.subtree for name in node.ds.data_vars}
    assert found == set(store.array_names())
    assert {s.name for s in SPECS} <= found


def test_open_xarray_silences_the_foreign_file_warning(store):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = open_xarray(store.url)
    assert "image_embedding" in ds
