"""CLIP-InterpreT analyses (spec S5) against brute-force numpy: per-head and property nearest neighbours of an
image, per-head neighbours of a text, over several row blocks with exact ties; a new image's query equals its
stored row's; topic and contrast maps equal the per-token terms projected by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipscope.errors import ConfigError, ParameterError
from clipscope.pipelines.query import interpret
from clipscope.storage.layout import ArraySpec
from clipscope.storage.query import open_run
from clipscope.storage.store import RunStore

from extract_helpers import TINY_MODEL, decoded_image, extract_args, run_cli

ROWS, RPC, HEADS, EMBED = 120, 4, 3, 32


def brute_top(scores: np.ndarray, valid: np.ndarray, k: int) -> tuple[list[int], np.ndarray]:
    rows = sorted(np.flatnonzero(valid).tolist(), key=lambda r: (-scores[r], r))[:k]
    return rows, scores[rows]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Heads of layers 5 and 7; row 90 repeats row 20 and row 100 repeats row 30 (exact ties across blocks)."""
    rng = np.random.default_rng(5)
    url = str(tmp_path_factory.mktemp("interpret") / "store.zarr")
    specs = [ArraySpec("image_embedding", ("sample", "embed"), (EMBED,), "float32"),
             ArraySpec("direct/heads", ("sample", "layer", "head", "embed"), (2, HEADS, EMBED), "float32")]
    store = RunStore.create(url, arrays=specs, n_rows=ROWS, rows_per_chunk=RPC,
                            attrs={"layers": {"heads": [5, 7]}})
    data = {s.name: rng.standard_normal((ROWS, *s.shape_tail)).astype(np.float32) for s in specs}
    data["image_embedding"] *= rng.uniform(0.5, 3, (ROWS, 1)).astype(np.float32)  # norms differ
    for values in data.values():
        values[90], values[100] = values[20], values[30]
    valid = rng.random(ROWS) < 0.85
    valid[[20, 30, 57, 90, 100]] = True
    store.write_rows(0, data, valid)
    store.write_samples_part(0, [{"row": r, "key": f"k{r:03d}", "shard": "x.tar"} for r in range(ROWS) if valid[r]])
    store.merge_samples()
    return url, data, valid


def rho(data, position, head, normalize=True):
    heads = data["direct/heads"][:, position, head].astype(np.float64)
    norms = np.linalg.norm(data["image_embedding"].astype(np.float64), axis=1)
    return heads / norms[:, None] if normalize else heads


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("query_row", [20, 30, 57])
def test_head_image_neighbours_equal_brute_force(synthetic, query_row, normalize):
    url, data, valid = synthetic
    store = open_run(url)
    reps = rho(data, 1, 2, normalize)
    scores = reps @ reps[query_row]
    others = valid.copy()
    others[query_row] = False
    for k in (1, 8, ROWS):
        rows, expected = brute_top(scores, others, k)
        table = interpret.head_image_neighbours(store, 7, 2, sample=query_row, k=k, normalize=normalize, block_rows=8)
        assert table["row"].to_pylist() == rows
        np.testing.assert_allclose(table["score"].to_numpy(), expected, rtol=1e-12)
    order = interpret.head_image_neighbours(store, 7, 2, sample=f"k{query_row:03d}", k=ROWS)["row"].to_pylist()
    if query_row != 30:  # rows 30 and 100 tie exactly (different blocks): the lower row first, the other next
        assert order.index(30) + 1 == order.index(100)


@pytest.mark.parametrize("score", ["dot", "cosine"])
def test_property_neighbours_mean_the_heads_then_score(synthetic, score):
    url, data, valid = synthetic
    store = open_run(url)
    rep = (rho(data, 0, 1) + rho(data, 1, 2)) / 2
    if score == "cosine":
        rep = rep / np.linalg.norm(rep, axis=1, keepdims=True)
    others = valid.copy()
    others[30] = False
    rows, expected = brute_top(rep @ rep[30], others, 10)
    table = interpret.property_neighbours(store, heads=[(5, 1), (7, 2)], sample=30, k=10, score=score, block_rows=12)
    assert table["row"].to_pylist() == rows
    np.testing.assert_allclose(table["score"].to_numpy(), expected, rtol=1e-12)
    assert rows[0] == 100  # row 30's twin (another block) is its own best match


def test_the_executor_tree_and_block_size_do_not_change_the_answer(synthetic):
    url, _, _ = synthetic
    store = open_run(url)
    tables = [interpret.head_image_neighbours(store, 5, 0, sample=20, k=15, block_rows=b) for b in (4, 12, 64, 200)]
    assert all(t.equals(tables[0]) for t in tables)


def test_bad_queries_fail_naming_the_parameter(synthetic):
    store = open_run(synthetic[0])
    with pytest.raises(ParameterError, match="layer"):
        interpret.head_image_neighbours(store, 6, 0, sample=20)
    with pytest.raises(ParameterError, match="head"):
        interpret.head_image_neighbours(store, 5, 3, sample=20)
    with pytest.raises(ConfigError, match="exactly one query image"):
        interpret.head_image_neighbours(store, 5, 0)
    with pytest.raises(ParameterError, match="score"):
        interpret.property_neighbours(store, heads=[(5, 0)], sample=20, score="euclid")
    with pytest.raises(ParameterError, match="heads"):
        interpret.parse_heads("L5-H0")
    assert interpret.parse_heads("L5H0, l7h2") == [(5, 0), (7, 2)]


# --- a real (tiny-model) store: text neighbours, new images, topic maps ------------------------------


@pytest.fixture(scope="module")
def token_store(tmp_path_factory, tiny_dataset, fast_models):
    out = str(tmp_path_factory.mktemp("interpret-real") / "tokens.zarr")
    assert run_cli(*extract_args(tiny_dataset.pattern, out, "--token-layers", "2", "3", "--token-sum")) == 0
    return out


def unit(loaded, text):
    with torch.no_grad():
        emb = loaded.model.encode_text(loaded.tokenizer([text]))[0].double().numpy()
    return emb / np.linalg.norm(emb)


def test_head_text_neighbours_equal_brute_force(token_store, model_cache):
    loaded = model_cache(TINY_MODEL)
    store = open_run(token_store)
    heads = store.read("direct/heads")[:, 3, 1].astype(np.float64)
    norms = np.linalg.norm(store.read("image_embedding").astype(np.float64), axis=1)
    rows, expected = brute_top(heads @ unit(loaded, "a red circle") / np.maximum(norms, 1e-30), store.read_valid(), 5)
    text, table = interpret.head_text_neighbours(store, 3, 1, text="a red circle", k=5, loaded=loaded, block_rows=4)
    assert text == "a red circle" and table["row"].to_pylist() == rows
    np.testing.assert_allclose(table["score"].to_numpy(), expected, rtol=1e-5)


def test_a_new_image_queries_like_its_stored_row(token_store, tiny_dataset, model_cache):
    loaded = model_cache(TINY_MODEL)
    store = open_run(token_store)
    key = "s0-001"
    row = int(store.read_samples().to_pandas().set_index("key").loc[key, "row"])
    image = decoded_image(tiny_dataset.images[key])
    new = interpret.query_of(store, image=image, loaded=loaded, token_layers=(3,), token_sum=True)
    stored = interpret.query_of(store, sample=key, names=("image_embedding", "direct/heads", "direct/tokens",
                                                          "direct/token_sum"))
    for name in ("image_embedding", "direct/heads", "direct/token_sum"):
        np.testing.assert_allclose(new.arrays[name], stored.arrays[name], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.arrays["direct/tokens"][0], stored.arrays["direct/tokens"][1], rtol=1e-5, atol=1e-6)
    by_image = interpret.head_image_neighbours(store, 3, 2, image=image, k=30, loaded=loaded)["row"].to_pylist()
    by_row = interpret.head_image_neighbours(store, 3, 2, sample=key, k=30)["row"].to_pylist()
    assert [r for r in by_image if r != row] == by_row
    maps_new = interpret.topic_maps(store, ["a red circle"], image=image, layer=3, head=1, loaded=loaded)
    maps_row = interpret.topic_maps(store, ["a red circle"], sample=key, layer=3, head=1, loaded=loaded)
    np.testing.assert_allclose(maps_new[0].grid, maps_row[0].grid, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("layer,head", [(3, 0), (2, 3), (None, None)])
def test_topic_and_contrast_maps_equal_the_terms_projected_by_hand(token_store, model_cache, layer, head):
    loaded = model_cache(TINY_MODEL)
    store = open_run(token_store)
    row = 9
    norm = np.linalg.norm(store.read("image_embedding", [row])[0].astype(np.float64))
    if layer is None:
        terms = store.read("direct/token_sum", [row])[0, 1:].astype(np.float64)
    else:
        terms = store.read("direct/tokens", [row])[0, [2, 3].index(layer), head, 1:].astype(np.float64)
    texts = ["a red circle", "a blue square"]
    grids = [(terms / norm @ unit(loaded, t)).reshape(4, 4) for t in texts]
    maps = interpret.topic_maps(store, texts, sample=row, layer=layer, head=head, loaded=loaded)
    for m, grid in zip(maps, grids):
        np.testing.assert_allclose(m.grid, grid, rtol=1e-5, atol=1e-8)
        assert m.pixels.shape == (64, 64)
        up = torch.nn.functional.interpolate(torch.from_numpy(grid)[None, None], size=(64, 64), mode="bilinear",
                                             align_corners=False)[0, 0].numpy()
        np.testing.assert_allclose(m.pixels, up, rtol=1e-5, atol=1e-8)
        assert m.display.min() == 0 and m.display.max() == pytest.approx(1)
    contrast = interpret.contrast_map(store, *texts, sample=row, layer=layer, head=head, loaded=loaded)
    d = contrast.difference
    np.testing.assert_allclose(d, maps[0].pixels - maps[1].pixels, rtol=1e-12)
    share = contrast.first_share
    assert share.min() >= 0 and share.max() <= 1 and np.isclose(max(share.max(), 1 - share.min()), 1)


def test_cli_neighbours_topic_contrast_and_textspan_pick(token_store, tiny_dataset, tmp_path, capsys):
    from clipscope.pipelines.jobs import textspan

    url = str(tmp_path / "store.zarr")
    import shutil

    shutil.copytree(token_store, url)
    assert run_cli("query", url, "neighbours", "--sample", "s0-001", "--layer", "3", "--head", "2", "-k", "3") == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 5 and "score" in out  # header, rule, 3 rows
    image = tmp_path / "query.png"
    decoded_image(tiny_dataset.images["s0-001"]).save(image)
    assert run_cli("query", url, "neighbours", "--image", image, "--heads", "L3H2,L2H1", "--score", "cosine") == 0
    assert "score" in capsys.readouterr().out
    assert run_cli("query", url, "topic", "--sample", "s0-001", "--text", "a red circle", "--text", "a dog",
                   "--layer", "3", "--head", "1", "--png", tmp_path / "topic.png") == 0
    assert "peak at" in capsys.readouterr().out and (tmp_path / "topic.png").stat().st_size > 1000
    assert run_cli("query", url, "contrast", "--image", image, "--text", "red", "--text", "blue", "--aggregate",
                   "--png", tmp_path / "contrast.png") == 0
    assert "of pixels closer to the first" in capsys.readouterr().out
    assert (tmp_path / "contrast.png").stat().st_size > 1000
    textspan.run(RunStore.open(url, "r+"), textspan.Settings(layers=(3,), pool="shapes-colours", basis_size=3))
    assert run_cli("query", url, "text", "--layer", "3", "--head", "0", "--textspan-pick", "1", "-k", "2") == 0
    assert "TextSpan pick 1 of L3H0" in capsys.readouterr().out
    assert run_cli("roles", url) == 0  # shapes-colours: every tagged text is a colour
    capsys.readouterr()
    heads = interpret.heads_with_property(RunStore.open(url), "colours")
    assert heads and all(layer == 3 for layer, _ in heads)
    by_property = interpret.property_neighbours(RunStore.open(url), property="colours", sample="s0-001", k=4)
    assert by_property.equals(interpret.property_neighbours(RunStore.open(url), heads=heads, sample="s0-001", k=4))
    assert run_cli("query", url, "neighbours", "--sample", "s0-001", "--property", "colours") == 0
    assert run_cli("query", url, "neighbours", "--sample", "s0-001", "--property", "moods") == 2
    assert "property must be one of colours" in capsys.readouterr().err
    assert run_cli("query", url, "topic", "--sample", "s0-001", "--text", "red", "--layer", "3", "--head", "0",
                   "--textspan-extremes", "--task", "shapes-colour", "--png", tmp_path / "extremes.png") == 0
    assert "largest:" in capsys.readouterr().out
    assert run_cli("query", url, "contrast", "--sample", "s0-001", "--text", "red", "--aggregate") == 2
    assert "exactly two --text" in capsys.readouterr().err
    assert run_cli("query", url, "topic", "--sample", "s0-001", "--text", "red", "--layer", "1", "--head", "0") == 2
    assert "--token-layers 1" in capsys.readouterr().err


def test_textspan_extremes_equal_brute_force(token_store, tmp_path, model_cache):
    import shutil

    from clipscope.pipelines.jobs import textspan
    from clipscope.pipelines.texts.pools import get_pool

    url = str(tmp_path / "store.zarr")
    shutil.copytree(token_store, url)
    store = RunStore.open(url, "r+")
    textspan.run(store, textspan.Settings(layers=(3,), pool="shapes-colours", basis_size=4))
    loaded = model_cache(TINY_MODEL)
    texts = get_pool("shapes-colours").texts
    picks = store.read_result("reductions/textspan/layer_3/indices")[2]
    units = np.stack([unit(loaded, texts[i]) for i in picks])
    baseline = np.stack([unit(loaded, t) for t in ("a dog", "a cat", "a car")]).T  # [embed n]
    row = 9
    norm = np.linalg.norm(store.read("image_embedding", [row])[0].astype(np.float64))
    tokens = store.read("direct/tokens", [row])[0, 1, 2].astype(np.float64)  # token layer 3 (position 1), head 2
    coefficients = units @ (tokens.sum(0) / norm)
    chosen = [int(np.argmax(coefficients)), int(np.argmin(coefficients))]
    maps = interpret.textspan_extremes(store, 3, 2, sample=row, baseline=baseline, loaded=loaded)
    assert [m.text for m in maps] == [texts[picks[i]] for i in chosen]
    for m, i in zip(maps, chosen):
        expected = (tokens[1:] / norm @ (units[i] - baseline.mean(1))).reshape(4, 4)
        np.testing.assert_allclose(m.grid, expected, rtol=1e-4, atol=1e-7)
