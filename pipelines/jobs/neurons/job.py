"""Sparse text decomposition of every neuron's second-order PC (second-order paper §4).

`run` approximates the unit PC r_n of every neuron of a layer (`reductions/second_order/
layer_{l}/pc`, written by the second-order job) by m atoms of a text dictionary with orthogonal
matching pursuit, no intercept (sklearn `orthogonal_mp_gram` semantics), for several m from one
greedy run at the largest m (`kernels.omp.dictionary_omp_path`). The dictionary is the pool's unit text
embeddings (cached in the store), or with `reference_preprocessing` the reference code's
dictionary (`kernels.omp.reference_dictionary`); the preprocessing changes the atoms only: the
target stays r_n and the reconstruction r̂_n = Σ γ_j X_j is a vector of the same space (the
reference reconstructs exactly so). Neurons are solved in blocks, spread over the executor's tasks.

Then (`settings.accuracy`) the paper's Fig. 4: zero-shot accuracy when all neurons of the layer
are replaced at once by their reconstruction (see `_reconstruction_accuracy` for the definition).
What is stored where: result.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from clipscope.cluster.executor import Executor, LocalExecutor
from clipscope.errors import ConfigError, StoreError
from clipscope.kernels.omp import dictionary_omp_path, path_reconstruction, reference_dictionary
from clipscope.kernels.zero_shot import count_correct
from clipscope.pipelines.jobs.means.job import current_means, reduce_rows, row_blocks
from clipscope.pipelines.jobs.neurons.result import ReconstructionAccuracy, Result, accuracy_name
from clipscope.pipelines.jobs.neurons.settings import Settings
from clipscope.pipelines.models.loading import LoadedModel
from clipscope.pipelines.texts.embedding_cache import cached_text_embeddings, embeddings_key
from clipscope.pipelines.texts.pools import TextPool, pool_hash
from clipscope.storage import schema
from clipscope.storage.layout import row_slices
from clipscope.storage.results import RESULT_ATTR, Reduction, begin_reduction, settings_digest
from clipscope.storage.store import RunStore

NEURONS_PER_BLOCK = 128  # bounds the [sparsity, block, embed] reconstructions


def run(store: RunStore, settings: Settings, executor: Executor | None = None, *,
        loaded: LoadedModel | None = None) -> Result:
    """OMP of every neuron's PC of `settings.layer` on the pool's texts, written to `reductions/omp/layer_{l}/`
    whole; then, with `settings.accuracy`, the reconstruction accuracy added to that group.

    A rerun with the same pool, m, dictionary and PCs on the same extraction reads the OMP back (unless
    `force`); likewise the accuracy for the same task and OMP. Text embeddings come from the store's cache,
    filled when missing with `loaded` (default: the store's model, loaded then).
    """
    layer = settings.layer
    pool = TextPool(settings.pool_name, list(settings.texts), pool_hash(list(settings.texts)))
    pcs = read_pcs(store, layer)
    sparsities = m_values(settings.m, len(pool.texts))
    record = {"layer": layer, "pool_hash": pool.hash, "m": list(sparsities),
              "reference_preprocessing": settings.reference_preprocessing, "pc_sha256": pcs_digest(pcs)}
    with begin_reduction(store, "neurons", record, allow_incomplete=settings.allow_incomplete,
                         force=settings.force) as reduction:
        if reduction.is_current(schema.OMP.path(layer=layer)):
            result = Result.of_layer(store, layer)
        else:
            result = _solve(reduction, layer, pool, pcs, sparsities, settings, executor, loaded)
            result.write(reduction)
    if settings.accuracy:
        result = dataclasses.replace(result, accuracy=_reconstruction_accuracy(store, settings, executor, loaded))
    return result


def second_order_command(store: RunStore, layer: int) -> str:
    return f"clipscope second-order {store.url} --layer {layer}"


def read_pcs(store: RunStore, layer: int) -> np.ndarray:
    """The unit PC per neuron [neuron embed] the second-order job stored for `layer`."""
    name = f"{schema.SECOND_ORDER.path(layer=layer)}/pc"
    if name not in store.array_names():
        raise StoreError(f"{store.url} has no {name}; run `{second_order_command(store, layer)}` first")
    pcs = store.read_result(name).astype(np.float64)
    if pcs.ndim != 2 or not np.isfinite(pcs).all():
        raise StoreError(f"{name} must be a finite [neuron, embed] array, got shape {pcs.shape}")
    return pcs


def optional_second_order(store: RunStore, layer: int, name: str) -> np.ndarray | None:
    """`reductions/second_order/layer_{l}/<name>` if the second-order job stored it."""
    full = f"{schema.SECOND_ORDER.path(layer=layer)}/{name}"
    return store.read_result(full) if full in store.array_names() else None


def pcs_digest(pcs: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pcs, np.float64).tobytes()).hexdigest()[:16]


def m_values(m: tuple[int, ...], pool_size: int) -> tuple[int, ...]:
    """The sparsities to solve: each of `m` (validated by Settings) capped by the pool size, sorted, without repeats."""
    return tuple(sorted({min(value, pool_size) for value in m}))


def text_dictionary(embeddings: np.ndarray, reference_preprocessing: bool) -> np.ndarray:
    """The atoms [text embed] in float64: the unit text embeddings, or the reference dictionary."""
    atoms = torch.from_numpy(np.asarray(embeddings, np.float64))
    return (reference_dictionary(atoms) if reference_preprocessing else atoms).numpy()


@dataclass(frozen=True)
class _OMPTask:
    """Picklable: OMP path of a range of neurons (one Ray task), solved in fixed-size blocks."""

    atoms: np.ndarray  # [text embed] float64
    pcs: np.ndarray  # [neuron embed] float64
    sparsities: tuple[int, ...]

    def __call__(self, neurons: slice) -> dict[str, np.ndarray]:
        # One greedy run at the largest m for every neuron of the range (every smaller m read off it);
        # the Gram rows of the picked atoms are formed once and shared by all of them.
        x = torch.from_numpy(self.atoms)
        y = torch.from_numpy(self.pcs[neurons])
        path = dictionary_omp_path(x, y, self.sparsities)
        residual = []
        for block in row_slices(y.shape[0], NEURONS_PER_BLOCK):
            recon = path_reconstruction(x, path.support[block], path.coef[:, block])
            residual.append((y[block][None] - recon).norm(dim=-1).T.numpy())
        return {"support": path.support.numpy(), "coefs": path.coef.numpy(),
                "residual_norm": np.concatenate(residual)}


def _solve(reduction: Reduction, layer: int, pool: TextPool, pcs: np.ndarray, sparsities: tuple[int, ...],
           settings: Settings, executor: Executor | None, loaded: LoadedModel | None) -> Result:
    store = reduction.store
    embeddings = cached_text_embeddings(store, pool.texts, pool_name=pool.name, loaded=loaded)
    if embeddings.shape[1] != pcs.shape[1]:
        raise StoreError(f"text embeddings have {embeddings.shape[1]} dims but the PCs of layer {layer} "
                         f"have {pcs.shape[1]}")
    task = _OMPTask(text_dictionary(embeddings, settings.reference_preprocessing), pcs, sparsities)
    executor = executor if executor is not None else LocalExecutor()
    chunks = row_slices(pcs.shape[0], settings.neurons_per_task)
    parts = executor.fan_out(task, chunks, desc="neurons OMP", unit="neurons",
                             sizes=[chunk.stop - chunk.start for chunk in chunks])
    return Result(
        layer=layer,
        support=np.concatenate([p["support"] for p in parts]).astype(np.int64),
        coefs=np.concatenate([p["coefs"] for p in parts], axis=1),
        residual_norm=np.concatenate([p["residual_norm"] for p in parts]),
        m=sparsities,
        attrs={"pool": pool.name, "pool_hash": pool.hash, "n_texts": len(pool.texts),
               "texts_key": embeddings_key(pool.texts, store.info.model.to_dict()), "m": list(sparsities),
               "preprocessing": "reference" if settings.reference_preprocessing else "none",
               "pc_sha256": pcs_digest(pcs)},
    )


def reconstructions(store: RunStore, layer: int) -> tuple[Result, np.ndarray, np.ndarray]:
    """(the stored decomposition, the PCs [neuron embed], r̂ [m neuron embed]) of `layer`."""
    result = Result.of_layer(store, layer)
    pcs = read_pcs(store, layer)
    if pcs_digest(pcs) != result.attrs["pc_sha256"]:
        raise StoreError(f"the PCs of layer {layer} changed since its OMP ran; rerun "
                         f"`clipscope neurons {store.url} --layer {layer}`")
    name = schema.TEXT_EMBEDDINGS.path(key=result.attrs["texts_key"])
    if name not in store.array_names():
        raise StoreError(f"{store.url} lost the text embeddings {name} of the OMP of layer {layer}; rerun it")
    atoms = text_dictionary(store.read_result(name), result.attrs["preprocessing"] == "reference")
    recon = path_reconstruction(torch.from_numpy(atoms), torch.from_numpy(result.support),
                                torch.from_numpy(result.coefs))
    return result, pcs, recon.numpy()


# ----------------------------------------------------------------------------------------------
# Reconstruction accuracy (paper Fig. 4)


@dataclass(frozen=True)
class _ReplaceBlock:
    """Picklable map function: per row block, the image embeddings with every neuron's centred
    second-order effect replaced, and the number of correct zero-shot predictions for each variant."""

    store: RunStore
    layer: int
    directions: np.ndarray  # D [later_layer head neuron embed] float64
    along_pc: np.ndarray  # D_n r_n [later_layer head neuron]
    pcs: np.ndarray  # r_n [neuron embed]
    variants: np.ndarray  # [variant neuron embed]: what replaces r_n
    q_mean: np.ndarray  # [later_layer head neuron]
    shared_mean: np.ndarray | None  # [embed]
    weights: np.ndarray  # zero-shot classifier [embed class]
    classes: np.ndarray  # [sample] class or −1

    def embeddings(self, rows: slice) -> tuple[np.ndarray, np.ndarray]:
        """(valid mask of the block, [1 + variant, valid sample, embed]: the original embedding first)."""
        valid = self.store.read_valid(rows)
        emb = self.store.read(schema.IMAGE_EMBEDDING.path(), rows)[valid].astype(np.float64)
        weights = schema.SECOND_ORDER_WEIGHTS.path(layer=self.layer)
        dq = self.store.read(weights, rows)[valid].astype(np.float64) - self.q_mean
        n_samples, n_neurons = dq.shape[0], dq.shape[-1]
        # Σ_n (φ_n − φ̄_n) and x_n = ⟨φ_n − φ̄_n, r_n⟩, with φ_n − φ̄_n = D_nᵀ(q_n − q̄_n) + (s − s̄)
        total = dq.reshape(n_samples, -1) @ self.directions.reshape(-1, self.directions.shape[-1])
        x = np.einsum("slhn,lhn->sn", dq, self.along_pc)
        if self.shared_mean is not None:
            shared = schema.SECOND_ORDER_SHARED.path(layer=self.layer)
            ds = self.store.read(shared, rows)[valid].astype(np.float64) - self.shared_mean
            total += n_neurons * ds
            x += ds @ self.pcs.T
        kept = emb - total
        return valid, np.stack([emb, *(kept + x @ v for v in self.variants)])

    def __call__(self, rows: slice) -> dict[str, np.ndarray]:
        valid, embeddings = self.embeddings(rows)
        classes = self.classes[rows][valid]
        correct = count_correct(torch.from_numpy(embeddings), torch.from_numpy(self.weights),
                                torch.from_numpy(classes)).numpy().astype(np.int64)
        return {"labelled": int((classes >= 0).sum()), "correct": correct}


def _add(a: dict, b: dict) -> dict:
    return {key: a[key] + b[key] for key in a}


def replace_block(store: RunStore, layer: int, weights: np.ndarray, classes: np.ndarray, *,
                  executor: Executor | None = None) -> tuple[_ReplaceBlock, tuple[int, ...]]:
    """The map function of `reconstruction_accuracy` (variants: r, then r̂ for each m) and the m values."""
    result, pcs, recon = reconstructions(store, layer)
    weights_name, shared = schema.SECOND_ORDER_WEIGHTS.path(layer=layer), schema.SECOND_ORDER_SHARED.path(layer=layer)
    names = [weights_name] + ([shared] if shared in store.array_names() else [])
    means = current_means(store, names, executor=executor)
    directions_name = schema.SECOND_ORDER_DIRECTIONS.path(layer=layer)
    directions = store.read_result(directions_name).astype(np.float64)
    if directions.shape[2:] != pcs.shape:
        raise StoreError(f"{directions_name} {directions.shape} does not fit the PCs {pcs.shape}")
    block = _ReplaceBlock(
        store=store, layer=layer, directions=directions, along_pc=np.einsum("lhne,ne->lhn", directions, pcs),
        pcs=pcs, variants=np.concatenate([pcs[None], recon]), q_mean=means[names[0]],
        shared_mean=means.get(shared), weights=weights, classes=classes,
    )
    return block, result.m


def _reconstruction_accuracy(store: RunStore, settings: Settings, executor: Executor | None,
                             loaded: LoadedModel | None) -> ReconstructionAccuracy:
    """Zero-shot accuracy when every neuron of `layer` is replaced by its sparse text reconstruction.

    The paper (§3.3, §4) approximates φ_n(I) ≈ x_n(I) r_n + b_n with b_n = φ̄_n (mean over the
    dataset) and x_n(I) = ⟨φ_n(I) − φ̄_n, r_n⟩ the projection on the PC, then replaces r_n by its
    sparse reconstruction r̂_n. So, for all neurons n of the layer at once and every image,
        M'(I) = M(I) − Σ_n (φ_n(I) − φ̄_n) + Σ_n ⟨φ_n(I) − φ̄_n, r_n⟩ · r̂_n,
    with r̂_n the m-atom OMP reconstruction for each m, and r̂_n = r_n for the PC1-only reference.
    (The reference code projects on r̂_n instead of r_n; the paper's text defines x_n with r_n.)
    φ is never formed: φ_n − φ̄_n = D_nᵀ(q_n − q̄_n) + (s − s̄), so the sum over neurons is one
    product of the centred q with D and the projections are ⟨q_n − q̄_n, D_n r_n⟩ + ⟨s − s̄, r_n⟩
    (s: the `split` convention's shared term). Means are over the valid rows; accuracy over the
    valid rows that have a class under `task` (default: `zero_shot.default_task(store)`).
    """
    from clipscope.pipelines.texts.zero_shot import classifier, default_task, get_task, store_classes

    layer = settings.layer
    zero_shot = get_task(settings.task or default_task(store))
    name = accuracy_name(layer)
    group_attrs = store.result_group_attrs(schema.OMP.path(layer=layer)) or {}
    record = {"layer": layer, "task": zero_shot.name, "prompts": settings_digest(zero_shot.prompts),
              "omp": settings_digest(group_attrs.get(RESULT_ATTR))}
    with begin_reduction(store, "neurons accuracy", record, allow_incomplete=settings.allow_incomplete,
                         force=settings.force) as reduction:
        if reduction.is_current_array(name):
            return ReconstructionAccuracy.read(store, layer)
        classes = store_classes(store, zero_shot)
        if not (classes >= 0).any():
            raise ConfigError(f"no valid sample of {store.url} has a class under the zero-shot task "
                              f"{zero_shot.name!r}; skip the accuracy with accuracy=False (--no-accuracy)")
        weights = classifier(store, zero_shot, loaded)
        block, sparsities = replace_block(store, layer, weights, classes, executor=executor)
        counts = reduce_rows(executor, store, row_blocks(store), block, _add, desc="neurons accuracy")
        rates = counts["correct"] / counts["labelled"]
        out = ReconstructionAccuracy(zero_shot.name, sparsities, rates[2:], float(rates[1]), float(rates[0]),
                                     int(counts["labelled"]))
        if store.mode == "r+":
            out.write(reduction, layer)
    return out
