"""Head roles from a store's TextSpan results (spec S6): tags per pool text → label per head → the scores.

Tags: the TextSpan pool's built-in tags (`pipelines.texts.tags`; the shapes world registers its pools),
or `text_labels` (text<TAB>property). `labels` (a CSV of layer,head,label) names heads' labels directly —
the paper's in-context ChatGPT step stays outside clipscope — and the tags, when there are any, still
count each head's matching texts for the association score.
"""

from __future__ import annotations

import csv

import numpy as np
import torch

from clipscope.cluster.executor import Executor
from clipscope.errors import DataError, ParameterError, StoreError, literal
from clipscope.kernels.head_roles import label_heads, property_shares, role_scores
from clipscope.pipelines.jobs.roles.result import GROUP, Result
from clipscope.pipelines.jobs.roles.settings import RolesSettings
from clipscope.pipelines.texts.embedding_cache import stored_texts
from clipscope.pipelines.texts.tags import get_tags, has_tags, read_tag_file
from clipscope.storage import schema
from clipscope.storage.results import begin_reduction
from clipscope.storage.store import RunStore


def textspan_layers(store: RunStore, settings: RolesSettings) -> tuple[int, ...]:
    names = set(store.array_names())
    found = tuple(l for l in store.info.heads_layers if f"{schema.TEXTSPAN.path(layer=l)}/indices" in names)
    layers = found[-4:] if settings.layers is None else tuple(settings.layers)
    missing = [l for l in layers if l not in found]
    if not layers or missing:
        which = " ".join(map(str, missing or settings.layers or ()))
        raise StoreError(f"{store.url} has no TextSpan results for layer(s) {which or '(none found)'}; run "
                         f"`clipscope textspan {store.url} --layers {which or 'L …'}` first")
    return layers


def read_picks(store: RunStore, layers: tuple[int, ...]) -> tuple[list[str], str, str, np.ndarray, np.ndarray]:
    """(the pool's texts, its name, its key, indices [layer head pick], explained ratios [layer head pick])."""
    keys = {store.array(f"{schema.TEXTSPAN.path(layer=l)}/indices").attrs.get("texts_key") for l in layers}
    if len(keys) != 1:
        raise StoreError(f"the TextSpan results of layers {list(layers)} were searched with different pools; rerun "
                         "`clipscope textspan` on one pool for all of them")
    key = keys.pop()
    pool = str(store.array(f"{schema.TEXTSPAN.path(layer=layers[0])}/indices").attrs.get("pool"))
    indices = np.stack([store.read_result(f"{schema.TEXTSPAN.path(layer=l)}/indices") for l in layers])
    ratios = np.stack([store.read_result(f"{schema.TEXTSPAN.path(layer=l)}/explained_ratio") for l in layers])
    return stored_texts(store, key), pool, key, indices, ratios


def text_tags(settings: RolesSettings, pool: str) -> tuple[dict[str, str] | None, str]:
    if settings.text_labels is not None:
        return read_tag_file(settings.text_labels), settings.text_labels
    if has_tags(pool):
        return get_tags(pool), f"built-in tags of {pool}"
    if settings.labels is None:
        get_tags(pool)  # raises the message naming --text-labels / --labels
    return None, "none"


def read_label_csv(path: str, layers: tuple[int, ...], n_heads: int) -> dict[tuple[int, int], str]:
    """{(layer, head): label} from a CSV with columns layer, head, label (a header row optional)."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except OSError as err:
        raise ParameterError("labels", f"{path}: cannot read it ({err.strerror or err})") from None
    if rows and [c.strip().lower() for c in rows[0]] == ["layer", "head", "label"]:
        rows = rows[1:]
    out: dict[tuple[int, int], str] = {}
    for number, row in enumerate(rows, 1):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 3 or not row[0].strip().isdigit() or not row[1].strip().isdigit() or not row[2].strip():
            raise DataError(f"{{labels}} {literal(path)} row {number}: expected layer,head,label, got "
                            f"{literal(repr(','.join(row)[:60]))}", parameters=("labels",))
        layer, head = int(row[0]), int(row[1])
        if layer not in layers or not 0 <= head < n_heads:
            raise DataError(f"{{labels}} {literal(path)} row {number}: head L{layer}H{head} is not one of the heads "
                            f"of layers {literal(list(layers))} (0..{n_heads - 1})", parameters=("labels",))
        out[(layer, head)] = row[2].strip()
    return out


def compute(settings: RolesSettings, layers: tuple[int, ...], texts: list[str], pool: str, indices: np.ndarray,
            ratios: np.ndarray) -> Result:
    tags, source = text_tags(settings, pool)
    n_layers, n_heads, n_picks = indices.shape
    csv_labels = None
    if settings.labels is not None:
        csv_labels = read_label_csv(settings.labels, layers, n_heads)
        source = f"labels {settings.labels}" + ("" if tags is None else f" (matches: {source})")
    properties: list[str] = []
    for prop in list((tags or {}).values()) + list((csv_labels or {}).values()):
        if prop not in properties:
            properties.append(prop)
    flat_tags = torch.tensor([[properties.index(tags[texts[int(j)]]) if tags and texts[int(j)] in tags else -1
                               for j in head] for head in indices.reshape(-1, n_picks)], dtype=torch.int64)
    flat_ratios = torch.from_numpy(ratios.reshape(-1, n_picks).astype(np.float64))
    share = property_shares(flat_tags, flat_ratios, len(properties))
    labels, matches = label_heads(flat_tags, flat_ratios, settings.m, len(properties))
    if csv_labels is not None:
        given = [properties.index(csv_labels[(l, h)]) if (l, h) in csv_labels else -1
                 for l in layers for h in range(n_heads)]
        labels = torch.tensor(given, dtype=torch.int64)
        top = flat_tags[:, :settings.m]
        matches = torch.where(labels >= 0, (top == labels[:, None]).sum(1), torch.zeros_like(labels))
        if tags is None:
            matches = torch.full_like(labels, -1)
    entanglement, shared, association = role_scores(labels, matches.clamp_min(0), settings.min_match)
    if tags is None:
        association = float("nan")
    shape = (n_layers, n_heads)
    return Result(settings, layers, tuple(properties), labels.numpy().reshape(shape).astype(np.int64),
                  share.numpy().reshape(*shape, len(properties)), matches.numpy().reshape(shape).astype(np.int64),
                  entanglement, shared, association, pool, source)


def run(store: RunStore, settings: RolesSettings, executor: Executor | None = None) -> Result:
    """Label every head of the settings' layers and score them; writes `reductions/roles`, returns the result.
    (`executor` is accepted for the common job signature; the work is a few small tables.)"""
    layers = textspan_layers(store, settings)
    texts, pool, key, indices, ratios = read_picks(store, layers)
    record = {"m": settings.m, "min_match": settings.min_match, "text_labels": settings.text_labels,
              "labels": settings.labels, "layers": list(layers), "texts_key": key,
              "text_labels_digest": _digest(settings.text_labels), "labels_digest": _digest(settings.labels)}
    with begin_reduction(store, "roles", record, allow_incomplete=settings.allow_incomplete,
                         force=settings.force) as reduction:
        if reduction.is_current(GROUP):
            return Result.read(store, settings)
        result = compute(settings, layers, texts, pool, indices, ratios)
        if store.mode == "r+":
            result.write(reduction)
    return result


def _digest(path: str | None) -> str | None:
    if path is None:
        return None
    import hashlib

    try:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()[:16]
    except OSError:
        return None
