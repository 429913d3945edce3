"""`clipscope maps`: activation maps of any torch vision model over the same shards as `extract`.

The driver is extraction's own (`pipelines.jobs.extract.job.run_extract` with `MapsExtractor` as the
per-shard worker): the same planner (so stores of different models over the same shards are row-aligned),
writer lock, Ray actors, per-shard done markers, resume and corrupt-sample handling. Only what a shard
computes differs: the zoo network's hooked layers, written to ``maps/{layer}/values[sample, unit, y, x]``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import torch

from clipscope import __version__
from clipscope.errors import ConfigError, StoreError, literal
from clipscope.pipelines.jobs.extract import job as extract_job
from clipscope.pipelines.jobs.extract.sample_extras import SampleExtras
from clipscope.pipelines.jobs.extract.job import (
    ExtractSummary,
    existing_store,
    RunPlan,
    ShardExtractor,
    resolve_device,
    run_extract,
    shard_list_difference,
)
from clipscope.pipelines.jobs.maps.settings import MapsConfig
from clipscope.pipelines.jobs.maps.zoo import Network, Tap, build_network, file_sha256, model_inputs
from clipscope.storage import schema
from clipscope.storage.layout import ArraySpec, validate_array_name
from clipscope.storage.lock import LOCK_FILE
from clipscope.storage.store import RunStore

logger = logging.getLogger(__name__)

STORE_READY_ATTR = "maps_store_ready"
# Result fields added after maps stores were first written: a store without one was made with its default.
LATER_FIELD_DEFAULTS = {"unit_chunk": None}


@dataclasses.dataclass
class ZooModel:
    """A built zoo network with its hooked layers and their map shapes (C, h, w)."""

    network: Network
    layers: tuple[str, ...]
    shapes: dict[str, tuple[int, int, int]]
    identity: dict[str, Any]


def layer_array(layer: str) -> str:
    name = schema.MAPS.path(layer=layer)
    try:
        validate_array_name(name)
    except ConfigError:
        raise ConfigError(f"{{layers}}: {literal(repr(layer))} cannot name a store group (letters, digits, '_', '.', "
                          "'-')", parameters=("layers",)) from None
    return name


def build_zoo_model(config: MapsConfig) -> ZooModel:
    with torch.random.fork_rng(devices=[]):
        network = build_network(config.zoo, seed=config.seed, checkpoint=config.checkpoint)
    network.module.eval()
    layers = tuple(config.layers) or network.layers
    if not layers:
        raise ConfigError(f"{{layers}}: {literal(config.zoo)} has no default layers; name the modules to hook",
                          parameters=("layers",))
    for layer in layers:
        layer_array(layer)
    tap = Tap(network, layers)
    probe = probe_input(network, config.geometry)
    shapes = {name: tuple(int(s) for s in value.shape[1:]) for name, value in tap.capture(probe[None]).items()}
    # `pretrained`: the weights (a random init says "none", so readers warn as for a random-init CLIP)
    identity = {"name": config.zoo, "pretrained": config.checkpoint or network.description.pop("weights", "none"),
                "seed": config.seed if config.checkpoint is None else None,
                "checkpoint": config.checkpoint, "sha256": None if config.checkpoint is None
                else file_sha256(config.checkpoint), **network.description}
    for handle in tap._handles:
        handle.remove()
    return ZooModel(network, layers, shapes, identity)


def probe_input(network: Network, geometry: int) -> torch.Tensor:
    """A zero input of the network's kind (to learn the layers' map shapes before anything is written)."""
    from PIL import Image

    if network.sample_input is not None:
        return torch.zeros(network.input_channels, geometry, geometry)
    return model_inputs(network, None, Image.new("RGB", (geometry, geometry)), geometry)


def maps_attrs(config: MapsConfig, plan: RunPlan, zoo: ZooModel) -> dict[str, Any]:
    return {
        "config": config.result_dict(),
        "model": zoo.identity,
        "geometry": {"size": config.geometry, "resize": "shorter side, bicubic", "crop": "centre",
                     "input_size": list(zoo.network.input_size), "mean": list(zoo.network.mean),
                     "std": list(zoo.network.std)},
        "maps": {"layers": list(zoo.layers), "shapes": {k: list(v) for k, v in zoo.shapes.items()}},
        "code_version": __version__,
        "shards": list(plan.urls),
        "shard_counts": list(plan.counts),
        "row_blocks": [[t.start, t.capacity] for t in plan.tasks],
    }


def map_specs(config: MapsConfig, zoo: ZooModel) -> list[ArraySpec]:
    """One array per layer; with `unit_chunk`, zarr shards of whole row chunks holding inner chunks of
    `unit_chunk` units, so a Rosetta tile decodes only its own units."""
    specs = []
    for layer in zoo.layers:
        spec = schema.MAPS.spec(zoo.shapes[layer], config.dtype, layer=layer)
        if config.unit_chunk:
            c, h, w = zoo.shapes[layer]
            spec = dataclasses.replace(spec, inner_chunk_tail=(min(config.unit_chunk, c), h, w))
        specs.append(spec)
    return specs


def open_maps_store(config: MapsConfig, plan: RunPlan, zoo: ZooModel) -> RunStore:
    """Create the maps store, or re-open it for a resume after checking it is the same run."""
    options = config.storage_options or None
    attrs = maps_attrs(config, plan, zoo)
    store = existing_store(config)
    if store is not None:
        stored = {**dict(store.attrs), "config": {**LATER_FIELD_DEFAULTS, **(store.attrs.get("config") or {})}}
        problems = [f"{key}: store has {stored.get(key)!r}, this run has {attrs[key]!r}"
                    for key in ("config", "geometry", "maps") if stored.get(key) != attrs[key]]
        if store.attrs.get("model", {}).get("sha256") != zoo.identity.get("sha256"):
            problems.append("model checkpoint differs (sha256)")
        shards = shard_list_difference(list(store.attrs.get("shards") or []),
                                       list(store.attrs.get("shard_counts") or []), attrs["shards"],
                                       attrs["shard_counts"])
        if shards:
            problems.append(shards)
        if problems:
            raise StoreError(f"cannot resume {store.url} with a different maps run: {problems[0]}")
        if store.attrs.get(STORE_READY_ATTR) or store.shard_records(stage="extract"):
            return store
        logger.warning("store %s was left half-created by a killed run; creating it again", store.url)
        for name in store.location.list_names():
            if name != LOCK_FILE:
                store.location.fs.rm(store.location.path(name), recursive=True)
    store = RunStore.create(config.out, arrays=map_specs(config, zoo), n_rows=plan.n_rows,
                            rows_per_chunk=config.rows_per_chunk, attrs=attrs, storage_options=options)
    store.update_attrs({STORE_READY_ATTR: True})
    return store


class MapsExtractor(ShardExtractor):
    """The per-shard work of `clipscope maps`: decode, field of view, forward with hooks, write the maps."""

    def __init__(self, config: MapsConfig, loaded: ZooModel | None = None):
        self.config = config
        self.device = resolve_device(config.device)
        self.loaded = loaded or build_zoo_model(config)
        self.loaded.network.module.to(self.device)
        self.tap = Tap(self.loaded.network, self.loaded.layers)
        self.np_dtype = np.dtype(config.dtype)
        self._store: RunStore | None = None
        # what extraction's shard loop reads besides the hooks above (a zoo forward is float32)
        self.dtype = torch.float32
        self.batch_size = config.batch_size if isinstance(config.batch_size, int) else 32
        self.decode_threads = extract_job.decode_threads(config, self.device)
        self.extras = SampleExtras(None, config.group_key)

    @classmethod
    def prepare(cls, config: MapsConfig) -> ZooModel:
        if not isinstance(config, MapsConfig):
            raise ConfigError(f"MapsExtractor runs a MapsConfig, got {type(config).__name__}")
        return build_zoo_model(config)

    @classmethod
    def open_store(cls, config: MapsConfig, plan: RunPlan, loaded: ZooModel) -> RunStore:
        return open_maps_store(config, plan, loaded)

    def array_specs(self) -> list[ArraySpec]:
        return map_specs(self.config, self.loaded)

    @property
    def input_dtype(self) -> torch.dtype:
        return torch.float32

    def preprocess(self, raw, image) -> torch.Tensor:
        return model_inputs(self.loaded.network, raw, image, self.config.geometry)

    def _outputs(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        maps = self.tap.capture(images)
        return {layer_array(name): value.cpu().numpy().astype(self.np_dtype) for name, value in maps.items()}


def run_maps(config: MapsConfig, *, progress_display: str = "auto", executor=None) -> ExtractSummary:
    """Plan, create/resume the maps store, compute every unfinished shard (extraction's driver)."""
    return run_extract(config, progress_display=progress_display, extractor_class=MapsExtractor, executor=executor)
