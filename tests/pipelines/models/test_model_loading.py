"""Model loading: names, tags, checkpoints, refusal of unsupported towers."""

import subprocess
import sys

import pytest
import torch

from clipscope.errors import ModelError
from clipscope.pipelines.models.loading import list_models, list_tiny_models, load_model


def test_tiny_configs_are_registered():
    assert {"clipscope-tiny", "clipscope-tiny-quickgelu", "clipscope-tiny-ls"} <= set(list_tiny_models())
    assert set(list_tiny_models()) <= set(list_models())
    assert "ViT-B-32" in list_models()


def test_unknown_model_suggests_close_names():
    with pytest.raises(ModelError, match=r"unknown model 'ViT-B-33'; did you mean .*ViT-B-32"):
        load_model("ViT-B-33", "none")


def test_unknown_tag_lists_known_tags():
    with pytest.raises(ModelError, match=r"unknown pretrained tag 'nope' for ViT-B-32; known tags: .*openai"):
        load_model("ViT-B-32", "nope")


def test_hub_tag_offline_fails_with_one_clear_line():
    with pytest.raises(ModelError) as info:
        load_model("ViT-B-32", "laion2b_s34b_b79k")
    message = str(info.value)
    assert "\n" not in message
    assert "pass a local checkpoint with --pretrained" in message


def test_random_init_is_seeded():
    a = load_model("clipscope-tiny", "none", seed=3).model.visual.proj
    b = load_model("clipscope-tiny", "none", seed=3).model.visual.proj
    c = load_model("clipscope-tiny", "none", seed=4).model.visual.proj
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cached_spec_follows_in_place_weight_changes():
    """`LoadedModel.spec` is built once and holds views of the weights, so training or editing the
    model in place keeps the decomposition exact without rebuilding it."""
    from clipscope.kernels.decompose import DecomposeRequest, decompose

    loaded = load_model("clipscope-tiny", "none", seed=0)
    spec = loaded.spec
    with torch.no_grad():
        for param in loaded.model.visual.parameters():
            param.mul_(1.5).add_(0.01)
    assert loaded.spec is spec
    images = torch.randn(2, 3, *loaded.image_size, generator=torch.Generator().manual_seed(0))
    out = decompose(loaded.spec, images, DecomposeRequest(direct=True))
    total = out.direct.embedding + out.direct.mlps.sum(1) + out.direct.heads.sum((1, 2)) + out.direct.bias
    with torch.no_grad():
        reference = loaded.model.encode_image(images)
    torch.testing.assert_close(out.image_embedding, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(total, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_checkpoint_round_trip(tmp_path, suffix):
    source = load_model("clipscope-tiny", "none", seed=7)
    path = tmp_path / f"tiny{suffix}"
    state = source.model.state_dict()
    if suffix == ".pt":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = load_model("clipscope-tiny", str(path))
    assert torch.equal(loaded.model.visual.proj, source.model.visual.proj)
    assert len(loaded.identity["sha256"]) == 64
    assert loaded.identity["pretrained"] == str(path.resolve())


def test_checkpoint_for_another_architecture_is_refused(tmp_path):
    path = tmp_path / "ls.pt"
    torch.save(load_model("clipscope-tiny-ls", "none").model.state_dict(), path)
    with pytest.raises(ModelError, match=r"checkpoint .*ls\.pt does not match architecture clipscope-tiny: "):
        load_model("clipscope-tiny", str(path))


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(ModelError, match=r"checkpoint not found: .*absent\.pt"):
        load_model("clipscope-tiny", str(tmp_path / "absent.pt"))


def test_unsupported_pooling_is_refused(tmp_path):
    import json

    from clipscope.pipelines.models import loading as models
    config = json.loads((models.CONFIG_DIR / "clipscope-tiny.json").read_text())
    config["vision_cfg"]["pool_type"] = "avg"
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    with pytest.raises(ModelError, match="pool_type='avg'; only class-token pooling is decomposed"):
        load_model(f"local-dir:{tmp_path}", "none")


TORCHVISION_PROBE = """
import sys
from clipscope import _torchvision_compat as compat
if sys.argv[1] == "working":
    compat._compiled_ops_load = lambda: True
declared = compat.ensure_torchvision_importable()
print("declared", ",".join(declared))
import torchvision, open_clip
print("imported", torchvision.__version__)
"""


def test_torchvision_shim_declares_ops_only_when_compiled_ops_fail():
    from clipscope import _torchvision_compat as compat

    broken = not compat._compiled_ops_load()
    run = subprocess.run([sys.executable, "-c", TORCHVISION_PROBE, "real"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "imported" in run.stdout
    expected = "declared nms,qnms" if broken else "declared \n"
    assert expected.strip() in run.stdout
    # On a working install (simulated), nothing is declared.
    working = subprocess.run([sys.executable, "-c", TORCHVISION_PROBE, "working"], capture_output=True, text=True)
    assert "declared \n" in working.stdout
    if broken:  # and then torchvision's own import fails, which is what the shim is for
        assert working.returncode != 0 and "torchvision::nms does not exist" in working.stderr
