"""A new user's first hour: unlabelled photos, honest defaults and warnings, chance levels,
readable status and help, a README that stands alone."""

from __future__ import annotations

import argparse
import io
import json
import logging
import pathlib
import re

import numpy as np
import pytest
from PIL import Image

from extract_helpers import extract_args, run_cli

REPO = pathlib.Path(__file__).resolve().parents[3]


def _photo(rng: np.random.Generator) -> bytes:
    """A smooth, photo-like RGB image (gradients and blobs, not white noise)."""
    h, w = int(rng.integers(40, 80)), int(rng.integers(40, 80))
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    channels = [np.sin(rng.uniform(2, 8) * x + rng.uniform(0, 6)) * np.cos(rng.uniform(2, 8) * y) for _ in range(3)]
    pixels = ((np.stack(channels, -1) + 1) * 127.5).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def unlabelled_store(tmp_path_factory, fast_models) -> str:
    """14 photos in two shards without `.cls` labels, extracted with a second-order layer."""
    from clipscope.pipelines.data.webdataset_input import write_shard

    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    for s in range(2):
        write_shard(str(folder / f"photos-{s}.tar"),
                    [{"__key__": f"p{s}-{i}", "jpg": _photo(rng)} for i in range(7)])
    out = folder / "store.zarr"
    assert run_cli(*extract_args(str(folder / "photos-{0..1}.tar"), out, "--second-order-layers", "1")) == 0
    return str(out)


@pytest.fixture
def no_text_encoding(monkeypatch):
    """Text encoding fails loudly: a command that should never encode texts shows it does not."""
    from clipscope.pipelines.texts import embedding_cache

    def refuse(*args, **kwargs):
        raise AssertionError("texts were encoded")

    monkeypatch.setattr(embedding_cache, "encode_texts", refuse)


# ----------------------------------------------------------------------------------------------
# 1. second-order on unlabelled data


def test_second_order_on_unlabelled_photos_skips_the_evaluation_before_any_text_is_encoded(
        unlabelled_store, capsys, caplog, no_text_encoding):
    from clipscope.storage.store import RunStore

    with caplog.at_level(logging.WARNING, logger="clipscope"):
        assert run_cli("second-order", unlabelled_store, "--layer", "1") == 0
    captured = capsys.readouterr()
    assert "no labelled samples" in captured.out and "skipping the zero-shot evaluation" in captured.out
    names = RunStore.open(unlabelled_store, "r").array_names()
    assert "reductions/second_order/layer_1/pc" in names
    assert "reductions/second_order/layer_1/evaluation" not in names
    # 14 images < --top-k 100: the PCs describe these images only, and the command says so
    assert any("only 14 images for --top-k 100" in r.getMessage() for r in caplog.records)


def test_second_order_with_a_task_on_unlabelled_photos_fails_before_work_naming_no_evaluation(
        unlabelled_store, tmp_path, capsys, no_text_encoding):
    import shutil

    from clipscope.storage.store import RunStore

    copy = tmp_path / "copy.zarr"
    shutil.copytree(unlabelled_store, copy)
    RunStore.open(str(copy), "r+").delete_results("reductions/second_order")
    assert run_cli("second-order", str(copy), "--layer", "1", "--task", "imagenet") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("clipscope second-order: error: --task imagenet") and "--no-evaluation" in err
    assert not any(n.startswith("reductions/second_order") for n in RunStore.open(str(copy), "r").array_names())


def test_neurons_on_unlabelled_photos_skips_or_names_no_accuracy(unlabelled_store, capsys, no_text_encoding,
                                                                 monkeypatch):
    from clipscope.pipelines.texts import embedding_cache

    if run_cli("second-order", unlabelled_store, "--layer", "1") != 0:
        pytest.fail("second-order failed")
    capsys.readouterr()
    assert run_cli("neurons", unlabelled_store, "--layer", "1", "--task", "imagenet", "--pool", "shapes-colours",
                   "--m", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--no-accuracy" in err
    monkeypatch.undo()  # the OMP dictionary needs the pool's embeddings
    monkeypatch.setattr(embedding_cache, "encode_texts", _encode_only_small_pools(embedding_cache.encode_texts))
    assert run_cli("neurons", unlabelled_store, "--layer", "1", "--pool", "shapes-colours", "--m", "2") == 0
    assert "skipping the reconstruction accuracy" in capsys.readouterr().out


def _encode_only_small_pools(encode):
    def guarded(loaded, texts, *args, **kwargs):
        if len(texts) > 100:
            raise AssertionError(f"{len(texts)} texts were encoded (a zero-shot task's prompts)")
        return encode(loaded, texts, *args, **kwargs)

    return guarded


# ----------------------------------------------------------------------------------------------
# 3. no silent random toy model


def test_extract_without_model_is_an_error_that_says_how_to_choose(unlabelled_store, tmp_path, capsys):
    out = tmp_path / "never.zarr"
    args = [a for a in extract_args("x.tar", out) if a not in ("--model", "clipscope-tiny")]
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipscope extract: error: --model is required") and "clipscope models" in err
    assert "--pretrained" in err and not out.exists()


def test_random_init_weights_are_announced_once_and_shown_by_status(unlabelled_store, capsys, caplog, tmp_path,
                                                                    fast_models):
    from clipscope.pipelines.cli import notices

    data = str(pathlib.Path(unlabelled_store).parent / "photos-0.tar")
    with caplog.at_level(logging.WARNING, logger="clipscope"):
        assert run_cli(*extract_args(data, tmp_path / "r.zarr")) == 0
    assert sum("RANDOM-INIT WEIGHTS" in r.getMessage() for r in caplog.records) == 1
    notices._shown.clear()
    assert run_cli("status", unlabelled_store) == 0
    assert "RANDOM INIT" in capsys.readouterr().out
    assert run_cli("status", unlabelled_store, "--json") == 0
    assert json.loads(capsys.readouterr().out)["random_init"] is True
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clipscope"):
        assert run_cli("query", unlabelled_store, "image", "p0-0") == 0
        assert run_cli("query", unlabelled_store, "image", "p0-1") == 0
    assert sum("RANDOM-INIT WEIGHTS" in r.getMessage() for r in caplog.records) == 1  # once per process


# ----------------------------------------------------------------------------------------------
# 4. small samples and chance levels


def test_textspan_warns_when_images_are_fewer_than_the_span_rank(unlabelled_store, caplog):
    with caplog.at_level(logging.WARNING, logger="clipscope"):
        assert run_cli("textspan", unlabelled_store, "--layers", "3", "--pool", "shapes-colours", "-m", "3") == 0
    assert any("only 14 images for a span rank of 80" in r.getMessage() for r in caplog.records)


@pytest.fixture
def own_split_store(split_store, tmp_path) -> str:
    """A copy of the session store that commands may write results into (the session store stays as
    extracted: other tests pin its array names)."""
    import shutil

    copy = tmp_path / "split-copy.zarr"
    shutil.copytree(split_store, copy)
    return str(copy)


def test_every_accuracy_has_its_chance_level(own_split_store, capsys):
    split_store = own_split_store
    assert run_cli("evaluate", split_store, "--task", "imagenet-simple") == 0
    out = capsys.readouterr().out
    assert re.search(r"chance 0\.001 \(1/1000\), majority class 0\.\d+", out), out
    assert run_cli("second-order", split_store, "--layer", "1", "--task", "imagenet-simple") == 0
    out = capsys.readouterr().out
    assert "PC1 reconstruction" in out and "chance (imagenet-simple, 1000 classes" in out


def test_chance_levels_are_uniform_and_majority():
    from clipscope.pipelines.texts.zero_shot import chance_levels

    assert chance_levels(np.array([0, 0, 0, 1, -1]), 4) == (0.25, 0.75)


# ----------------------------------------------------------------------------------------------
# 6. textspan --curve with its own defaults


def test_textspan_curve_runs_with_its_own_defaults(own_split_store, tmp_path, capsys):
    split_store = own_split_store
    plot = tmp_path / "curve.png"
    assert run_cli("textspan", split_store, "--layers", "3", "--curve", "--task", "imagenet-simple",
                   "--plot", str(plot)) == 0
    out = capsys.readouterr().out
    assert "so the curve uses m =" in out and "chance (imagenet-simple" in out and plot.is_file()


# ----------------------------------------------------------------------------------------------
# 7. status shows values, not "[1 items]"


def test_status_shows_data_paths_and_layers(unlabelled_store, capsys):
    assert run_cli("status", unlabelled_store) == 0
    text = capsys.readouterr().out
    assert re.search(r"config\.data\s+\S*photos-\{0\.\.1\}\.tar", text), text
    assert re.search(r"layers\.heads\s+0, 1, 2, 3", text), text
    assert run_cli("status", unlabelled_store, "--json") == 0
    config = json.loads(capsys.readouterr().out)["config"]
    assert config["layers.heads"] == [0, 1, 2, 3] and config["config.data"][0].endswith("photos-{0..1}.tar")


# ----------------------------------------------------------------------------------------------
# 9. --help


def test_help_is_whole_and_shows_defaults(capsys):
    from clipscope.pipelines.cli import build_parser

    parser = build_parser()
    description = parser.description
    assert description.endswith(".") and "webdataset" in description
    sub = parser._subparsers._group_actions[0].choices
    extract_help = sub["extract"].format_help()
    assert "(default: 32)" in extract_help and "(default: 256)" in extract_help and "--model is" not in extract_help
    query = next(a for a in sub["query"]._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in query.items():
        for action in command._actions:
            assert action.help, f"query {name} {action.option_strings or action.dest} has no description"


def test_models_marks_supported_architectures_as_the_adapter_decides(capsys):
    from clipscope.errors import ModelError
    from clipscope.pipelines.models.loading import _open_clip, unsupported_reason
    from clipscope.pipelines.models.open_clip_adapter import vit_spec_from_open_clip

    assert run_cli("models") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# ") and "can be extracted" in lines[0]
    marks = dict(line.split("\t")[:2] for line in lines[1:])
    assert marks["ViT-B-32"] == "supported" and marks["RN50"].startswith("unsupported: ResNet")
    assert marks["ViT-L-14-CLIPA"].startswith("unsupported: pool_type avg")
    for name in ("ViT-S-32", "RN50"):
        model = _open_clip().create_model(name, pretrained=None)
        try:
            vit_spec_from_open_clip(model.visual)
            refused = None
        except ModelError as err:
            refused = str(err)
        assert (unsupported_reason(name) is None) == (refused is None), (name, refused)


# ----------------------------------------------------------------------------------------------
# 10. README stands alone


def test_readme_stands_alone_and_names_real_pools():
    from clipscope.pipelines.texts.pools import list_pools

    readme = (REPO / "README.md").read_text()
    assert "../shared" not in readme and "DESIGN" not in readme
    assert "docs/methods.md" in readme and (REPO / "docs" / "methods.md").is_file()
    assert "## Run it on your own images" in readme
    pools = set(list_pools())
    named = set(re.findall(r"`((?:shapes|wordfreq|imagenet)[a-z-]*)`", readme.split("Text pools")[1][:600]))
    assert named and named <= pools, named - pools
    for cited in ("thesis Algorithm 1", "paper Fig. 4"):
        assert cited not in readme


def test_methods_document_cites_the_three_works_and_the_code():
    text = " ".join((REPO / "docs" / "methods.md").read_text().split())
    for needle in ("Interpreting the Inner-Workings of Vision Models", "UCB/EECS-2025-44",
                   "Interpreting the Second-Order Effects of Neurons in CLIP", "ICLR", "Quantifying and Enabling the "
                   "Interpretability of CLIP-like Models", "Madasu", "github.com/yossigandelsman/clip_text_span",
                   "github.com/yossigandelsman/second_order_lens", "TextSpan", "OMP", "Rosetta", "split", "center"):
        assert needle in text, needle
    assert "../shared" not in text and "DESIGN" not in text


# ----------------------------------------------------------------------------------------------
# 5. the pool's texts live in the store


def test_pool_texts_are_stored_so_results_decode_without_the_file(unlabelled_store, tmp_path, capsys):
    from clipscope.pipelines.texts.embedding_cache import stored_texts
    from clipscope.storage.store import RunStore

    texts = ["a cat", "a dog", "ein Hund ü", "ein Boot"]
    pool = tmp_path / "pool.txt"
    pool.write_text("\n".join(texts) + "\n", encoding="utf-8")
    assert run_cli("textspan", unlabelled_store, "--layers", "3", "--pool", f"file:{pool}", "-m", "2") == 0
    pool.unlink()
    store = RunStore.open(unlabelled_store, "r")
    key = store.array("reductions/textspan/layer_3/indices").attrs["texts_key"]
    assert stored_texts(store, key) == texts
    assert store.dims(f"text_embeddings/{key}/text_utf8") == ("byte",)
    capsys.readouterr()
    assert run_cli("query", unlabelled_store, "pools", "--texts", key) == 0
    assert capsys.readouterr().out.splitlines() == texts


def test_text_encoding_reports_progress_while_it_runs(model_cache, caplog):
    from clipscope.pipelines.texts.encode import encode_texts

    with caplog.at_level(logging.INFO, logger="clipscope"):
        out = encode_texts(model_cache("clipscope-tiny"), [f"text {i}" for i in range(12)], batch_size=4,
                           log_every_s=0.0)
    assert out.shape[0] == 12
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("encoding texts:")]
    assert lines[-1].startswith("encoding texts: 12/12 (100%)") and len(lines) == 3



# ----------------------------------------------------------------------------------------------
# 12. xarray with coordinates, without padding rows


def test_open_xarray_labels_dims_and_drops_padding_rows(split_store):
    from clipscope.storage.query import open_xarray
    from clipscope.storage.store import RunStore

    url, store = split_store, RunStore.open(split_store, "r")
    valid = store.read_valid()
    direct = open_xarray(url, group="direct")
    assert direct.sizes["sample"] == int(valid.sum()) < store.n_rows  # padding and undecodable rows dropped
    np.testing.assert_array_equal(direct["sample"].values, np.flatnonzero(valid))
    keys = dict(zip(store.read_samples()["row"].to_pylist(), store.read_samples()["key"].to_pylist()))
    assert list(direct["key"].values) == [keys[r] for r in np.flatnonzero(valid)]
    assert list(direct["layer"].values) == store.attrs["layers"]["heads"]
    assert list(direct["head"].values) == list(range(direct.sizes["head"]))
    np.testing.assert_array_equal(direct["heads"].sel(layer=3, head=1).values,
                                  store.read("direct/heads")[valid][:, 3, 1])
    second = open_xarray(url, group="second_order/layer_1")
    assert list(second["later_layer"].values) == [2, 3]
    everything = open_xarray(url, group="direct", valid_only=False)
    assert everything.sizes["sample"] == store.n_rows


# ----------------------------------------------------------------------------------------------
# 8. a store grows by shards; other changes are refused with the command of a second store


def test_extract_with_more_shards_grows_the_store(unlabelled_store, tmp_path, capsys):
    import numpy as np

    from clipscope.storage.store import RunStore

    folder = pathlib.Path(unlabelled_store).parent
    store = str(tmp_path / "grow.zarr")
    assert run_cli(*extract_args(str(folder / "photos-0.tar"), store, "--second-order-layers", "1")) == 0
    first = RunStore.open(store, "r")
    rows_before, heads_before = first.n_rows, first.read("direct/heads")
    assert run_cli(*extract_args(str(folder / "photos-{0..1}.tar"), store, "--second-order-layers", "1")) == 0
    assert "1 shards extracted, 1 already done" in capsys.readouterr().out
    grown, whole = RunStore.open(store, "r"), RunStore.open(unlabelled_store, "r")
    assert grown.n_rows > rows_before and grown.n_rows == whole.n_rows
    assert len(grown.attrs["shards"]) == 2 and grown.attrs["row_blocks"] == whole.attrs["row_blocks"]
    np.testing.assert_array_equal(grown.read("direct/heads")[:rows_before], heads_before)  # untouched
    for name in ("valid", "image_embedding", "direct/heads", "second_order/layer_1/weights"):
        np.testing.assert_allclose(grown.read(name), whole.read(name), rtol=1e-6, atol=1e-7, err_msg=name)
    assert grown.read_samples().num_rows == 14
    assert run_cli(*extract_args(str(folder / "photos-{0..1}.tar"), store, "--second-order-layers", "1")) == 0
    assert "0 shards extracted, 2 already done" in capsys.readouterr().out  # and it resumes as usual


def test_adding_layers_is_refused_with_the_command_of_a_second_store(unlabelled_store, tmp_path, capsys,
                                                                    monkeypatch):
    import shlex
    import shutil

    folder = pathlib.Path(unlabelled_store).parent
    store = tmp_path / "one.zarr"
    assert run_cli(*extract_args(str(folder / "photos-0.tar"), store)) == 0
    capsys.readouterr()
    assert run_cli(*extract_args(str(folder / "photos-0.tar"), store, "--second-order-layers", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot resume" in err and "in a second store" in err
    command = err.split("`")[-2]
    assert command.startswith("clipscope extract ") and f"--out {store}-2" in command
    assert "--second-order-layers 1" in command
    monkeypatch.chdir(tmp_path)
    assert run_cli(*shlex.split(command)[1:], "--progress", "off") == 0
    shutil.rmtree(f"{store}-2")


def test_textspan_curve_on_unlabelled_photos_fails_before_work(unlabelled_store, capsys, no_text_encoding):
    assert run_cli("textspan", unlabelled_store, "--layers", "3", "--curve", "--task", "imagenet-simple") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no .cls in the shards" in err and "leave out --curve" in err
