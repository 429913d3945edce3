"""The viewer's endpoints through Flask's test client: every page and API answers, its numbers equal the query
API's and the jobs' `Result.read` (or a brute-force recomputation), bad input is a 4xx with a one-line message
(an HTML page, or JSON under /api/), and the store's bytes never change."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from clipscope.pipelines.jobs import neurons as neuron_job
from clipscope.pipelines.jobs import second_order, textspan
from clipscope.pipelines.jobs.neurons.report import neuron_table
from clipscope.pipelines.query import store_queries
from clipscope.pipelines.texts.pools import get_pool
from clipscope.pipelines.view import create_app
from clipscope.storage.query import sample_info
from clipscope.storage.store import RunStore

from conftest import NEURON_LAYER, TEXTSPAN_LAYERS, reference_map, tree_digest, unit_text

TEXT = "a red circle"


@pytest.fixture(scope="module")
def client(shapes_view, store_digest_before):
    return create_app(shapes_view).test_client()


@pytest.fixture(scope="module")
def store(shapes_store):
    return RunStore.open(shapes_store, "r")


@pytest.fixture(scope="module")
def keys(store):
    valid = store.read_valid()
    table = sample_info(store, np.flatnonzero(valid))
    return table["key"].to_pylist()


def get_json(client, url, status=200):
    response = client.get(url)
    assert response.status_code == status, (url, response.status_code, response.get_data(as_text=True)[:300])
    return response.get_json()


def test_run_page_and_api(client, store):
    run = get_json(client, "/api/run")
    assert run["model"]["name"] == "clipscope-shapes"
    assert run["counts"] == {"shards": 1, "done": 1, "failed": 0, "missing": 0, "images": 48, "valid": 48,
                             "errors": 0}
    assert run["reductions"]["textspan"] == list(TEXTSPAN_LAYERS)
    assert run["reductions"]["second_order"] == [NEURON_LAYER] and run["reductions"]["omp"] == [NEURON_LAYER]
    assert {a["name"] for a in run["arrays"]} == set(store.array_names())
    assert run["member_index"]["indexed"] == 0 and "--build-index" in run["member_index"]["command"]
    page = client.get("/").get_data(as_text=True)
    assert "clipscope-shapes" in page and "shapes-00000.tar" in page


def test_heads_equal_textspan_result(client, store):
    result = textspan.Result.read(store, textspan.Settings(layers=TEXTSPAN_LAYERS, pool="shapes-all", basis_size=5,
                                                           span_rank=16))
    table = result.table().to_pylist()
    for layer in TEXTSPAN_LAYERS:
        shown = get_json(client, f"/api/heads/{layer}")
        for head in shown["heads"]:
            expected = [r for r in table if r["layer"] == layer and r["head"] == head["head"]]
            assert [p["text"] for p in head["picks"]] == [r["text"] for r in expected]
            assert [p["explained_ratio"] for p in head["picks"]] == [r["explained_ratio"] for r in expected]
        page = client.get(f"/heads?layer={layer}").get_data(as_text=True)
        assert all(p["text"] in page for p in shown["heads"][0]["picks"])


def test_top_images_equal_query_api(client, store, shapes_view):
    expected = store_queries.top_images_for_text(store, 3, 1, TEXT, 6, loaded=shapes_view.model())
    shown = get_json(client, f"/api/heads/3/1/top?text={TEXT}&k=6")["top"]
    assert [r["key"] for r in shown] == expected["key"].to_pylist()
    assert [r["score"] for r in shown] == expected["score"].to_pylist()
    page = client.get(f"/heads/3/1?text={TEXT}&k=6").get_data(as_text=True)
    positions = [page.index(f'data-key="{key}"') for key in expected["key"].to_pylist()]
    assert positions == sorted(positions)


def test_neuron_equals_job_results(client, store):
    stats, _ = second_order.result.read_statistics(store, NEURON_LAYER)
    neuron = int(np.argmax(stats["norm_mean"]))
    shown = get_json(client, f"/api/neurons/{NEURON_LAYER}/{neuron}?m=4")
    assert shown["stats"]["norm_mean"] == stats["norm_mean"][neuron]
    assert shown["stats"]["pc_explained"] == stats["pc_explained"][neuron]
    rows = stats["topk_rows"][neuron]
    assert [t["key"] for t in shown["top"]] == sample_info(store, rows[rows >= 0])["key"].to_pylist()
    omp = neuron_job.Result.of_layer(store, NEURON_LAYER)
    expected = neuron_table(omp, get_pool("shapes-all"), m=4, top=4, neurons=[neuron]).to_pylist()
    assert [(t["sign"], t["text"], t["coefficient"]) for t in shown["omp"]["terms"]] == [
        (r["sign"], r["text"], r["coefficient"]) for r in expected]
    evaluation = second_order.Result.read(store, second_order.Settings(NEURON_LAYER, top_k=8, task="shapes"))
    assert shown["ablations"]["accuracy"] == evaluation.accuracy
    assert shown["omp"]["accuracy"]["accuracy"] == omp.accuracy.accuracy.tolist()
    counts = stats["norm_histogram"][neuron]
    filled = np.flatnonzero(counts)
    assert shown["histogram"] == counts[filled[0]:filled[-1] + 1].tolist()
    assert shown["bin_edges"] == stats["norm_bin_edges"][filled[0]:filled[-1] + 2].tolist()
    listing = get_json(client, f"/api/neurons/{NEURON_LAYER}")
    assert listing["neurons"][0]["neuron"] == neuron
    page = client.get(f"/neurons/{NEURON_LAYER}/{neuron}?m=4").get_data(as_text=True)
    assert all(r["text"] in page for r in expected)


def test_image_decomposition_equals_query_api(client, store, keys):
    header, table = store_queries.image_summary(store, keys[3], top=12)
    shown = get_json(client, f"/api/image/{keys[3]}")
    assert shown["decomposition"]["header"] == header
    assert shown["decomposition"]["components"] == table.to_pylist()
    assert client.get(f"/image/{keys[3]}").status_code == 200


def test_topic_and_contrast_maps_equal_brute_force(client, store, shapes_view, keys):
    from clipscope.pipelines.query import interpret

    row = int(sample_info(store, np.flatnonzero(store.read_valid()))["row"][5].as_py())
    loaded = shapes_view.model()
    red, blue = unit_text(loaded, "red"), unit_text(loaded, "blue")
    topic = get_json(client, f"/api/map?key={keys[5]}&text=red")
    assert topic["map"] == "3" and topic["grid"] == [6, 6]
    np.testing.assert_allclose(np.asarray(topic["values"]).ravel(), reference_map(store.url, row, red),
                               rtol=1e-4, atol=1e-6)
    contrast = get_json(client, f"/api/map?key={keys[5]}&text=red&contrast=blue")
    np.testing.assert_allclose(np.asarray(contrast["values"]).ravel(), reference_map(store.url, row, red - blue),
                               rtol=1e-4, atol=1e-6)
    one_head = get_json(client, f"/api/map?key={keys[5]}&text=red&map=3:1")
    np.testing.assert_allclose(np.asarray(one_head["values"]).ravel(), reference_map(store.url, row, red, [1]),
                               rtol=1e-4, atol=1e-6)
    query_api = interpret.topic_maps(store, ["red"], sample=keys[5], layer=3, head=1, loaded=loaded)[0]
    assert np.asarray(one_head["values"]).tolist() == query_api.grid.tolist()
    png = client.get(f"/map.png?key={keys[5]}&text=red&map=3:2")
    assert png.status_code == 200 and png.mimetype == "image/png" and png.data[:4] == b"\x89PNG"


def test_neighbours_equal_brute_force_and_query_api(client, store, keys):
    from clipscope.pipelines.query import interpret

    group = zarr.open_group(store.url, mode="r")
    heads = np.asarray(group["direct/heads"][...], np.float64)
    rho = heads[:, 3, 2] / np.linalg.norm(np.asarray(group["image_embedding"][...], np.float64), axis=1)[:, None]
    valid = store.read_valid()
    row = int(sample_info(store, np.flatnonzero(valid))["row"][2].as_py())
    for score in ("dot", "cosine"):
        scores = {r: float(rho[r] @ rho[row]) / (float(np.linalg.norm(rho[r]) * np.linalg.norm(rho[row]))
                                                 if score == "cosine" else 1.0)
                  for r in np.flatnonzero(valid) if r != row}
        expected = sorted(scores, key=lambda r: (-scores[r], r))[:5]
        shown = get_json(client, f"/api/neighbours?key={keys[2]}&layer=3&head=2&k=5&score={score}")["neighbours"]
        assert [n["row"] for n in shown] == expected
        np.testing.assert_allclose([n["score"] for n in shown], [scores[r] for r in expected], rtol=1e-9)
        query_api = interpret.head_image_neighbours(store, 3, 2, sample=keys[2], k=5, score=score)
        assert [n["key"] for n in shown] == query_api["key"].to_pylist()


def test_thumbnails_come_from_the_shard_by_key(client, shapes_view, keys):
    from PIL import Image
    import io

    response = client.get(f"/thumb?key={keys[0]}&size=96")
    assert response.status_code == 200 and response.mimetype == "image/png"
    with Image.open(io.BytesIO(response.data)) as image:
        assert image.size == (96, 96)
    again = client.get(f"/thumb?key={keys[0]}&size=96")
    assert again.data == response.data


def test_extra_sections_name_their_commands(client):
    for section, command in (("segmentation", "clipscope segment"), ("rosetta", "clipscope rosetta")):
        body = get_json(client, f"/api/{section}")
        assert body["results"] == [] and body["command"].startswith(command)
        page = client.get(f"/{section}").get_data(as_text=True)
        assert command in page


def test_images_listing(client, keys):
    page = client.get("/images").get_data(as_text=True)
    assert all(f'data-key="{key}"' in page for key in keys[:10])
    assert client.get("/images?page=99").status_code == 400


BAD = [
    # (url, status, words of the message)
    ("/image/no-such-key", 404, "no sample with key"),
    ("/image/..%2F..%2Fetc%2Fpasswd", 400, "key"),
    ("/image/a%00b", 400, "key"),
    ("/thumb?key=../../etc/passwd", 400, "key"),
    ("/thumb?key=shapes-s0-00000000&size=9999", 400, "size"),
    ("/thumb?key=no-such-key", 404, "no sample"),
    ("/heads?layer=0", 404, "textspan"),
    ("/heads/99/0", 404, "layer 99"),
    ("/heads/3/99", 404, "head 99"),
    ("/heads/3/1?text=" + "x" * 201, 400, "at most 200"),
    ("/heads/3/1?k=0&text=red", 400, "k must be in"),
    ("/neurons?layer=0", 404, "second-order"),
    ("/neurons/2/100000", 404, "neuron 100000"),
    ("/neurons/2/0?m=3", 400, "m"),
    ("/neurons?layer=2&page=abc", 400, "page must be an integer"),
    ("/no/such/page", 404, "not found"),
    ("/static/..%2Fapp.py", 404, "not found"),
    ("/static/../data.py", 404, "not found"),
    ("/api/image/no-such-key", 404, "no sample with key"),
    ("/api/map?key=shapes-s0-00000000", 400, "text must be a non-empty"),
    ("/api/map?key=shapes-s0-00000000&text=" + "y" * 300, 400, "at most 200"),
    ("/api/map?key=../x&text=red", 400, "key"),
    ("/api/neighbours?key=shapes-s0-00000000", 400, "layer"),
    ("/api/neighbours?key=shapes-s0-00000000&layer=3&head=1&score=euclid", 400, "score must be dot or cosine"),
    ("/api/map?key=shapes-s0-00000000&text=red&map=9:9", 400, "map must be one of"),
    ("/api/neighbours?key=shapes-s0-00000000&layer=3&head=1&k=500", 400, "k must be in"),
    ("/api/heads/3/1/top", 400, "text"),
    ("/api/heads/7", 404, "layer 7"),
    ("/api/neurons/5", 404, "layer 5"),
    ("/api/neurons/2/-1", 404, "not found"),
]


@pytest.mark.parametrize("url, status, words", BAD)
def test_bad_input_is_a_4xx_with_a_message(client, url, status, words):
    response = client.get(url)
    assert response.status_code == status, response.get_data(as_text=True)[:300]
    body = response.get_data(as_text=True)
    assert "Traceback" not in body
    if url.startswith("/api/"):
        assert response.is_json and words.lower() in response.get_json()["error"].lower()
    else:
        assert response.mimetype == "text/html" and 'id="error-message"' in body
        assert words.lower() in body.lower()


def test_key_check():
    from clipscope.errors import ParameterError
    from clipscope.pipelines.view.data import check_key

    for key in ("shapes-s0-00000001", "photos/my cat é", "a.b/c_d", "./x"):
        assert check_key(key) == key
    for key in ("", "a/../b", "..", "../x", "a\x00b", "a\nb", "x" * 513):
        with pytest.raises(ParameterError, match="key must be a sample key"):
            check_key(key)


def test_find_a_key(client, keys):
    response = client.get(f"/find?key={keys[4]}")
    assert response.status_code == 302 and response.headers["Location"].endswith(f"/image/{keys[4]}")
    assert client.get("/find?key=nope").status_code == 404
    assert client.get("/find?key=a/../b").status_code == 400


def test_writes_are_refused(client):
    assert client.post("/").status_code == 405
    assert client.put("/api/run").status_code == 405
    assert client.delete("/image/shapes-s0-00000000").status_code == 405


def test_unexpected_errors_are_pages_without_traceback(shapes_view, monkeypatch):
    app = create_app(shapes_view)
    monkeypatch.setattr(shapes_view, "run", lambda: 1 / 0)
    response = app.test_client().get("/")
    body = response.get_data(as_text=True)
    assert response.status_code == 500 and "ZeroDivisionError" in body and "Traceback" not in body


def test_store_bytes_unchanged(client, shapes_store, store_digest_before):
    assert tree_digest(shapes_store) == store_digest_before


def test_store_by_fsspec_url(shapes_store, shapes_view, keys):
    """A store named by an fsspec URL (file://, as s3:// or gs://) is served the same way."""
    from clipscope.pipelines.view import StoreView

    view = StoreView("file://" + shapes_store, loaded=shapes_view.model())
    client = create_app(view).test_client()
    assert client.get("/").status_code == 200
    assert client.get(f"/image/{keys[1]}").status_code == 200
    assert client.get(f"/thumb?key={keys[1]}&size=64").data[:4] == b"\x89PNG"
    assert client.get("/api/heads/3").get_json() == get_json(create_app(shapes_view).test_client(), "/api/heads/3")


def test_cli_serves_on_localhost(shapes_store):
    """`clipscope view STORE --port 0` binds 127.0.0.1, says where, and answers; stopped with SIGINT."""
    import signal
    import subprocess
    import sys
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "clipscope.pipelines.cli", "view", shapes_store, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line and "read-only" in line, (line, proc.stderr.read() if proc.poll() else "")
        url = line.split(" at ", 1)[1].split()[0]
        with urllib.request.urlopen(url) as response:
            assert response.status == 200 and b"clipscope-shapes" in response.read()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
