"""Store queries against brute-force numpy: top images for a text direction of one head, top
images by a neuron's second-order effect norm, and one image's components along its embedding."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
import zarr

from clipscope.errors import ConfigError
from clipscope.pipelines.query import store_queries as queries
from clipscope.storage.layout import ArraySpec
from clipscope.storage.query import open_run
from clipscope.storage.store import RunStore

from extract_helpers import TINY_MODEL

TEXT = "a red circle"


def text_direction(loaded, text: str) -> np.ndarray:
    """Unit text embedding straight from the model's text tower (float64)."""
    with torch.no_grad():
        emb = loaded.model.encode_text(loaded.tokenizer([text]))[0].double().numpy()
    return emb / np.linalg.norm(emb)


def brute_top(scores: np.ndarray, valid: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Valid rows by score, highest first, ties to the lower row."""
    rows = np.flatnonzero(valid)
    order = sorted(rows.tolist(), key=lambda r: (-scores[r], r))[:k]
    return np.array(order, np.int64), scores[order]


def zarr_values(url: str, name: str) -> np.ndarray:
    return np.asarray(zarr.open_group(url, mode="r")[name][...])


def phi_norms(weights: np.ndarray, directions: np.ndarray, shared: np.ndarray | None, neuron: int) -> np.ndarray:
    """‖Σ_{l',h} q[l',h,n] · D[l',h,n] (+ shared)‖ per row, one row at a time with plain loops over (l', h)."""
    n_rows, n_later, n_heads = weights.shape[:3]
    out = np.zeros(n_rows)
    for r in range(n_rows):
        phi = np.zeros(directions.shape[-1])
        for later in range(n_later):
            for head in range(n_heads):
                phi += float(weights[r, later, head, neuron]) * directions[later, head, neuron].astype(np.float64)
        if shared is not None:
            phi += shared[r].astype(np.float64)
        out[r] = np.linalg.norm(phi)
    return out


# ----------------------------------------------------------------------------------------------
# A synthetic store spanning several read blocks (rows_per_chunk·16 = 64 rows per block)

SYN_ROWS, SYN_RPC, SYN_HEADS, SYN_NEURONS, SYN_EMBED = 200, 4, 3, 6, 32


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory):
    rng = np.random.default_rng(3)
    url = str(tmp_path_factory.mktemp("synthetic") / "store.zarr")
    specs = [
        ArraySpec("image_embedding", ("sample", "embed"), (SYN_EMBED,), "float32"),
        ArraySpec("direct/heads", ("sample", "layer", "head", "embed"), (2, SYN_HEADS, SYN_EMBED), "float32"),
        ArraySpec("second_order/layer_3/weights", ("sample", "later_layer", "head", "neuron"),
                  (2, SYN_HEADS, SYN_NEURONS), "float32"),
        ArraySpec("second_order/layer_3/shared", ("sample", "embed"), (SYN_EMBED,), "float32"),
    ]
    attrs = {"layers": {"heads": [5, 7], "second_order": {"3": [4, 5]}}}
    store = RunStore.create(url, arrays=specs, n_rows=SYN_ROWS, rows_per_chunk=SYN_RPC, attrs=attrs)
    data = {s.name: rng.standard_normal((SYN_ROWS, *s.shape_tail)).astype(np.float32) for s in specs}
    # Exact ties across blocks: row 150 repeats row 20, so their scores tie and row 20 must come first.
    for values in data.values():
        values[150] = values[20]
    valid = rng.random(SYN_ROWS) < 0.8
    valid[[20, 150]] = True
    store.write_rows(0, data, valid)
    store.write_result("second_order/layer_3/directions",
                       rng.standard_normal((2, SYN_HEADS, SYN_NEURONS, SYN_EMBED)).astype(np.float32),
                       ("later_layer", "head", "neuron", "embed"))
    store.write_samples_part(0, [{"row": r, "key": f"k{r:03d}", "shard": "synthetic.tar", "label": r % 7}
                                 for r in range(SYN_ROWS) if valid[r]])
    store.merge_samples()
    return url, data, valid


# ----------------------------------------------------------------------------------------------
# Text directions


@pytest.mark.parametrize("layer,head", [(3, 1), (0, 2)])
def test_top_images_for_text_equals_brute_force(split_store, model_cache, layer, head):
    loaded = model_cache(TINY_MODEL)
    store = open_run(split_store)
    heads = zarr_values(split_store, "direct/heads")[:, layer, head].astype(np.float64)
    valid = zarr_values(split_store, "valid")
    rows, scores = brute_top(heads @ text_direction(loaded, TEXT), valid, 5)
    table = queries.top_images_for_text(store, layer, head, TEXT, k=5, loaded=loaded, normalize=False)
    np.testing.assert_array_equal(table["row"].to_numpy(), rows)
    np.testing.assert_allclose(table["score"].to_numpy(), scores, rtol=1e-6, atol=1e-9)
    assert table["key"].to_pylist() == [f"s{r // 8}-{r % 8:03d}" for r in rows]
    # More than there are: every valid row once.
    everything = queries.top_images_for_text(store, layer, head, TEXT, k=100, loaded=loaded, normalize=False)
    assert sorted(everything["row"].to_pylist()) == np.flatnonzero(valid).tolist()


def test_top_images_for_text_loads_the_stores_own_model(split_store, model_cache, fast_models):
    store = open_run(split_store)
    given = queries.top_images_for_text(store, 2, 3, TEXT, k=4, loaded=model_cache(TINY_MODEL))
    assert queries.top_images_for_text(store, 2, 3, TEXT, k=4).equals(given)


def test_top_images_for_text_divides_by_the_image_norm_by_default(split_store, model_cache):
    loaded = model_cache(TINY_MODEL)
    store = open_run(split_store)
    heads = zarr_values(split_store, "direct/heads")[:, 2, 1].astype(np.float64)
    norms = np.linalg.norm(zarr_values(split_store, "image_embedding").astype(np.float64), axis=1)
    valid = zarr_values(split_store, "valid")
    rows, scores = brute_top(heads @ text_direction(loaded, TEXT) / np.maximum(norms, 1e-30), valid, 6)
    table = queries.top_images_for_text(store, 2, 1, TEXT, k=6, loaded=loaded)
    np.testing.assert_array_equal(table["row"].to_numpy(), rows)
    np.testing.assert_allclose(table["score"].to_numpy(), scores, rtol=1e-6, atol=1e-9)


def test_top_images_for_text_over_several_blocks_with_ties(synthetic_store, model_cache):
    url, data, valid = synthetic_store
    loaded = model_cache(TINY_MODEL)  # only its text tower is used (embed 32)
    store = open_run(url)
    direction = text_direction(loaded, "stripes")
    for layer, position in ((5, 0), (7, 1)):
        scores = data["direct/heads"][:, position, 2].astype(np.float64) @ direction
        scores[150] = scores[20]  # the same float32 values give the same float64 score
        for k in (1, 7, 40):
            rows, expected = brute_top(scores, valid, k)
            table = queries.top_images_for_text(store, layer, 2, "stripes", k=k, loaded=loaded, normalize=False)
            np.testing.assert_array_equal(table["row"].to_numpy(), rows)
            np.testing.assert_allclose(table["score"].to_numpy(), expected, rtol=1e-6)  # float32 text unit
            assert table["key"].to_pylist() == [f"k{r:03d}" for r in rows]
    # Rows 20 and 150 (in different read blocks) tie exactly: the lower row ranks first, the other next.
    order = queries.top_images_for_text(store, 7, 2, "stripes", k=SYN_ROWS, loaded=loaded, normalize=False)["row"].to_pylist()
    assert order.index(20) + 1 == order.index(150)


# ----------------------------------------------------------------------------------------------
# Second-order neuron norms


@pytest.mark.parametrize("store_fixture", ["split_store", "center_store"])
def test_top_images_for_neuron_equals_brute_force(store_fixture, request):
    url = request.getfixturevalue(store_fixture)
    store = open_run(url)
    weights = zarr_values(url, "second_order/layer_1/weights")
    directions = zarr_values(url, "second_order/layer_1/directions")
    shared = zarr_values(url, "second_order/layer_1/shared") if store_fixture == "split_store" else None
    valid = zarr_values(url, "valid")
    for neuron in (0, 5, 255):
        rows, norms = brute_top(phi_norms(weights, directions, shared, neuron), valid, 6)
        table = queries.top_images_for_neuron(store, 1, neuron, k=6)
        np.testing.assert_array_equal(table["row"].to_numpy(), rows)
        np.testing.assert_allclose(table["norm"].to_numpy(), norms, rtol=1e-9)


def test_top_images_for_neuron_over_several_blocks(synthetic_store):
    url, data, valid = synthetic_store
    store = open_run(url)
    directions = zarr_values(url, "second_order/layer_3/directions")
    for neuron in range(SYN_NEURONS):
        norms = phi_norms(data["second_order/layer_3/weights"], directions, data["second_order/layer_3/shared"],
                          neuron)
        rows, expected = brute_top(norms, valid, 9)
        table = queries.top_images_for_neuron(store, 3, neuron, k=9)
        np.testing.assert_array_equal(table["row"].to_numpy(), rows)
        np.testing.assert_allclose(table["norm"].to_numpy(), expected, rtol=1e-9)


# ----------------------------------------------------------------------------------------------
# One image


@pytest.mark.parametrize("store_fixture", ["split_store", "center_store"])
def test_image_summary_components_sum_to_the_embedding_norm(store_fixture, request):
    url = request.getfixturevalue(store_fixture)
    store = open_run(url)
    for key, row in (("s0-000", 0), ("s1-006", 14), ("s2-005", 21)):
        header, table = queries.image_summary(store, key, top=1000)
        embedding = zarr_values(url, "image_embedding")[row].astype(np.float64)
        norm = np.linalg.norm(embedding)
        assert header["embedding_norm"] == pytest.approx(norm, rel=1e-12)
        assert header["sum_of_components_along_embedding"] == pytest.approx(norm, rel=1e-5)
        assert table.num_rows == 2 + 4 + 4 * 4  # embedding, bias, 4 MLPs, 16 heads
        along = table["along_embedding"].to_numpy()
        assert along.sum() == pytest.approx(norm, rel=1e-5)
        assert np.all(np.diff(np.abs(along)) <= 0)
        unit = embedding / norm
        heads, mlps = zarr_values(url, "direct/heads")[row], zarr_values(url, "direct/mlps")[row]
        for rec in table.to_pylist():
            if rec["component"] == "head":
                vector = heads[rec["layer"], rec["head"]]
            elif rec["component"] == "mlp":
                vector = mlps[rec["layer"]]
            else:
                vector = zarr_values(url, f"direct/{rec['component']}")[row]
            vector = vector.astype(np.float64)
            assert rec["along_embedding"] == pytest.approx(vector @ unit, rel=1e-9, abs=1e-12)
            assert rec["norm"] == pytest.approx(np.linalg.norm(vector), rel=1e-9)
        top3 = queries.image_summary(store, row, top=3)[1]
        assert top3.equals(table.slice(0, 3))


# ----------------------------------------------------------------------------------------------
# Errors and formatting


def test_queries_refuse_what_the_store_does_not_hold(split_store, model_cache):
    store = open_run(split_store)
    loaded = model_cache(TINY_MODEL)
    with pytest.raises(ConfigError, match=r"^layer 4 is not stored .*stored heads layers: \[0, 1, 2, 3\]"):
        queries.top_images_for_text(store, 4, 0, TEXT, loaded=loaded, normalize=False)
    with pytest.raises(ConfigError, match=r"^head must be in 0\.\.3, got 4"):
        queries.top_images_for_text(store, 0, 4, TEXT, loaded=loaded, normalize=False)
    with pytest.raises(ConfigError, match=r"^k must be an integer ≥ 1, got 0"):
        queries.top_images_for_text(store, 0, 0, TEXT, k=0, loaded=loaded, normalize=False)
    with pytest.raises(ConfigError, match=r"^layer 0 has no second-order data .*stored: \['1'\]"):
        queries.top_images_for_neuron(store, 0, 3)
    with pytest.raises(ConfigError, match=r"^neuron must be in 0\.\.255, got 256"):
        queries.top_images_for_neuron(store, 1, 256)


def test_format_table_aligns_columns_and_blanks_missing_values():
    table = pa.table({"name": ["a", "longer"], "layer": pa.array([None, 3], pa.int64()), "score": [0.5, -1.25]})
    assert queries.format_table(table).splitlines() == [
        "name    layer  score  ",
        "------  -----  -------",
        "a              0.5000 ",
        "longer  3      -1.2500",
    ]
