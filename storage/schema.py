"""The store schema, in one place: every array a clipscope job writes, and the run's metadata.

Each array is declared once — its path (or path pattern with ``{fields}``), dimension names, dtype
rule, chunking rule, the job that writes it and one line of meaning — and jobs and readers build
names and dims from these declarations instead of spelling them out. The names are the store's
public contract (README, "The store"); ``tests/storage/test_schema.py`` pins them.

dtype rules: ``"run"`` is the run's ``--dtype`` (float16 or float32); otherwise a numpy dtype name.
Chunking rules: ``"rows"`` — per-sample, chunked ``(rows_per_chunk, *whole tail)`` so a shard owns
whole chunks (storage.layout); ``"whole"`` — written at once by one writer, zarr's default chunks.

``RunInfo`` is the typed view of the group attributes extraction writes (config, model identity,
ln convention, layers, rows): readers ask ``RunInfo.of(store)`` instead of digging in raw dicts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from clipscope.errors import ConfigError, StoreError
from clipscope.storage.layout import SAMPLE_DIM, SCHEMA_ATTR, SCHEMA_VERSION, VALID_ARRAY, ArraySpec

_FIELD = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class ArrayDecl:
    """One array (or family of arrays, when `pattern` has fields) of the store."""

    pattern: str
    dims: tuple[str, ...]
    dtype: str
    chunking: str
    writer: str
    what: str

    def __post_init__(self) -> None:
        if self.chunking not in ("rows", "whole"):
            raise ConfigError(f"chunking of {self.pattern!r} must be 'rows' or 'whole', got {self.chunking!r}")
        if (self.chunking == "rows") != (self.dims[:1] == (SAMPLE_DIM,)):
            raise ConfigError(f"{self.pattern!r}: per-sample arrays (and only they) start with {SAMPLE_DIM!r}")

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(_FIELD.findall(self.pattern))

    @property
    def leaf(self) -> str:
        return self.pattern.rsplit("/", 1)[-1]

    @property
    def per_sample(self) -> bool:
        return self.chunking == "rows"

    def path(self, **fields: Any) -> str:
        """The array's name for these field values (``layer=3`` → ``second_order/layer_3/weights``)."""
        missing = [f for f in self.fields if f not in fields]
        if missing:
            raise ConfigError(f"the path of {self.pattern!r} needs {missing}")
        return self.pattern.format(**fields)

    def matches(self, name: str) -> dict[str, str] | None:
        """The field values if `name` is one of this declaration's arrays, else None."""
        regex = "^" + _FIELD.sub(lambda m: f"(?P<{m.group(1)}>{'.+' if m.group(1) == 'array' else '[^/]+'})",
                                 re.escape(self.pattern).replace(r"\{", "{").replace(r"\}", "}")) + "$"
        found = re.match(regex, name)
        return found.groupdict() if found else None

    def spec(self, shape_tail: tuple[int, ...], dtype: str | None = None, **fields: Any) -> ArraySpec:
        """The ArraySpec extraction creates the array from (per-sample arrays; `dtype` for "run")."""
        if not self.per_sample:
            raise ConfigError(f"{self.pattern!r} is not per-sample; it is written whole with write_result")
        if self.dtype == "run" and dtype is None:
            raise ConfigError(f"{self.pattern!r} is stored in the run's dtype; pass dtype")
        return ArraySpec(self.path(**fields), self.dims, tuple(shape_tail), dtype if self.dtype == "run" else self.dtype)


@dataclass(frozen=True)
class GroupDecl:
    """A result group a reduction writes whole (storage.results): its path pattern and its arrays."""

    pattern: str
    writer: str
    arrays: tuple[ArrayDecl, ...]

    def path(self, **fields: Any) -> str:
        return self.pattern.format(**fields)

    def __getitem__(self, leaf: str) -> ArrayDecl:
        for decl in self.arrays:
            if decl.leaf == leaf:
                return decl
        raise KeyError(f"{self.pattern!r} declares no array {leaf!r}")

    def dims(self, leaf: str) -> tuple[str, ...]:
        return self[leaf].dims

    @property
    def leaves(self) -> tuple[str, ...]:
        return tuple(d.leaf for d in self.arrays)


def _rows(pattern: str, dims: tuple[str, ...], what: str, dtype: str = "run") -> ArrayDecl:
    return ArrayDecl(pattern, (SAMPLE_DIM, *dims), dtype, "rows", "extract", what)


def _group(pattern: str, writer: str, arrays: Mapping[str, tuple[tuple[str, ...], str, str]]) -> GroupDecl:
    return GroupDecl(pattern, writer, tuple(ArrayDecl(f"{pattern}/{leaf}", dims, dtype, "whole", writer, what)
                                            for leaf, (dims, dtype, what) in arrays.items()))


# --- extraction: per-sample rows ------------------------------------------------------------------

VALID = _rows(VALID_ARRAY, (), "row holds a decoded sample (of a shard with a done record)", "bool")
IMAGE_EMBEDDING = _rows("image_embedding", ("embed",), "`encode_image` output")
DIRECT_EMBEDDING = _rows("direct/embedding", ("embed",), "embedding term")
DIRECT_BIAS = _rows("direct/bias", ("embed",), "every term of no head/MLP (biases, β)")
DIRECT_MLPS = _rows("direct/mlps", ("layer", "embed"), "per-layer MLP direct effect")
DIRECT_HEADS = _rows("direct/heads", ("layer", "head", "embed"), "per-(layer, head) direct effect")
DIRECT_CLS_TOKEN = _rows("direct/cls_token", ("layer", "embed"),
                         "the class token attended from itself, Σ_h of token 0 (part of direct/heads)")
DIRECT_TOKENS = _rows("direct/tokens", ("token_layer", "head", "token", "embed"),
                      "per-token terms of --token-layers (token 0 = class)")
SECOND_ORDER_WEIGHTS = _rows("second_order/layer_{layer}/weights", ("later_layer", "head", "neuron"),
                             "q (later layers l+1 … L−1)")
SECOND_ORDER_SHARED = _rows("second_order/layer_{layer}/shared", ("embed",), "`split` convention's shared term")
ACTIVATIONS = _rows("activations/layer_{layer}", ("token", "neuron"), "post-activation MLP values")
SECOND_ORDER_DIRECTIONS = ArrayDecl("second_order/layer_{layer}/directions", ("later_layer", "head", "neuron", "embed"),
                                    "float32", "whole", "extract", "D (written once)")

# --- shared by the jobs that encode texts ---------------------------------------------------------

TEXT_EMBEDDINGS = ArrayDecl("text_embeddings/{key}/embeddings", ("text", "embed"), "float32", "whole",
                            "textspan, neurons, evaluate, second-order",
                            "a text pool encoded with the run's model (key: texts + model identity)")

TEXT_UTF8 = ArrayDecl("text_embeddings/{key}/text_utf8", ("byte",), "uint8", "whole",
                      "textspan, neurons, evaluate, second-order", "the pool's texts, UTF-8, concatenated")
TEXT_OFFSETS = ArrayDecl("text_embeddings/{key}/text_offsets", ("text_edge",), "int64", "whole",
                         "textspan, neurons, evaluate, second-order", "text i = text_utf8[offsets[i]:offsets[i+1]]")

# --- reductions -----------------------------------------------------------------------------------

MEANS = ArrayDecl("reductions/means/{array}", (), "float64", "whole", "means",
                  "mean over valid rows (for mean-ablation); dims: the array's without `sample`")

TEXTSPAN = _group("reductions/textspan/layer_{layer}", "textspan", {
    "indices": (("head", "pick"), "int64", "text index of each pick"),
    "variances": (("head", "pick"), "float64", "variance each pick explains"),
    "explained_ratio": (("head", "pick"), "float64", "its share of the head's variance"),
})
TEXTSPAN_CURVE = _group("reductions/textspan/curve/{task}", "textspan --curve", {
    "basis_size": (("basis_size",), "int64", "m"),
    "accuracy": (("basis_size",), "float64", "zero-shot accuracy with the heads projected on their first m texts"),
})
EVALUATION = _group("reductions/evaluation/{task}", "evaluate", {
    "accuracy": (("ablation",), "float64", "zero-shot accuracy under mean-ablation (names in attrs)"),
    "correct": (("ablation",), "int64", "correct predictions"),
})
SECOND_ORDER = _group("reductions/second_order/layer_{layer}", "second-order", {
    "mean_weights": (("later_layer", "head", "neuron"), "float64", "q̄"),
    "mean_shared": (("embed",), "float64", "s̄ (split)"),
    "norm_mean": (("neuron",), "float64", "mean centred norm"),
    "norm_max": (("neuron",), "float64", "largest centred norm"),
    "norm_p98": (("neuron",), "float64", "98th percentile of the centred norm (grid edge)"),
    "energy_topk": (("neuron",), "float64", "share of the centred energy in the top-k images"),
    "significant_share": (("neuron",), "float64", "share of images above the layer-wide p98"),
    "norm_histogram": (("neuron", "bin"), "int64", "norms on fixed edges 2^(j/8)"),
    "norm_bin_edges": (("edge",), "float64", "the edges"),
    "topk_rows": (("neuron", "rank"), "int64", "top-k images by centred norm (−1 padding)"),
    "topk_norms": (("neuron", "rank"), "float64", "their norms (NaN padding)"),
    "pc": (("neuron", "embed"), "float64", "unit rank-1 PC"),
    "pc_explained": (("neuron",), "float64", "PC1's share"),
    "evaluation": (("ablation",), "float64", "zero-shot accuracy under the layer's ablations"),
})
OMP = _group("reductions/omp/layer_{layer}", "neurons", {
    "m": (("m",), "int64", "the sparsities"),
    "support": (("neuron", "pick"), "int64", "text indices in pick order (−1: stopped early)"),
    "coefs": (("m", "neuron", "pick"), "float64", "coefficients of the m-atom solutions"),
    "residual_norm": (("neuron", "m"), "float64", "‖r − r̂‖"),
    "accuracy": (("m",), "float64", "zero-shot accuracy with every neuron replaced by its m-text reconstruction"),
})

GROUPS: tuple[GroupDecl, ...] = (TEXTSPAN, TEXTSPAN_CURVE, EVALUATION, SECOND_ORDER, OMP)
ARRAYS: tuple[ArrayDecl, ...] = (
    VALID, IMAGE_EMBEDDING, DIRECT_EMBEDDING, DIRECT_BIAS, DIRECT_MLPS, DIRECT_HEADS, DIRECT_CLS_TOKEN,
    DIRECT_TOKENS, SECOND_ORDER_WEIGHTS, SECOND_ORDER_SHARED, ACTIVATIONS, SECOND_ORDER_DIRECTIONS,
    TEXT_EMBEDDINGS, TEXT_UTF8, TEXT_OFFSETS, MEANS, *(decl for group in GROUPS for decl in group.arrays),
)
"""Every array a clipscope job writes."""

# --- Segmentation and CLIP-InterpreT: object masks, all-layer token sums, class-token attention rows
# (extract); head roles and zero-shot segmentation (reductions). Appended here so the arrays above keep their order.

MASKS = _rows("masks", ("mask_y", "mask_x"),
              "object mask after the image's geometric transform (0 = background; 255 = no mask member)", "uint8")
DIRECT_TOKEN_SUM = _rows("direct/token_sum", ("token", "embed"),
                         "Σ over every layer and head of the per-token terms (token 0 = class)")
ATTENTION = _rows("attention/layer_{layer}", ("head", "token"), "class-token query row of the softmax attention")
ROLES = _group("reductions/roles", "roles", {
    "label": (("layer", "head"), "int64", "index of the head's property in attrs `properties` (−1: none)"),
    "share": (("layer", "head", "property"), "float64", "share of the head's TextSpan variance per property"),
    "matches": (("layer", "head"), "int64", "how many of the head's top-m texts carry its label"),
})
SEGMENTATION = _group("reductions/segmentation/{method}/{task}", "segment", {
    "class_index": (("row",), "int64", "the class whose map was segmented (predicted or label; −1: not scored)"),
    "correct": (("row",), "int64", "correctly classified labelled pixels"),
    "labelled": (("row",), "int64", "labelled pixels"),
    "intersection": (("row", "seg_class"), "int64", "per class [background, foreground]: |pred ∩ truth|"),
    "union": (("row", "seg_class"), "int64", "per class [background, foreground]: |pred ∪ truth|"),
    "ap": (("row",), "float64", "average precision over both channels (NaN: row not scored)"),
    "selected": (("class", "rank"), "int64", "neuron methods: each class's chosen neurons (flat index over the layers)"),
})
ARRAYS = (*ARRAYS, MASKS, DIRECT_TOKEN_SUM, ATTENTION, *ROLES.arrays, *SEGMENTATION.arrays)
GROUPS = (*GROUPS, ROLES, SEGMENTATION)

# --- Applications of the decompositions (reductions). Per-image results of a reduction use the
# `row` dim (= the store's row number; written whole), as the segmentation job's.

CONCEPTS = _group("reductions/concepts/layer_{layer}", "concepts", {
    "text_index": (("row", "concept"), "int64", "pool text of each discovered concept, best first (−1: none)"),
    "score": (("row", "concept"), "float64", "its score w_j(I) = Σ over active neurons γ_j^n ν_n(I) (NaN: none)"),
    "n_active": (("row",), "int64", "active neurons |𝒩(I)| (ν_n(I) > τ_n; −1: row not valid)"),
})
CUES = _group("reductions/cues/{pair}", "cues", {
    "text_index": (("cue",), "int64", "pool text of each mined cue word, best first"),
    "score": (("cue",), "float64", "its Eq. 6 score (or reference entry value)"),
    "neurons": (("cue_neuron",), "int64", "the chosen neurons (flat index over the layers, by |⟨v, r_n⟩|)"),
})
WORST_GROUP = _group("reductions/worst_group/{task}", "worst-group", {
    "group_count": (("class", "group"), "int64", "labelled valid rows per (class, group)"),
    "group_correct": (("ablation", "class", "group"), "int64", "correct zero-shot predictions per cell"),
    "group_accuracy": (("ablation", "class", "group"), "float64", "accuracy per (class, group) (NaN: empty)"),
    "worst_group": (("ablation",), "float64", "min accuracy over non-empty cells"),
    "accuracy": (("ablation",), "float64", "overall accuracy"),
})
ARRAYS = (*ARRAYS, *CONCEPTS.arrays, *CUES.arrays, *WORST_GROUP.arrays)
GROUPS = (*GROUPS, CONCEPTS, CUES, WORST_GROUP)

# --- Rosetta Neurons: activation maps of a model zoo (`clipscope maps`, per-sample) and the Rosetta job's results.
# One sub-group per map layer / per model, so each group's `unit`, `y`, `x` have one length.

MAPS = ArrayDecl("maps/{layer}/values", (SAMPLE_DIM, "unit", "y", "x"), "run", "rows", "maps",
                 "a zoo model's activation map per unit (channel) of the hooked layer, on its grid")
_ROSETTA = "reductions/rosetta/{name}"


def _rosetta(leaf: str, dims: tuple[str, ...], dtype: str, what: str) -> ArrayDecl:
    return ArrayDecl(f"{_ROSETTA}/{leaf}", dims, dtype, "whole", "rosetta", what)


ROSETTA_UNITS = tuple(_rosetta(f"units/{{model}}/{leaf}", ("unit",), dtype, what) for leaf, dtype, what in (
    ("layer_index", "int32", "index of the unit's layer in the model's layer list (attrs)"),
    ("channel", "int32", "the unit's channel in its layer"),
    ("height", "int32", "its map's native height"), ("width", "int32", "its map's native width"),
    ("mean", "float64", "mean of the native map over valid images × positions"),
    ("std", "float64", "population std of the native map")))
ROSETTA_PAIRS = tuple(_rosetta(f"pairs/{{model}}/{leaf}", dims, dtype, what) for leaf, dims, dtype, what in (
    ("row_top_index", ("anchor_unit", "k"), "int64", "the model's most correlated units per anchor unit (−1: none)"),
    ("row_top_corr", ("anchor_unit", "k"), "float64", "their Pearson r (−inf: none)"),
    ("col_top_index", ("unit", "k"), "int64", "the most correlated anchor units per model unit"),
    ("col_top_corr", ("unit", "k"), "float64", "their Pearson r"),
    ("buddies", ("buddy", "side"), "int64", "best buddies (anchor unit, model unit), sorted"),
    ("buddy_corr", ("buddy",), "float64", "r of each buddy pair"),
    ("corr", ("anchor_unit", "unit"), "float32", "the full correlation matrix (--keep-matrix only)")))
ROSETTA_SELF = tuple(_rosetta(f"self/{leaf}", dims, dtype, what) for leaf, dims, dtype, what in (
    ("buddies", ("self_buddy", "side"), "int64", "self best buddies BB(anchor, anchor; K_self), i < j"),
    ("buddy_corr", ("self_buddy",), "float64", "their r")))
ROSETTA_TUPLES = tuple(_rosetta(f"tuples/{leaf}", dims, dtype, what) for leaf, dims, dtype, what in (
    ("members", ("tuple", "member"), "int64", "Eq. 4.4 tuples: column 0 the anchor unit, then one buddy per model"),
    ("corr", ("tuple", "other"), "float64", "r of the anchor unit with each model's member"),
    ("concept", ("tuple",), "int64", "concept (cluster of self best buddies) of each tuple")))
ROSETTA_BEST = tuple(_rosetta(f"best/{leaf}", ("anchor_unit", "other"), dtype, what) for leaf, dtype, what in (
    ("unit", "int64", "strongest buddy per model of each anchor unit (−1: none)"),
    ("corr", "float64", "its r (NaN: none)")))
ROSETTA_DICTIONARY = tuple(_rosetta(f"dictionary/{leaf}", ("concept", "rank"), dtype, what)
                           for leaf, dtype, what in (
    ("example_rows", "int64", "store rows of each concept's top images (−1 padding)"),
    ("example_scores", "float64", "their score: mean over the concept's pairs of mean_x ĝ·d̂ (NaN padding)")))
ROSETTA_SUMMARY = _rosetta("summary/n_units", ("model",), "int64",
                           "units per model (anchor first); written last: the result is complete when present")
ROSETTA = (*ROSETTA_UNITS, *ROSETTA_PAIRS, *ROSETTA_SELF, *ROSETTA_TUPLES, *ROSETTA_BEST, *ROSETTA_DICTIONARY,
           ROSETTA_SUMMARY)
ARRAYS = (*ARRAYS, MAPS, *ROSETTA)


def declaration(name: str) -> tuple[ArrayDecl, dict[str, str]]:
    """The declaration an array name belongs to and its field values; StoreError when undeclared."""
    for decl in ARRAYS:
        fields = decl.matches(name)
        if fields is not None:
            return decl, fields
    raise StoreError(f"{name!r} is not an array of the clipscope store schema")


def expected_dims(name: str, source_dims: Mapping[str, tuple[str, ...]] | None = None) -> tuple[str, ...]:
    """The dims `name` must have; a mean's are its source array's without `sample` (`source_dims`)."""
    decl, fields = declaration(name)
    if decl is MEANS:
        source = (source_dims or {}).get(fields["array"])
        if source is None:
            source = (SAMPLE_DIM, *declaration(fields["array"])[0].dims[1:])
        return tuple(source[1:])
    return decl.dims


# --- run metadata ---------------------------------------------------------------------------------

LN_CONVENTIONS = ("split", "center")


@dataclass(frozen=True)
class ModelIdentity:
    """What model a store was extracted with (the `model` group attribute); `to_dict` gives it back."""

    name: str = ""
    pretrained: str | None = None
    sha256: str | None = None
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    present: tuple[str, ...] = ("name", "pretrained", "sha256", "seed")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> ModelIdentity:
        data = dict(data or {})
        known = {k: data.pop(k) for k in ("name", "pretrained", "sha256", "seed") if k in data}
        return cls(**known, extra=data, present=tuple(known))

    def to_dict(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in self.present}, **self.extra}


@dataclass(frozen=True)
class RunInfo:
    """The typed run metadata of an extracted store (group attributes written by `extract`)."""

    schema_version: int
    n_rows: int
    rows_per_chunk: int
    ln_convention: str | None
    model: ModelIdentity
    heads_layers: tuple[int, ...] = ()
    token_layers: tuple[int, ...] = ()
    second_order_layers: Mapping[int, tuple[int, ...]] = field(default_factory=dict)  # l → later layers
    activation_layers: tuple[int, ...] = ()
    shards: tuple[str, ...] = ()
    attention_layers: tuple[int, ...] = ()
    row_blocks: tuple[tuple[int, int], ...] = ()
    config: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> RunInfo:
        layers = attrs.get("layers") or {}
        config = attrs.get("config") or {}
        convention = attrs.get("ln_convention", config.get("ln_convention"))
        if convention is not None and convention not in LN_CONVENTIONS:
            raise StoreError(f"the store's ln_convention must be one of {LN_CONVENTIONS}, got {convention!r}")
        return cls(
            schema_version=int(attrs.get(SCHEMA_ATTR, SCHEMA_VERSION)),
            n_rows=int(attrs.get("n_rows", 0)),
            rows_per_chunk=int(attrs.get("rows_per_chunk", 1)),
            ln_convention=convention,
            model=ModelIdentity.from_dict(attrs.get("model")),
            heads_layers=tuple(int(l) for l in layers.get("heads", ())),
            token_layers=tuple(int(l) for l in layers.get("tokens", ())),
            second_order_layers={int(l): tuple(int(v) for v in later)
                                 for l, later in (layers.get("second_order") or {}).items()},
            activation_layers=tuple(int(l) for l in layers.get("activations", ())),
            shards=tuple(attrs.get("shards") or ()),
            row_blocks=tuple((int(s), int(c)) for s, c in attrs.get("row_blocks") or ()),
            config=dict(config),
            attention_layers=tuple(int(l) for l in layers.get("attention", ())),
        )

    @classmethod
    def of(cls, store: Any) -> RunInfo:
        """The RunInfo of a RunStore (anything with `.attrs`)."""
        return cls.from_attrs(store.attrs)

    def layers_attr(self) -> dict[str, Any]:
        """The `layers` group attribute this describes (the inverse of `from_attrs`)."""
        return {"heads": list(self.heads_layers), "tokens": list(self.token_layers),
                "second_order": {str(l): list(v) for l, v in self.second_order_layers.items()},
                "activations": list(self.activation_layers),
                **({"attention": list(self.attention_layers)} if self.attention_layers else {})}

    def head_position(self, layer: int, what: str = "layers") -> int:
        """Index of `layer` along the `layer` dim of direct/heads (ConfigError naming the stored layers)."""
        if layer not in self.heads_layers:
            raise ConfigError(f"{what} {layer} has no head terms in this store; stored: {list(self.heads_layers)}")
        return self.heads_layers.index(layer)

# --- TextSpan statistics as a stored reduction (ΣC, ΣCᵀC, K per head, relative to a shift), written
# once per (normalisation, layer) and updated when done shards are added; read by textspan instead of the rows.

TEXTSPAN_STATISTICS = _group("reductions/head_statistics/{norm}/layer_{layer}", "textspan statistics", {
    "count": (("head",), "int64", "K: valid images summed"),
    "sum": (("head", "embed"), "float64", "Σ (c − shift)"),
    "gram": (("head", "embed", "embed2"), "float64", "Σ (c − shift)(c − shift)ᵀ"),
    "shift": (("head", "embed"), "float64", "the statistics' shift (a constant per head)"),
    "eigenvalues": (("head", "embed"), "float64", "eigenvalues of the uncentred ΣCᵀC (ascending)"),
    "eigenvectors": (("head", "embed", "embed2"), "float64", "its eigenvectors (columns)"),
})
ARRAYS = (*ARRAYS, *TEXTSPAN_STATISTICS.arrays)
GROUPS = (*GROUPS, TEXTSPAN_STATISTICS)
