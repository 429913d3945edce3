"""`clipscope roles` (spec S6): labels and scores from hand-built TextSpan tables with known tags (exact), a
text<TAB>property file, a layer,head,label CSV that round-trips, and the job on a store (stored, read back)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from clipscope.errors import ConfigError, DataError, StoreError
from clipscope.pipelines.jobs import roles
from clipscope.pipelines.jobs.roles.job import compute
from clipscope.storage.store import RunStore

from extract_helpers import run_cli

TEXTS = ["red", "blue", "circle", "square", "left", "dog", "cat"]
TAGS = "red\tcolour\nblue\tcolour\ncircle\tshape\nsquare\tshape\nleft\tposition\n"


def table(picks):
    """indices [layer head pick] of TEXTS and equal explained ratios."""
    indices = np.array([[[TEXTS.index(t) for t in head] for head in layer] for layer in picks])
    return indices, np.full(indices.shape, 0.1)


def test_hand_built_tables_give_exact_labels_and_scores(tmp_path):
    (tmp_path / "tags.tsv").write_text(TAGS)
    indices, ratios = table([[["red", "blue", "red", "dog", "cat"], ["blue", "red", "circle", "dog", "dog"]],
                             [["circle", "square", "circle", "red", "dog"], ["left", "dog", "cat", "dog", "cat"]]])
    settings = roles.Settings(m=5, min_match=3, text_labels=str(tmp_path / "tags.tsv"))
    result = compute(settings, (10, 11), TEXTS, "custom", indices, ratios)
    assert result.properties == ("colour", "shape", "position")
    assert [result.label_of(l, h) for l in (10, 11) for h in (0, 1)] == ["colour", "colour", "shape", "position"]
    assert result.matches.tolist() == [[3, 2], [3, 1]]
    assert (result.entanglement, result.entanglement_shared, result.association) == (0.25, 0.5, 0.5)
    assert result.heads_with("colour") == [(10, 0), (10, 1)]
    np.testing.assert_allclose(result.share[0, 0], [0.3, 0, 0])


def test_the_labels_csv_round_trips_and_still_counts_matches(tmp_path):
    (tmp_path / "tags.tsv").write_text(TAGS)
    indices, ratios = table([[["red", "blue", "red", "dog", "cat"], ["circle", "square", "circle", "dog", "dog"]]])
    first = compute(roles.Settings(text_labels=str(tmp_path / "tags.tsv")), (3,), TEXTS, "custom", indices, ratios)
    rows = first.table().to_pydict()
    csv = "layer,head,label\n" + "".join(f"{l},{h},{lab}\n" for l, h, lab in zip(rows["layer"], rows["head"],
                                                                                  rows["label"]))
    (tmp_path / "labels.csv").write_text(csv)
    again = compute(roles.Settings(labels=str(tmp_path / "labels.csv"), text_labels=str(tmp_path / "tags.tsv")),
                    (3,), TEXTS, "custom", indices, ratios)
    assert [again.label_of(3, h) for h in (0, 1)] == ["colour", "shape"]
    assert again.matches.tolist() == first.matches.tolist() and again.association == first.association
    # labels only, no tags: the association cannot be counted
    only = compute(roles.Settings(labels=str(tmp_path / "labels.csv")), (3,), TEXTS, "no-tags-pool", indices, ratios)
    assert only.entanglement == 0 and np.isnan(only.association) and (only.matches == -1).all()
    (tmp_path / "bad.csv").write_text("3,7,colour\n")
    with pytest.raises(DataError, match=r"^labels \S+bad\.csv row 1: head L3H7 is not one of the heads"):
        compute(roles.Settings(labels=str(tmp_path / "bad.csv")), (3,), TEXTS, "x", indices, ratios)
    (tmp_path / "bad.tsv").write_text("red colour\n")
    with pytest.raises(DataError, match=r"^text_labels \S+bad\.tsv line 1: expected text<TAB>property"):
        compute(roles.Settings(text_labels=str(tmp_path / "bad.tsv")), (3,), TEXTS, "x", indices, ratios)
    with pytest.raises(ConfigError, match="no built-in property tags for the text pool 'x'"):
        compute(roles.Settings(), (3,), TEXTS, "x", indices, ratios)


def test_roles_on_a_store_are_stored_and_read_back(split_store, tmp_path, capsys):
    from clipscope.pipelines.jobs import textspan

    url = str(tmp_path / "store.zarr")
    shutil.copytree(split_store, url)
    store = RunStore.open(url, "r+")
    with pytest.raises(StoreError, match="clipscope textspan"):
        roles.run(store, roles.Settings())
    textspan.run(store, textspan.Settings(layers=(2, 3), pool="shapes-all", basis_size=6))
    assert run_cli("roles", url, "--png", tmp_path / "roles.png") == 0
    out = capsys.readouterr().out
    assert "entanglement" in out and "association" in out and "L3H0" in out
    assert (tmp_path / "roles.png").stat().st_size > 1000
    stored = roles.Result.read(RunStore.open(url))
    assert stored.layers == (2, 3) and stored.label.shape == (2, 4)
    assert set(stored.properties) <= {"colours", "shapes", "positions", "sizes", "counts"}
    assert RunStore.open(url).dims("reductions/roles/share") == ("layer", "head", "property")


def test_a_rerun_of_roles_is_a_no_op_and_other_tags_recompute(split_store, tmp_path, caplog):
    import logging

    from clipscope.pipelines.jobs import textspan

    url = str(tmp_path / "store.zarr")
    shutil.copytree(split_store, url)
    store = RunStore.open(url, "r+")
    textspan.run(store, textspan.Settings(layers=(3,), pool="shapes-all", basis_size=5))
    first = roles.run(store, roles.Settings())
    with caplog.at_level(logging.INFO):
        assert roles.run(store, roles.Settings()).label.tobytes() == first.label.tobytes()
    assert "is up to date" in caplog.text
    (tmp_path / "tags.tsv").write_text("".join(f"{t}\tthing\n" for t in ("red", "blue", "circle", "dog")))
    other = roles.run(store, roles.Settings(text_labels=str(tmp_path / "tags.tsv")))
    assert other.properties == ("thing",) and roles.Result.read(RunStore.open(url)).properties == ("thing",)
