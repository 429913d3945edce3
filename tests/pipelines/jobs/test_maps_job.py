"""`clipscope maps`: stored maps equal a direct forward-hook capture; a CLIP ViT's maps equal its extract
store's activations; token grids with prefix tokens; resume; refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipscope.pipelines.jobs.maps.job import run_maps
from clipscope.pipelines.jobs.maps.settings import MapsConfig
from clipscope.pipelines.jobs.maps.zoo import Network, Tap, build_network, model_inputs
from clipscope.pipelines.jobs.rosetta.sources import open_source
from clipscope.storage.store import RunStore
from extract_helpers import decoded_image, extract_args, run_cli


def _config(dataset, out, zoo, **kw) -> MapsConfig:
    return MapsConfig(data=(dataset.pattern,), out=str(out), zoo=zoo, rows_per_chunk=4, batch_size=4,
                      dtype="float32", **{"geometry": 32, **kw})


def _direct(network: Network, dataset, store: RunStore, layers, geometry) -> dict[str, np.ndarray]:
    """Hook capture on the same preprocessed images, row by row, outside the job."""
    table = store.read_samples().to_pylist()
    valid = store.read_valid()
    tap = Tap(network, layers)
    rows = [r for r in table if valid[r["row"]]]
    inputs = torch.stack([model_inputs(network, None, decoded_image(dataset.images[r["key"]]), geometry) for r in rows])
    with torch.no_grad():
        maps = tap.capture(inputs)
    return {"rows": np.asarray([r["row"] for r in rows]), **{k: v.numpy() for k, v in maps.items()}}


def test_torchvision_maps_equal_a_direct_hook_capture(tiny_dataset, tmp_path):
    # a random init (seed 5) saved as a state dict and loaded through --checkpoint (the seed then does not apply)
    checkpoint = True
    net = build_network("torchvision:resnet18", seed=5)
    path = str(tmp_path / "r18.pt")
    torch.save(net.module.state_dict(), path)
    config = _config(tiny_dataset, tmp_path / "m.zarr", "torchvision:resnet18", layers=("layer1", "layer3"),
                     checkpoint=path, seed=3)
    summary = run_maps(config, progress_display="off")
    assert summary.ok or summary.partial == []
    store = RunStore.open(config.out, "r")
    net = build_network("torchvision:resnet18", seed=5 if checkpoint else 3, checkpoint=path)
    net.module.eval()
    direct = _direct(net, tiny_dataset, store, ("layer1", "layer3"), 32)
    for layer in ("layer1", "layer3"):
        stored = store.read(f"maps/{layer}/values", direct["rows"])
        np.testing.assert_allclose(stored, direct[layer], rtol=1e-5, atol=1e-5)
    assert store.attrs["model"]["sha256"] is not None if checkpoint else store.attrs["model"]["seed"] == 3
    assert not store.read_valid()[[r["row"] for r in store.read_samples().to_pylist() if r["error"]]].any()


def test_clip_vit_maps_equal_the_extract_stores_activation_view(tiny_dataset, tmp_path, fast_models):
    assert run_cli(*extract_args(tiny_dataset.pattern, tmp_path / "e.zarr", "--activation-layers", "1", "2")) == 0
    config = MapsConfig(data=(tiny_dataset.pattern,), out=str(tmp_path / "m.zarr"), zoo="open_clip:clipscope-tiny",
                        layers=("transformer.resblocks.2.mlp.gelu",), rows_per_chunk=4, batch_size=4,
                        dtype="float32", geometry=64)
    run_maps(config, progress_display="off")
    extracted, mapped = RunStore.open(str(tmp_path / "e.zarr"), "r"), RunStore.open(config.out, "r")
    view = open_source(extracted, ("layer_2",), "store")
    own = open_source(mapped, (), "store")
    rows = np.flatnonzero(extracted.read_valid())
    np.testing.assert_array_equal(mapped.read_valid(), extracted.read_valid())
    a = view.read(extracted, view.layers[0], rows)
    b = own.read(mapped, own.layers[0], rows)
    assert a.shape == b.shape == (len(rows), 256, 4, 4)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert view.geometry == own.geometry == 64


class _Tokens(torch.nn.Module):
    """A token model: 1 class + 4 register tokens before a 4×6 grid; token t of the grid holds t in every
    channel, channel c adds 100·c."""

    def __init__(self):
        super().__init__()
        self.out = torch.nn.Identity()

    def forward(self, images):
        b = images.shape[0]
        grid = torch.arange(24, dtype=torch.float32)[None, :, None] + 100 * torch.arange(3.0)[None, None, :]
        prefix = torch.full((1, 5, 3), -7.0)
        return self.out(torch.cat([prefix, grid], dim=1).expand(b, -1, -1).clone())


def small_cnn(seed: int = 0, checkpoint: str | None = None) -> Network:
    torch.manual_seed(seed)
    module = torch.nn.Sequential()
    module.add_module("layer1", torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.ReLU()))
    module.add_module("layer2", torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3, stride=2), torch.nn.ReLU()))
    return Network(module, ("layer1", "layer2"), (32, 32))


def token_factory(seed: int = 0, checkpoint: str | None = None) -> Network:
    return Network(_Tokens(), ("out",), (16, 16), token_grid=(4, 6), prefix_tokens=5)


def test_a_token_model_with_registers_is_reshaped_to_its_non_square_grid(tiny_dataset, tmp_path):
    # with inner zarr chunks of 2 units (3 units: one shard of 4 per row chunk, holding 2 inner chunks)
    config = _config(tiny_dataset, tmp_path / "t.zarr", f"python:{__name__}:token_factory", unit_chunk=2)
    run_maps(config, progress_display="off")
    store = RunStore.open(config.out, "r")
    array = store.array("maps/out/values")
    assert array.shards == (4, 4, 4, 6) and array.chunks == (4, 2, 4, 6)
    row = int(np.flatnonzero(store.read_valid())[0])
    values = store.read("maps/out/values", [row])[0]
    assert values.shape == (3, 4, 6)
    expected = np.arange(24, dtype=np.float32).reshape(4, 6)[None] + 100 * np.arange(3.0)[:, None, None]
    np.testing.assert_array_equal(values, expected)


def test_a_resumed_run_rewrites_unfinished_shards_to_the_same_bytes(tiny_dataset, tmp_path):
    config = _config(tiny_dataset, tmp_path / "r.zarr", f"python:{__name__}:small_cnn", layers=("layer2",))
    run_maps(config, progress_display="off")
    store = RunStore.open(config.out, "r+")
    before = store.read("maps/layer2/values")
    # the state a kill -9 during shard 1 leaves: no done marker, rows half written
    store.clear_shard(1)
    start, capacity = store.attrs["row_blocks"][1]
    store.write_rows(start, {"maps/layer2/values": np.full((4, *before.shape[1:]), 9.0, np.float32)},
                     np.ones(4, bool))
    summary = run_maps(config, progress_display="off")
    assert (summary.done, summary.skipped) == (1, 2)
    assert RunStore.open(config.out, "r").read("maps/layer2/values").tobytes() == before.tobytes()


@pytest.mark.parametrize("flags, message", [
    (["--zoo", "torchvision:resnet18", "--layers", "nope"], "--layers: the network has no module 'nope'"),
    (["--zoo", "torchvision:nonet"], "torchvision has no model"),
    (["--zoo", "resnet18"], "--zoo 'resnet18': expected torchvision:NAME"),
])
def test_bad_models_and_layers_exit_2_with_one_line_and_write_nothing(tiny_dataset, tmp_path, capsys, flags, message):
    out = tmp_path / "bad.zarr"
    capsys.readouterr()
    assert run_cli("maps", tiny_dataset.pattern, "--out", str(out), "--progress", "off", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not out.exists() or not any(out.iterdir())


def test_an_open_clip_modified_resnet_hooks_its_stages(tmp_path):
    """A tiny ModifiedResNet config (RN50's architecture, small): stage maps at strides 4/8/16/32."""
    import json

    from clipscope import import_open_clip

    open_clip = import_open_clip()
    (tmp_path / "rn-tiny-test.json").write_text(json.dumps({
        "embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(tmp_path)
    network = build_network("open_clip:rn-tiny-test", seed=2)
    assert network.layers == ("layer1", "layer2", "layer3", "layer4") and network.input_size == (64, 64)
    maps = Tap(network, network.layers).capture(torch.randn(2, 3, 64, 64))
    assert [tuple(v.shape[2:]) for v in maps.values()] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert all(bool((v >= 0).all()) for v in maps.values())  # post-ReLU stage outputs
