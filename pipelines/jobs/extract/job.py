"""`clipscope extract`: webdataset shards → decomposition rows in one resumable run store.

The driver plans (shard URLs, sample counts, row blocks), creates or re-opens the store (refusing a
different config or model), takes the store's writer lock and hands every unfinished shard to
`ShardExtractor.process` — in this process, or on Ray actors (`cluster.shard_pool`) that call the
same method unchanged. A shard's rows are written whole chunks at a time straight into the store;
the driver writes the shard's done-marker only after `process` returned, so a killed run resumes
by rewriting unfinished shards whole (same bytes) and skipping finished ones.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from clipscope import __version__
from clipscope.errors import ClipscopeError, ConfigError, StoreError
from clipscope.kernels.decompose import DecomposeRequest, decompose, folding, second_order_directions
from clipscope.kernels.vit import ViTSpec
from clipscope.pipelines.jobs.extract.settings import ExtractConfig, config_differences
from clipscope.pipelines.models.loading import LoadedModel, load_model
from clipscope.pipelines.data.shard_counts import count_all
from clipscope.pipelines.data.webdataset_input import decode_or_error, expand_urls, iter_shard_samples, prefetch
from clipscope.cluster.progress import Progress
from clipscope.storage.lock import acquire_lock
from clipscope.storage.layout import ArraySpec, plan_row_blocks
from clipscope.storage.lock import LOCK_FILE
from clipscope.storage.store import RunStore

logger = logging.getLogger(__name__)

# Group attribute set once every array of a new store exists and its directions are written.
STORE_READY_ATTR = "extract_store_ready"


@dataclass(frozen=True)
class ShardTask:
    """One shard and the rows it owns: [start, start + capacity), of which `count` are samples."""

    index: int
    url: str
    start: int
    capacity: int
    count: int

    @property
    def weight(self) -> int:
        return self.count


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ClipscopeError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(device)


def compute_dtype(config: ExtractConfig, device: torch.device) -> torch.dtype:
    # fp16 matmuls on CPU are slow and lossy; there fp16 is a storage format only.
    if device.type == "cpu":
        return torch.float32
    return getattr(torch, config.dtype)


def build_request(config: ExtractConfig) -> DecomposeRequest:
    return DecomposeRequest(
        direct=True,
        token_layers=config.token_layers,
        second_order_layers=config.second_order_layers,
        activation_layers=config.activation_layers,
        convention=config.ln_convention,
    )


def heads_layers(config: ExtractConfig, spec: ViTSpec) -> tuple[int, ...]:
    return tuple(range(spec.n_layers)) if config.heads_layers is None else config.heads_layers


def array_specs(config: ExtractConfig, spec: ViTSpec) -> list[ArraySpec]:
    """The per-sample arrays this config writes (names and dims are the store contract)."""
    dt = config.dtype
    n_layers = len(heads_layers(config, spec))
    h, d, t, n = spec.n_heads, spec.embed_dim, spec.n_tokens, spec.mlp_width
    specs = [
        ArraySpec("image_embedding", ("sample", "embed"), (d,), dt),
        ArraySpec("direct/embedding", ("sample", "embed"), (d,), dt),
        ArraySpec("direct/mlps", ("sample", "layer", "embed"), (n_layers, d), dt),
        ArraySpec("direct/heads", ("sample", "layer", "head", "embed"), (n_layers, h, d), dt),
        ArraySpec("direct/bias", ("sample", "embed"), (d,), dt),
        ArraySpec("direct/cls_token", ("sample", "layer", "embed"), (n_layers, d), dt),
    ]
    if config.token_layers:
        specs.append(ArraySpec("direct/tokens", ("sample", "token_layer", "head", "token", "embed"),
                               (len(config.token_layers), h, t, d), dt))
    for layer in config.second_order_layers:
        later = spec.n_layers - layer - 1
        specs.append(ArraySpec(f"second_order/layer_{layer}/weights", ("sample", "later_layer", "head", "neuron"),
                               (later, h, n), dt))
        if config.ln_convention == "split":
            specs.append(ArraySpec(f"second_order/layer_{layer}/shared", ("sample", "embed"), (d,), dt))
    for layer in config.activation_layers:
        specs.append(ArraySpec(f"activations/layer_{layer}", ("sample", "token", "neuron"), (t, n), dt))
    return specs


def model_description(spec: ViTSpec) -> dict[str, Any]:
    return {"n_layers": spec.n_layers, "n_heads": spec.n_heads, "width": spec.width, "embed_dim": spec.embed_dim,
            "mlp_width": spec.mlp_width, "n_tokens": spec.n_tokens, "image_size": list(spec.image_size),
            "patch_size": list(spec.patch_size)}


@dataclass(frozen=True)
class RunPlan:
    urls: tuple[str, ...]
    counts: tuple[int, ...]
    count_errors: tuple[str | None, ...]
    tasks: tuple[ShardTask, ...]
    n_rows: int


def plan_run(config: ExtractConfig) -> RunPlan:
    urls = expand_urls(list(config.data), storage_options=config.storage_options or None)
    counts = count_all(urls, storage_options=config.storage_options or None)
    blocks = plan_row_blocks([c.count for c in counts], config.rows_per_chunk)
    tasks = tuple(ShardTask(b.index, urls[b.index], b.start, b.capacity, b.count) for b in blocks)
    n_rows = sum(b.capacity for b in blocks)
    return RunPlan(tuple(urls), tuple(c.count for c in counts), tuple(c.error for c in counts), tasks, n_rows)


def store_attrs(config: ExtractConfig, plan: RunPlan, loaded: LoadedModel) -> dict[str, Any]:
    spec = loaded.spec
    return {
        "config": config.result_dict(),
        "model": loaded.identity,
        "model_spec": model_description(spec),
        "code_version": __version__,
        "shards": list(plan.urls),
        "shard_counts": list(plan.counts),
        "row_blocks": [[t.start, t.capacity] for t in plan.tasks],
        "layers": {
            "heads": list(heads_layers(config, spec)),
            "tokens": list(config.token_layers),
            "second_order": {str(l): list(range(l + 1, spec.n_layers)) for l in config.second_order_layers},
            "activations": list(config.activation_layers),
        },
        "ln_convention": config.ln_convention,
    }


def open_or_create_store(config: ExtractConfig, plan: RunPlan, loaded: LoadedModel) -> RunStore:
    """Create the run's store, or re-open it for a resume after checking it is the same run."""
    options = config.storage_options or None
    attrs = store_attrs(config, plan, loaded)
    try:
        store = RunStore.open(config.out, "r+", storage_options=options)
    except StoreError as err:
        if not str(err).startswith("no run store at"):
            raise
        store = None
    if store is not None:
        check_resumable(store, attrs)
        if store.attrs.get(STORE_READY_ATTR) or store.shard_records(stage="extract"):
            return store
        # A run killed while creating the store left arrays (or `valid`, or directions) out. No rows
        # are written before creation finishes, so nothing is lost by creating it again.
        logger.warning("store %s was left half-created by a killed run; creating it again", store.url)
        for name in store.location.list_names():
            if name != LOCK_FILE:
                store.location.fs.rm(store.location.path(name), recursive=True)
    store = RunStore.create(config.out, arrays=array_specs(config, loaded.spec), n_rows=plan.n_rows,
                            rows_per_chunk=config.rows_per_chunk, attrs=attrs, storage_options=options)
    for layer in config.second_order_layers:
        directions = second_order_directions(loaded.spec.to(dtype=torch.float32), layer, config.ln_convention)
        store.write_result(f"second_order/layer_{layer}/directions", directions.cpu().numpy(),
                           ("later_layer", "head", "neuron", "embed"),
                           {"later_layers": list(range(layer + 1, loaded.spec.n_layers))})
    store.update_attrs({STORE_READY_ATTR: True})
    return store


def check_resumable(store: RunStore, attrs: dict[str, Any]) -> None:
    stored = store.attrs
    problems = config_differences(stored.get("config", {}), attrs["config"])
    for key in ("name", "pretrained", "sha256"):
        if stored.get("model", {}).get(key) != attrs["model"].get(key):
            problems.append(f"model {key}: store has {stored.get('model', {}).get(key)!r}, "
                            f"this run has {attrs['model'].get(key)!r}")
    if stored.get("shards") != attrs["shards"] or stored.get("shard_counts") != attrs["shard_counts"]:
        problems.append("the shard list or the shards' sample counts changed since the store was created")
    if problems:
        raise StoreError(f"cannot resume {store.url} with a different run: " + "; ".join(problems))


class ShardExtractor:
    """The per-shard work: decode, preprocess, decompose, write the shard's rows. One per actor."""

    def __init__(self, config: ExtractConfig, loaded: LoadedModel | None = None):
        self.config = config
        self.device = resolve_device(config.device)
        self.loaded = loaded or load_model(config.model, config.pretrained, device="cpu", seed=config.seed)
        self.spec = self.loaded.spec.to(device=self.device, dtype=compute_dtype(config, self.device))
        self.request = build_request(config).validated(self.spec)
        self.fold = folding(self.spec, config.ln_convention)
        self.heads_layers = list(heads_layers(config, self.spec))
        self.np_dtype = np.dtype(config.dtype)
        self._store: RunStore | None = None

    @property
    def store(self) -> RunStore:
        if self._store is None:
            self._store = RunStore.open(self.config.out, "r+", storage_options=self.config.storage_options or None)
        return self._store

    def _inputs(self, task: ShardTask, shard_errors: list[str]):
        samples = iter_shard_samples(task.url, storage_options=self.config.storage_options or None,
                                     expected_count=task.count)
        try:
            for raw in samples:
                image, error = decode_or_error(raw)
                tensor = None
                if image is not None:
                    try:
                        tensor = self.loaded.preprocess(image)
                    except Exception as err:  # a transform failing on one odd image must not stop the run
                        error = f"sample {raw.key}: preprocessing failed: {type(err).__name__}: {err}"
                if error is not None:
                    logger.warning("shard %s: %s", task.url, error)
                yield raw, tensor, error
        finally:
            samples.close()
            if samples.error:
                shard_errors.append(samples.error)

    def process(self, task: ShardTask) -> dict[str, Any]:
        started = time.time()
        rpc = self.config.rows_per_chunk
        shapes = {s.name: s.shape_tail for s in array_specs(self.config, self.loaded.spec)}
        chunks: dict[int, dict[str, np.ndarray]] = {}
        valid = np.zeros(task.capacity, dtype=bool)
        index_rows: list[dict[str, Any]] = []
        shard_errors: list[str] = []
        batch: list[tuple[int, torch.Tensor]] = []
        flushed = 0  # chunks [0, flushed) of this block are written

        def chunk(c: int) -> dict[str, np.ndarray]:
            if c not in chunks:
                chunks[c] = {name: np.zeros((rpc, *tail), self.np_dtype) for name, tail in shapes.items()}
            return chunks[c]

        def flush(upto_row: int) -> None:
            nonlocal flushed
            while (flushed + 1) * rpc <= upto_row:
                rows = slice(flushed * rpc, (flushed + 1) * rpc)
                self.store.write_rows(task.start + rows.start, chunk(flushed), valid[rows])
                chunks.pop(flushed, None)
                flushed += 1

        def run_batch() -> None:
            if not batch:
                return
            images = torch.stack([t for _, t in batch]).to(self.device, self.spec.dtype)
            out = self._outputs(images)
            for j, (row, _) in enumerate(batch):
                buffer = chunk(row // rpc)
                for name, values in out.items():
                    buffer[name][row % rpc] = values[j]
            batch.clear()

        n_seen = 0
        for raw, tensor, error in prefetch(self._inputs(task, shard_errors), depth=2 * self.config.batch_size):
            row = raw.index_in_shard
            n_seen = row + 1
            valid[row] = tensor is not None
            index_rows.append({"row": task.start + row, "key": raw.key, "shard": task.url, "shard_index": task.index,
                               "label": raw.label, "caption": raw.caption, "error": error})
            if tensor is not None:
                batch.append((row, tensor))
            if len(batch) >= self.config.batch_size:
                run_batch()
                flush(row + 1)
        run_batch()
        flush(task.capacity)
        self.store.write_samples_part(task.index, index_rows)
        n_valid = int(valid.sum())
        return {
            "index": task.index, "url": task.url, "start": task.start, "capacity": task.capacity,
            "count": n_seen, "expected": task.count, "valid": n_valid,
            "errors": n_seen - n_valid + len(shard_errors), "shard_errors": shard_errors,
            "seconds": round(time.time() - started, 3), "host": socket.gethostname(),
            "checksum": self.store.rows_checksum(task.start, task.capacity),
        }

    def _outputs(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        out = decompose(self.spec, images, self.request, fold=self.fold)
        if len(self.heads_layers) != self.spec.n_layers:
            out["direct/heads"] = out["direct/heads"][:, self.heads_layers]
            out["direct/mlps"] = out["direct/mlps"][:, self.heads_layers]
            out["direct/cls_token"] = out["direct/cls_token"][:, self.heads_layers]
        return {name: value.float().cpu().numpy().astype(self.np_dtype) for name, value in out.items()}


@dataclass
class ExtractSummary:
    store: str
    done: int
    skipped: int
    failed: list[tuple[int, str]]
    images: int
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.failed


def run_extract(config: ExtractConfig, *, progress_display: str = "auto",
                extractor_class: type[ShardExtractor] = ShardExtractor) -> ExtractSummary:
    """Plan, create/resume the store, extract every unfinished shard, merge the sample index.

    `extractor_class` is the per-shard worker (constructed as ``cls(config)`` once per Ray actor,
    or ``cls(config, loaded)`` in-process); a subclass can change decoding or add outputs.
    """
    started = time.time()
    plan = plan_run(config)
    loaded = load_model(config.model, config.pretrained, device="cpu", seed=config.seed)
    build_request(config).validated(loaded.spec)  # bad layers fail before anything is written
    if config.heads_layers is not None:
        from clipscope.kernels.vit import check_layers

        check_layers(loaded.spec, config.heads_layers, "heads layers")
    use_ray = config.uses_ray
    if use_ray:
        from clipscope.cluster.runtime import ray_runtime, require_shared_store

        with ray_runtime(config.address):
            require_shared_store(config.out, allow_local=config.allow_local_store)
            _require_readable_by_workers(plan.urls, config.allow_local_store)
            return _run(config, plan, loaded, started, progress_display, use_ray, extractor_class)
    return _run(config, plan, loaded, started, progress_display, use_ray, extractor_class)


def _run(config, plan, loaded, started, progress_display, use_ray, extractor_class) -> ExtractSummary:
    options = config.storage_options or None
    with acquire_lock(config.out, options, owner="clipscope extract"):
        store = open_or_create_store(config, plan, loaded)
        records = store.shard_records(stage="extract")
        done = {i for i, r in records.items() if r.get("status") == "done"}
        failed_before = {i: r for i, r in records.items() if r.get("status") == "failed"}
        pending = [t for t in plan.tasks if t.index not in done and (config.retry_failed or t.index not in failed_before)]
        skipped_failed = [] if config.retry_failed else [(i, r.get("error", "")) for i, r in failed_before.items()]
        logger.info("store %s: %d shards, %d done, %d to extract, %d rows", store.url, len(plan.tasks),
                    len(done), len(pending), plan.n_rows)
        failures: list[tuple[int, str]] = []

        def on_result(task: ShardTask, record: dict[str, Any]) -> None:
            store.mark_shard_done(task.index, record)

        def on_failure(task: ShardTask, error: str) -> None:
            failures.append((task.index, error))
            store.mark_shard_failed(task.index, {"index": task.index, "url": task.url, "error": error})
            logger.error("shard %s failed: %s", task.url, error)

        progress = Progress("extract", unit="img", display=progress_display)
        if use_ray:
            from clipscope.cluster.shard_pool import run_shards

            use_gpu = config.device == "cuda" or (config.device == "auto" and _cluster_has_gpus())
            run_shards(pending, _ExtractorFactory(config, extractor_class),
                       num_workers=None if use_gpu else config.workers,
                       use_gpu=use_gpu,
                       on_result=on_result, on_failure=on_failure, progress=progress)
        else:
            _run_local(extractor_class(config, loaded), pending, on_result, on_failure, progress)
        store.merge_samples()
    images = sum(r.get("count", 0) for r in store.shard_records(stage="extract").values() if r.get("status") == "done")
    return ExtractSummary(store.url, len(pending) - len(failures), len(done), failures + skipped_failed,
                          images, round(time.time() - started, 2))


def _require_readable_by_workers(urls: tuple[str, ...], allow_local: bool) -> None:
    """Shards Ray workers could not open are refused before anything is written."""
    from clipscope.cluster.runtime import check_shared_store, cluster_nodes, store_url_scope

    files = [u for u in urls if not u.startswith("pipe:")]
    in_process = [u for u in files if store_url_scope(u) == "process"]
    if in_process:
        raise ConfigError(f"shard {in_process[0]!r} lives in this Python process; Ray workers cannot read it")
    local = [u for u in files if store_url_scope(u) == "local"]
    if local:
        nodes = len(cluster_nodes())
        try:
            check_shared_store(local[0], alive_nodes=nodes, allow_local=allow_local)
        except ConfigError as err:
            raise ConfigError(f"shard {local[0]!r}: {err}".replace("store ", "", 1)) from None


def _cluster_has_gpus() -> bool:
    from clipscope.cluster.runtime import cluster_nodes

    return any(node.num_gpus > 0 for node in cluster_nodes())


class _ExtractorFactory:
    """Picklable factory: each Ray actor builds its own extractor (model loaded once per actor)."""

    def __init__(self, config: ExtractConfig, extractor_class: type[ShardExtractor]):
        self.config = config
        self.extractor_class = extractor_class

    def __call__(self) -> ShardExtractor:
        return self.extractor_class(self.config)


def _run_local(extractor: ShardExtractor, pending, on_result, on_failure, progress) -> None:
    progress.start(sum(t.count for t in pending), len(pending))
    try:
        for task in pending:
            try:
                record = extractor.process(task)
            except ClipscopeError as err:
                on_failure(task, str(err))
                progress.fail(expected=task.count)
                continue
            on_result(task, record)
            progress.advance(record["count"], expected=task.count)
    finally:
        progress.close()
