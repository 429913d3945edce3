"""Rank-1 PCA of second-order effects in q-space (second-order paper §3.3, reference semantics).

For neuron n and image I the second-order effect is
    φ_n(I) = D_nᵀ q_n(I) + shared_scale · shared(I)
with q_n(I) ∈ R^P (P = later layers × heads, stored per image), D_n ∈ R^{P×E} fixed, and an
optional per-image term shared(I) ∈ R^E common to all neurons of the layer (`split` convention).
Centred effects are linear in the stored data: φ_n − φ̄_n = D_nᵀ(q_n − q̄_n) + scale·(s − s̄).

Reference procedure (compute_pcas.py): centre φ_n over all images, take the k images with the
largest centred norm, first right singular vector of those k rows (no re-centring), sign chosen
so that most of the k projections are positive. Here φ is never materialised:

* `neuron_factors`: one thin QR per neuron, D_nᵀ = U_n T_n (U_n: E×r orthonormal, T_n: r×P,
  r = min(P, E)). Then ‖D_nᵀ q‖ = ‖T_n q‖, so norms cost O(P²) per (image, neuron) instead of
  O(P·E), and the Gram matrix G_n = D_n D_nᵀ = T_nᵀ T_n is never squared again.
* `rank1_pc`: for the k×P rows Q of the top-k images, Φ = Q D_n = (Q T_nᵀ) U_nᵀ, so the right
  singular vectors of Φ are U_n times those of the small k×r matrix Q T_nᵀ — an SVD of the data
  itself, not an eigen-decomposition of ΦᵀΦ, so the accuracy of the direction is not lost to
  squaring the condition number. A shared term adds its component outside span(U_n) as up to k
  extra orthonormal columns (a k×(r+k) problem).
* `TopK`: streaming top-k per neuron, associative and order-independent (ties by lower row).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from clipscope.errors import ConfigError, DataError

DEFAULT_TOP_K = 100
DEFAULT_CHUNK_BYTES = 1 << 22


class NeuronFactors(NamedTuple):
    """D_nᵀ = basis_n @ coords_n for every neuron; basis columns are orthonormal."""

    basis: Float[Tensor, "neuron embed rank"]
    coords: Float[Tensor, "neuron rank weight"]


class Rank1PC(NamedTuple):
    """pc: unit first right singular vector per neuron (reference sign); singular_value: σ₁;
    explained_ratio: σ₁² / ‖Φ‖_F² over the k rows; projections: Φ · pc for the k rows."""

    pc: Float[Tensor, "neuron embed"]
    singular_value: Float[Tensor, "neuron"]
    explained_ratio: Float[Tensor, "neuron"]
    projections: Float[Tensor, "neuron top"]


def neuron_factors(directions: Float[Tensor, "neuron weight embed"]) -> NeuronFactors:
    """Thin QR of every D_nᵀ (E×P)."""
    if directions.ndim != 3:
        raise ConfigError(f"directions must be [neuron, weight, embed], got shape {tuple(directions.shape)}")
    basis, coords = torch.linalg.qr(directions.transpose(1, 2), mode="reduced")
    return NeuronFactors(basis, coords)


def _factors(directions: Tensor | None, factors: NeuronFactors | None) -> NeuronFactors:
    if factors is not None:
        return factors
    if directions is None:
        raise ConfigError("pass directions or factors")
    return neuron_factors(directions)


def _centred(x: Tensor, mean: Tensor | None, name: str) -> Tensor:
    if mean is None:
        return x
    try:
        return x - mean
    except RuntimeError as exc:
        raise ConfigError(f"{name} of shape {tuple(mean.shape)} does not fit rows of shape {tuple(x.shape)}") from exc


def gram_norms(
    q: Float[Tensor, "sample neuron weight"],
    directions: Float[Tensor, "neuron weight embed"] | None = None,
    *,
    factors: NeuronFactors | None = None,
    q_mean: Float[Tensor, "neuron weight"] | None = None,
    shared: Float[Tensor, "sample embed"] | None = None,
    shared_mean: Float[Tensor, "embed"] | None = None,
    shared_scale: float = 1.0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Float[Tensor, "sample neuron"]:
    """Squared norms ‖φ_n(I)‖² (centred when means are given) without materialising φ.

    Without `shared` the cost is O(B·N·P·r) (r = min(P, E)) against O(B·N·P·E) for φ; a shared
    term adds O(B·N·E·r) for its cross term. Neurons are taken a chunk at a time (centring, one
    batched product with the factors, a sum of squares), so the temporaries stay within
    `chunk_bytes` (cache sized) and nothing of size [sample, neuron, weight] is allocated besides q.
    """
    f = _factors(directions, factors)
    n_neurons, rank, n_weights = f.coords.shape
    if q.ndim != 3 or q.shape[1:] != (n_neurons, n_weights):
        raise ConfigError(f"q must have shape [sample, {n_neurons}, {n_weights}], got {tuple(q.shape)}")
    if q_mean is not None and q_mean.shape != (n_neurons, n_weights):
        raise ConfigError(f"q_mean of shape {tuple(q_mean.shape)} does not fit rows of shape {tuple(q.shape[1:])}")
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ConfigError(f"chunk_bytes must be an integer ≥ 1, got {chunk_bytes!r}")
    dtype = f.coords.dtype
    ds = None
    if shared is not None:
        if shared.ndim != 2 or shared.shape != (q.shape[0], f.basis.shape[1]):
            raise ConfigError(
                f"shared must have shape [{q.shape[0]}, {f.basis.shape[1]}], got {tuple(shared.shape)}"
            )
        ds = shared_scale * _centred(shared, shared_mean, "shared_mean").to(dtype)
        ds_energy = (ds * ds).sum(dim=-1)
    out = torch.empty(q.shape[0], n_neurons, dtype=dtype, device=q.device)
    per_neuron = q.shape[0] * (n_weights + 2 * rank) * torch.finfo(dtype).bits // 8
    step = max(1, chunk_bytes // max(per_neuron, 1))
    coords_t = f.coords.transpose(1, 2)  # [neuron weight rank]
    mean = None if q_mean is None else q_mean.to(dtype)
    for lo in range(0, n_neurons, step):
        part = slice(lo, min(lo + step, n_neurons))
        dq = q[:, part].to(dtype).transpose(0, 1)  # [chunk sample weight]
        if mean is not None:
            dq = dq - mean[part, None, :]
        t = torch.bmm(dq, coords_t[part])  # [chunk sample rank] = (T_n dq)ᵀ
        if ds is None:
            out[:, part] = (t * t).sum(dim=-1).T
            continue
        # φ = U(t + Uᵀs) + (I − UUᵀ)s: two orthogonal parts, both sums of squares.
        inside = torch.matmul(ds, f.basis[part])  # [chunk sample rank]
        along = t + inside
        outside = (ds_energy - (inside * inside).sum(dim=-1)).clamp(min=0)
        out[:, part] = ((along * along).sum(dim=-1) + outside).T
    return out


def rank1_pc(
    q_top: Float[Tensor, "neuron top weight"],
    directions: Float[Tensor, "neuron weight embed"] | None = None,
    *,
    factors: NeuronFactors | None = None,
    q_mean: Float[Tensor, "neuron weight"] | None = None,
    shared_top: Float[Tensor, "neuron top embed"] | None = None,
    shared_mean: Float[Tensor, "embed"] | None = None,
    shared_scale: float = 1.0,
) -> Rank1PC:
    """First right singular vector of each neuron's k×E matrix of (centred) top-k effects.

    `q_top[n]` are the q rows of neuron n's top-k images (centred here when `q_mean` is given,
    else taken as already centred); `shared_top[n]` the matching rows of the shared term.
    Sign rule: keep the sign under which more projections are > 0 than < 0; on a tie, the one
    with a positive sum of projections; if that is 0 too, the largest |component| > 0. The
    reference keeps vh[0] iff #(projections > 0) > k//2, else flips it; the two agree whenever
    the reference's outcome does not depend on the arbitrary sign LAPACK returns.
    """
    f = _factors(directions, factors)
    n_neurons, rank, n_weights = f.coords.shape
    if q_top.ndim != 3 or q_top.shape[0] != n_neurons or q_top.shape[2] != n_weights:
        raise ConfigError(f"q_top must have shape [{n_neurons}, top, {n_weights}], got {tuple(q_top.shape)}")
    dq = q_top.to(f.coords.dtype)
    if q_mean is not None:
        dq = _centred(dq, q_mean[:, None, :].to(dq.dtype), "q_mean")
    small = dq @ f.coords.transpose(1, 2)  # [N, k, r] = Q T_nᵀ; Φ = small @ U_nᵀ
    basis = f.basis
    if shared_top is not None:
        top = q_top.shape[1]
        if shared_top.shape != (n_neurons, top, f.basis.shape[1]):
            raise ConfigError(
                f"shared_top must have shape [{n_neurons}, {top}, {f.basis.shape[1]}], got {tuple(shared_top.shape)}"
            )
        ds = shared_top.to(dq.dtype)
        if shared_mean is not None:
            ds = _centred(ds, shared_mean.to(dq.dtype), "shared_mean")
        ds = shared_scale * ds
        inside = ds @ basis  # [N, k, r]
        outside = ds - inside @ basis.transpose(1, 2)
        outside = outside - (outside @ basis) @ basis.transpose(1, 2)  # re-orthogonalise once
        extra, weights = torch.linalg.qr(outside.transpose(1, 2), mode="reduced")  # outsideᵀ = Z W
        small = torch.cat([small + inside, weights.transpose(1, 2)], dim=2)
        basis = torch.cat([basis, extra], dim=2)
    # small = Q R (QR) has the right singular vectors of R; the SVD then runs on an r×r matrix.
    tri = torch.linalg.qr(small, mode="r").R if small.shape[1] > small.shape[2] else small
    _, sing, vh = torch.linalg.svd(tri, full_matrices=False)
    v = vh[:, 0, :]
    proj = (small @ v[:, :, None])[:, :, 0]
    pc = (basis @ v[:, :, None])[:, :, 0]
    pos = (proj > 0).sum(dim=1)
    neg = (proj < 0).sum(dim=1)
    total = proj.sum(dim=1)
    lead = pc.gather(1, pc.abs().argmax(dim=1, keepdim=True))[:, 0]
    tie = pos == neg
    flip = (neg > pos) | (tie & (total < 0)) | (tie & (total == 0) & (lead < 0))
    sign = torch.where(flip, -1.0, 1.0).to(pc.dtype)
    energy = (small * small).sum(dim=(1, 2))
    ratio = torch.where(energy > 0, sing[:, 0] ** 2 / energy.clamp(min=torch.finfo(energy.dtype).tiny), 0.0)
    return Rank1PC(pc * sign[:, None], sing[:, 0], ratio, proj * sign[:, None])


def pc_coordinates(
    q: Float[Tensor, "sample neuron weight"],
    pc: Float[Tensor, "neuron embed"],
    directions: Float[Tensor, "neuron weight embed"],
    *,
    q_mean: Float[Tensor, "neuron weight"] | None = None,
    shared: Float[Tensor, "sample embed"] | None = None,
    shared_mean: Float[Tensor, "embed"] | None = None,
    shared_scale: float = 1.0,
) -> Float[Tensor, "sample neuron"]:
    """x_n(I) = ⟨φ_n(I) − φ̄_n, r_n⟩ (or uncentred without means): the coefficient of the rank-1
    approximation φ_n ≈ x_n r_n + φ̄_n, computed as ⟨q_n − q̄_n, D_n r_n⟩ + scale·⟨s − s̄, r_n⟩."""
    if directions.ndim != 3 or pc.shape != (directions.shape[0], directions.shape[2]):
        raise ConfigError(
            f"pc must have shape [{directions.shape[0]}, {directions.shape[2]}] like directions, got {tuple(pc.shape)}"
        )
    dir_pc = torch.einsum("npe,ne->np", directions, pc.to(directions.dtype))
    dq = _centred(q, q_mean, "q_mean").to(dir_pc.dtype)
    out = torch.einsum("bnp,np->bn", dq, dir_pc)
    if shared is not None:
        ds = shared_scale * _centred(shared, shared_mean, "shared_mean").to(dir_pc.dtype)
        out = out + ds @ pc.to(dir_pc.dtype).T
    return out


@dataclass(frozen=True)
class TopK:
    """The k largest scores seen per neuron and their rows, sorted by (score desc, row asc).

    Holds fewer than k slots until k rows have been seen. Rows must be unique across updates.
    """

    values: Float[Tensor, "neuron slot"]
    rows: Int[Tensor, "neuron slot"]
    k: int


def topk_init(
    n_neurons: int, k: int = DEFAULT_TOP_K, *, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
) -> TopK:
    """An empty state."""
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be an integer ≥ 1, got {k!r}")
    return TopK(
        torch.empty(n_neurons, 0, dtype=dtype, device=device),
        torch.empty(n_neurons, 0, dtype=torch.long, device=device),
        k,
    )


def _select(values: Tensor, rows: Tensor, k: int) -> tuple[Tensor, Tensor]:
    # Two stable sorts give the total order (value desc, row asc), so the result is independent of
    # the order in which candidates arrive.
    by_row = torch.sort(rows, dim=1, stable=True)
    values = values.gather(1, by_row.indices)
    rows = by_row.values
    by_value = torch.sort(values, dim=1, descending=True, stable=True)
    keep = by_value.indices[:, :k]
    return by_value.values[:, :k], rows.gather(1, keep)


def topk_merge(a: TopK, b: TopK) -> TopK:
    """Top-k of the union of two states (associative and commutative)."""
    if a.k != b.k or a.values.shape[0] != b.values.shape[0]:
        raise ConfigError(
            f"cannot merge top-k states with k={a.k}/{b.k} and {a.values.shape[0]}/{b.values.shape[0]} neurons"
        )
    values, rows = _select(
        torch.cat([a.values, b.values.to(a.values)], dim=1), torch.cat([a.rows, b.rows.to(a.rows.device)], dim=1), a.k
    )
    return TopK(values, rows, a.k)


def topk_update(state: TopK, scores: Float[Tensor, "sample neuron"], rows: Int[Tensor, "sample"]) -> TopK:
    """Fold a block of scores (one row per sample, with its global row index) into the state."""
    if scores.ndim != 2 or scores.shape[1] != state.values.shape[0]:
        raise ConfigError(f"scores must have shape [sample, {state.values.shape[0]}], got {tuple(scores.shape)}")
    if rows.shape != (scores.shape[0],):
        raise ConfigError(f"rows must have shape ({scores.shape[0]},), got {tuple(rows.shape)}")
    if bool(torch.isnan(scores).any()):
        raise DataError("top-k scores contain NaN")
    n = state.values.shape[0]
    block = TopK(
        scores.T.to(state.values),
        rows.to(device=state.rows.device, dtype=torch.long)[None, :].expand(n, -1),
        state.k,
    )
    return topk_merge(state, block)
