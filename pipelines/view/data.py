"""What the viewer shows, read from a store opened read-only: plain dicts and lists, one function per page.

Every function reads only what its page shows: one row of a per-sample array (an image's terms), one
neuron's slice of a result, a layer's TextSpan picks; the sample index is read once. The numbers come
from the same code the query API and the jobs' ``Result.read`` use (``store_queries``, ``textspan.result``,
``second_order.result``, ``neurons.result``), so the viewer and ``clipscope query`` agree. The two questions
that rank rows — top images for a text, neighbours of an image — stream over row blocks in bounded
memory, as ``clipscope query`` does.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from clipscope.errors import ParameterError, StoreError
from clipscope.pipelines.jobs.neurons import result as omp_result
from clipscope.pipelines.jobs.second_order import result as second_order_result
from clipscope.pipelines.jobs.textspan import result as textspan_result
from clipscope.pipelines.query import store_queries
from clipscope.pipelines.texts.embedding_cache import stored_texts
from clipscope.storage import schema
from clipscope.storage.layout import MEMBERS_DIR
from clipscope.storage.manifest import shard_records
from clipscope.storage.sample_index import read_samples
from clipscope.storage.store import RunStore

MAX_TEXT = 200
MAX_K = 50
_KEY = re.compile(r"^[^\x00-\x1f\x7f]{1,512}$")
_TEXT_CACHE = 256


class NotFound(StoreError):
    """What the URL names is not in the store (a key, a layer, a neuron): answered with 404."""


def check_key(key: str) -> str:
    """A sample key from a URL: 1–512 printable characters, no ``..`` path segment. Keys are only ever looked up
    in the sample index (never used as a path); the check refuses what cannot be a webdataset key early."""
    if not isinstance(key, str) or not _KEY.match(key) or ".." in key.split("/"):
        shown = key if isinstance(key, str) and len(key) <= 80 else f"{str(key)[:80]}…"
        raise ParameterError("key", f"must be a sample key (1–512 printable characters, no '..' segment), "
                                    f"got {shown!r}")
    return key


def check_text(text: str | None, *, required: bool = True, name: str = "text") -> str:
    text = (text or "").strip()
    if required and not text:
        raise ParameterError(name, "must be a non-empty text, got nothing")
    if len(text) > MAX_TEXT:
        raise ParameterError(name, f"must be at most {MAX_TEXT} characters, got {len(text)}")
    return text


def check_int(value: Any, name: str, low: int, high: int) -> int:
    """An integer from a URL in [low, high] (ParameterError naming it otherwise)."""
    try:
        number = int(str(value), 10)
    except (TypeError, ValueError):
        raise ParameterError(name, f"must be an integer, got {str(value)[:40]!r}") from None
    if not low <= number <= high:
        raise ParameterError(name, f"must be in {low}..{high}, got {number}")
    return number


def _floats(values: np.ndarray) -> list:
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(values, np.float64).ravel()]


class StoreView:
    """A run store opened read-only, with the little state a server keeps (sample index, model, texts)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, loaded=None):
        self.store = RunStore.open(url, "r", storage_options)
        self.info = self.store.info
        self._lock = threading.Lock()
        self._samples = None
        self._rows: dict[str, int] | None = None
        self._loaded = loaded
        self._texts: OrderedDict[str, np.ndarray] = OrderedDict()
        self._pool_texts: dict[str, list[str]] = {}

    @property
    def url(self) -> str:
        return self.store.url

    # --- samples ------------------------------------------------------------------------------------

    def samples(self):
        with self._lock:
            if self._samples is None:
                table = read_samples(self.store)
                self._rows = {key: row for key, row in zip(table["key"].to_pylist(), table["row"].to_pylist())}
                self._samples = table
        return self._samples

    def row_of(self, key: str) -> int:
        check_key(key)
        self.samples()
        row = self._rows.get(key) if self._rows is not None else None
        if row is None:
            raise NotFound(f"no sample with key {key!r} in {self.url}")
        return int(row)

    def sample(self, row: int) -> dict[str, Any]:
        table = self.samples()
        position = int(np.searchsorted(table["row"].to_numpy(), row))
        if position >= table.num_rows or int(table["row"][position].as_py()) != row:
            raise NotFound(f"row {row} of {self.url} has no entry in the sample index")
        out = {name: table[name][position].as_py() for name in ("row", "key", "shard", "shard_index", "label",
                                                                 "caption", "error")}
        out["valid"] = bool(self.store.read_valid(slice(row, row + 1))[0])
        return out

    def samples_at(self, rows, scores=None, score_name: str = "score") -> list[dict[str, Any]]:
        out = []
        for i, row in enumerate(np.asarray(rows, np.int64).tolist()):
            if row < 0:
                continue
            item = self.sample(row)
            if scores is not None:
                item[score_name] = float(scores[i])
            out.append(item)
        return out

    # --- model and texts -------------------------------------------------------------------------------

    def model(self):
        with self._lock:
            if self._loaded is None:
                from clipscope.pipelines.models.loading import load_run_model

                self._loaded = load_run_model(self.store)
            return self._loaded

    def text_direction(self, text: str) -> np.ndarray:
        """Unit embedding of a text with the run's model (`interpret.unit_text`; cached per text)."""
        from clipscope.pipelines.query import interpret

        with self._lock:
            if text in self._texts:
                self._texts.move_to_end(text)
                return self._texts[text]
        vector = interpret.unit_text(self.store, text, self.model())
        with self._lock:
            self._texts[text] = vector
            while len(self._texts) > _TEXT_CACHE:
                self._texts.popitem(last=False)
        return vector

    def pool_texts(self, key: str) -> list[str]:
        with self._lock:
            if key not in self._pool_texts:
                self._pool_texts[key] = stored_texts(self.store, key)
            return self._pool_texts[key]

    # --- the run --------------------------------------------------------------------------------------

    def reductions(self) -> dict[str, Any]:
        """Which results the store holds, by job."""
        names = self.store.array_names()
        found: dict[str, Any] = {"textspan": self.textspan_layers(), "second_order": self.second_order_layers(),
                                 "omp": self.omp_layers(), "evaluation": [], "means": [], "other": []}
        known = ("reductions/textspan/", "reductions/second_order/", "reductions/omp/", "reductions/evaluation/",
                 "reductions/means/")
        for name in names:
            parts = name.split("/")
            if name.startswith("reductions/evaluation/") and parts[-1] == "accuracy":
                found["evaluation"].append("/".join(parts[2:-1]))
            elif name.startswith("reductions/means/"):
                found["means"].append(name[len("reductions/means/"):])
            elif name.startswith("reductions/") and not name.startswith(known):
                group = "/".join(parts[:-1])
                if group not in found["other"]:
                    found["other"].append(group)
        return found

    def run(self) -> dict[str, Any]:
        info = self.info
        records = shard_records(self.store)
        shards = []
        for index, url in enumerate(info.shards):
            record = records.get(index, {})
            status = record.get("status", "missing")
            shards.append({"index": index, "url": url, "status": status, "count": record.get("count"),
                           "valid": record.get("valid"), "errors": record.get("errors"),
                           "lost": record.get("lost"), "error": record.get("error"),
                           "partial": record.get("partial") or record.get("loss")})
        done = [s for s in shards if s["status"] == "done"]
        arrays = []
        for name in self.store.array_names():
            arr = self.store.array(name)
            arrays.append({"name": name, "dims": list(self.store.dims(name)), "shape": list(arr.shape),
                           "dtype": str(arr.dtype)})
        model = info.model.to_dict()
        return {
            "url": self.url, "model": model, "model_spec": self.store.attrs.get("model_spec") or {},
            "ln_convention": info.ln_convention, "layers": info.layers_attr(), "n_rows": info.n_rows,
            "rows_per_chunk": info.rows_per_chunk, "shards": shards,
            "counts": {"shards": len(shards), "done": len(done),
                       "failed": sum(s["status"] == "failed" for s in shards),
                       "missing": sum(s["status"] == "missing" for s in shards),
                       "images": sum(int(s["count"] or 0) for s in done),
                       "valid": sum(int(s["valid"] or 0) for s in done),
                       "errors": sum(int(s["errors"] or 0) for s in done)},
            "reductions": self.reductions(), "arrays": arrays,
            "member_index": {"indexed": len([n for n in self.store.location.list_names(MEMBERS_DIR)
                                             if n.startswith("part-") and n.endswith(".parquet")]),
                             "command": f"clipscope view {self.url} --build-index"},
        }

    # --- heads ----------------------------------------------------------------------------------------

    def textspan_layers(self) -> list[int]:
        names = set(self.store.array_names())
        return [layer for layer in self.info.heads_layers
                if f"{textspan_result.layer_group(layer)}/indices" in names]

    def n_heads(self) -> int:
        return int(self.store.array(schema.DIRECT_HEADS.path()).shape[2])

    def check_layer_head(self, layer: int, head: int | None = None) -> None:
        if layer not in self.info.heads_layers:
            raise NotFound(f"layer {layer} has no head terms in {self.url}; stored: {list(self.info.heads_layers)}")
        if head is not None and not 0 <= head < self.n_heads():
            raise NotFound(f"head {head} is not a head of layer {layer}: heads 0..{self.n_heads() - 1}")

    def textspan(self, layer: int) -> dict[str, Any]:
        """A layer's TextSpan picks per head (texts, variance, share), read as `textspan.Result.read` does."""
        self.check_layer_head(layer)
        group = textspan_result.layer_group(layer)
        if layer not in self.textspan_layers():
            raise NotFound(f"{self.url} has no TextSpan results for layer {layer}; they are made by "
                           f"`clipscope textspan {self.url} --layers {layer}`")
        attrs = self.store.array(f"{group}/indices").attrs
        key = attrs.get("texts_key")
        picks = textspan_result.read_layer(self.store, layer, key)
        texts = self.pool_texts(key)
        heads = []
        for head in range(picks["indices"].shape[0]):
            heads.append({"head": head, "picks": [
                {"text": texts[int(j)], "text_index": int(j), "variance": float(v), "explained_ratio": float(r)}
                for j, v, r in zip(picks["indices"][head], picks["variances"][head], picks["explained_ratio"][head])]})
        return {"layer": layer, "pool": attrs.get("pool"), "n_texts": attrs.get("n_texts"), "heads": heads}

    def top_images_for_text(self, layer: int, head: int, text: str, k: int = 10) -> list[dict[str, Any]]:
        """`clipscope query STORE text`: the images whose head term points furthest along the text."""
        self.check_layer_head(layer, head)
        text = check_text(text)
        self.text_direction(text)  # encodes once with the cached model, as the query below does
        table = store_queries.top_images_for_text(self.store, layer, head, text, k, loaded=self.model())
        return [{**row, "valid": True} for row in table.to_pylist()]

    # --- neurons --------------------------------------------------------------------------------------

    def second_order_layers(self) -> list[int]:
        return [layer for layer in sorted(self.info.second_order_layers)
                if self.store.result_group_attrs(schema.SECOND_ORDER.path(layer=layer)) is not None]

    def omp_layers(self) -> list[int]:
        names = set(self.store.array_names())
        return [layer for layer in sorted(self.info.second_order_layers)
                if f"{schema.OMP.path(layer=layer)}/support" in names]

    def _stat(self, layer: int, leaf: str):
        name = schema.SECOND_ORDER[leaf].path(layer=layer)
        return self.store.array(name) if name in self.store.array_names() else None

    def n_neurons(self, layer: int) -> int:
        return int(self.store.array(schema.SECOND_ORDER_WEIGHTS.path(layer=layer)).shape[-1])

    def check_neuron_layer(self, layer: int) -> None:
        if layer not in self.info.second_order_layers:
            raise NotFound(f"layer {layer} has no second-order data in {self.url}; stored: "
                           f"{sorted(self.info.second_order_layers)} (extract with --second-order-layers {layer})")
        if layer not in self.second_order_layers():
            raise NotFound(f"{self.url} has no second-order results for layer {layer}; they are made by "
                           f"`clipscope second-order {self.url} --layer {layer}`")

    def neurons(self, layer: int, page: int = 0, per_page: int = 50) -> dict[str, Any]:
        """Neurons of a layer by mean centred norm, one page."""
        self.check_neuron_layer(layer)
        norm_mean = np.asarray(self._stat(layer, "norm_mean")[...], np.float64)
        order = np.argsort(-norm_mean, kind="stable")
        pages = max(1, -(-order.size // per_page))
        page = check_int(page, "page", 0, pages - 1)
        shown = order[page * per_page:(page + 1) * per_page]
        columns = {leaf: self._stat(layer, leaf) for leaf in ("norm_max", "pc_explained", "energy_topk")}
        rows = []
        for n in shown.tolist():
            row = {"neuron": n, "norm_mean": float(norm_mean[n])}
            for leaf, arr in columns.items():
                row[leaf] = None if arr is None else float(arr[n])
            rows.append(row)
        return {"layer": layer, "page": page, "pages": pages, "n_neurons": int(order.size), "neurons": rows,
                "omp": layer in self.omp_layers()}

    def neuron(self, layer: int, neuron: int, m: int | None = None) -> dict[str, Any]:
        """One neuron: its norm statistics, top images, OMP texts with signs, and the layer's ablations."""
        self.check_neuron_layer(layer)
        n_neurons = self.n_neurons(layer)
        if not 0 <= neuron < n_neurons:
            raise NotFound(f"neuron {neuron} is not a neuron of layer {layer}: neurons 0..{n_neurons - 1}")
        stats = {}
        for leaf in ("norm_mean", "norm_max", "norm_p98", "energy_topk", "significant_share", "pc_explained"):
            arr = self._stat(layer, leaf)
            stats[leaf] = None if arr is None else float(arr[neuron])
        attrs = self.store.result_group_attrs(schema.SECOND_ORDER.path(layer=layer)) or {}
        record = attrs.get("clipscope_result") or {}
        top_k = (record.get("settings") or {}).get("top_k")
        rows = np.asarray(self._stat(layer, "topk_rows")[neuron], np.int64)
        norms = np.asarray(self._stat(layer, "topk_norms")[neuron], np.float64)
        top = self.samples_at(rows, norms, "norm")
        histogram = self._stat(layer, "norm_histogram")
        edges = self._stat(layer, "norm_bin_edges")
        out: dict[str, Any] = {
            "layer": layer, "neuron": neuron, "n_neurons": n_neurons, "stats": stats, "top_k": top_k, "top": top,
            "histogram": None, "bin_edges": None,
            "ablations": self.second_order_ablations(layer), "omp": None,
            "omp_command": f"clipscope neurons {self.url} --layer {layer}",
        }
        if histogram is not None and edges is not None:
            counts = np.asarray(histogram[neuron], np.int64)
            filled = np.flatnonzero(counts)
            if filled.size:  # the bins from the first to the last non-empty one, and their edges
                lo, hi = int(filled[0]), int(filled[-1]) + 1
                out["histogram"] = counts[lo:hi].tolist()
                out["bin_edges"] = _floats(edges[lo:hi + 1])
        if layer in self.omp_layers():
            out["omp"] = self.omp(layer, neuron, m)
        return out

    def second_order_ablations(self, layer: int) -> dict[str, Any] | None:
        name = second_order_result.evaluation_name(layer)
        if name not in self.store.array_names():
            return None
        arr = self.store.array(name)
        names = list(arr.attrs.get("ablations") or [])
        values = _floats(arr[...])
        return {"task": arr.attrs.get("task"), "labelled": arr.attrs.get("labelled"),
                "accuracy": dict(zip(names, values))}

    def omp(self, layer: int, neuron: int, m: int | None = None) -> dict[str, Any]:
        """The OMP texts of one neuron for sparsity m (default: the largest stored m ≤ 8), by |coefficient|,
        as `neurons.report.neuron_table` orders them; plus the reconstruction accuracy per m."""
        group = schema.OMP.path(layer=layer)
        support_arr = self.store.array(f"{group}/support")
        attrs = support_arr.attrs
        stored_m = [int(v) for v in self.store.read_result(f"{group}/m")]
        if m is None:
            small = [v for v in stored_m if v <= 8]
            m = max(small) if small else stored_m[0]
        if m not in stored_m:
            raise ParameterError("m", f"{m} was not solved for layer {layer}; stored m: {stored_m}")
        i = stored_m.index(m)
        support = np.asarray(support_arr[neuron, :m], np.int64)
        coefs = np.asarray(self.store.array(f"{group}/coefs")[i, neuron, :m], np.float64)
        residual = float(self.store.array(f"{group}/residual_norm")[neuron, i])
        texts = self.pool_texts(attrs["texts_key"])
        picked = np.flatnonzero(support >= 0)
        order = picked[np.argsort(-np.abs(coefs[picked]), kind="stable")]
        terms = [{"text": texts[int(support[k])], "text_index": int(support[k]), "coefficient": float(coefs[k]),
                  "sign": "+" if coefs[k] > 0 else "-"} for k in order]
        accuracy = omp_result.ReconstructionAccuracy.read(self.store, layer)
        acc = None
        if accuracy is not None:
            acc = {"task": accuracy.task, "m": list(accuracy.m), "accuracy": _floats(accuracy.accuracy),
                   "pc1": accuracy.pc_accuracy, "baseline": accuracy.baseline, "n_labelled": accuracy.n_labelled}
        return {"m": m, "stored_m": stored_m, "pool": attrs.get("pool"), "terms": terms, "residual_norm": residual,
                "accuracy": acc}

    # --- one image ------------------------------------------------------------------------------------

    def image(self, key: str, top: int = 12) -> dict[str, Any]:
        """One image: its sample record and its largest components along its embedding (`clipscope query
        STORE image KEY`)."""
        row = self.row_of(key)
        sample = self.sample(row)
        out: dict[str, Any] = {"sample": sample, "maps": self.map_choices(), "grid": self.grid()}
        if not sample["valid"]:
            out["decomposition"] = None
            return out
        header, table = store_queries.image_summary(self.store, row, top=top)
        out["decomposition"] = {"header": header, "components": table.to_pylist()}
        return out

    def grid(self) -> tuple[int, int] | None:
        spec = self.store.attrs.get("model_spec") or {}
        size, patch = spec.get("image_size"), spec.get("patch_size")
        if not size or not patch:
            return None
        return int(size[0]) // int(patch[0]), int(size[1]) // int(patch[1])

    def map_choices(self) -> list[tuple[str, str]]:
        """The maps `clipscope query STORE topic` can draw for a stored row: ("all", …) over every layer and head
        (needs `direct/token_sum`), ("L", …) summed over the heads of a `--token-layers` layer, ("L:H", …) one head."""
        names = set(self.store.array_names())
        out = []
        if schema.DIRECT_TOKEN_SUM.path() in names:
            out.append(("all", "all layers and heads (token sum)"))
        if schema.DIRECT_TOKENS.path() in names:
            for layer in self.info.token_layers:
                out.append((str(layer), f"layer {layer}, all heads"))
                out += [(f"{layer}:{head}", f"layer {layer} head {head}") for head in range(self.n_heads())]
        return out

    def topic_map(self, key: str, text: str, contrast: str = "", which: str | None = None) -> dict[str, Any]:
        """The topic map m(p) = ⟨c_p / ‖M(I)‖, t̂⟩ over the patches (`interpret.topic_maps`, the query API's), of
        one head, of a token layer's heads summed, or of all layers (token sum); with `contrast`, the contrastive
        map m_text − m_contrast. Reads one row."""
        from clipscope.pipelines.query import interpret

        text = check_text(text)
        contrast = check_text(contrast, required=False, name="contrast")
        choices = [c for c, _ in self.map_choices()]
        if not choices:
            raise NotFound(f"{self.url} stores no per-token terms; extract with --token-layers L (or --token-sum) "
                           f"to see maps")
        which = which or choices[0]
        if which not in choices:
            raise ParameterError("map", f"must be one of {choices}, got {str(which)[:40]!r}")
        row = self.row_of(key)
        if not bool(self.store.read_valid(slice(row, row + 1))[0]):
            raise NotFound(f"sample {key!r} holds no decoded image (valid=False)")
        texts = [text, contrast] if contrast else [text]
        directions = np.stack([self.text_direction(t) for t in texts])
        if which == "all":
            parts = [(None, None)]
        elif ":" in which:
            layer, head = (int(v) for v in which.split(":"))
            parts = [(layer, head)]
        else:
            parts = [(int(which), head) for head in range(self.n_heads())]
        grids = 0
        for layer, head in parts:
            maps = interpret.topic_maps(self.store, texts, sample=row, layer=layer, head=head, loaded=self.model(),
                                        directions=directions)
            grids = grids + np.stack([m.grid for m in maps])
        values = grids[0] - grids[1] if contrast else grids[0]
        return {"key": key, "text": text, "contrast": contrast, "map": which, "grid": list(values.shape),
                "values": values.tolist(), "min": float(values.min()), "max": float(values.max())}

    def neighbours(self, key: str, layer: int, head: int, k: int = 8, score: str = "dot") -> list[dict[str, Any]]:
        """Per-head nearest neighbours of an image (`interpret.head_image_neighbours`, the query API's):
        ⟨ρ_h(I_q), ρ_h(I)⟩ (or their cosine) over every valid row but the image's own, streamed over row blocks."""
        from clipscope.pipelines.query import interpret

        self.check_layer_head(layer, head)
        k = check_int(k, "k", 1, MAX_K)
        row = self.row_of(key)
        table = interpret.head_image_neighbours(self.store, layer, head, sample=row, k=k, score=score)
        return self.samples_at(table["row"].to_numpy(), table["score"].to_numpy(), "score")
