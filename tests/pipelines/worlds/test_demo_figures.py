"""The demo's figures read without the code: titled, labelled, the image under every map, a colour
bar, whole captions, chance and keep-last-k on the ablation plot."""

from __future__ import annotations

import pytest


@pytest.fixture
def saved_figures(monkeypatch):
    """Every matplotlib figure saved during the test, in order (the PNG is still written)."""
    from matplotlib.figure import Figure

    figures = []
    original = Figure.savefig

    def record(self, *args, **kwargs):
        figures.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return figures


def test_ablation_plot_has_chance_and_keep_last(tmp_path, saved_figures):
    import numpy as np

    from clipscope.pipelines.jobs import evaluate
    from clipscope.pipelines.jobs.evaluate.report import plot_evaluation

    accuracy = np.array([0.9, 0.85, 0.8, 0.2, 0.88])
    result = evaluate.Result(evaluate.Settings("shapes", keep_last=(2,)),
                             ("baseline", "mlps", "heads_to_L0", "heads_to_L1", "keep_last_2"),
                             ("baseline", "mlps", "cumulative", "cumulative", "keep_last"),
                             np.round(accuracy * 100).astype(np.int64), accuracy, 100, 56, (0, 1))
    plot_evaluation(result, tmp_path / "a.png", title="t", chance=1 / 56)
    (fig,) = saved_figures
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(label.startswith("chance (0.018)") for label in labels), labels
    assert any("last 2 layers' heads kept" in label for label in labels), labels
    assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()


def test_token_maps_overlay_the_image_with_a_colour_bar_and_whole_captions(split_store, model_cache, tmp_path,
                                                                           saved_figures):
    from clipscope.pipelines.worlds.shapes.demo import plot_token_maps
    from clipscope.storage.query import read_samples
    from clipscope.storage.store import RunStore

    store = RunStore.open(split_store, "r")
    plot_token_maps(store, model_cache("clipscope-tiny"), tmp_path / "t.png", n_images=3)
    (fig,) = saved_figures
    maps = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(maps) == 3 and len(fig.axes) == 4  # three maps and their colour bar
    captions = set(read_samples(store).to_pydict()["caption"])
    for ax in maps:
        assert len(ax.get_images()) == 2  # the image, and the map over it
        assert " ".join(ax.get_title().split()) in captions  # wrapped, never cut
    assert fig._suptitle is not None and fig._suptitle.get_text()
