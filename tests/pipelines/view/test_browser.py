"""The viewer in a real browser: headless Debian chromium driven by Playwright against `clipscope view`'s app
served by waitress on 127.0.0.1, over the shapes-world store. Each page renders and shows the top image keys and
texts the query API gives; typing a text redraws the topic map; a bad key gives an error page; the store's bytes
are unchanged after the session. Every page's screenshot is written to a temporary folder (its path is printed;
set CLIPSCOPE_VIEW_SCREENSHOTS=DIR to keep them).

No browser: the tests skip with the reason, except under CI (CI=true), where `.ci/setup` installs chromium and
its absence is a failure."""

from __future__ import annotations

import os
import shutil
import threading

import numpy as np
import pytest

from clipscope.pipelines.jobs import neurons as neuron_job
from clipscope.pipelines.jobs import second_order, textspan
from clipscope.pipelines.jobs.neurons.report import neuron_table
from clipscope.pipelines.query import store_queries
from clipscope.pipelines.texts.pools import get_pool
from clipscope.pipelines.view import create_app
from clipscope.storage.query import sample_info
from clipscope.storage.store import RunStore

from conftest import NEURON_LAYER, TEXTSPAN_LAYERS, reference_map, tree_digest, unit_text

BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TEXT = "a red circle"


def find_chromium() -> str | None:
    path = os.environ.get("CLIPSCOPE_CHROMIUM")
    if path:
        return path
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _no_browser(reason: str):
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must run the viewer's browser tests, but {reason} (.ci/setup installs Debian's chromium)")
    pytest.skip(f"viewer browser tests skipped: {reason}; install Debian's chromium (apt-get install chromium) "
                f"or set CLIPSCOPE_CHROMIUM")


@pytest.fixture(scope="module")
def server(shapes_view, store_digest_before):
    from waitress import create_server

    app = create_app(shapes_view)
    srv = create_server(app, host="127.0.0.1", port=0, threads=4)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.effective_port}"
    srv.close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    executable = find_chromium()
    if executable is None:
        _no_browser("no chromium executable was found")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _no_browser("the playwright package is not installed (pip install -e '.[test]')")
    playwright = sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=executable, headless=True, args=BROWSER_ARGS)
    except Exception as exc:
        playwright.stop()
        _no_browser(f"chromium at {executable} did not start ({str(exc).splitlines()[0]})")
    yield chromium
    chromium.close()
    playwright.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = os.environ.get("CLIPSCOPE_VIEW_SCREENSHOTS") or str(tmp_path_factory.mktemp("view-screenshots"))
    os.makedirs(folder, exist_ok=True)
    print(f"viewer screenshots: {folder}")
    return folder


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    context.close()
    assert not errors, f"JavaScript errors: {errors}"


@pytest.fixture(scope="module")
def store(shapes_store):
    return RunStore.open(shapes_store, "r")


@pytest.fixture(scope="module")
def keys(store):
    return sample_info(store, np.flatnonzero(store.read_valid()))["key"].to_pylist()


def shot(page, shots, name):
    path = os.path.join(shots, f"{name}.png")
    page.screenshot(path=path, full_page=True)
    assert os.path.getsize(path) > 1000


def shown_keys(page, selector="#top-images .top-image"):
    return page.eval_on_selector_all(selector, "els => els.map(e => e.dataset.key)")


def loaded_images(page, selector):
    """How many of the images matched have loaded with a non-zero width (thumbnails from the shard)."""
    page.wait_for_load_state("networkidle")
    return page.eval_on_selector_all(selector, "els => els.filter(e => e.complete && e.naturalWidth > 0).length")


def test_run_page(page, server, shots):
    response = page.goto(server + "/")
    assert response.status == 200
    assert page.inner_text("#model-name") == "clipscope-shapes"
    assert page.inner_text("#count-images") == "48" and page.inner_text("#count-valid") == "48"
    assert "shapes-00000.tar" in page.inner_text("#shards")
    assert "layers 2, 3" in page.inner_text("#reductions")
    shot(page, shots, "run")


def test_heads_page_shows_textspan_texts(page, server, shots, store):
    result = textspan.Result.read(store, textspan.Settings(layers=TEXTSPAN_LAYERS, pool="shapes-all", basis_size=5,
                                                           span_rank=16))
    page.goto(server + "/heads?layer=3")
    for head in range(4):
        texts = page.eval_on_selector_all(f'.head-card[data-head="{head}"] .textspan-text',
                                          "els => els.map(e => e.textContent)")
        assert texts == [result.texts[int(j)] for j in result.indices[3][head]]
    shot(page, shots, "heads")


def test_head_page_top_images_for_a_typed_text(page, server, shots, store, shapes_view):
    page.goto(server + "/heads?layer=3")
    page.select_option("#head-select", "1")
    page.fill("#head-search input[name=text]", TEXT)
    page.click("#head-search button")
    page.wait_for_url("**/heads/3/1?text=*")
    expected = store_queries.top_images_for_text(store, 3, 1, TEXT, 10, loaded=shapes_view.model())
    assert shown_keys(page) == expected["key"].to_pylist()
    assert loaded_images(page, "#top-images img") == 10
    shot(page, shots, "head")


def test_neuron_pages(page, server, shots, store):
    stats, _ = second_order.result.read_statistics(store, NEURON_LAYER)
    neuron = int(np.argmax(stats["norm_mean"]))
    page.goto(server + f"/neurons?layer={NEURON_LAYER}")
    first = page.eval_on_selector("#neuron-list tr:nth-child(2) a", "e => e.textContent")
    assert int(first) == neuron
    shot(page, shots, "neurons")
    page.click("#neuron-list tr:nth-child(2) a")
    page.wait_for_url(f"**/neurons/{NEURON_LAYER}/{neuron}")
    rows = stats["topk_rows"][neuron]
    assert shown_keys(page) == sample_info(store, rows[rows >= 0])["key"].to_pylist()
    omp = neuron_job.Result.of_layer(store, NEURON_LAYER)
    expected = neuron_table(omp, get_pool("shapes-all"), m=4, top=4, neurons=[neuron]).to_pylist()
    texts = page.eval_on_selector_all("#omp-texts .omp-text", "els => els.map(e => e.textContent)")
    signs = page.eval_on_selector_all("#omp-texts tr td:first-child", "els => els.map(e => e.textContent)")
    assert texts == [r["text"] for r in expected] and signs == [r["sign"] for r in expected]
    assert "all_neurons" in page.inner_text("#ablations")
    assert loaded_images(page, "#top-images img") == int((rows >= 0).sum())
    shot(page, shots, "neuron")


def test_image_page_topic_map_follows_the_typed_text(page, server, shots, store, shapes_view, keys):
    key = keys[7]
    row = int(sample_info(store, np.flatnonzero(store.read_valid()))["row"][7].as_py())
    page.goto(server + f"/image/{key}")
    assert page.inner_text("#sample-key") == key
    header, table = store_queries.image_summary(store, key, top=12)
    cells = page.eval_on_selector_all("#decomposition tr td:nth-child(4)", "els => els.map(e => e.textContent)")
    assert cells == [f"{v:.4f}" for v in table["along_embedding"].to_pylist()]
    assert loaded_images(page, "#original") == 1

    loaded = shapes_view.model()
    for text in ("red", "a blue square"):
        with page.expect_response(lambda r: "/api/map?" in r.url) as answer:
            page.fill("#map-text", text)
        body = answer.value.json()
        page.wait_for_function("t => document.getElementById('topic-map').dataset.text === t", arg=text)
        np.testing.assert_allclose(np.asarray(body["values"]).ravel(),
                                   reference_map(store.url, row, unit_text(loaded, text)), rtol=1e-4, atol=1e-6)
        assert f'"{text}"' in page.inner_text("#map-stats")
        assert page.eval_on_selector("#topic-map", "e => e.naturalWidth") > 0
        assert f"text={text.replace(' ', '+')}" in page.url
    with page.expect_response(lambda r: "/api/map?" in r.url) as answer:
        page.fill("#map-contrast", "blue")
    np.testing.assert_allclose(
        np.asarray(answer.value.json()["values"]).ravel(),
        reference_map(store.url, row, unit_text(loaded, "a blue square") - unit_text(loaded, "blue")),
        rtol=1e-4, atol=1e-6)
    page.wait_for_function("() => document.getElementById('topic-map').dataset.contrast === 'blue'")
    with page.expect_response(lambda r: "/api/map?" in r.url) as answer:
        page.select_option("#map-which", "3:0")
    np.testing.assert_allclose(
        np.asarray(answer.value.json()["values"]).ravel(),
        reference_map(store.url, row, unit_text(loaded, "a blue square") - unit_text(loaded, "blue"), [0]),
        rtol=1e-4, atol=1e-6)
    assert page.query_selector("#neighbours") is None  # neighbours scan rows: only when asked for
    page.select_option("#neighbour-form select[name=layer]", "3")
    page.select_option("#neighbour-form select[name=head]", "2")
    page.click("#neighbour-form button")
    page.wait_for_selector("#neighbours")
    expected = [n["key"] for n in shapes_view.neighbours(key, 3, 2, 8)]
    assert shown_keys(page, "#neighbours .top-image") == expected and key not in expected
    assert loaded_images(page, "#neighbours img") == 8
    page.wait_for_function("() => document.getElementById('topic-map').dataset.text === 'a blue square'")
    assert page.eval_on_selector("#map-which", "e => e.value") == "3:0"
    shot(page, shots, "image")


def test_bad_key_gives_an_error_page(page, server, shots, keys):
    page.goto(server + "/")
    page.fill("form.find input", keys[2])  # the header's key box finds an image
    with page.expect_navigation():
        page.press("form.find input", "Enter")
    assert page.inner_text("#sample-key") == keys[2]
    page.fill("form.find input", "no-such-image")
    with page.expect_navigation():
        page.press("form.find input", "Enter")
    assert "no sample with key 'no-such-image'" in page.inner_text("#error-message")
    response = page.goto(server + "/image/no-such-image")
    assert response.status == 404
    assert "no sample with key 'no-such-image'" in page.inner_text("#error-message")
    shot(page, shots, "error")
    response = page.goto(server + "/image/..%2F..%2Fetc%2Fpasswd")
    assert response.status == 400 and "key must be a sample key" in page.inner_text("#error-message")


def test_pages_of_missing_results_name_their_command(page, server, shots):
    for section, command in (("segmentation", "clipscope segment"), ("rosetta", "clipscope rosetta")):
        assert page.goto(server + f"/{section}").status == 200
        assert command in page.inner_text(f"#{section}-missing")
        shot(page, shots, section)
    assert page.goto(server + "/images").status == 200
    assert loaded_images(page, ".thumbs img") == 48
    shot(page, shots, "images")


def test_store_bytes_unchanged_after_the_browser_session(server, shapes_store, store_digest_before):
    assert tree_digest(shapes_store) == store_digest_before
