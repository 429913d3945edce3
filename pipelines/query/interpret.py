"""CLIP-InterpreT's analyses over a store (spec S5): per-head and property-based nearest neighbours of
an image, per-head nearest neighbours of a text, topic and contrastive segmentation maps.

The common term is ρ_{l,h}(I) = c_head^{l,h}(I) / ‖M(I)‖ (`direct/heads` over the norm of
`image_embedding`), as the papers' code divides every term by ‖M(I)‖; ``normalize=False`` gives the raw
term. A query image is a store row (a row number or sample key) or a new image (a PIL image or a file
path), decomposed on the fly with the store's model in the store's ln convention — its terms equal the
stored row of the same image. Top-k runs over row blocks on an executor (`cluster.executor`): each
block's top-k, merged in a fixed tree (ties: the lower row first), so the answer is the same however the
blocks are spread.

Scores (dot product by default, as the reference code; ``score="cosine"`` is the paper's wording):
  per-head image NN   ⟨ρ_h(I_q), ρ_h(I)⟩, the query's own row excluded
  per-head text NN    ⟨ρ_h(I), t̂⟩, t̂ the unit text embedding (no template), or the head's i-th TextSpan text
  property NN         ⟨ρ_P(I_q), ρ_P(I)⟩ with ρ_P = mean over heads h ∈ P of ρ_h
  topic map           m(p) = ⟨c_{p,l,h}(I)/‖M(I)‖, t̂⟩ over patch tokens p (one head, from `direct/tokens`), or
                      over all layers and heads (aggregate, from `direct/token_sum`)
  contrast            D(p) = m_{t₁}(p) − m_{t₂}(p)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from clipscope.cluster.executor import Executor, LocalExecutor
from clipscope.errors import ConfigError, DataError, ParameterError, StoreError, literal
from clipscope.kernels.decompose import DecomposeRequest, decompose
from clipscope.kernels.segmentation_metrics import upsample
from clipscope.pipelines.models.loading import LoadedModel, load_run_model
from clipscope.pipelines.texts.encode import encode_texts
from clipscope.storage import schema
from clipscope.storage.layout import row_slices
from clipscope.storage.query import rows_for_keys, sample_info, topk_rows
from clipscope.storage.store import RunStore

SCORES = ("dot", "cosine")


# --- the query: a store row or a new image ------------------------------------------------------


def resolve_row(store: RunStore, sample: int | str) -> int:
    """A row number (int) or a sample key (str) → a valid row."""
    if isinstance(sample, str):
        row = int(rows_for_keys(store, [sample])[0])
    elif isinstance(sample, (int, np.integer)) and not isinstance(sample, bool):
        row = int(sample)
    else:
        raise ParameterError("sample", f"must be a row number or a sample key, got {sample!r}")
    if not 0 <= row < store.n_rows or not bool(store.read_valid(slice(row, row + 1))[0]):
        raise ParameterError("sample", f"row {row} of {store.url} holds no valid sample")
    return row


def load_image(image: Any):
    """A PIL image from a PIL image or a file path (RGB)."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise ParameterError("image", f"no image file at {image}")
        try:
            with Image.open(image) as opened:
                return opened.convert("RGB")
        except Exception as err:  # PIL raises many types for unreadable files
            raise DataError(f"{{image}} {literal(image)}: not a readable image ({type(err).__name__}: {literal(err)})",
                            parameters=("image",)) from None
    if hasattr(image, "convert"):
        return image.convert("RGB")
    raise ParameterError("image", f"must be a PIL image or a file path, got {type(image).__name__}")


def model_input(loaded: LoadedModel, image: Any) -> torch.Tensor:
    """The model's input tensor [1 3 h w] for an image (its own preprocess)."""
    return loaded.preprocess(load_image(image))[None].to(loaded.spec.dtype)


def decompose_new_image(store: RunStore, image: Any, loaded: LoadedModel, *, token_layers: Sequence[int] = (),
                        token_sum: bool = False) -> dict[str, np.ndarray]:
    """A new image's terms as the store would hold them (one row, the store's layers and convention)."""
    info = store.info
    request = DecomposeRequest(direct=True, token_layers=tuple(token_layers), token_sum=token_sum,
                               convention=info.ln_convention or "split")
    out = decompose(loaded.spec, model_input(loaded, image), request)
    layers = list(info.heads_layers)
    arrays = {schema.IMAGE_EMBEDDING.path(): out.image_embedding, schema.DIRECT_HEADS.path(): out.direct.heads[:, layers]}
    if out.tokens is not None:
        arrays[schema.DIRECT_TOKENS.path()] = out.tokens
    if out.token_sum is not None:
        arrays[schema.DIRECT_TOKEN_SUM.path()] = out.token_sum
    return {name: value.double().cpu().numpy()[0] for name, value in arrays.items()}


@dataclass(frozen=True)
class Query:
    """The query image's terms: its row (None for a new image) and the arrays read or computed."""

    row: int | None
    arrays: dict[str, np.ndarray]

    @property
    def norm(self) -> float:
        return float(np.linalg.norm(self.arrays[schema.IMAGE_EMBEDDING.path()]))


def query_of(store: RunStore, *, sample: int | str | None = None, image: Any = None, loaded: LoadedModel | None = None,
             names: Sequence[str] = (schema.IMAGE_EMBEDDING.path(), schema.DIRECT_HEADS.path()),
             token_layers: Sequence[int] = (), token_sum: bool = False) -> Query:
    if (sample is None) == (image is None):
        raise ConfigError("name exactly one query image: a store sample (row or key) or a new image file")
    if sample is not None:
        row = resolve_row(store, sample)
        return Query(row, {n: store.read(n, [row])[0].astype(np.float64) for n in names})
    loaded = loaded or load_run_model(store)
    return Query(None, decompose_new_image(store, image, loaded, token_layers=token_layers, token_sum=token_sum))


# --- heads ---------------------------------------------------------------------------------------


def head_positions(store: RunStore, heads: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """(layer, head) pairs → (position along direct/heads' layer axis, head), checked."""
    if not heads:
        raise ParameterError("heads", "must name at least one head (L<layer>H<head>)")
    n_heads = store.array(schema.DIRECT_HEADS.path()).shape[2]
    out = []
    for layer, head in heads:
        if layer not in store.info.heads_layers:
            raise ParameterError("layer", f"{layer} has no head terms in {store.url}; stored: "
                                          f"{list(store.info.heads_layers)}")
        if not 0 <= head < n_heads:
            raise ParameterError("head", f"must be in 0..{n_heads - 1}, got {head}")
        out.append((store.info.heads_layers.index(layer), int(head)))
    return out


def parse_heads(text: str | Sequence[str]) -> list[tuple[int, int]]:
    """"L8H1,L9H3" (or a list of such items) → [(8, 1), (9, 3)]."""
    import re

    items = [t for part in ([text] if isinstance(text, str) else text) for t in str(part).split(",") if t.strip()]
    out = []
    for item in items:
        found = re.fullmatch(r"\s*L(\d+)H(\d+)\s*", item, flags=re.IGNORECASE)
        if found is None:
            raise ParameterError("heads", f"must be L<layer>H<head> items such as L8H1,L9H3, got {item!r}")
        out.append((int(found.group(1)), int(found.group(2))))
    return out


def represent(heads: np.ndarray, norms: np.ndarray, positions: Sequence[tuple[int, int]], normalize: bool) -> np.ndarray:
    """[rows embed] mean over the chosen heads of ρ_h (c_h / ‖M‖, or c_h with normalize=False)."""
    rep = np.mean([heads[:, p, h].astype(np.float64) for p, h in positions], axis=0)
    return rep / np.maximum(norms, 1e-30)[:, None] if normalize else rep


# --- streamed top-k on an executor ------------------------------------------------------------------


@dataclass(frozen=True)
class _BlockScores:
    """Picklable map of a top-k: one block of rows → its k best (rows, scores)."""

    store: RunStore
    positions: tuple[tuple[int, int], ...]
    vector: np.ndarray
    normalize: bool
    cosine: bool
    k: int
    exclude: int | None

    def __call__(self, rows: slice) -> tuple[np.ndarray, np.ndarray]:
        valid = self.store.read_valid(rows)
        if self.exclude is not None and rows.start <= self.exclude < rows.stop:
            valid = valid.copy()
            valid[self.exclude - rows.start] = False
        if not valid.any():
            return np.zeros(0, np.int64), np.zeros(0, np.float64)
        heads = self.store.read(schema.DIRECT_HEADS.path(), rows)
        norms = np.linalg.norm(self.store.read(schema.IMAGE_EMBEDDING.path(), rows).astype(np.float64), axis=1)
        rep = represent(heads, norms, self.positions, self.normalize)
        if self.cosine:
            rep = rep / np.maximum(np.linalg.norm(rep, axis=1), 1e-30)[:, None]
        scores = rep @ self.vector
        local = topk_rows(scores, self.k, valid)
        return local + rows.start, scores[local]


@dataclass(frozen=True)
class _MergeTopK:
    k: int

    def __call__(self, a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]):
        rows, scores = np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]])
        order = np.lexsort((rows, -scores))[:self.k]
        return rows[order], scores[order]


def streamed_topk(store: RunStore, positions: Sequence[tuple[int, int]], vector: np.ndarray, k: int, *,
                  normalize: bool = True, cosine: bool = False, exclude: int | None = None,
                  executor: Executor | None = None, block_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k rows whose ρ_P (mean over `positions`) scores highest against `vector`, best first."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ParameterError("k", f"must be an integer ≥ 1, got {k!r}")
    block = block_rows or store.rows_per_chunk * 16
    blocks = row_slices(store.n_rows, block)
    mapper = _BlockScores(store, tuple(positions), np.asarray(vector, np.float64), normalize, cosine, k, exclude)
    return (executor or LocalExecutor(progress="off")).map_reduce(blocks, mapper, _MergeTopK(k), desc="neighbours",
                                                                   unit="blocks")


def _table(store: RunStore, rows: np.ndarray, scores: np.ndarray) -> pa.Table:
    table = sample_info(store, rows)
    return table.append_column("score", pa.array(np.asarray(scores, np.float64), pa.float64()))


def _check_score(score: str) -> bool:
    if score not in SCORES:
        raise ParameterError("score", f"must be one of {', '.join(SCORES)}, got {score!r}")
    return score == "cosine"


# --- nearest neighbours ----------------------------------------------------------------------------


def head_image_neighbours(store: RunStore, layer: int, head: int, *, sample: int | str | None = None,
                          image: Any = None, k: int = 8, normalize: bool = True, score: str = "dot",
                          executor: Executor | None = None, loaded: LoadedModel | None = None,
                          block_rows: int | None = None) -> pa.Table:
    """Per-head nearest neighbours of an image: ⟨ρ_h(I_q), ρ_h(I)⟩ (the query's own row excluded)."""
    return property_neighbours(store, heads=[(layer, head)], sample=sample, image=image, k=k, normalize=normalize,
                               score=score, executor=executor, loaded=loaded, block_rows=block_rows)


def property_neighbours(store: RunStore, *, heads: Sequence[tuple[int, int]] | None = None,
                        property: str | None = None, sample: int | str | None = None, image: Any = None, k: int = 4,
                        normalize: bool = True, score: str = "dot", executor: Executor | None = None,
                        loaded: LoadedModel | None = None, block_rows: int | None = None) -> pa.Table:
    """Nearest neighbours by ρ_P = mean over heads P of ρ_h: `heads` given, or those labelled `property`
    by `clipscope roles`."""
    cosine = _check_score(score)
    if (heads is None) == (property is None):
        raise ConfigError("name the heads (--heads L8H1,…) or a property (--property NAME), not both")
    if property is not None:
        heads = heads_with_property(store, property)
    positions = head_positions(store, list(heads))
    query = query_of(store, sample=sample, image=image, loaded=loaded)
    vector = represent(query.arrays[schema.DIRECT_HEADS.path()][None], np.array([query.norm]), positions, normalize)[0]
    if cosine:
        vector = vector / max(float(np.linalg.norm(vector)), 1e-30)
    rows, scores = streamed_topk(store, positions, vector, k, normalize=normalize, cosine=cosine, exclude=query.row,
                                 executor=executor, block_rows=block_rows)
    return _table(store, rows, scores)


def heads_with_property(store: RunStore, prop: str) -> list[tuple[int, int]]:
    """The (layer, head) pairs `clipscope roles` labelled `prop` (read from `reductions/roles`)."""
    group = schema.ROLES.path()
    attrs = store.result_group_attrs(group)
    if attrs is None:
        raise StoreError(f"{store.url} has no head roles; run `clipscope roles {store.url}` first")
    properties, layers = list(attrs["properties"]), [int(l) for l in attrs["layers"]]
    if prop not in properties:
        raise ParameterError("property", f"must be one of {', '.join(properties)}, got {prop!r}")
    labels = store.read_result(f"{group}/label")
    heads = [(layers[i], int(h)) for i, h in zip(*np.nonzero(labels == properties.index(prop)))]
    if not heads:
        raise ParameterError("property", f"no head of {store.url} is labelled {prop!r}")
    return heads


def textspan_text(store: RunStore, layer: int, head: int, pick: int) -> str:
    """The head's `pick`-th TextSpan text (0 = first), from the store's TextSpan results."""
    from clipscope.pipelines.texts.embedding_cache import stored_texts

    name = f"{schema.TEXTSPAN.path(layer=layer)}/indices"
    if name not in store.array_names():
        raise StoreError(f"{store.url} has no TextSpan results for layer {layer}; run `clipscope textspan "
                         f"{store.url} --layers {layer}` first")
    indices = store.read_result(name)
    if not 0 <= head < indices.shape[0]:
        raise ParameterError("head", f"must be in 0..{indices.shape[0] - 1}, got {head}")
    if not 0 <= pick < indices.shape[1]:
        raise ParameterError("textspan_pick", f"must be in 0..{indices.shape[1] - 1}, got {pick}")
    texts = stored_texts(store, store.array(name).attrs["texts_key"])
    return texts[int(indices[head, pick])]


def head_text_neighbours(store: RunStore, layer: int, head: int, *, text: str | None = None,
                         textspan_pick: int | None = None, k: int = 3, normalize: bool = True,
                         executor: Executor | None = None, loaded: LoadedModel | None = None,
                         block_rows: int | None = None) -> tuple[str, pa.Table]:
    """Per-head nearest neighbours of a text: ⟨ρ_h(I), t̂⟩. Returns (the text used, the table)."""
    if (text is None) == (textspan_pick is None):
        raise ConfigError("name a text (--text) or a TextSpan pick of the head (--textspan-pick i), not both")
    if textspan_pick is not None:
        text = textspan_text(store, layer, head, textspan_pick)
    positions = head_positions(store, [(layer, head)])
    direction = unit_text(store, text, loaded)
    rows, scores = streamed_topk(store, positions, direction, k, normalize=normalize, executor=executor,
                                 block_rows=block_rows)
    return text, _table(store, rows, scores)


def unit_text(store: RunStore, text: str, loaded: LoadedModel | None = None) -> np.ndarray:
    """The unit embedding of `text` with the store's model (no template)."""
    if not isinstance(text, str) or not text.strip():
        raise ParameterError("text", f"must be a non-empty string, got {text!r}")
    vector = encode_texts(loaded or load_run_model(store), [text])[0].astype(np.float64)
    return vector / max(float(np.linalg.norm(vector)), 1e-30)


# --- topic and contrastive maps ----------------------------------------------------------------------


@dataclass(frozen=True)
class TopicMap:
    """One text's map over one image: the patch grid (raw), upsampled to the input size, and min–max."""

    text: str
    grid: np.ndarray  # [gh gw]
    pixels: np.ndarray  # [h w], bilinear (align_corners=False)

    @property
    def display(self) -> np.ndarray:
        low, high = float(self.pixels.min()), float(self.pixels.max())
        return (self.pixels - low) / (high - low) if high > low else np.zeros_like(self.pixels)


def grid_shape(store: RunStore) -> tuple[tuple[int, int], tuple[int, int]]:
    """((gh, gw), (h, w)) of the store's model (from the recorded model description)."""
    spec = store.attrs.get("model_spec") or {}
    if "image_size" not in spec or "patch_size" not in spec:
        raise StoreError(f"{store.url} records no model_spec (image and patch size); re-extract it")
    size, patch = tuple(spec["image_size"]), tuple(spec["patch_size"])
    return (size[0] // patch[0], size[1] // patch[1]), (int(size[0]), int(size[1]))


def token_terms(store: RunStore, query: Query, layer: int | None, head: int | None) -> np.ndarray:
    """[patch embed] per-patch terms (CLS dropped) of one head, or of the aggregate (layer = head = None)."""
    if (layer is None) != (head is None):
        raise ConfigError("a topic map needs --layer and --head together, or --aggregate")
    if layer is None:
        return query.arrays[schema.DIRECT_TOKEN_SUM.path()][1:]
    layers = list(store.info.token_layers) if query.row is not None else [layer]
    position = layers.index(layer)
    return query.arrays[schema.DIRECT_TOKENS.path()][position, head, 1:]


def topic_query(store: RunStore, *, sample: int | str | None, image: Any, layer: int | None, head: int | None,
                loaded: LoadedModel | None) -> Query:
    """The query's per-token terms that a topic map of (layer, head) or the aggregate needs."""
    names = [schema.IMAGE_EMBEDDING.path()]
    if layer is None:
        if sample is not None and schema.DIRECT_TOKEN_SUM.path() not in store.array_names():
            raise StoreError(f"{store.url} has no direct/token_sum; extract with --token-sum for aggregate maps")
        names.append(schema.DIRECT_TOKEN_SUM.path())
    else:
        if sample is not None and layer not in store.info.token_layers:
            raise ParameterError("layer", f"{layer} has no per-token terms in {store.url}; stored token layers: "
                                          f"{list(store.info.token_layers)} (extract with --token-layers {layer})")
        n_heads = store.array(schema.DIRECT_HEADS.path()).shape[2]
        if head is None or not 0 <= head < n_heads:
            raise ParameterError("head", f"must be in 0..{n_heads - 1}, got {head}")
        names.append(schema.DIRECT_TOKENS.path())
    return query_of(store, sample=sample, image=image, loaded=loaded, names=names,
                    token_layers=() if layer is None else (layer,), token_sum=layer is None)


def topic_maps(store: RunStore, texts: Sequence[str], *, sample: int | str | None = None, image: Any = None,
               layer: int | None = None, head: int | None = None, normalize: bool = True,
               loaded: LoadedModel | None = None, directions: np.ndarray | None = None,
               baseline: Sequence[str] | np.ndarray | None = None) -> list[TopicMap]:
    """m(p) = ⟨c_p / ‖M(I)‖, t̂⟩ per text (`directions`: their unit embeddings, else encoded here).

    `baseline` (texts, or their unit embeddings [n embed]): subtract the mean map over them (thesis Fig. 2.6's
    "minus the mean heatmap over the class descriptions"; the segmentation's w_c − w̄): what every text of the
    baseline shares — e.g. "a … shape" — no longer lights up every attended token."""
    query = topic_query(store, sample=sample, image=image, layer=layer, head=head, loaded=loaded)
    terms = token_terms(store, query, layer, head)
    if normalize:
        terms = terms / max(query.norm, 1e-30)
    if directions is None:
        loaded = loaded or load_run_model(store)
        directions = np.stack([unit_text(store, t, loaded) for t in texts])
    directions = np.asarray(directions, np.float64)
    if baseline is not None:
        if len(baseline) and isinstance(baseline[0], str):
            loaded = loaded or load_run_model(store)
            baseline = np.stack([unit_text(store, t, loaded) for t in baseline])
        directions = directions - np.asarray(baseline, np.float64).mean(0)[None]
    (gh, gw), size = grid_shape(store)
    grids = (terms @ directions.T).T.reshape(len(texts), gh, gw)
    pixels = upsample(torch.from_numpy(grids), size).numpy()
    return [TopicMap(t, g, p) for t, g, p in zip(texts, grids, pixels)]


@dataclass(frozen=True)
class ContrastMap:
    """D = m₁ − m₂ and its diverging display: symmetric scale s = max|D|, v₁ = (D + s)/2s, v₂ = 1 − v₁."""

    first: TopicMap
    second: TopicMap

    @property
    def difference(self) -> np.ndarray:
        return self.first.pixels - self.second.pixels

    @property
    def scale(self) -> float:
        return float(np.abs(self.difference).max())

    @property
    def first_share(self) -> np.ndarray:
        s = self.scale
        return (self.difference + s) / (2 * s) if s > 0 else np.full_like(self.difference, 0.5)


def contrast_map(store: RunStore, text_a: str, text_b: str, **options: Any) -> ContrastMap:
    first, second = topic_maps(store, [text_a, text_b], **options)
    return ContrastMap(first, second)


def textspan_extremes(store: RunStore, layer: int, head: int, *, sample: int | str | None = None, image: Any = None,
                      baseline: np.ndarray, loaded: LoadedModel | None = None) -> list[TopicMap]:
    """Thesis Fig. 2.6: the head's TextSpan texts with the largest and smallest coefficient ⟨ρ_h(I), t_i⟩,
    each map minus the mean map over `baseline` ([embed n] unit directions, e.g. the task's classes)."""
    name = f"{schema.TEXTSPAN.path(layer=layer)}/indices"
    if name not in store.array_names():
        raise StoreError(f"{store.url} has no TextSpan results for layer {layer}")
    picks = store.read_result(name)[head]
    key = store.array(name).attrs["texts_key"]
    from clipscope.pipelines.texts.embedding_cache import stored_texts

    texts = [stored_texts(store, key)[int(i)] for i in picks]
    pool = store.read_result(schema.TEXT_EMBEDDINGS.path(key=key))[picks].astype(np.float64)
    pool = pool / np.linalg.norm(pool, axis=1, keepdims=True)
    query = topic_query(store, sample=sample, image=image, layer=layer, head=head, loaded=loaded)
    rho = query.arrays.get(schema.DIRECT_TOKENS.path())
    layers = list(store.info.token_layers) if query.row is not None else [layer]
    head_term = rho[layers.index(layer), head].sum(0) / max(query.norm, 1e-30)
    coefficients = pool @ head_term
    chosen = [int(np.argmax(coefficients)), int(np.argmin(coefficients))]
    mean_direction = np.asarray(baseline, np.float64).mean(1)
    maps = topic_maps(store, [texts[i] for i in chosen] + ["(baseline mean)"], sample=sample, image=image, layer=layer,
                      head=head, loaded=loaded, directions=np.stack([pool[i] for i in chosen] + [mean_direction]))
    base = maps[-1]
    return [TopicMap(m.text, m.grid - base.grid, m.pixels - base.pixels) for m in maps[:-1]]
