"""Offline, a hub tag fails in seconds with one line; a local-dir: model names
its bad path; reductions say which checkpoint they load and refuse one that is not a regular file."""

from __future__ import annotations

import logging
import socket

import pytest
import torch

from clipscope.errors import ModelError, StoreError
from clipscope.pipelines.models import loading


@pytest.fixture()
def no_network(monkeypatch, tmp_path):
    """The hub is unreachable and its cache empty; any name lookup fails the test."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as on a user's machine: not declared offline
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout_s=3.0: False, raising=False)

    def no_lookup(*args, **kwargs):
        raise AssertionError(f"a network lookup was attempted: {args[:2]}")

    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)
    return constants


def test_an_offline_hub_tag_fails_at_once_with_one_line(no_network, caplog):
    with caplog.at_level(logging.WARNING):
        with pytest.raises(ModelError) as info:
            loading.load_model("ViT-B-32", "openai")
    message = str(info.value)
    assert "\n" not in message
    assert "no network reaches huggingface.co" in message and "--pretrained /path/to/checkpoint.pt" in message
    assert not [r for r in caplog.records if "retry" in r.getMessage().lower() or "Failed to download" in r.getMessage()]
    assert no_network.HF_HUB_OFFLINE is False  # the offline switch is restored


def test_a_bad_local_dir_is_named(tmp_path):
    with pytest.raises(ModelError, match=f"local-dir:{tmp_path / 'nowhere'}: no such folder"):
        loading.load_model(f"local-dir:{tmp_path / 'nowhere'}")
    with pytest.raises(ModelError, match="holds no open_clip_config.json"):
        loading.load_model(f"local-dir:{tmp_path}")


def test_a_checkpoint_path_that_is_a_folder_is_refused(tmp_path):
    with pytest.raises(ModelError, match="is not a regular file"):
        loading.load_model("clipscope-tiny", str(tmp_path))


def test_reductions_name_the_checkpoint_they_load_and_refuse_a_folder(tmp_path, model_cache, fast_models, caplog):
    from clipscope.storage.store import RunStore

    from extract_helpers import extract_args, run_cli, write_tiny_shards

    data = write_tiny_shards(tmp_path / "shards", (2,), seed=6)
    checkpoint = tmp_path / "tiny.pt"
    torch.save(model_cache("clipscope-tiny").model.state_dict(), checkpoint)
    store = tmp_path / "store.zarr"
    assert run_cli(*extract_args(data.paths, store, "--pretrained", checkpoint)) == 0
    with caplog.at_level(logging.INFO, logger="clipscope"):
        loading.load_run_model(RunStore.open(str(store), "r"))
    assert any(f"loading the checkpoint recorded by {store}: {checkpoint}" in r.getMessage() for r in caplog.records)
    checkpoint.unlink()
    checkpoint.mkdir()  # the recorded path now names a folder
    with pytest.raises(StoreError, match=f"checkpoint {checkpoint} recorded by .* is not a regular file"):
        loading.load_run_model(RunStore.open(str(store), "r"))
