"""`clipscope extract`: webdataset shards → decomposition rows in one resumable run store.

The driver plans (shard URLs, sample counts, row blocks), creates or re-opens the store (refusing a
different config or model), takes the store's writer lock and hands every unfinished shard to
`ShardExtractor.process` — in this process, or on Ray actors (`cluster.shard_pool`) that call the
same method unchanged. A shard's rows are written whole chunks at a time straight into the store;
the driver writes the shard's done-marker only after `process` returned, so a killed run resumes
by rewriting unfinished shards whole (same bytes) and skipping finished ones.
"""

from __future__ import annotations

import errno
from contextlib import closing
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Sequence

import fsspec
import numpy as np
import torch

from clipscope import __version__
from clipscope.errors import ConfigError, DataError, EnvironmentFault, StoreError
from clipscope.kernels.decompose import DecomposeRequest, Decomposition, decompose, folding, second_order_directions
from clipscope.kernels.vit import ViTSpec
from clipscope.pipelines.jobs.extract import sample_extras
from clipscope.pipelines.jobs.extract.settings import ExtractConfig, config_differences
from clipscope.pipelines.models.loading import LoadedModel, is_random_init, load_model, random_init_text
from clipscope.pipelines.data.shard_counts import count_all
from clipscope.pipelines.data.webdataset_input import (
    UnreadableShardError,
    decode_or_error,
    expand_urls,
    iter_shard_samples,
)
from clipscope.pipelines.data.prefetch import prefetch_batches
from clipscope.pipelines.jobs.extract.batch_size import resolve_batch_size
from clipscope.pipelines.jobs.extract.precision import dtype_name, forward_dtype, to_output
from clipscope.pipelines.jobs.extract.writer import BackgroundWriter
from clipscope.cluster.executor import Executor, open_executor
from clipscope.cluster.progress import Progress
from clipscope.storage.lock import acquire_lock, current_token, writer_gone
from clipscope.storage.layout import ArraySpec, plan_row_blocks
from clipscope.storage.lock import LOCK_FILE
from clipscope.storage.location import check_writable_target
from clipscope.storage import schema
from clipscope.storage.store import RunStore

logger = logging.getLogger(__name__)

# OSError numbers that mean the machine, not the data, is at fault: they stop the run.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})

# Group attribute set once every array of a new store exists and its directions are written.
STORE_READY_ATTR = "extract_store_ready"


class WriterGoneError(StoreError):
    """The run a worker writes for has lost the store's lock; retrying cannot help."""

    retryable = False


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
        raise ConfigError("{device} cuda was asked for, but torch sees no CUDA device; use {device} cpu or auto",
                          parameters=("device",))
    return torch.device(device)


def compute_dtype(config: ExtractConfig, device: torch.device) -> torch.dtype:
    """The forward's dtype on `device` (precision.py: float16 is refused on CPU, auto is float32 there)."""
    return forward_dtype(config.compute_dtype, config.dtype, device)


def decode_threads(config: ExtractConfig, device: torch.device) -> int:
    """Threads decoding inputs beside the forward: `config.decode_threads`, else 8 (at most the CPU
    count) beside a CUDA forward and 1 beside a CPU one (whose matmuls use every core already)."""
    if config.decode_threads is not None:
        return config.decode_threads
    return min(8, os.cpu_count() or 1) if device.type == "cuda" else 1


def build_request(config: ExtractConfig) -> DecomposeRequest:
    return DecomposeRequest(
        direct=True,
        token_layers=config.token_layers,
        second_order_layers=config.second_order_layers,
        activation_layers=config.activation_layers,
        convention=config.ln_convention,
        token_sum=config.token_sum,
        attention_layers=config.attention_layers,
    )


def store_arrays(out: Decomposition, layers: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """A decomposition's per-sample store arrays by name (schema), the direct effects of `layers` only."""
    arrays = {schema.IMAGE_EMBEDDING.path(): out.image_embedding}
    if out.direct is not None:
        d = out.direct
        pick = slice(None) if layers is None else list(layers)
        arrays.update({
            schema.DIRECT_EMBEDDING.path(): d.embedding, schema.DIRECT_BIAS.path(): d.bias,
            schema.DIRECT_MLPS.path(): d.mlps[:, pick], schema.DIRECT_HEADS.path(): d.heads[:, pick],
            schema.DIRECT_CLS_TOKEN.path(): d.cls_token[:, pick],
        })
    if out.tokens is not None:
        arrays[schema.DIRECT_TOKENS.path()] = out.tokens
    for layer, terms in out.second_order.items():
        arrays[schema.SECOND_ORDER_WEIGHTS.path(layer=layer)] = terms.weights
        if terms.shared is not None:
            arrays[schema.SECOND_ORDER_SHARED.path(layer=layer)] = terms.shared
    for layer, values in out.activations.items():
        arrays[schema.ACTIVATIONS.path(layer=layer)] = values
    arrays.update(sample_extras.decomposition_arrays(out))
    return arrays


def heads_layers(config: ExtractConfig, spec: ViTSpec) -> tuple[int, ...]:
    return tuple(range(spec.n_layers)) if config.heads_layers is None else config.heads_layers


def array_specs(config: ExtractConfig, spec: ViTSpec) -> list[ArraySpec]:
    """The per-sample arrays this config writes (names and dims are the store contract)."""
    dt = config.dtype
    n_layers = len(heads_layers(config, spec))
    h, d, t, n = spec.n_heads, spec.embed_dim, spec.n_tokens, spec.mlp_width
    specs = [
        schema.IMAGE_EMBEDDING.spec((d,), dt),
        schema.DIRECT_EMBEDDING.spec((d,), dt),
        schema.DIRECT_MLPS.spec((n_layers, d), dt),
        schema.DIRECT_HEADS.spec((n_layers, h, d), dt),
        schema.DIRECT_BIAS.spec((d,), dt),
        schema.DIRECT_CLS_TOKEN.spec((n_layers, d), dt),
    ]
    if config.token_layers:
        specs.append(schema.DIRECT_TOKENS.spec((len(config.token_layers), h, t, d), dt))
    for layer in config.second_order_layers:
        later = spec.n_layers - layer - 1
        specs.append(schema.SECOND_ORDER_WEIGHTS.spec((later, h, n), dt, layer=layer))
        if config.ln_convention == "split":
            specs.append(schema.SECOND_ORDER_SHARED.spec((d,), dt, layer=layer))
    for layer in config.activation_layers:
        specs.append(schema.ACTIVATIONS.spec((t, n), dt, layer=layer))
    specs += sample_extras.array_specs(config, spec)
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
    remote = {u.split("://", 1)[0]: u for u in reversed(urls) if "://" in u and not u.startswith("pipe:")}
    for protocol, url in remote.items():
        try:
            fsspec.get_filesystem_class(protocol)
        except ImportError as err:  # s3:// without s3fs, gs:// without gcsfs
            raise DataError(f"cannot read shard {url}: {err} (install it into clipscope's environment)") from None
        except ValueError:
            raise DataError(f"cannot read shard {url}: fsspec knows no {protocol}:// file system") from None
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
            **({"attention": list(config.attention_layers)} if config.attention_layers else {}),
        },
        "ln_convention": config.ln_convention,
    }


def existing_store(config: ExtractConfig) -> RunStore | None:
    """The store at `config.out` opened for writing, or None where there is none yet (a store that is
    there but unreadable still raises)."""
    try:
        return RunStore.open(config.out, "r+", storage_options=config.storage_options or None)
    except StoreError as err:
        if not str(err).startswith("no run store at"):
            raise
        return None


def open_or_create_store(config: ExtractConfig, plan: RunPlan, loaded: LoadedModel) -> RunStore:
    """Create the run's store, or re-open it for a resume after checking it is the same run."""
    options = config.storage_options or None
    attrs = store_attrs(config, plan, loaded)
    store = existing_store(config)
    if store is not None:
        added = check_resumable(store, attrs)
        if added and store.attrs.get(STORE_READY_ATTR):
            logger.info("store %s grows by %d shard(s): %d → %d rows", store.url, added, store.n_rows, plan.n_rows)
            store.grow(plan.n_rows, {k: attrs[k] for k in ("config", "shards", "shard_counts", "row_blocks")})
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
        store.write_result(schema.SECOND_ORDER_DIRECTIONS.path(layer=layer), directions.cpu().numpy(),
                           schema.SECOND_ORDER_DIRECTIONS.dims,
                           {"later_layers": list(range(layer + 1, loaded.spec.n_layers))})
    store.update_attrs({STORE_READY_ATTR: True})
    return store


def shard_identity(url: str) -> str:
    """What a shard URL names, however it was typed: a local file's real path (``file://`` or not,
    relative to any working directory, through symlinks), else the URL itself."""
    if url.startswith("pipe:"):
        return url
    if url.startswith(("file://", "local://")):
        url = url.split("://", 1)[1]
    elif "://" in url:
        return url.rstrip("/")
    return os.path.realpath(os.path.expanduser(url))


def shard_list_difference(stored_urls: list[str], stored_counts: list[int], urls: list[str],
                          counts: list[int]) -> str | None:
    """None when both lists name the same shards with the same counts, else one short line."""
    mine, theirs = [shard_identity(u) for u in stored_urls], [shard_identity(u) for u in urls]
    for i, (a, b) in enumerate(zip(mine, theirs)):
        if a != b:
            return f"shard {i} differs: store has {stored_urls[i]}, this run has {urls[i]}"
    if len(mine) != len(theirs):
        longer, who = (stored_urls, "store") if len(mine) > len(theirs) else (urls, "this run")
        return (f"the store has {len(mine)} shards, this run {len(theirs)} (first extra one, in the {who}: "
                f"{longer[min(len(mine), len(theirs))]})")
    for i, (a, b) in enumerate(zip(stored_counts, counts)):
        if a != b:
            return f"shard {i} ({urls[i]}) holds {b} samples now, {a} when the store was created"
    return None


def check_resumable(store: RunStore, attrs: dict[str, Any]) -> int:
    """Refuse to resume a store with a different run. Shards are compared by what they name (not
    how they were typed), a checkpoint by its sha256 (not its path). A run that only adds shards
    after the store's own (same options, same model, the store's shards first with the same sample
    counts) is accepted: returns how many shards it adds (0 for a plain resume); the store grows."""
    stored = store.attrs
    stored_model, model = stored.get("model", {}), attrs["model"]
    same_checkpoint = model.get("sha256") is not None and stored_model.get("sha256") == model.get("sha256")
    ignored = {"data"} | ({"pretrained"} if same_checkpoint else set())
    problems = config_differences({k: v for k, v in stored.get("config", {}).items() if k not in ignored},
                                  {k: v for k, v in attrs["config"].items() if k not in ignored})
    for key in ("name", "sha256") if same_checkpoint else ("name", "pretrained", "sha256"):
        if stored_model.get(key) != model.get(key):
            problems.append(f"model {key}: store has {stored_model.get(key)!r}, this run has {model.get(key)!r}")
    stored_shards = list(stored.get("shards") or [])
    added = len(attrs["shards"]) - len(stored_shards)
    if added > 0 and not problems:  # appended shards: compare the store's shards with this run's first ones
        shards = shard_list_difference(stored_shards, list(stored.get("shard_counts") or []),
                                       attrs["shards"][:len(stored_shards)],
                                       attrs["shard_counts"][:len(stored_shards)])
    else:
        shards = shard_list_difference(stored_shards, list(stored.get("shard_counts") or []),
                                       attrs["shards"], attrs["shard_counts"])
    if shards:
        problems.append(shards)
    if not problems:
        return max(added, 0)
    # Same shards (or added ones) with other options — e.g. layers added to finished shards — need a
    # new pass over the data: say which command makes it.
    hint = "" if shards else (f"; other options (such as added layers) need a new pass over the data, in a second "
                              f"store: `{second_store_command(attrs['config'], store.url)}`")
    raise StoreError(f"cannot resume {store.url} with a different run: " + "; ".join(problems) + hint)


def second_store_command(config: dict[str, Any], url: str) -> str:
    """The `clipscope extract` command line of run `config` (a store's `config` attribute) into a new
    store beside `url` (`<url>-2`)."""
    import shlex

    parts = ["clipscope", "extract", *map(shlex.quote, config.get("data") or []),
             "--out", shlex.quote(url.rstrip("/") + "-2"),
             "--model", shlex.quote(str(config.get("model"))), "--pretrained", shlex.quote(str(config.get("pretrained")))]
    if str(config.get("pretrained")) == "none" and config.get("seed", 0) != 0:
        parts += ["--seed", str(config["seed"])]
    for flag, key in (("--heads-layers", "heads_layers"), ("--second-order-layers", "second_order_layers"),
                      ("--token-layers", "token_layers"), ("--activation-layers", "activation_layers")):
        if config.get(key):
            parts += [flag, *map(str, config[key])]
    for flag, key, default in (("--ln-convention", "ln_convention", "split"), ("--dtype", "dtype", "float32"),
                               ("--rows-per-chunk", "rows_per_chunk", 256)):
        if config.get(key, default) != default:
            parts += [flag, str(config[key])]
    if config.get("masks"):
        parts += ["--masks", shlex.quote(config["masks"])]
    for flag, key, default in (("--mask-geometry", "mask_geometry", "preprocess"), ("--group-key", "group_key", "group")):
        if config.get(key, default) != default:
            parts += [flag, shlex.quote(str(config[key]))]
    if config.get("token_sum"):
        parts.append("--token-sum")
    if config.get("attention_layers"):
        parts += ["--attention-layers", *map(str, config["attention_layers"])]
    return " ".join(parts)


class ShardExtractor:
    """The per-shard work: decode, preprocess, decompose, write the shard's rows. One per actor."""

    def __init__(self, config: ExtractConfig, loaded: LoadedModel | None = None):
        self.config = config
        self.device = resolve_device(config.device)
        self.loaded = loaded or load_model(config.model, config.pretrained, device="cpu", seed=config.seed)
        self.dtype = compute_dtype(config, self.device)
        self.spec = self.loaded.spec.to(device=self.device, dtype=self.dtype)
        self.request = build_request(config).validated(self.spec)
        self.fold = folding(self.spec, config.ln_convention)
        self.heads_layers = list(heads_layers(config, self.spec))
        self.batch_size = resolve_batch_size(config.batch_size, self.spec, self.request, self.dtype, self.device,
                                             heads_layers=self.heads_layers)
        self.decode_threads = decode_threads(config, self.device)
        self.np_dtype = np.dtype(config.dtype)
        self.extras = sample_extras.SampleExtras.of(config, self.loaded)
        self._store: RunStore | None = None

    # Hooks a subclass (e.g. `clipscope maps`) overrides to extract other arrays with the same driver.
    @classmethod
    def prepare(cls, config: ExtractConfig) -> LoadedModel:
        """Load (and check) what the run extracts with, before anything is written."""
        loaded = load_model(config.model, config.pretrained, device="cpu", seed=config.seed)
        build_request(config).validated(loaded.spec)  # bad layers fail before anything is written
        if config.heads_layers is not None:
            from clipscope.kernels.vit import check_layers

            check_layers(loaded.spec, config.heads_layers, "heads layers")
        if is_random_init(loaded.identity):
            logger.warning("%s", random_init_text(loaded.identity))
        return loaded

    @classmethod
    def open_store(cls, config: ExtractConfig, plan: RunPlan, loaded: LoadedModel) -> RunStore:
        return open_or_create_store(config, plan, loaded)

    def array_specs(self) -> list[ArraySpec]:
        return array_specs(self.config, self.loaded.spec)

    @property
    def input_dtype(self) -> torch.dtype:
        return self.spec.dtype

    def preprocess(self, raw, image) -> torch.Tensor:
        return self.loaded.preprocess(image)

    @property
    def store(self) -> RunStore:
        if self._store is None:
            self._store = RunStore.open(self.config.out, "r+", storage_options=self.config.storage_options or None)
        return self._store

    def _inputs(self, task: ShardTask, shard_errors: list[str], outcome: dict[str, Any]):
        """The shard's raw samples in tar order; its read errors land in shard_errors / outcome."""
        samples = iter_shard_samples(task.url, storage_options=self.config.storage_options or None,
                                     expected_count=task.count)
        try:
            yield from samples
        finally:
            samples.close()
            if samples.error:
                shard_errors.append(samples.error)
                outcome.update(lost=samples.lost, unreadable=samples.unreadable)

    def _prepare(self, task: ShardTask, raw) -> tuple[Any, torch.Tensor | None, str | None]:
        """(raw, image tensor or None, error or None): one sample decoded and preprocessed, on a CPU
        thread of the prefetch queue (`pipelines/data/prefetch.py`) while the forward runs."""
        image, error = decode_or_error(raw)
        tensor = None
        if image is not None:
            try:
                tensor = self.preprocess(raw, image)
            except Exception as err:  # a transform failing on one odd image must not stop the run
                error = f"sample {raw.key}: preprocessing failed: {type(err).__name__}: {err}"
        if error is None and raw.meta_error is not None:
            # The image is good; only its metadata is flagged (the row stays valid).
            error = f"sample {raw.key}: metadata ignored, image kept: {raw.meta_error}"
        if error is not None:
            logger.warning("shard %s: %s", task.url, error)
        return raw, tensor, error

    def process(self, task: ShardTask) -> dict[str, Any]:
        """Extract one shard into its rows; returns its done record. A full or read-only store
        raises `EnvironmentFault` (the run stops: every other shard would fail the same way)."""
        try:
            return self._process(task)
        except OSError as err:
            if err.errno not in ENVIRONMENT_ERRNOS:
                raise
            where = f" ({err.filename})" if err.filename else ""
            raise EnvironmentFault(
                f"writing shard {task.index} into {self.config.out} failed: {err.strerror or err}{where}; "
                "free space or fix permissions (or choose another --out), then rerun the same command to resume"
            ) from err

    def _process(self, task: ShardTask) -> dict[str, Any]:
        started = time.time()
        rpc = self.config.rows_per_chunk
        specs = self.array_specs()
        shapes = {s.name: s.shape_tail for s in specs}
        dtypes = {s.name: np.dtype(s.dtype) for s in specs}  # the run's dtype, masks uint8
        chunks: dict[int, dict[str, np.ndarray]] = {}
        valid = np.zeros(task.capacity, dtype=bool)
        index_rows: list[dict[str, Any]] = []
        shard_errors: list[str] = []
        outcome: dict[str, Any] = {"lost": 0, "unreadable": False}
        token = current_token(self.store.location)  # the run's lock: its holder must outlive every write
        flushed = 0  # chunks [0, flushed) of this block are written

        def chunk(c: int) -> dict[str, np.ndarray]:
            if c not in chunks:
                chunks[c] = {name: np.zeros((rpc, *tail), dtypes[name]) for name, tail in shapes.items()}
            return chunks[c]

        def write_chunk(start: int, arrays: dict[str, np.ndarray], mask: np.ndarray) -> None:
            self._check_writer(task, token)
            self.store.write_rows(start, arrays, mask)

        def flush(upto_row: int) -> None:
            # Whole chunks go to the background writer: the next forwards run while they are written.
            nonlocal flushed
            while (flushed + 1) * rpc <= upto_row:
                rows = slice(flushed * rpc, (flushed + 1) * rpc)
                writer.submit(partial(write_chunk, task.start + rows.start, chunk(flushed), valid[rows].copy()))
                chunks.pop(flushed, None)
                flushed += 1

        def run_batch(images: torch.Tensor, rows: list[int]) -> None:
            # A pinned batch (CUDA) copies asynchronously; the queue decodes the next batches meanwhile.
            out = self._outputs(images.to(self.device, non_blocking=True).to(self.input_dtype))
            for lo, hi in consecutive_runs(rows, rpc):  # one copy per run of consecutive rows in one chunk
                buffer, first = chunk(rows[lo] // rpc), rows[lo] % rpc
                for name, values in out.items():
                    buffer[name][first:first + hi - lo] = values[lo:hi]

        n_seen = 0
        batches = prefetch_batches(self._inputs(task, shard_errors, outcome), batch_size=self.batch_size, depth=2,
                                   transform=lambda raw: self._prepare(task, raw), image_of=lambda item: item[1],
                                   threads=self.decode_threads, pin_memory=self.device.type == "cuda")
        # A failure stops the decoding threads and drops the waiting chunk writes: the retry rewrites them.
        with BackgroundWriter(depth=2) as writer, closing(batches):
            for batch in batches:
                for raw, tensor, error in batch.items:
                    row = raw.index_in_shard
                    n_seen = row + 1
                    valid[row] = tensor is not None
                    index_rows.append({"row": task.start + row, "key": raw.key, "shard": task.url,
                                       "shard_index": task.index, "label": raw.label, "caption": raw.caption,
                                       "error": error, "group": self.extras.group(raw)})
                    if tensor is not None:
                        for name, value in self.extras.rows(raw).items():  # masks: no forward needed
                            chunk(row // rpc)[name][row % rpc] = value
                if batch.images is not None:
                    rows = [batch.items[p][0].index_in_shard for p in batch.positions]
                    run_batch(batch.images, rows)
                    flush(rows[-1] + 1)  # every row before it is final: whole chunks up to it can be written
            if outcome["unreadable"]:
                # Nothing of it was read and no row was written: a failed shard, not a done one.
                raise UnreadableShardError(f"{task.url} is {shard_errors[0]}")
            flush(task.capacity)
        self.store.write_samples_part(task.index, index_rows)
        n_valid = int(valid.sum())
        return {
            "index": task.index, "url": task.url, "start": task.start, "capacity": task.capacity,
            "count": n_seen, "expected": task.count, "valid": n_valid,
            "errors": n_seen - n_valid + len(shard_errors), "shard_errors": shard_errors,
            "lost": outcome["lost"], "forward": this_forward(self.device, self.dtype),
            "seconds": round(time.time() - started, 3), "host": socket.gethostname(),
            "checksum": self.store.rows_checksum(task.start, task.capacity),
        }

    def _check_writer(self, task: ShardTask, token: str | None) -> None:
        """Stop writing when the run that holds the store's lock is gone (its driver was killed, or
        another run took the store over): a worker outliving its driver must not touch the rows."""
        if token is None:
            return  # no lock on the store (a direct call outside a run)
        why = writer_gone(self.store.location, token)
        if why is not None:
            raise WriterGoneError(f"stopped writing shard {task.index} into {self.store.url}: {why}")

    def _outputs(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        out = store_arrays(decompose(self.spec, images, self.request, fold=self.fold), self.heads_layers)
        return {name: to_output(value, self.np_dtype) for name, value in out.items()}


def consecutive_runs(rows: Sequence[int], rows_per_chunk: int) -> list[tuple[int, int]]:
    """[lo, hi) index ranges of `rows` (increasing) holding consecutive rows of one chunk each."""
    runs, lo = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[i - 1] + 1 or rows[i] // rows_per_chunk != rows[lo] // rows_per_chunk:
            runs.append((lo, i))
            lo = i
    return runs


def this_forward(device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """What decides a forward's float bytes besides the inputs: the device, on CPU torch's thread
    count (a 1-CPU Ray actor computes with 1 thread, this process with all of its), and the forward's
    dtype when it is not float32 (records written before `--compute-dtype` existed have none)."""
    forward = {"device": device.type, "threads": torch.get_num_threads() if device.type == "cpu" else None}
    return forward if dtype == torch.float32 else {**forward, "dtype": dtype_name(dtype)}


class ForwardCheck:
    """Refuses to mix forwards of different thread counts (or devices) in one store: rows of such a
    mix match neither an uninterrupted in-process run nor an uninterrupted Ray run."""

    def __init__(self, url: str, done_records: list[dict[str, Any]]):
        seen = {json.dumps(r["forward"], sort_keys=True) for r in done_records if r.get("forward")}
        self.url = url
        self.expected = json.loads(next(iter(seen))) if len(seen) == 1 else None  # none, or an old mix

    def check(self, forward: dict[str, Any] | None, what: str) -> None:
        if forward is None:
            return
        if self.expected is None:
            self.expected = forward
            return
        if forward != self.expected:
            raise StoreError(
                f"{what} computes on {_describe_forward(forward)}, the done shards of {self.url} on "
                f"{_describe_forward(self.expected)}: their rows would match neither run; resume the way the "
                "store was started (in-process, or with --workers), with the same --compute-dtype, or with the same "
                "thread count (OMP_NUM_THREADS / torch.set_num_threads)"
            )


def _describe_forward(forward: dict[str, Any]) -> str:
    threads = forward.get("threads")
    return (forward.get("device", "?") + ("" if threads is None else f" with {threads} torch thread(s)")
            + (f" in {forward['dtype']}" if forward.get("dtype") else ""))


@dataclass(frozen=True)
class ShardLoss:
    """A done shard of which some samples were not read: how many (None: unknown) and why."""

    index: int
    url: str
    lost: int | None
    reason: str

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ShardLoss | None:
        errors = record.get("shard_errors") or []
        if not errors:
            return None
        return cls(int(record["index"]), str(record.get("url")), record.get("lost"), "; ".join(errors))

    def describe(self) -> str:
        lost = "an unknown number of samples" if self.lost is None else f"{self.lost} sample(s)"
        return f"shard {self.index} {self.url}: {lost} lost: {self.reason}"


@dataclass
class ExtractSummary:
    store: str
    done: int
    skipped: int
    failed: list[tuple[int, str]]
    images: int
    seconds: float
    partial: list[ShardLoss] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No shard failed and no sample of a done shard was lost."""
        return not self.failed and not self.partial


def run_extract(config: ExtractConfig, *, progress_display: str = "auto",
                extractor_class: type[ShardExtractor] = ShardExtractor,
                executor: Executor | None = None) -> ExtractSummary:
    """Plan, create/resume the store, extract every unfinished shard, merge the sample index.

    `extractor_class` is the per-shard worker (constructed as ``cls(config)`` once per Ray actor,
    or ``cls(config, loaded)`` in-process); a subclass can change decoding or add outputs.
    `executor` says where the shards run (a Ray executor: a pool of actors on its Ray); None opens
    the one `config.workers` / `config.address` (or RAY_ADDRESS) name, as every command does.
    """
    started = time.time()
    # Cheap checks of the machine first: nothing is planned, loaded or written when they fail.
    check_writable_target(config.out, "--out", folder=True)
    device = resolve_device(config.device)
    if not config.uses_ray or config.device == "cpu":  # Ray actors may see a GPU the driver lacks
        compute_dtype(config, device)  # float16 on CPU is refused here, before anything is written
    plan = plan_run(config)
    loaded = extractor_class.prepare(config)
    if executor is None:
        with open_executor(config.workers, config.address, progress=progress_display) as opened:
            return _run_on(opened, config, plan, loaded, started, progress_display, extractor_class)
    return _run_on(executor, config, plan, loaded, started, progress_display, extractor_class)


def _run_on(executor: Executor, config, plan, loaded, started, progress_display, extractor_class) -> ExtractSummary:
    if executor.is_ray:
        from clipscope.cluster.runtime import require_shared_store

        require_shared_store(config.out, allow_local=config.allow_local_store)
        _require_readable_by_workers(plan.urls, config.allow_local_store)
    return _run(config, plan, loaded, started, progress_display, executor, extractor_class)


def _run(config, plan, loaded, started, progress_display, executor: Executor, extractor_class) -> ExtractSummary:
    options = config.storage_options or None
    with acquire_lock(config.out, options, owner="clipscope extract"):
        store = extractor_class.open_store(config, plan, loaded)
        records = store.shard_records(stage="extract")
        done = {i for i, r in records.items() if r.get("status") == "done"}
        failed_before = {i: r for i, r in records.items() if r.get("status") == "failed"}
        pending = [t for t in plan.tasks if t.index not in done and (config.retry_failed or t.index not in failed_before)]
        skipped_failed = [] if config.retry_failed else [(i, r.get("error", "")) for i, r in failed_before.items()]
        logger.info("store %s: %d shards, %d done, %d to extract, %d rows", store.url, len(plan.tasks),
                    len(done), len(pending), plan.n_rows)
        failures: list[tuple[int, str]] = []
        forward = ForwardCheck(store.url, [records[i] for i in done])
        if not executor.is_ray and pending:
            device = resolve_device(config.device)
            forward.check(this_forward(device, compute_dtype(config, device)), "this in-process run")

        def on_result(task: ShardTask, record: dict[str, Any]) -> None:
            forward.check(record.get("forward"), f"shard {task.index}")  # before its done record
            store.mark_shard_done(task.index, record)
            loss = ShardLoss.from_record(record)
            if loss is not None:
                logger.warning("%s", loss.describe())

        def on_failure(task: ShardTask, error: str) -> None:
            failures.append((task.index, error))
            store.mark_shard_failed(task.index, {"index": task.index, "url": task.url, "error": error})
            logger.error("shard %d failed: %s", task.index, error)

        progress = Progress("extract", unit="img", display=progress_display)
        if executor.is_ray:
            from clipscope.cluster.shard_pool import run_shards

            use_gpu = config.device == "cuda" or (config.device == "auto" and _cluster_has_gpus())
            run_shards(pending, _ExtractorFactory(config, extractor_class),
                       num_workers=None if use_gpu else config.workers,
                       use_gpu=use_gpu,
                       on_result=on_result, on_failure=on_failure, progress=progress)
        else:
            _run_local(extractor_class(config, loaded), pending, on_result, on_failure, progress)
        store.merge_samples()
    finished = [r for r in store.shard_records(stage="extract").values() if r.get("status") == "done"]
    images = sum(r.get("count", 0) for r in finished)
    partial = [loss for loss in map(ShardLoss.from_record, finished) if loss is not None]
    return ExtractSummary(store.url, len(pending) - len(failures), len(done), failures + skipped_failed,
                          images, round(time.time() - started, 2), partial)


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
    """Shards one after another, with the Ray pool's retry policy (`cluster.shard_pool.retry_decision`)."""
    from clipscope.cluster.shard_pool import MAX_ATTEMPTS, retry_decision

    progress.start(sum(t.count for t in pending), len(pending))
    try:
        for task in pending:
            for attempt in range(1, MAX_ATTEMPTS + 1):
                try:
                    record = extractor.process(task)
                except Exception as err:  # noqa: BLE001 - any failure of one shard is that shard's
                    decision = retry_decision(err)
                    if decision == "abort":
                        raise
                    # The same texts as the Ray pool's: "TypeName: message" for a retried error.
                    text = str(err) if decision == "fail" else f"{type(err).__name__}: {err}"
                    if decision == "retry" and attempt < MAX_ATTEMPTS:
                        logger.warning("shard %d attempt %d/%d failed: %s", task.index, attempt, MAX_ATTEMPTS, text)
                        progress.retry()
                        continue
                    if decision == "retry":
                        text = f"failed after {attempt} attempt(s); last error: {text}"
                    on_failure(task, text)
                    progress.fail(expected=task.count)
                    break
                on_result(task, record)
                progress.advance(record["count"], expected=task.count)
                break
    finally:
        progress.close()
