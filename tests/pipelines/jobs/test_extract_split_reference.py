"""The `split` convention through a store: what `clipscope extract --ln-convention split` writes equals the literal,
loop-by-loop reference procedure of docs/methods.md (tests/kernels/split_reference.py), first and second
order, on a tiny model whose every bias, LayerNorm gain/bias and LayerScale is random and non-zero;
and a store written under the previous schema (the old `split`) is refused with a one-line message
saying how to re-extract."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from clipscope.errors import StoreError
from clipscope.kernels.decompose import second_order_effects
from clipscope.pipelines.models.loading import load_model
from clipscope.storage.layout import SCHEMA_ATTR, SCHEMA_VERSION
from clipscope.storage.store import RunStore

from extract_helpers import TINY_MODEL, decoded_image, extract_args, run_cli

_spec = importlib.util.spec_from_file_location(
    "split_reference", pathlib.Path(__file__).resolve().parents[2] / "kernels" / "split_reference.py")
split_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(split_reference)

SOURCES = (0, 2)  # second-order source layers of the 4-layer tiny model
NEURONS = [0, 5, 128, 255]


def rel_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def randomized_store(tmp_path_factory, tiny_dataset):
    """The tiny dataset extracted (split, float32, every layer's tokens, two second-order layers) with a
    checkpoint of the tiny model whose biases and affine parameters are random."""
    folder = tmp_path_factory.mktemp("split-reference")
    model = split_reference.randomized_affine(load_model(TINY_MODEL, "none").model, seed=21).float()
    checkpoint = folder / "randomized.pt"
    torch.save(model.state_dict(), checkpoint)
    out = folder / "store"
    code = run_cli(*extract_args(tiny_dataset.pattern, out, "--pretrained", checkpoint, "--token-layers", 0, 1, 2, 3,
                                 "--second-order-layers", *SOURCES, "--ln-convention", "split"))
    assert code == 0
    return str(out), str(checkpoint)


def _reference_inputs(url, checkpoint, dataset):
    loaded = load_model(TINY_MODEL, checkpoint)
    table = pq.read_table(os.path.join(url, "samples.parquet"))
    rows = dict(zip(table["key"].to_pylist(), table["row"].to_pylist()))
    keys = sorted(k for k in rows if k not in dataset.corrupt)
    images = torch.stack([loaded.preprocess(decoded_image(dataset.images[k])) for k in keys]).double()
    visual = loaded.model.double().visual  # float32 weights of the checkpoint, evaluated in float64
    return visual, images, [rows[k] for k in keys]


def test_store_equals_the_literal_reference_first_and_second_order(randomized_store, tiny_dataset):
    url, checkpoint = randomized_store
    visual, images, index = _reference_inputs(url, checkpoint, tiny_dataset)
    store = RunStore.open(url, "r")
    read = {name: store.read(name)[index] for name in store.array_names(per_sample=True)}
    ref = split_reference.reference_direct(visual, images)
    for name in ("image_embedding", "direct/embedding", "direct/mlps", "direct/heads", "direct/tokens",
                 "direct/cls_token"):
        assert read[name].dtype == np.float32
        assert rel_error(read[name], ref[name].numpy()) <= 1e-6, (name, rel_error(read[name], ref[name].numpy()))
    assert not read["direct/bias"].any()  # split: nothing is left for direct/bias
    total = (read["direct/embedding"].astype(np.float64) + read["direct/mlps"].sum(1) + read["direct/heads"].sum((1, 2))
             + read["direct/bias"])
    assert rel_error(total, read["image_embedding"]) <= 1e-5
    for source in SOURCES:
        prefix = f"second_order/layer_{source}"
        phi = second_order_effects(torch.from_numpy(read[f"{prefix}/weights"]).double(),
                                   torch.from_numpy(store.read_result(f"{prefix}/directions")).double(),
                                   torch.from_numpy(read[f"{prefix}/shared"]).double(), torch.tensor(NEURONS))
        expected = split_reference.reference_second_order(visual, images, source, NEURONS)
        assert rel_error(phi.numpy(), expected.numpy()) <= 1e-6, (source, rel_error(phi.numpy(), expected.numpy()))


def _as_old_schema(url: str, folder) -> str:
    """A copy of the store whose group attribute says it was written under the previous schema."""
    old = os.path.join(folder, "old-store")
    shutil.copytree(url, old)
    path = os.path.join(old, "zarr.json")
    with open(path) as fh:
        meta = json.load(fh)
    meta["attributes"][SCHEMA_ATTR] = SCHEMA_VERSION - 1
    with open(path, "w") as fh:
        json.dump(meta, fh)
    return old


def test_a_store_of_the_old_split_is_refused_with_how_to_re_extract(randomized_store, tmp_path, capsys):
    old = _as_old_schema(randomized_store[0], tmp_path)
    with pytest.raises(StoreError) as err:
        RunStore.open(old, "r")
    message = str(err.value)
    assert "\n" not in message
    assert f"schema version {SCHEMA_VERSION - 1}" in message and "split" in message
    assert "re-extract" in message and "`clipscope extract`" in message and "new --out store" in message
    # every reader refuses it the same way, in one line
    for argv in (("textspan", old, "--layers", "3"), ("status", old), ("query", old, "image", "0")):
        capsys.readouterr()
        assert run_cli(*argv) == 2
        stderr = capsys.readouterr().err.strip()
        assert len(stderr.splitlines()) == 1 and "re-extract" in stderr, stderr
