"""The TextSpan job's `--span-rank auto` (the default) is min(80, each head's numerical rank),
with one warning line when that is below 80; an explicit integer is used literally."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from clipscope.errors import ConfigError
from clipscope.kernels.textspan import REFERENCE_SPAN_RANK, resolve_span_rank, textspan, textspan_stats
from clipscope.pipelines.data.webdataset_input import write_shard
from clipscope.pipelines.jobs.extract.job import run_extract
from clipscope.pipelines.jobs.extract.settings import ExtractConfig
from clipscope.pipelines.jobs import textspan as textspan_job
from clipscope.pipelines.jobs.textspan import TextSpanSettings
from clipscope.pipelines.jobs.textspan.job import rank_rtol_for
from clipscope.pipelines.jobs.textspan.settings import parse_span_rank
from clipscope.pipelines.texts.embedding_cache import cached_text_embeddings
from clipscope.storage.store import RunStore

from extract_helpers import run_cli

TEXTS = ["a red circle", "a blue square", "a green triangle", "a yellow star", "a purple heart", "top left",
         "bottom right", "centre", "large", "small", "one shape", "two shapes", "a photo", "a drawing"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("span-rank")
    rng = np.random.default_rng(3)
    for s in range(2):
        samples = [{"__key__": f"s{s}-{i:03d}", "png": Image.fromarray(rng.integers(0, 255, (48, 48, 3), np.uint8))}
                   for i in range(20)]
        write_shard(str(root / f"shard-{s}.tar"), samples)
    config = ExtractConfig(data=(str(root / "shard-{0..1}.tar"),), out=str(root / "store"), rows_per_chunk=4,
                           batch_size=10)
    run_extract(config, progress_display="off")
    return RunStore.open(config.out, "r+")


def _heads(store, layer):
    valid = store.read_valid()
    heads = store.read("direct/heads")[valid][:, layer].astype(np.float64)
    norms = np.linalg.norm(store.read("image_embedding")[valid].astype(np.float64), axis=-1)
    return heads / norms[:, None, None]


def test_auto_is_the_default_and_warns_once_when_below_80(store, caplog):
    assert TextSpanSettings().span_rank == "auto"
    with caplog.at_level(logging.WARNING, logger="clipscope"):
        textspan_job.run(store, TextSpanSettings(layers=(2, 3), texts=tuple(TEXTS), basis_size=4))
    notices = [r for r in caplog.records if "span-rank" in r.getMessage()]
    assert len(notices) == 1 and "\n" not in notices[0].getMessage()
    assert f"--span-rank {REFERENCE_SPAN_RANK}" in notices[0].getMessage()
    texts = torch.from_numpy(cached_text_embeddings(store, TEXTS)).double()
    for layer in (2, 3):
        heads = _heads(store, layer)
        attrs = dict(store.array(f"reductions/textspan/layer_{layer}/indices").attrs)
        assert attrs["span_rank"] == "auto"
        ranks = [resolve_span_rank(textspan_stats(torch.from_numpy(heads[:, h])), "auto")
                 for h in range(heads.shape[1])]
        # a tiny head (width 16, embed 32) has rank 16 + its offset directions, far below 80
        assert attrs["span_ranks_used"] == ranks and max(ranks) < REFERENCE_SPAN_RANK
        stored = store.read_result(f"reductions/textspan/layer_{layer}/indices")
        for h in range(heads.shape[1]):
            ref = textspan(torch.from_numpy(heads[:, h]), texts, basis_size=4)  # the in-memory path, auto too
            assert stored[h].tolist() == ref.indices.tolist()


def test_an_integer_span_rank_is_used_literally_without_notice(store, caplog):
    with caplog.at_level(logging.WARNING, logger="clipscope"):
        textspan_job.run(store, TextSpanSettings(layers=(3,), texts=tuple(TEXTS), basis_size=4, span_rank=30))
    assert not [r for r in caplog.records if "span-rank" in r.getMessage()]
    attrs = dict(store.array("reductions/textspan/layer_3/indices").attrs)
    assert attrs["span_rank"] == 30 and set(attrs["span_ranks_used"]) == {30}


def test_span_rank_values_and_the_cli(store, capsys):
    assert parse_span_rank("auto") == "auto" and parse_span_rank("64") == 64
    for bad in ("0", "-3", "eighty", "6.5"):
        with pytest.raises(ConfigError, match="^span_rank must be 'auto' or an integer ≥ 1"):
            parse_span_rank(bad)
    with pytest.raises(ConfigError, match="^span_rank"):
        TextSpanSettings(span_rank=0)
    assert rank_rtol_for(np.dtype(np.float32)) == 1e-5 and rank_rtol_for(np.dtype(np.float16)) > 1e-3
    assert run_cli("textspan", store.url, "--layers", "3", "--pool", "shapes-all", "-m", "3") == 0
    fresh = RunStore.open(store.url, "r")  # the CLI wrote through its own handle
    assert dict(fresh.array("reductions/textspan/layer_3/indices").attrs)["span_rank"] == "auto"
    capsys.readouterr()
    assert run_cli("textspan", store.url, "--layers", "3", "--span-rank", "many") == 2
    assert "--span-rank must be 'auto' or an integer" in capsys.readouterr().err
