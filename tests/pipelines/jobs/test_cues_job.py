"""Spurious-cue mining over a store (= literal loops over the stored PCs, γ and text embeddings, both rankings),
the fooling rate (= a loop over the stored embeddings), and the `cues` command end to end: prompt export, a
user's generator through `--generate python:…`, extraction of its images and `cues evaluate`."""

from __future__ import annotations

import shutil
import sys
import textwrap

import numpy as np
import pytest

from clipscope.errors import ConfigError
from clipscope.pipelines.jobs import cues
from clipscope.pipelines.jobs.cues.result import pair_key
from clipscope.pipelines.texts.embedding_cache import cached_text_embeddings, stored_texts
from clipscope.storage.store import RunStore

from extract_helpers import extract_args, run_cli
from test_concepts_job import LAYER, reduced  # noqa: F401  (the module-scoped fixture)

TRUE, WRONG = "star", "heart"


@pytest.fixture
def store(reduced, tmp_path) -> RunStore:  # noqa: F811
    shutil.copytree(reduced, tmp_path / "copy.zarr")
    return RunStore.open(str(tmp_path / "copy.zarr"), "r+")


def literal_cues(store: RunStore, settings: cues.Settings) -> tuple[list[int], list[float], list[int]]:
    omp = f"reductions/omp/layer_{LAYER}"
    pcs = store.read_result(f"reductions/second_order/layer_{LAYER}/pc")
    ms = list(store.read_result(f"{omp}/m"))
    support = store.read_result(f"{omp}/support")
    coefs = store.read_result(f"{omp}/coefs")[ms.index(max(ms))]
    key = store.array(f"{omp}/support").attrs["texts_key"]
    texts = stored_texts(store, key)
    emb = store.read_result(f"text_embeddings/{key}/embeddings").astype(np.float64)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    classes = cached_text_embeddings(store, [TRUE, WRONG]).astype(np.float64)
    t_true, t_wrong = (c / np.linalg.norm(c) for c in classes)
    v = t_wrong - t_true
    along = pcs @ v
    chosen = sorted(range(len(pcs)), key=lambda n: (-abs(along[n]), n))[:settings.neurons]
    if settings.random_neurons is not None:
        chosen = sorted(np.random.default_rng(settings.random_neurons).choice(len(pcs), settings.neurons,
                                                                               replace=False).tolist())
    blocked = [emb[j] @ t_wrong >= settings.synonym_cosine or texts[j].lower() in (WRONG, *settings.block)
               for j in range(len(texts))]
    if settings.ranking == "eq6":
        w, used = np.zeros(len(texts)), set()
        for n in chosen:
            for p in range(support.shape[1]):
                if support[n, p] >= 0:
                    w[support[n, p]] += coefs[n, p] * along[n]
                    used.add(int(support[n, p])) if coefs[n, p] != 0 else None
        order = sorted((j for j in used if not blocked[j]), key=lambda j: (-w[j], j))[:settings.words]
        return order, [w[j] for j in order], chosen
    entries = [(coefs[n, p] * along[n], n, p, int(support[n, p])) for n in sorted(chosen)
               for p in range(support.shape[1]) if support[n, p] >= 0 and not blocked[support[n, p]]]
    entries.sort(key=lambda e: (-e[0], e[1], e[2]))
    order, values = [], []
    for value, _, _, j in entries[:settings.entries]:
        if j not in order:
            order.append(j)
            values.append(value)
    return order[:settings.words], values[:settings.words], chosen


@pytest.mark.parametrize("ranking,random_neurons", [("eq6", None), ("reference", None), ("eq6", 3)])
def test_cues_equal_literal_loops(store, ranking, random_neurons):
    settings = cues.Settings(true=TRUE, wrong=WRONG, layers=(LAYER,), neurons=12, words=6, ranking=ranking,
                             entries=9, block=("red",), random_neurons=random_neurons)
    result = cues.run(store, settings)
    order, values, chosen = literal_cues(store, settings)
    assert result.text_index.tolist() == order
    np.testing.assert_allclose(result.score, values, rtol=1e-9, atol=1e-12)
    assert result.neurons.tolist() == chosen
    texts = stored_texts(store, result.attrs["texts_key"])
    assert result.cues == [texts[j] for j in order] and WRONG not in result.cues and "red" not in result.cues
    assert cues.Result.read(RunStore.open(store.url, "r"), settings) == result
    suffix = "" if random_neurons is None else f"__random{random_neurons}"
    assert f"reductions/cues/{pair_key(TRUE, WRONG)}{suffix}/score" in store.array_names()


def test_allowed_vocabulary_and_bad_inputs(store):
    allowed = ("blue", "small", "circle", "top left")
    result = cues.run(store, cues.Settings(true=TRUE, wrong=WRONG, layers=(LAYER,), allowed=allowed))
    assert set(result.cues) <= set(allowed)
    with pytest.raises(ConfigError, match="ranking must be one of 'eq6', 'reference'"):
        cues.Settings(true=TRUE, wrong=WRONG, layers=(LAYER,), ranking="sum")
    with pytest.raises(ConfigError, match="^true and wrong must name two classes"):
        cues.run(store, cues.Settings(true=TRUE, wrong=TRUE, layers=(LAYER,)))
    assert pair_key("red star", "Blue heart!") == "red-star__blue-heart"


def test_fooling_rate_equals_a_loop(store):
    rate, fooled, n = cues.fooling_rate(store, TRUE, WRONG)
    v = cues.cue_direction_of(store, TRUE, WRONG)
    emb = store.read("image_embedding")[store.read_valid()].astype(np.float64)
    assert n == len(emb) and fooled == sum(float(e @ v) > 0 for e in emb) and rate == fooled / n


GENERATOR = textwrap.dedent("""
    import numpy as np

    def make(prompt, words, true, wrong):
        assert true in prompt and wrong in prompt and words and all(w in prompt for w in words)
        rng = np.random.default_rng(0)
        return [rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8) for _ in range(5)]
""")


def test_cli_prompt_generate_extract_evaluate(store, tmp_path, monkeypatch, capsys, fast_models):
    (tmp_path / "my_generator.py").write_text(GENERATOR)
    monkeypatch.syspath_prepend(str(tmp_path))
    prompt, shard = tmp_path / "prompt.txt", tmp_path / "gen" / "generated-000.tar"
    assert run_cli("cues", store.url, "--true", TRUE, "--wrong", WRONG, "--neurons", "10", "--words", "5",
                   "--prompt-out", prompt, "--generate", "python:my_generator:make", "--generated-out", shard) == 0
    out = capsys.readouterr().out
    assert "cues pushing 'star' towards 'heart'" in out and "5 generated images written" in out
    assert "must not mention heart" in prompt.read_text()
    generated = tmp_path / "generated.zarr"
    assert run_cli(*extract_args(str(shard), generated)) == 0
    capsys.readouterr()
    assert run_cli("cues", "evaluate", generated, "--true", TRUE, "--wrong", WRONG) == 0
    assert "of 5 images" in capsys.readouterr().out
    assert run_cli("cues", store.url, "--true", TRUE, "--wrong", WRONG, "--generate", "python:nope") == 2
    assert "--generate and --generated-out go together" in capsys.readouterr().err
    assert run_cli("cues", store.url, "--true", TRUE, "--wrong", WRONG, "--generate", "python:nope:f",
                   "--generated-out", shard) == 2
    assert "--generate python:nope:f: cannot import nope" in capsys.readouterr().err
    sys.modules.pop("my_generator", None)


def test_templates_take_the_task_class_weights(store):
    from clipscope.pipelines.texts.zero_shot import classifier, get_task

    task = get_task("shapes-shape")
    weights = classifier(store, task).astype(np.float64)
    w_true, w_wrong = weights[:, task.classnames.index(TRUE)], weights[:, task.classnames.index(WRONG)]
    v = cues.cue_direction_of(store, TRUE, WRONG, task="shapes-shape")
    np.testing.assert_allclose(v, w_wrong / np.linalg.norm(w_wrong) - w_true / np.linalg.norm(w_true), rtol=1e-12)
    result = cues.run(store, cues.Settings(true=TRUE, wrong=WRONG, layers=(LAYER,), task="shapes-shape"))
    assert result.attrs["task"] == "shapes-shape"
    with pytest.raises(ConfigError, match="task shapes-shape has no class 'dog'"):
        cues.run(store, cues.Settings(true=TRUE, wrong="dog", layers=(LAYER,), task="shapes-shape", force=True))
