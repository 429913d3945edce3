"""Shared fixtures of the pipeline tests: the cached tiny model patched into the extraction
pipeline, a tiny webdataset, and stores extracted from it once per session."""

from __future__ import annotations

import pytest

from extract_helpers import TinyDataset, extract_args, run_cli, write_tiny_shards


# ----------------------------------------------------------------------------------------------
# The cached model, patched into the pipeline


@pytest.fixture(scope="session")
def cached_load_model(model_cache):
    """`load_model` with the same signature that serves random-init models from the session cache."""
    from clipscope.pipelines.models.loading import load_model

    def load(name, pretrained="none", *, device="cpu", seed=0):
        if pretrained in ("none", "", None) and str(device) == "cpu":
            return model_cache(name, seed)
        return load_model(name, pretrained, device=device, seed=seed)

    return load


@pytest.fixture(scope="session")
def fast_models(cached_load_model):
    """Patch the pipeline's model loading with the session cache (a model load costs seconds)."""
    from clipscope.pipelines.jobs.extract import job as extract
    from clipscope.pipelines.models import loading

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(extract, "load_model", cached_load_model)
        patch.setattr(loading, "load_model", cached_load_model)
        yield cached_load_model


# ----------------------------------------------------------------------------------------------
# Session datasets and stores

# Shard 1 holds a corrupt image; 5, 7, 6 samples → 8 + 8 + 8 rows at 4 rows per chunk.
DATASET_COUNTS = (5, 7, 6)
DATASET_CORRUPT = ((1, 2),)
# The full store: every optional kind of array.
FULL_EXTRAS = ("--second-order-layers", "1", "--token-layers", "3", "--activation-layers", "2")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> TinyDataset:
    return write_tiny_shards(tmp_path_factory.mktemp("shards"), DATASET_COUNTS, seed=7, corrupt=DATASET_CORRUPT)


def _extract_once(tmp_path_factory, dataset: TinyDataset, name: str, *extra: str) -> str:
    out = tmp_path_factory.mktemp("stores") / name
    code = run_cli(*extract_args(dataset.pattern, out, *extra))
    if code != 0:
        raise RuntimeError(f"extraction of the session store {name} exited with {code}")
    return str(out)


@pytest.fixture(scope="session")
def split_store(tmp_path_factory, tiny_dataset, fast_models) -> str:
    """The tiny dataset extracted with every optional array, split convention, float32."""
    return _extract_once(tmp_path_factory, tiny_dataset, "split.zarr", *FULL_EXTRAS, "--ln-convention", "split")


@pytest.fixture(scope="session")
def center_store(tmp_path_factory, tiny_dataset, fast_models) -> str:
    """As `split_store`, with the center convention."""
    return _extract_once(tmp_path_factory, tiny_dataset, "center.zarr", *FULL_EXTRAS, "--ln-convention", "center")
