"""Training the shapes-world CLIP: the head-readout objective is the evaluation's mean-ablation, and
a short run is deterministic."""

import dataclasses

import numpy as np
import pytest
import torch

from clipscope.errors import ConfigError
from clipscope.pipelines.worlds.shapes import evaluate as se
from clipscope.pipelines.worlds.shapes import probes
from clipscope.pipelines.worlds.shapes import train as st
from clipscope.pipelines.worlds.shapes import world as sw
@pytest.fixture(scope="module")
def loaded():
    return st.load_shapes_model()


@pytest.mark.parametrize("layers", [(3,), (2, 3), (0, 1, 2, 3)])
def test_keep_last_embedding_is_the_decomposition_s_mean_ablation(loaded, layers):
    scenes = list(sw.generate_scenes(24, 5, config=sw.WorldConfig(counts=(1, 2))))
    images, out = se.decompose_scenes(loaded, scenes, ())
    emb = out.image_embedding
    early = [layer for layer in range(4) if layer not in layers]
    ablated = out.direct.mlps.sum(1) + out.direct.heads[:, early].sum((1, 2))
    expected = emb - ablated + ablated.mean(0, keepdim=True)
    with torch.no_grad(), st.ClassTokenTap(loaded.model.visual) as tap:
        embedding = loaded.model.encode_image(images)
    got = st.keep_last_embedding(loaded.model.visual, tap, embedding, layers)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_tap_removes_its_hooks(loaded):
    visual = loaded.model.visual
    with st.ClassTokenTap(visual) as tap:
        pass
    assert not tap._handles
    assert not visual.ln_post._forward_pre_hooks
    assert not any(block.ls_1._forward_hooks or block.ls_2._forward_hooks for block in visual.transformer.resblocks)


def test_readout_loss_trains_the_kept_heads_and_what_feeds_them(loaded):
    model = st.load_shapes_model().model
    images = probes.image_tensor(np.stack([s.image for s in sw.generate_scenes(8, 3)]), loaded)
    with st.ClassTokenTap(model.visual) as tap:
        embedding = model.encode_image(images)
    st.keep_last_embedding(model.visual, tap, embedding, (3,)).square().sum().backward()
    blocks = model.visual.transformer.resblocks
    assert blocks[3].attn.out_proj.weight.grad.abs().sum() > 0
    assert blocks[0].mlp.c_fc.weight.grad.abs().sum() > 0  # earlier layers write what the heads read


def test_short_training_is_deterministic_and_the_readout_loss_and_clipping_change_it():
    config = st.TrainConfig(steps=2, batch_size=16, warmup_steps=1, readout_weight=1.0)
    first, summary = st.train(config, log=lambda line: None)
    second, _ = st.train(config, log=lambda line: None)
    plain, _ = st.train(dataclasses.replace(config, readout_weight=0.0), log=lambda line: None)
    unclipped, _ = st.train(dataclasses.replace(config, grad_clip_norm=0.0), log=lambda line: None)
    assert summary["config"]["readout_weight"] == 1.0 and torch.isfinite(torch.tensor(summary["final_loss"]))
    a, b, c, d = (m.model.state_dict() for m in (first, second, plain, unclipped))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert not all(torch.equal(a[k], d[k]) for k in a)  # at the start the gradient norm is ≫ 1


@pytest.mark.parametrize("changes, message", [
    ({"readout_weight": -1.0}, "readout_weight must be a number in [0, 10], got -1.0"),
    ({"readout_layers": -1}, "readout_layers must be an integer ≥ 0, got -1"),
    ({"grad_clip_norm": -1.0}, "grad_clip_norm must be a number ≥ 0 (0: off), got -1.0"),
])
def test_bad_readout_options_are_named(changes, message):
    with pytest.raises(ConfigError) as err:
        st.TrainConfig(**changes).validated()
    assert str(err.value) == message


def test_readout_layers_beyond_the_model_are_named():
    with pytest.raises(ConfigError, match=r"readout_layers must be in \[1, 4\] \(clipscope-shapes has 4 layers\), got 5"):
        st.train(st.TrainConfig(steps=1, batch_size=4, readout_weight=0.5, readout_layers=5), log=lambda line: None)


def test_content_digest_sees_tensors_and_metadata_not_the_file_layout(loaded, tmp_path):
    """Re-saving the shipped model reproduces its content digest (the loaded fp32 weights are fp16
    values; the metadata is the default `TrainConfig`); any changed value changes it."""
    shipped = st.content_digest(st.CHECKPOINT)
    assert st.save_checkpoint(loaded.model, tmp_path / "again.safetensors", st.TrainConfig()) == shipped
    edited = st.load_shapes_model().model
    with torch.no_grad():
        edited.logit_scale.add_(1.0)
    assert st.save_checkpoint(edited, tmp_path / "edited.safetensors", st.TrainConfig()) != shipped
    other = dataclasses.replace(st.TrainConfig(), steps=999)
    assert st.save_checkpoint(loaded.model, tmp_path / "meta.safetensors", other) != shipped


def test_head_writes_are_the_heads_parts_of_the_attention_write(loaded):
    images = probes.image_tensor(np.stack([s.image for s in sw.generate_scenes(6, 4)]), loaded)
    visual = loaded.model.visual
    with torch.no_grad(), st.ClassTokenTap(visual) as tap, st.HeadTap(visual, [1, 3]) as heads:
        loaded.model.encode_image(images)
    for layer in (1, 3):
        writes = heads.head_writes(layer)
        assert writes.shape == (6, 4, 64)
        torch.testing.assert_close(writes.sum(1), tap.attn[layer], rtol=1e-5, atol=1e-6)
    assert not any(block.ln_1._forward_hooks for block in visual.transformer.resblocks)


@pytest.mark.parametrize("spec, expected", [
    ("", ()),
    ("L3H3=colour, L2H2=shape", ((3, 3, "colour"), (2, 2, "shape"))),
    ("l0h1=shape", ((0, 1, "shape"),)),
])
def test_planted_roles_are_parsed(spec, expected):
    assert st.planted_roles(spec) == expected


@pytest.mark.parametrize("changes, message", [
    ({"planted_heads": "L3=colour"}, "planted_heads entries are LxHy=property, got 'L3=colour'"),
    ({"planted_heads": "L3H3=size"}, "planted_heads property must be one of colour, shape, got 'size'"),
    ({"planted_weight": -0.5}, "planted_weight must be a number in [0, 10], got -0.5"),
    ({"readout_shares": "center"}, "readout_shares must be 'split' or 'split-v1', got 'center'"),
])
def test_bad_planting_options_are_named(changes, message):
    with pytest.raises(ConfigError) as err:
        st.TrainConfig(**changes).validated()
    assert str(err.value) == message


def test_a_planted_head_outside_the_model_is_named():
    with pytest.raises(ConfigError, match="planted_heads: clipscope-shapes has no head L4H0"):
        st.train(st.TrainConfig(steps=1, batch_size=4, planted_heads="L4H0=shape", planted_weight=1.0),
                 log=lambda line: None)


def test_planted_heads_change_a_short_training_deterministically():
    config = st.TrainConfig(steps=2, batch_size=16, warmup_steps=1, planted_heads="L3H3=colour,L2H2=shape",
                            planted_weight=1.0)
    first, summary = st.train(config, log=lambda line: None)
    second, _ = st.train(config, log=lambda line: None)
    plain, _ = st.train(dataclasses.replace(config, planted_weight=0.0), log=lambda line: None)
    a, b, c = (m.model.state_dict() for m in (first, second, plain))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert torch.isfinite(torch.tensor(summary["final_loss"]))


def test_the_record_leaves_later_fields_out_at_their_defaults():
    assert set(st.TrainConfig().record()) == {f.name for f in dataclasses.fields(st.TrainConfig)} - set(st.LATER_FIELDS)
    planted = st.TrainConfig(planted_heads="L3H3=colour", planted_weight=0.5).record()
    assert planted["planted_heads"] == "L3H3=colour" and planted["planted_weight"] == 0.5
    assert "init_checkpoint" not in planted


def test_a_fine_tune_starts_from_its_checkpoint(loaded):
    config = st.TrainConfig(steps=1, batch_size=4, lr=0.0, min_lr=0.0, init_checkpoint=str(st.CHECKPOINT))
    tuned, _ = st.train(config, log=lambda line: None)
    shipped = loaded.model.state_dict()
    assert all(torch.equal(value, shipped[name]) for name, value in tuned.model.state_dict().items())
