"""`clipscope extract` end to end on the tiny model: the store contract (README, "The store"), the exact
decomposition read back from the store alone, agreement with a direct `decompose` call, and
robustness to bad data (corrupt images, truncated and empty shards, fsspec URLs)."""

from __future__ import annotations

import json
import os
import uuid
import warnings

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr

import clipscope
from clipscope.kernels.decompose import DecomposeRequest, decompose, second_order_directions
from clipscope.pipelines.jobs.extract.job import store_arrays as decomposition_arrays
from clipscope.pipelines.jobs.extract.settings import ExtractConfig
from clipscope.storage.store import RunStore

from extract_helpers import TINY_MODEL, decoded_image, extract_args, run_cli, truncate_inside_sample, write_tiny_shards

RPC = 4
# clipscope-tiny: 4 layers of 4 heads, width 64, embed 32, 64 px / 16 px patches → 17 tokens, MLP 256.
L, H, D, T, N = 4, 4, 32, 17, 256
N_ROWS = 24  # 5, 7, 6 samples → 8 + 8 + 8 rows
SUMMED = ("direct/embedding", "direct/bias", "direct/mlps", "direct/heads")


def store_arrays(url: str) -> dict[str, zarr.Array]:
    """Every array of a local store's zarr hierarchy, read with plain zarr (not through RunStore)."""
    group = zarr.open_group(url, mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr warns about the store's non-zarr side files
        return {name: node for name, node in group.members(max_depth=None) if isinstance(node, zarr.Array)}


def read_all(url: str) -> dict[str, np.ndarray]:
    return {name: np.asarray(arr[...]) for name, arr in store_arrays(url).items()}


def block_starts(counts, rpc=RPC) -> list[int]:
    capacities = [-(-c // rpc) * rpc for c in counts]
    return [int(x) for x in np.cumsum([0, *capacities[:-1]])]


def rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual − expected| over max |expected| (float64)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


def reference(loaded, dataset, keys, convention: str, **layers) -> dict[str, np.ndarray]:
    """`decompose` on the model's own preprocess of each decoded PIL image, one batch."""
    images = torch.stack([loaded.preprocess(decoded_image(dataset.images[k])) for k in keys])
    request = DecomposeRequest(direct=True, convention=convention, **layers)
    return {name: value.numpy() for name, value in decomposition_arrays(decompose(loaded.spec, images, request)).items()}


def key_rows(url: str) -> dict[str, int]:
    table = pq.read_table(os.path.join(url, "samples.parquet"))
    return dict(zip(table["key"].to_pylist(), table["row"].to_pylist()))


# ----------------------------------------------------------------------------------------------
# The store contract


def test_store_holds_every_array_with_dimension_names(split_store, model_cache):
    spec = model_cache(TINY_MODEL).spec
    assert (spec.n_layers, spec.n_heads, spec.embed_dim, spec.n_tokens, spec.mlp_width) == (L, H, D, T, N)
    expected = {
        "valid": (("sample",), (N_ROWS,)),
        "image_embedding": (("sample", "embed"), (N_ROWS, D)),
        "direct/embedding": (("sample", "embed"), (N_ROWS, D)),
        "direct/bias": (("sample", "embed"), (N_ROWS, D)),
        "direct/mlps": (("sample", "layer", "embed"), (N_ROWS, L, D)),
        "direct/heads": (("sample", "layer", "head", "embed"), (N_ROWS, L, H, D)),
        "direct/cls_token": (("sample", "layer", "embed"), (N_ROWS, L, D)),
        "direct/tokens": (("sample", "token_layer", "head", "token", "embed"), (N_ROWS, 1, H, T, D)),
        "second_order/layer_1/weights": (("sample", "later_layer", "head", "neuron"), (N_ROWS, L - 2, H, N)),
        "second_order/layer_1/shared": (("sample", "embed"), (N_ROWS, D)),
        "second_order/layer_1/directions": (("later_layer", "head", "neuron", "embed"), (L - 2, H, N, D)),
        "activations/layer_2": (("sample", "token", "neuron"), (N_ROWS, T, N)),
    }
    arrays = store_arrays(split_store)
    assert sorted(arrays) == sorted(expected)
    for name, (dims, shape) in expected.items():
        arr = arrays[name]
        assert tuple(arr.metadata.dimension_names) == dims, name
        assert arr.shape == shape, name
        assert arr.dtype == (np.bool_ if name == "valid" else np.float32), name
        if dims[0] == "sample":
            assert arr.chunks[0] == RPC, name  # one shard's rows never share a chunk with another's
    assert store_arrays(split_store)["second_order/layer_1/directions"].attrs["later_layers"] == [2, 3]


def test_group_attributes_describe_the_run(split_store, tiny_dataset):
    attrs = zarr.open_group(split_store, mode="r").attrs.asdict()
    config = ExtractConfig(data=(tiny_dataset.pattern,), out=split_store, model=TINY_MODEL, rows_per_chunk=RPC,
                           batch_size=4, second_order_layers=(1,), token_layers=(3,), activation_layers=(2,))
    assert attrs["config"] == config.result_dict()
    assert attrs["model"]["name"] == TINY_MODEL
    assert attrs["model"]["pretrained"] == "none" and attrs["model"]["seed"] == 0
    assert attrs["code_version"] == clipscope.__version__
    assert attrs["shards"] == [os.path.abspath(p) for p in tiny_dataset.paths]
    assert attrs["shard_counts"] == list(tiny_dataset.counts)
    assert attrs["layers"]["heads"] == [0, 1, 2, 3]
    assert attrs["layers"]["tokens"] == [3] and attrs["layers"]["activations"] == [2]
    assert attrs["ln_convention"] == "split"
    assert attrs["n_rows"] == N_ROWS and attrs["rows_per_chunk"] == RPC


def test_valid_and_sample_index_describe_every_row(split_store, tiny_dataset):
    table = pq.read_table(os.path.join(split_store, "samples.parquet")).to_pylist()
    arrays = read_all(split_store)
    valid = arrays["valid"]
    starts = block_starts(tiny_dataset.counts)
    expected_rows = {}
    for s, (path, count) in enumerate(zip(tiny_dataset.paths, tiny_dataset.counts)):
        for i in range(count):
            expected_rows[starts[s] + i] = (f"s{s}-{i:03d}", os.path.abspath(path), s)
    assert [r["row"] for r in table] == sorted(expected_rows)
    for record in table:
        key, shard, shard_index = expected_rows[record["row"]]
        assert (record["key"], record["shard"], record["shard_index"]) == (key, shard, shard_index)
        assert record["label"] == tiny_dataset.labels[key]
        assert record["caption"] == tiny_dataset.captions[key]
        if key in tiny_dataset.corrupt:
            assert key in record["error"] and "decode" in record["error"]
        else:
            assert record["error"] is None
        assert bool(valid[record["row"]]) == (record["error"] is None)
    assert tiny_dataset.corrupt and int(valid.sum()) == sum(tiny_dataset.counts) - len(tiny_dataset.corrupt)
    # Padding and undecodable rows are all zeros.
    empty = ~valid
    for name, values in arrays.items():
        if name != "valid" and values.shape[:1] == (N_ROWS,):
            assert not values[empty].any(), name


@pytest.mark.parametrize("store_fixture", ["split_store", "center_store"])
def test_decomposition_sums_to_the_embedding_from_the_store_alone(store_fixture, request):
    url = request.getfixturevalue(store_fixture)
    arrays = read_all(url)
    valid = arrays["valid"]
    total = (arrays["direct/embedding"] + arrays["direct/bias"] + arrays["direct/mlps"].sum(1)
             + arrays["direct/heads"].sum((1, 2)))[valid]
    embedding = arrays["image_embedding"][valid]
    assert total.dtype == np.float32
    per_row = np.linalg.norm(total.astype(np.float64) - embedding, axis=1) / np.linalg.norm(embedding, axis=1)
    assert per_row.max() <= 1e-5
    # Per-token terms of the token layer sum over tokens to that layer's heads.
    tokens = arrays["direct/tokens"][valid][:, 0].astype(np.float64).sum(axis=2)
    assert rel_error(tokens, arrays["direct/heads"][valid][:, 3]) <= 1e-5


@pytest.mark.parametrize("convention", ["split", "center"])
def test_stored_values_equal_a_direct_decompose_call(convention, request, tiny_dataset, model_cache):
    url = request.getfixturevalue(f"{convention}_store")
    loaded = model_cache(TINY_MODEL)
    rows = key_rows(url)
    keys = sorted(k for k in rows if k not in tiny_dataset.corrupt)
    expected = reference(loaded, tiny_dataset, keys, convention, token_layers=(3,), second_order_layers=(1,),
                         activation_layers=(2,))
    arrays = read_all(url)
    index = [rows[k] for k in keys]
    assert sorted(expected) == sorted(n for n in arrays if n not in ("valid", "second_order/layer_1/directions"))
    for name, values in expected.items():
        assert rel_error(arrays[name][index], values) <= 1e-5, name
    directions = second_order_directions(loaded.spec, 1, convention).numpy()
    assert rel_error(arrays["second_order/layer_1/directions"], directions) <= 1e-6
    assert ("second_order/layer_1/shared" in arrays) == (convention == "split")


def test_xarray_opens_the_root_and_the_direct_group(split_store):
    xr = pytest.importorskip("xarray")
    arrays = read_all(split_store)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = xr.open_zarr(split_store, consolidated=False)
        direct = xr.open_zarr(split_store, group="direct", consolidated=False)
    assert root["image_embedding"].dims == ("sample", "embed")
    assert root["valid"].dims == ("sample",)
    np.testing.assert_array_equal(root["image_embedding"].values, arrays["image_embedding"])
    assert direct["heads"].dims == ("sample", "layer", "head", "embed")
    assert direct["tokens"].dims == ("sample", "token_layer", "head", "token", "embed")
    np.testing.assert_array_equal(direct["heads"].values, arrays["direct/heads"])
    assert dict(direct.sizes) == {"sample": N_ROWS, "layer": L, "head": H, "embed": D, "token_layer": 1, "token": T}


def test_float16_storage_of_chosen_head_layers(tmp_path, tiny_dataset, model_cache, fast_models):
    out = tmp_path / "fp16.zarr"
    shard = tiny_dataset.paths[0]
    assert run_cli(*extract_args(shard, out, "--dtype", "float16", "--heads-layers", "2", "3",
                                 "--second-order-layers", "0")) == 0
    arrays = read_all(str(out))
    for name, values in arrays.items():
        if name == "valid":
            assert values.dtype == np.bool_
        elif name == "second_order/layer_0/directions":
            assert values.dtype == np.float32  # input-independent, written once at full precision
        else:
            assert values.dtype == np.float16, name
    assert arrays["direct/heads"].shape == (8, 2, H, D) and arrays["direct/mlps"].shape == (8, 2, D)
    assert zarr.open_group(str(out), mode="r").attrs["layers"]["heads"] == [2, 3]
    keys = [f"s0-{i:03d}" for i in range(tiny_dataset.counts[0])]
    expected = reference(model_cache(TINY_MODEL), tiny_dataset, keys, "split", second_order_layers=(0,))
    rows = np.arange(len(keys))
    assert rel_error(arrays["direct/heads"][rows], expected["direct/heads"][:, 2:]) <= 2e-3
    assert rel_error(arrays["direct/mlps"][rows], expected["direct/mlps"][:, 2:]) <= 2e-3
    assert arrays["direct/cls_token"].shape == (8, 2, D)
    assert rel_error(arrays["direct/cls_token"][rows], expected["direct/cls_token"][:, 2:]) <= 2e-3
    for name in ("image_embedding", "direct/embedding", "direct/bias", "second_order/layer_0/weights",
                 "second_order/layer_0/shared"):
        assert rel_error(arrays[name][rows], expected[name]) <= 2e-3, name


# ----------------------------------------------------------------------------------------------
# Bad data and fsspec locations


def test_truncated_and_empty_shards_from_file_urls_into_a_memory_store(tmp_path, model_cache, fast_models):
    data = write_tiny_shards(tmp_path / "shards", (4, 6, 0), seed=3)
    truncate_inside_sample(data.paths[1], 3)  # samples 0..2 survive, sample 3 is cut
    urls = [f"file://{p}" for p in data.paths]
    out = f"memory://clipscope-tests/{uuid.uuid4().hex}.zarr"
    try:
        assert run_cli(*extract_args(urls, out)) == 3  # done, but shard 1 was not read whole
        assert run_cli(*extract_args(urls, out, "--allow-partial")) == 0
        store = RunStore.open(out, "r")
        records = store.shard_records(stage="extract")
        assert sorted(records) == [0, 1, 2] and all(r["status"] == "done" for r in records.values())
        assert records[1]["count"] == 3 and records[1]["valid"] == 3
        assert len(records[1]["shard_errors"]) == 1 and "truncated after 3 samples" in records[1]["shard_errors"][0]
        assert records[0]["shard_errors"] == [] and records[0]["count"] == 4
        assert records[2]["count"] == 0 and records[2]["capacity"] == 0 and records[2]["shard_errors"] == []
        assert store.n_rows == 8 and store.attrs["shards"] == urls
        table = pq.read_table(fsspec.open(f"{out}/samples.parquet", "rb").open()).to_pylist()
        assert [r["key"] for r in table] == ["s0-000", "s0-001", "s0-002", "s0-003", "s1-000", "s1-001", "s1-002"]
        assert [r["row"] for r in table] == [0, 1, 2, 3, 4, 5, 6]
        assert all(r["error"] is None for r in table)
        np.testing.assert_array_equal(store.read_valid(), [True] * 7 + [False])
        keys = [r["key"] for r in table]
        expected = reference(model_cache(TINY_MODEL), data, keys, "split")
        assert rel_error(store.read("image_embedding")[:7], expected["image_embedding"]) <= 1e-5
        assert rel_error(store.read("direct/heads")[:7], expected["direct/heads"]) <= 1e-5
        assert json.loads(fsspec.open(f"{out}/zarr.json", "rb").open().read())["attributes"]["n_rows"] == 8
    finally:
        fs = fsspec.filesystem("memory")
        root = out.split("://", 1)[1]
        if fs.exists(root):
            fs.rm(root, recursive=True)
