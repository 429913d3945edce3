"""The store schema has one owner (storage/schema.py): names pinned, dims declared once, RunInfo typed."""

from __future__ import annotations

import pytest

from clipscope.errors import ConfigError, StoreError
from clipscope.storage import schema
from clipscope.storage.layout import SCHEMA_ATTR, SCHEMA_VERSION

# The public contract (README, "The store"): renaming one of these is a store migration.
PINNED = [
    "valid", "image_embedding", "direct/embedding", "direct/bias", "direct/mlps", "direct/heads",
    "direct/cls_token", "direct/tokens", "second_order/layer_{layer}/weights", "second_order/layer_{layer}/shared",
    "activations/layer_{layer}", "second_order/layer_{layer}/directions", "text_embeddings/{key}/embeddings",
    "text_embeddings/{key}/text_utf8", "text_embeddings/{key}/text_offsets", "reductions/means/{array}",
    "reductions/textspan/layer_{layer}/indices", "reductions/textspan/layer_{layer}/variances",
    "reductions/textspan/layer_{layer}/explained_ratio", "reductions/textspan/curve/{task}/basis_size",
    "reductions/textspan/curve/{task}/accuracy", "reductions/evaluation/{task}/accuracy",
    "reductions/evaluation/{task}/correct", *(f"reductions/second_order/layer_{{layer}}/{leaf}" for leaf in (
        "mean_weights", "mean_shared", "norm_mean", "norm_max", "norm_p98", "energy_topk", "significant_share",
        "norm_histogram", "norm_bin_edges", "topk_rows", "topk_norms", "pc", "pc_explained", "evaluation")),
    "reductions/omp/layer_{layer}/m", "reductions/omp/layer_{layer}/support", "reductions/omp/layer_{layer}/coefs",
    "reductions/omp/layer_{layer}/residual_norm", "reductions/omp/layer_{layer}/accuracy",
    # segmentation and CLIP-InterpreT
    "masks", "direct/token_sum", "attention/layer_{layer}", "reductions/roles/label", "reductions/roles/share",
    "reductions/roles/matches", *(f"reductions/segmentation/{{method}}/{{task}}/{leaf}" for leaf in (
        "class_index", "correct", "labelled", "intersection", "union", "ap", "selected")),
    # the applications
    *(f"reductions/concepts/layer_{{layer}}/{leaf}" for leaf in ("text_index", "score", "n_active")),
    *(f"reductions/cues/{{pair}}/{leaf}" for leaf in ("text_index", "score", "neurons")),
    *(f"reductions/worst_group/{{task}}/{leaf}" for leaf in (
        "group_count", "group_correct", "group_accuracy", "worst_group", "accuracy")),
    # Rosetta Neurons
    "maps/{layer}/values",
    *(f"reductions/rosetta/{{name}}/units/{{model}}/{leaf}" for leaf in (
        "layer_index", "channel", "height", "width", "mean", "std")),
    *(f"reductions/rosetta/{{name}}/pairs/{{model}}/{leaf}" for leaf in (
        "row_top_index", "row_top_corr", "col_top_index", "col_top_corr", "buddies", "buddy_corr", "corr")),
    "reductions/rosetta/{name}/self/buddies", "reductions/rosetta/{name}/self/buddy_corr",
    "reductions/rosetta/{name}/tuples/members", "reductions/rosetta/{name}/tuples/corr",
    "reductions/rosetta/{name}/tuples/concept", "reductions/rosetta/{name}/best/unit",
    "reductions/rosetta/{name}/best/corr", "reductions/rosetta/{name}/dictionary/example_rows",
    "reductions/rosetta/{name}/dictionary/example_scores", "reductions/rosetta/{name}/summary/n_units",
    # TextSpan statistics
    *(f"reductions/head_statistics/{{norm}}/layer_{{layer}}/{leaf}" for leaf in (
        "count", "sum", "gram", "shift", "eigenvalues", "eigenvectors")),
]


def test_every_array_name_is_pinned():
    assert [d.pattern for d in schema.ARRAYS] == PINNED


def test_names_resolve_to_their_declaration():
    decl, fields = schema.declaration("second_order/layer_7/weights")
    assert decl is schema.SECOND_ORDER_WEIGHTS and fields == {"layer": "7"}
    decl, fields = schema.declaration("reductions/means/second_order/layer_7/weights")
    assert decl is schema.MEANS and fields == {"array": "second_order/layer_7/weights"}
    assert schema.expected_dims("reductions/means/direct/heads") == ("layer", "head", "embed")
    assert schema.expected_dims("reductions/textspan/layer_3/indices") == ("head", "pick")
    assert schema.declaration("reductions/textspan/curve/shapes/accuracy")[0] is schema.TEXTSPAN_CURVE["accuracy"]
    with pytest.raises(StoreError, match="'reductions/nope' is not an array of the clipscope store schema"):
        schema.declaration("reductions/nope")


def test_paths_and_specs():
    assert schema.TEXTSPAN.path(layer=3) == "reductions/textspan/layer_3"
    assert schema.SECOND_ORDER.dims("pc") == ("neuron", "embed")
    spec = schema.SECOND_ORDER_WEIGHTS.spec((2, 4, 8), "float16", layer=1)
    assert (spec.name, spec.dims, spec.shape_tail, spec.dtype) == (
        "second_order/layer_1/weights", ("sample", "later_layer", "head", "neuron"), (2, 4, 8), "float16")
    assert schema.VALID.dtype == "bool" and schema.VALID.per_sample
    with pytest.raises(ConfigError, match="needs \\['layer'\\]"):
        schema.SECOND_ORDER_WEIGHTS.path()
    with pytest.raises(ConfigError, match="not per-sample"):
        schema.SECOND_ORDER_DIRECTIONS.spec((1,))
    with pytest.raises(ConfigError, match="per-sample arrays \\(and only they\\) start with 'sample'"):
        schema.ArrayDecl("x", ("embed",), "float32", "rows", "extract", "")


ATTRS = {
    SCHEMA_ATTR: SCHEMA_VERSION, "n_rows": 24, "rows_per_chunk": 8, "ln_convention": "split",
    "config": {"ln_convention": "split", "dtype": "float32"},
    "model": {"name": "clipscope-tiny", "pretrained": "none", "sha256": None, "seed": 0, "open_clip_version": "3"},
    "layers": {"heads": [0, 1, 2, 3], "tokens": [3], "second_order": {"1": [2, 3]}, "activations": [2]},
    "shards": ["a.tar", "b.tar"], "row_blocks": [[0, 8], [8, 16]],
}


def test_run_info_round_trip():
    info = schema.RunInfo.from_attrs(ATTRS)
    assert info.ln_convention == "split" and info.heads_layers == (0, 1, 2, 3)
    assert info.second_order_layers == {1: (2, 3)} and info.row_blocks == ((0, 8), (8, 16))
    assert info.layers_attr() == ATTRS["layers"]
    assert info.model.to_dict() == ATTRS["model"]
    assert info.model.name == "clipscope-tiny" and info.model.extra == {"open_clip_version": "3"}
    assert info.head_position(2) == 2
    with pytest.raises(ConfigError, match=r"layers 7 has no head terms in this store; stored: \[0, 1, 2, 3\]"):
        info.head_position(7)


def test_run_info_of_a_store_without_extraction_attrs():
    info = schema.RunInfo.from_attrs({SCHEMA_ATTR: SCHEMA_VERSION, "n_rows": 4, "rows_per_chunk": 4})
    assert info.heads_layers == () and info.ln_convention is None and info.model.name == ""
    with pytest.raises(StoreError, match="ln_convention must be one of"):
        schema.RunInfo.from_attrs({**ATTRS, "ln_convention": "weird"})
