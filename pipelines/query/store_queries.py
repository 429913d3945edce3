"""Questions asked of a finished store that need the run's model or the decomposition's meaning.

Row-level reading, key lookup and export live in `clipscope.storage.query`; this module adds what
needs a model (text directions) or the math (second-order norms), streaming over row blocks so a
store of any size is read in bounded memory.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from clipscope.errors import ParameterError
from clipscope.kernels.decompose import second_order_effects
from clipscope.pipelines.models.loading import LoadedModel, load_run_model
from clipscope.pipelines.texts.encode import encode_texts
from clipscope.storage.layout import row_slices
from clipscope.storage.query import read_image, sample_info, topk_rows
from clipscope.storage import schema
from clipscope.storage.store import RunStore


def _layer_position(store: RunStore, layer: int, kind: str = "heads") -> int:
    info = store.info
    layers = list({"heads": info.heads_layers, "tokens": info.token_layers,
                   "activations": info.activation_layers}.get(kind, ()))
    if layer not in layers:
        raise ParameterError("layer", f"{layer} is not stored in {store.url}; stored {kind} layers: {layers}")
    return layers.index(layer)


def _check_head(store: RunStore, head: int) -> None:
    n_heads = store.array(schema.DIRECT_HEADS.path()).shape[2]
    if not 0 <= head < n_heads:
        raise ParameterError("head", f"must be in 0..{n_heads - 1}, got {head}")


def _streamed_topk(store: RunStore, k: int, score_block) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows by `score_block(rows: slice) -> scores`, over valid rows, one chunk group at a time."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ParameterError("k", f"must be an integer ≥ 1, got {k!r}")
    best_rows, best_scores = np.zeros(0, np.int64), np.zeros(0, np.float64)
    for rows in row_slices(store.n_rows, store.rows_per_chunk * 16):
        valid = store.read_valid(rows)
        if not valid.any():
            continue
        scores = np.asarray(score_block(rows), np.float64)
        local = topk_rows(scores, k, valid)
        best_rows = np.concatenate([best_rows, local + rows.start])
        best_scores = np.concatenate([best_scores, scores[local]])
        order = np.lexsort((best_rows, -best_scores))[:k]
        best_rows, best_scores = best_rows[order], best_scores[order]
    return best_rows, best_scores


def _with_info(store: RunStore, rows: np.ndarray, scores: np.ndarray, score_name: str) -> pa.Table:
    table = sample_info(store, rows)
    return table.append_column(score_name, pa.array(scores, pa.float64()))


def top_images_for_text(store: RunStore, layer: int, head: int, text: str, k: int = 10,
                        loaded: LoadedModel | None = None, normalize: bool = True) -> pa.Table:
    """Images whose (layer, head) direct effect points furthest along the text's embedding: the score is
    ⟨c_head / ‖M(I)‖, t̂⟩ as in the papers' code (`normalize=False`: the raw ⟨c_head, t̂⟩, which ranks
    images with large embeddings first)."""
    position = _layer_position(store, layer)
    _check_head(store, head)
    direction = encode_texts(loaded or load_run_model(store), [text])[0].astype(np.float64)
    heads = store.array(schema.DIRECT_HEADS.path())
    embeddings = store.array(schema.IMAGE_EMBEDDING.path())

    def scores_of(r: slice) -> np.ndarray:
        raw = heads[r, position, head].astype(np.float64) @ direction
        if not normalize:
            return raw
        return raw / np.maximum(np.linalg.norm(embeddings[r].astype(np.float64), axis=1), 1e-30)

    rows, scores = _streamed_topk(store, k, scores_of)
    return _with_info(store, rows, scores, "score")


def top_images_for_neuron(store: RunStore, layer: int, neuron: int, k: int = 10) -> pa.Table:
    """Images with the largest second-order effect norm ‖φ_n‖ of one neuron."""
    weights_name = schema.SECOND_ORDER_WEIGHTS.path(layer=layer)
    shared_name = schema.SECOND_ORDER_SHARED.path(layer=layer)
    if weights_name not in store.array_names():
        stored = sorted(str(l) for l in store.info.second_order_layers)
        raise ParameterError("layer", f"{layer} has no second-order data in {store.url}; stored: {stored}")
    weights = store.array(weights_name)
    if not 0 <= neuron < weights.shape[-1]:
        raise ParameterError("neuron", f"must be in 0..{weights.shape[-1] - 1}, got {neuron}")
    directions = torch.from_numpy(
        store.read_result(schema.SECOND_ORDER_DIRECTIONS.path(layer=layer))[:, :, [neuron]]).double()
    shared = store.array(shared_name) if shared_name in store.array_names() else None

    def norms(rows: slice) -> np.ndarray:
        q = torch.from_numpy(weights[rows, :, :, neuron][..., None].astype(np.float64))
        s = None if shared is None else torch.from_numpy(shared[rows].astype(np.float64))
        return second_order_effects(q, directions, s)[:, 0].norm(dim=-1).numpy()

    rows, scores = _streamed_topk(store, k, norms)
    return _with_info(store, rows, scores, "norm")


def image_summary(store: RunStore, sample: int | str, top: int = 10) -> tuple[dict[str, Any], pa.Table]:
    """One image: its embedding and the components that contribute most along it."""
    data = read_image(store, sample)
    emb = data[schema.IMAGE_EMBEDDING.path()].astype(np.float64)
    unit = emb / max(np.linalg.norm(emb), 1e-12)
    layers = list(store.info.heads_layers)
    parts: list[tuple[str, Any, Any, float, float]] = []
    for decl in (schema.DIRECT_EMBEDDING, schema.DIRECT_BIAS):
        v = data[decl.path()].astype(np.float64)
        parts.append((decl.leaf, None, None, float(v @ unit), float(np.linalg.norm(v))))
    for i, layer in enumerate(layers):
        v = data[schema.DIRECT_MLPS.path()][i].astype(np.float64)
        parts.append(("mlp", layer, None, float(v @ unit), float(np.linalg.norm(v))))
        for h, hv in enumerate(data[schema.DIRECT_HEADS.path()][i].astype(np.float64)):
            parts.append(("head", layer, h, float(hv @ unit), float(np.linalg.norm(hv))))
    parts.sort(key=lambda p: -abs(p[3]))
    parts = parts[:top]
    table = pa.table({
        "component": [p[0] for p in parts], "layer": pa.array([p[1] for p in parts], pa.int64()),
        "head": pa.array([p[2] for p in parts], pa.int64()), "along_embedding": [p[3] for p in parts],
        "norm": [p[4] for p in parts],
    })
    total = sum(float(data[n].astype(np.float64).sum(axis=tuple(range(data[n].ndim - 1))) @ unit)
                for n in (d.path() for d in (schema.DIRECT_EMBEDDING, schema.DIRECT_BIAS, schema.DIRECT_MLPS,
                                             schema.DIRECT_HEADS)))
    header = {"embedding_norm": float(np.linalg.norm(emb)), "sum_of_components_along_embedding": total}
    return header, table


def format_table(table: pa.Table, floats: str = "{:.4f}") -> str:
    """A plain aligned text table."""
    cols = table.column_names
    cells = [[("" if v is None else floats.format(v) if isinstance(v, float) else str(v))
              for v in table.column(c).to_pylist()] for c in cols]
    widths = [max([len(c)] + [len(x) for x in col]) for c, col in zip(cols, cells)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for i in range(table.num_rows):
        lines.append("  ".join(col[i][:60].ljust(w) for col, w in zip(cells, widths)))
    return "\n".join(lines)
