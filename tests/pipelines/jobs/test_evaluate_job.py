"""Mean-ablation from the store equals mean-ablating the same components of the live open_clip model.

The reference never touches clipscope's kernels: forward hooks on the real open_clip
VisionTransformer capture each block's ln_1 output, its ls_2·MLP output and the input of ln_post;
per-head attention comes from nn.MultiheadAttention's own per-head weights; every component is
folded through ln_post with the image's own μ, σ (split convention of docs/methods.md: with K₁ = 2L + 1,
the embedding and each MLP carry 1/K₁ of −μ and β; each (token, head) term carries the layer's
out-projection bias / (H·T) and 1/(K₁·H·T)); means are taken over the live
components; ablations happen at the output.
"""

import copy
import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from clipscope.errors import ConfigError, StoreError
from clipscope.kernels.zero_shot import zero_shot_logits
from clipscope.pipelines.jobs import evaluate
from clipscope.pipelines.jobs.evaluate import job as evaluate_module
from clipscope.pipelines.jobs.evaluate.job import (
    ablation_means,
    build_ablations,
    iter_ablated_embeddings,
    needed_arrays,
    parse_heads,
)
from clipscope.pipelines.jobs.extract.job import run_extract
from clipscope.pipelines.jobs.extract.settings import ExtractConfig
from clipscope.pipelines.jobs.means.job import row_blocks
from clipscope.pipelines.worlds.shapes.world import write_world
from clipscope.pipelines.data.webdataset_input import write_shard
from clipscope.pipelines.texts.zero_shot import classifier, get_task
from clipscope.storage.store import RunStore

from extract_helpers import run_cli

MODEL = "clipscope-tiny"
HEAD_SET = "L1H2,3:0"
KEEP_LAST = (2,)


@pytest.fixture(scope="module")
def world_store(tmp_path_factory, fast_models):
    root = tmp_path_factory.mktemp("evaluate")
    write_world(root / "shards", 2, 24, 3, image_size=48)
    config = ExtractConfig(data=(str(root / "shards" / "shapes-{00000..00001}.tar"),), out=str(root / "store"),
                           model=MODEL, token_layers=(0, 3), rows_per_chunk=8, batch_size=16)
    run_extract(config, progress_display="off")
    return config.out


@pytest.fixture(scope="module")
def unlabelled_store(tmp_path_factory, fast_models):
    """Head terms of layers 2 and 3 only, token terms of layer 3, and no labels."""
    root = tmp_path_factory.mktemp("unlabelled")
    rng = np.random.default_rng(1)
    write_shard(str(root / "plain.tar"), [{"__key__": f"k{i}", "png": Image.fromarray(
        rng.integers(0, 255, (40, 40, 3), np.uint8))} for i in range(6)])
    config = ExtractConfig(data=(str(root / "plain.tar"),), out=str(root / "store"), model=MODEL,
                           heads_layers=(2, 3), token_layers=(3,), rows_per_chunk=4, batch_size=6)
    run_extract(config, progress_display="off")
    return config.out


# ----------------------------------------------------------------------------------------------
# The live reference


def shard_images(folder) -> dict[str, tuple[Image.Image, int]]:
    out = {}
    for path in sorted(folder.glob("shapes-*.tar")):
        with tarfile.open(path) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}
        for name, data in members.items():
            key, ext = name.split(".", 1)
            if ext == "png":
                out[key] = (Image.open(io.BytesIO(data)).convert("RGB"), int(members[f"{key}.cls"]))
    return out


def live_components(loaded, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Folded direct effects [image …] of the real open_clip tower, in float64, from hooks."""
    visual = copy.deepcopy(loaded.model.visual).double().eval()
    blocks = visual.transformer.resblocks
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        return lambda module, args, output: seen.__setitem__(name, output)

    hooks = [blocks[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("x0", args[0])),
             visual.ln_post.register_forward_pre_hook(lambda m, args: seen.__setitem__("final", args[0]))]
    for i, block in enumerate(blocks):
        hooks += [block.ln_1.register_forward_hook(keep(f"y{i}")), block.ls_1.register_forward_hook(keep(f"a{i}")),
                  block.ls_2.register_forward_hook(keep(f"m{i}"))]
    with torch.no_grad():
        output = visual(images.double())
        for hook in hooks:
            hook.remove()
        final = seen["final"][:, 0]
        mu = final.mean(-1, keepdim=True)
        sigma = torch.sqrt(final.var(-1, unbiased=False, keepdim=True) + visual.ln_post.eps)
        n_layers, n_tokens = len(blocks), final.new_tensor(seen["x0"].shape[1])
        n_heads = blocks[0].attn.num_heads
        k = 2 * n_layers + 1

        def fold(c, share):  # c [image … width], share: of the ln_post offset carried by c
            s = share.reshape(-1, *[1] * (c.ndim - 2), 1) if torch.is_tensor(share) else share
            mu_, sigma_ = mu.reshape(-1, *[1] * (c.ndim - 1)), sigma.reshape(-1, *[1] * (c.ndim - 1))
            return (visual.ln_post.weight * (c - s * mu_) / sigma_ + s * visual.ln_post.bias) @ visual.proj

        heads, cls_self, mlps, biases = [], [], [], []
        for i, block in enumerate(blocks):
            attn, y = block.attn, seen[f"y{i}"]
            width = y.shape[-1]
            _, weights = attn(y, y, y, need_weights=True, average_attn_weights=False)  # [image head q key]
            v = (y @ attn.in_proj_weight[2 * width:].T + attn.in_proj_bias[2 * width:])
            v = v.reshape(*v.shape[:2], n_heads, -1)  # [image token head e]
            w_o = attn.out_proj.weight.reshape(width, n_heads, -1)  # [width head e]
            ls_1 = getattr(block.ls_1, "gamma", torch.ones(width, dtype=torch.float64))
            per_token = torch.einsum("bht,bthe,whe->bhtw", weights[:, :, 0], v, w_o) * ls_1  # [image head token width]
            per_head = per_token.sum(2)
            bias = ls_1 * attn.out_proj.bias
            # the reference itself: heads + bias are the block's attention output at the class token
            torch.testing.assert_close(per_head.sum(1) + bias, seen[f"a{i}"][:, 0], rtol=0, atol=1e-12)
            heads.append(fold(per_head + bias / n_heads, 1 / (k * n_heads)))
            cls_self.append(fold(per_token[:, :, 0] + bias / (n_heads * n_tokens), 1 / (k * n_heads * n_tokens)).sum(1))
            mlps.append(fold(seen[f"m{i}"][:, 0], 1 / k))
            biases.append(torch.zeros_like(output))  # split: the out-projection biases live inside the heads
        parts = {"output": output, "embedding": fold(seen["x0"][:, 0], 1 / k), "heads": torch.stack(heads, 1),
                 "mlps": torch.stack(mlps, 1), "cls_token": torch.stack(cls_self, 1),
                 "bias": torch.stack(biases, 1).sum(1)}
    total = parts["embedding"] + parts["mlps"].sum(1) + parts["heads"].sum((1, 2)) + parts["bias"]
    torch.testing.assert_close(total, output, rtol=0, atol=1e-12)
    return parts


def live_ablated(parts, mlps: bool, cls_token: bool, heads) -> torch.Tensor:
    emb = parts["output"].clone()
    if mlps:
        emb -= (parts["mlps"] - parts["mlps"].mean(0)).sum(1)
    if cls_token:
        emb -= (parts["cls_token"] - parts["cls_token"].mean(0)).sum(1)
    for layer, head in heads:
        emb -= parts["heads"][:, layer, head] - parts["heads"][:, layer, head].mean(0)
    return emb


def all_heads(layers):
    return [(l, h) for l in layers for h in range(4)]


# name -> (MLPs, class token, heads) mean-ablated, written out independently of build_ablations
EXPECTED = {
    "baseline": (False, False, []), "mlps": (True, False, []), "cls_token": (False, True, []),
    "mlps+cls_token": (True, True, []),
    **{f"heads_to_L{l}": (False, False, all_heads(range(l + 1))) for l in range(4)},
    "heads:L1H2,L3H0": (False, False, [(1, 2), (3, 0)]),
    "keep_last_2": (True, False, all_heads([0, 1])),
}


@pytest.fixture(scope="module")
def live(world_store, model_cache):
    """Live components of every store row, in row order, with the rows' classes."""
    store = RunStore.open(world_store)
    loaded = model_cache(MODEL)
    samples = pq.read_table(f"{world_store}/samples.parquet").to_pydict()
    images = shard_images(Path(world_store).parent / "shards")
    assert sorted(samples["key"]) == sorted(images) and store.read_valid().all()
    order = np.argsort(samples["row"])
    keys = [samples["key"][i] for i in order]
    assert [samples["row"][i] for i in order] == list(range(store.n_rows))
    batch = torch.stack([loaded.preprocess(images[k][0]) for k in keys])
    return live_components(loaded, batch), np.array([images[k][1] for k in keys])


# ----------------------------------------------------------------------------------------------
# Store path == live path


def test_cls_token_in_the_store_is_token_zero_summed_over_heads(world_store, unlabelled_store):
    for url, token_layers in ((world_store, [0, 3]), (unlabelled_store, [3])):
        store = RunStore.open(url)
        stored = store.attrs["layers"]["heads"]
        cls, tokens = store.read("direct/cls_token").astype(np.float64), store.read("direct/tokens")
        assert store.dims("direct/cls_token") == ("sample", "layer", "embed")
        assert cls.shape[1] == len(stored)
        valid = store.read_valid()
        for position, layer in enumerate(token_layers):
            expected = tokens[valid][:, position, :, 0].astype(np.float64).sum(1)
            np.testing.assert_allclose(cls[valid][:, stored.index(layer)], expected, rtol=1e-5, atol=1e-6)


def test_store_terms_equal_the_live_model(world_store, live):
    parts, _ = live
    store = RunStore.open(world_store)
    for name, live_name in (("direct/heads", "heads"), ("direct/mlps", "mlps"), ("direct/cls_token", "cls_token"),
                            ("image_embedding", "output")):
        np.testing.assert_allclose(store.read(name), parts[live_name].numpy(), rtol=0, atol=2e-5, err_msg=name)


def test_ablated_logits_and_accuracies_equal_the_live_model(world_store, live, model_cache, monkeypatch):
    monkeypatch.setattr(evaluate_module, "_ROWS_AT_ONCE", 5)  # several slices per block
    parts, labels = live
    store = RunStore.open(world_store, "r+")
    task = get_task("shapes")
    loaded = model_cache(MODEL)
    table = evaluate.run(store, evaluate.Settings(task.name, heads=(HEAD_SET,), keep_last=KEEP_LAST),
                         loaded=loaded).table()
    ablations = build_ablations(store.attrs["layers"]["heads"], 4, heads=[HEAD_SET], keep_last=KEEP_LAST)
    names = table.column("ablation").to_pylist()
    assert names == [a.name for a in ablations] == list(EXPECTED)
    weights = torch.from_numpy(classifier(store, task, loaded).astype(np.float64))
    means = ablation_means(store, needed_arrays(ablations))
    got = {}
    for rows in row_blocks(store):
        for row_numbers, emb in iter_ablated_embeddings(store, ablations, means, rows):
            for a, ablation in enumerate(ablations):
                got.setdefault(ablation.name, []).append(zero_shot_logits(emb[a], weights))
    n = len(labels)
    for a, ablation in enumerate(ablations):
        store_logits = torch.cat(got[ablation.name])
        live_logits = zero_shot_logits(live_ablated(parts, *EXPECTED[ablation.name]), weights)
        assert (store_logits - live_logits).abs().max().item() <= 1e-4, ablation.name
        live_accuracy = (live_logits.argmax(1).numpy() == labels).sum() / n
        assert table.column("accuracy")[a].as_py() == live_accuracy, ablation.name
    assert table.column("n").to_pylist() == [n] * len(ablations)
    # the ablations change the embeddings: the test would notice a no-op
    for name in ("mlps", "cls_token", "heads_to_L3", "heads:L1H2,L3H0"):
        assert (torch.cat(got[name]) - torch.cat(got["baseline"])).abs().max() > 1e-3, name
    # stored results
    accuracy = store.read_result("reductions/evaluation/shapes/accuracy")
    np.testing.assert_array_equal(accuracy, table.column("accuracy").to_numpy())
    assert store.dims("reductions/evaluation/shapes/accuracy") == ("ablation",)
    attrs = store.array("reductions/evaluation/shapes/accuracy").attrs
    assert attrs["ablations"] == names and attrs["n"] == n and attrs["heads_layers"] == [0, 1, 2, 3]
    assert store.array("reductions/means/direct/cls_token").attrs["count"] == n


@pytest.mark.slow  # an embedded Ray starts in 5–20 s here
def test_ray_counts_what_the_local_run_counts(world_store, model_cache):
    from clipscope.cluster.executor import open_executor

    store = RunStore.open(world_store, "r+")
    loaded = model_cache(MODEL)
    settings = evaluate.Settings("shapes-colour", heads=(HEAD_SET,), force=True)
    local = evaluate.run(store, settings, loaded=loaded).table()
    with open_executor(2, object_store_memory=100 * 1024 * 1024, progress="off") as on_ray:
        remote = evaluate.run(store, settings, on_ray, loaded=loaded).table()
    assert remote.equals(local)
    assert len(row_blocks(store)) > 1


# ----------------------------------------------------------------------------------------------
# Head sets, stored layers, old stores


def test_head_specs_parse_and_are_checked():
    assert parse_heads("L10H3, 11:0,l2h1", [2, 10, 11], 12) == ((10, 3), (11, 0), (2, 1))
    for spec, message in (("", "comma-separated list"), ("L1H1,,L2H2", "comma-separated list"),
                          ("L1-H1", "not of the form"), ("L0H1", r"layer 0 has no stored head terms; stored layers: \[2, 10, 11\]"),
                          ("2:12", r"head must be in 0..11, got 12"), ("L2H1,2:1", "names L2H1 twice")):
        with pytest.raises(ConfigError, match=message):
            parse_heads(spec, [2, 10, 11], 12)


def test_cumulative_ablations_follow_the_stored_layers(unlabelled_store):
    store = RunStore.open(unlabelled_store)
    ablations = build_ablations(store.attrs["layers"]["heads"], 4, keep_last=(1,))
    cumulative = {a.name: a.heads for a in ablations if a.kind == "cumulative"}
    assert cumulative == {"heads_to_L2": tuple((2, h) for h in range(4)),
                          "heads_to_L3": tuple((l, h) for l in (2, 3) for h in range(4))}
    keep = [a for a in ablations if a.kind == "keep_last"][0]
    assert keep.mlps and keep.heads == tuple((2, h) for h in range(4))
    with pytest.raises(ConfigError, match=r"^keep_last must be an integer in 1..2"):
        build_ablations([2, 3], 4, keep_last=(3,))
    with pytest.raises(ConfigError, match="'heads:L2H0' is asked for twice"):
        build_ablations([2, 3], 4, heads=["L2H0", "2:0"])


def test_a_store_without_the_class_token_term_asks_for_re_extraction(world_store, tmp_path, model_cache, capsys):
    old = tmp_path / "old.zarr"
    shutil.copytree(world_store, old)
    shutil.rmtree(old / "direct" / "cls_token")
    shutil.rmtree(old / "reductions", ignore_errors=True)
    store = RunStore.open(str(old), "r+")
    with pytest.raises(StoreError, match="has no direct/cls_token .*re-extract the store"):
        evaluate.run(store, evaluate.Settings("shapes"), loaded=model_cache(MODEL))
    assert not [n for n in store.array_names() if n.startswith("reductions/")]
    table = evaluate.run(store, evaluate.Settings("shapes", include_cls=False), loaded=model_cache(MODEL)).table()
    assert "cls_token" not in table.column("ablation").to_pylist()


def test_read_only_store_without_means_is_refused(world_store, tmp_path):
    copy_ = tmp_path / "ro.zarr"
    shutil.copytree(world_store, copy_)
    shutil.rmtree(copy_ / "reductions", ignore_errors=True)
    with pytest.raises(StoreError, match="no up-to-date dataset mean of direct/mlps and is opened read-only"):
        ablation_means(RunStore.open(str(copy_)), ["direct/mlps"])


# ----------------------------------------------------------------------------------------------
# CLI


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("clipscope evaluate: error: ")
    return err[0]


def test_cli_prints_writes_csv_and_png(world_store, tmp_path, capsys):
    csv, png = tmp_path / "ablation.csv", tmp_path / "curve.png"
    assert run_cli("evaluate", world_store, "--task", "shapes", "--heads", "L3H1,L3H2", "--keep-last", "1",
                   "--csv", csv, "--png", png) == 0
    out = capsys.readouterr().out
    assert "zero-shot task shapes: 48 labelled images, 56 classes" in out
    assert "heads:L3H1,L3H2" in out and "keep_last_1" in out
    assert csv.read_text().splitlines()[0] == '"ablation","kind","layer","accuracy","correct","n"'
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 300


@pytest.mark.parametrize("argv, message", [
    (["--task", "nope"], "unknown zero-shot task 'nope'"),
    (["--heads", "L3H9"], "--heads L3H9: head must be in 0..3, got 9"),
    (["--heads", "three"], "not of the form"),
    (["--keep-last", "0"], "--keep-last must be an integer in 1..4"),
    (["--workers", "0"], "--workers must be an integer ≥ 1, got 0"),
    (["--png", "/no/such/folder/x.png"], "--png /no/such/folder/x.png: its folder does not exist"),
])
def test_cli_bad_input_exits_2_writing_nothing(world_store, tmp_path, capsys, argv, message):
    copy_ = tmp_path / "bad.zarr"
    shutil.copytree(world_store, copy_)
    before = RunStore.open(str(copy_)).array_names()
    assert run_cli("evaluate", copy_, *argv) == 2
    assert message in one_error_line(capsys)
    assert RunStore.open(str(copy_)).array_names() == before


def test_cli_store_without_labels_or_heads_exits_2(unlabelled_store, capsys):
    before = RunStore.open(unlabelled_store).array_names()
    assert run_cli("evaluate", unlabelled_store, "--task", "shapes") == 2
    assert "no valid sample with a label for zero-shot task 'shapes'" in one_error_line(capsys)
    assert run_cli("evaluate", unlabelled_store, "--task", "shapes", "--heads", "L0H1") == 2
    assert "layer 0 has no stored head terms; stored layers: [2, 3]" in one_error_line(capsys)
    assert RunStore.open(unlabelled_store).array_names() == before
