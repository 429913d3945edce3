"""The viewer's sections over the newer jobs' results — head roles, segmentation, Rosetta concepts — on a copy of
the shapes store into which results of the declared layout (storage.schema: ROLES, SEGMENTATION, ROSETTA_*) are
written: each shows what is stored, and its top images by the stored rows' keys."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from clipscope.pipelines.view import StoreView, create_app
from clipscope.storage import schema
from clipscope.storage.query import sample_info
from clipscope.storage.store import RunStore

PROPERTIES = ["colours", "shapes", "positions"]


@pytest.fixture(scope="module")
def planted(shapes_store, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("planted") / "store")
    shutil.copytree(shapes_store, url)
    store = RunStore.open(url, "r+")
    layers = list(store.info.heads_layers)
    labels = np.array([[h % 3 - (h == 3) for h in range(4)] for _ in layers], np.int64)  # 0, 1, 2, −1
    attrs = {"layers": layers, "properties": PROPERTIES}
    store.write_result_group(schema.ROLES.path(), {
        "label": (labels, schema.ROLES.dims("label"), attrs),
        "share": (np.zeros((len(layers), 4, len(PROPERTIES))), schema.ROLES.dims("share"), attrs),
        "matches": (np.zeros((len(layers), 4), np.int64), schema.ROLES.dims("matches"), attrs)}, attrs)
    n = store.n_rows
    seg = schema.SEGMENTATION.path(method="tokens", task="shapes")
    store.write_result_group(seg, {
        "class_index": (np.zeros(n, np.int64), ("row",)), "correct": (np.arange(n), ("row",)),
        "labelled": (np.full(n, 100), ("row",)), "intersection": (np.ones((n, 2), np.int64), ("row", "seg_class")),
        "union": (np.full((n, 2), 4), ("row", "seg_class")), "ap": (np.full(n, 0.5), ("row",))},
        {"pixel_acc": 0.875, "miou": 0.4321, "map": 0.5, "n": n, "class_mode": "predicted", "threshold": "mean",
         "target": "foreground"})
    base = "reductions/rosetta/pair"
    store.write_result_group(f"{base}/units/anchor", {
        "layer_index": (np.array([0, 1, 1], np.int32), ("unit",)), "channel": (np.array([5, 6, 7], np.int32), ("unit",))})
    store.write_result_group(f"{base}/units/m1", {
        "layer_index": (np.array([0, 0], np.int32), ("unit",)), "channel": (np.array([3, 4], np.int32), ("unit",))})
    store.write_result_group(f"{base}/tuples", {
        "members": (np.array([[0, 1], [2, 0], [1, 1]], np.int64), ("tuple", "member")),
        "concept": (np.array([0, 1, 1], np.int64), ("tuple",))})
    store.write_result_group(f"{base}/dictionary", {
        "example_rows": (np.array([[3, 1, -1], [40, 2, 7]], np.int64), ("concept", "rank")),
        "example_scores": (np.array([[0.9, 0.8, np.nan], [0.7, 0.6, 0.5]]), ("concept", "rank"))})
    store.write_result_group(f"{base}/summary", {"n_units": (np.array([3, 2], np.int64), ("model",))},
                             {"models": ["anchor", "m1"], "k": 5,
                              "inputs": [{"layers": ["blocks.0", "blocks.1"]}, {"layers": ["layer1"]}]})
    return url


@pytest.fixture(scope="module")
def client(planted):
    from clipscope.pipelines.models.loading import load_run_model

    return create_app(StoreView(planted, loaded=load_run_model(RunStore.open(planted)))).test_client()


def test_head_roles_are_shown(client):
    page = client.get("/heads?layer=3").get_data(as_text=True)
    for label in ("colours", "shapes", "positions", "none"):
        assert f'<span class="role">{label}</span>' in page
    assert "No head roles stored" not in page


def test_segmentation_summary(client):
    body = client.get("/api/segmentation").get_json()
    assert [(r["method"], r["task"]) for r in body["results"]] == [("tokens", "shapes")]
    assert body["results"][0]["summary"]["miou"] == 0.4321
    assert "0.4321" in client.get("/segmentation").get_data(as_text=True)
    page = client.get("/image/shapes-s0-00000010").get_data(as_text=True)
    table = page[page.index('id="image-segmentation"'):]
    assert "<td>0.1000</td>" in table and "<td>0.2500</td>" in table and "<td>0.5000</td>" in table


def test_rosetta_concepts_with_dictionary_images(client, planted):
    store = RunStore.open(planted)
    body = client.get("/api/rosetta").get_json()
    assert body["names"] == ["pair"] and body["n_concepts"] == 2 and body["n_tuples"] == 3
    first, second = body["concepts"]
    assert first["n_tuples"] == 1 and first["units"] == ["anchor:blocks.0:5", "m1:layer1:4"]
    assert second["n_tuples"] == 2 and second["units"] == ["anchor:blocks.1:7", "m1:layer1:3"]
    assert [e["key"] for e in first["examples"]] == sample_info(store, [3, 1])["key"].to_pylist()
    assert [e["key"] for e in second["examples"]] == sample_info(store, [40, 2, 7])["key"].to_pylist()
    page = client.get("/rosetta").get_data(as_text=True)
    positions = [page.index(f'data-key="{e["key"]}"') for e in first["examples"] + second["examples"]]
    assert positions == sorted(positions)
    assert client.get("/rosetta?name=other").status_code == 404
    assert client.get("/api/rosetta?page=5").status_code == 400
