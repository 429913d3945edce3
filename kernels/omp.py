"""Batched orthogonal matching pursuit on a Gram matrix (second-order paper §4).

Same semantics as `sklearn.linear_model.orthogonal_mp_gram` (no intercept, no normalisation of
the atoms), run for B targets at once with batched Cholesky updates:
  each step picks the atom with the largest |Xy − G·coef| (ties: the first in sklearn's swapped
  atom order, reproduced here), extends the Cholesky factor of G restricted to the support and
  solves the least-squares problem on the support.
Like sklearn, a target stops early (fewer atoms, support padded with −1) when the best atom is
already chosen, when its squared correlation is below the dtype's eps, or when it is linearly
dependent on the chosen atoms. With `tol`, a target also stops once its squared residual is
≤ tol; sklearn then ignores n_nonzero_coefs, here it stays a cap (pass M for sklearn's behaviour).

Cost per step k: O(B·M·k) for the correlations (one batched product with the cached Gram rows of
the chosen atoms; memory B·m·M, bounded by solving targets in blocks) plus O(B·k²) for the
triangular solves.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from clipscope.errors import ConfigError

REFERENCE_COEFFICIENT = 100.0
DEFAULT_BLOCK_BYTES = 1 << 30


class OMPResult(NamedTuple):
    """coef: dense coefficients (zeros off the support); support: atoms in pick order, −1 = none."""

    coef: Float[Tensor, "target atom"]
    support: Int[Tensor, "target pick"]


def omp_gram(
    gram: Float[Tensor, "atom atom2"],
    xy: Float[Tensor, "target atom"],
    n_nonzero: int,
    *,
    tol: float | None = None,
    norms_squared: Float[Tensor, "target"] | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> OMPResult:
    """OMP for B targets from the dictionary Gram G = X Xᵀ and correlations Xy = y Xᵀ.

    `norms_squared` (‖y‖² per target) is required with `tol`, as in sklearn. Targets are solved
    in blocks whose cache of chosen Gram rows ([block, n_nonzero, atom]) fits in `block_bytes`.
    """
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ConfigError(f"gram must be a square [atom, atom] matrix, got shape {tuple(gram.shape)}")
    n_atoms = gram.shape[0]
    if xy.ndim != 2 or xy.shape[1] != n_atoms:
        raise ConfigError(f"xy must have shape [target, {n_atoms}], got {tuple(xy.shape)}")
    if not isinstance(n_nonzero, int) or not 1 <= n_nonzero <= n_atoms:
        raise ConfigError(f"n_nonzero must be an integer in [1, {n_atoms}], got {n_nonzero!r}")
    if tol is not None:
        if tol < 0:
            raise ConfigError(f"tol must be ≥ 0, got {tol}")
        if norms_squared is None or norms_squared.shape != (xy.shape[0],):
            raise ConfigError(f"tol needs norms_squared of shape ({xy.shape[0]},) (‖y‖² per target)")
    if not isinstance(block_bytes, int) or block_bytes < 1:
        raise ConfigError(f"block_bytes must be an integer ≥ 1, got {block_bytes!r}")
    xy = xy.to(gram.dtype)
    norms = None if tol is None else norms_squared.to(gram.dtype)
    per_target = n_nonzero * n_atoms * gram.element_size()
    block = max(1, block_bytes // per_target)
    parts = [
        _omp_block(gram, xy[i : i + block], n_nonzero, tol, None if norms is None else norms[i : i + block])
        for i in range(0, xy.shape[0], block)
    ]
    if len(parts) == 1:
        return parts[0]
    return OMPResult(torch.cat([p.coef for p in parts]), torch.cat([p.support for p in parts]))


def _omp_block(
    gram: Tensor, xy: Tensor, n_nonzero: int, tol: float | None, norms_squared: Tensor | None
) -> OMPResult:
    n_targets, n_atoms = xy.shape
    dtype, device = gram.dtype, gram.device
    eps = torch.finfo(dtype).eps
    rows = torch.arange(n_targets, device=device)

    # sklearn swaps each chosen atom to the front of its working order; argmax ties resolve in that
    # order, so it is tracked per target: order[b, position] = atom.
    order = torch.arange(n_atoms, device=device).repeat(n_targets, 1)
    support = torch.full((n_targets, n_nonzero), -1, dtype=torch.long, device=device)
    chosen_rows = torch.zeros(n_targets, n_nonzero, n_atoms, dtype=dtype, device=device)  # G[s_i, :]
    chol = torch.zeros(n_targets, n_nonzero, n_nonzero, dtype=dtype, device=device)
    gamma = torch.zeros(n_targets, 0, dtype=dtype, device=device)
    running = torch.ones(n_targets, dtype=torch.bool, device=device)

    for k in range(n_nonzero):
        alpha = xy if k == 0 else xy - (gamma[:, None, :] @ chosen_rows[:, :k])[:, 0]
        pos = torch.argmax(alpha.abs().gather(1, order), dim=1)
        lam = order[rows, pos]
        stop = (pos < k) | (alpha.gather(1, lam[:, None])[:, 0] ** 2 < eps)
        new_row = gram.index_select(0, lam)  # G[λ, :] (G is symmetric)
        diag = new_row.gather(1, lam[:, None])[:, 0]
        if k > 0:
            cross = chosen_rows[:, :k].gather(2, lam[:, None, None].expand(-1, k, 1))  # G[s_i, λ]
            lower = torch.linalg.solve_triangular(chol[:, :k, :k], cross, upper=False)[:, :, 0]
            pivot = diag - (lower * lower).sum(dim=1)
            stop |= pivot <= eps
        else:
            lower = torch.zeros(n_targets, 0, dtype=dtype, device=device)
            pivot = diag
        running = running & ~stop
        go = running
        # Stopped targets get a harmless identity row so the batched solve stays finite.
        chol[:, k, :k] = torch.where(go[:, None], lower, torch.zeros_like(lower))
        chol[:, k, k] = torch.where(go, pivot.clamp(min=eps).sqrt(), torch.ones_like(pivot))
        support[:, k] = torch.where(go, lam, torch.full_like(lam, -1))
        chosen_rows[:, k] = torch.where(go[:, None], new_row, torch.zeros_like(new_row))
        moving = rows[go]
        front = order[moving, k].clone()
        order[moving, pos[go]] = front
        order[moving, k] = lam[go]
        rhs = xy.gather(1, support[:, : k + 1].clamp(min=0))
        rhs = torch.where(support[:, : k + 1] >= 0, rhs, torch.zeros_like(rhs))
        solved = torch.cholesky_solve(rhs[:, :, None], chol[:, : k + 1, : k + 1], upper=False)[:, :, 0]
        padded = torch.cat([gamma, torch.zeros(n_targets, 1, dtype=dtype, device=device)], dim=1)
        gamma = torch.where(go[:, None], solved, padded)
        if tol is not None:
            sup = support[:, : k + 1].clamp(min=0)
            g_ss = chosen_rows[:, : k + 1].gather(2, sup[:, None, :].expand(-1, k + 1, -1))
            beta = (g_ss @ gamma[:, :, None])[:, :, 0]
            residual = norms_squared - (gamma * beta).sum(dim=1)
            running = running & ~(residual.abs() <= tol)
        if not bool(running.any()):
            break

    # Empty slots (−1) are sent to a spill column that is dropped, so they never touch atom 0.
    width = gamma.shape[1]
    slots = support[:, :width]
    slots = torch.where(slots >= 0, slots, torch.full_like(slots, n_atoms))
    coef = torch.zeros(n_targets, n_atoms + 1, dtype=dtype, device=device)
    coef.scatter_(1, slots, gamma)
    return OMPResult(coef[:, :n_atoms], support)


def omp(
    dictionary: Float[Tensor, "atom embed"],
    targets: Float[Tensor, "target embed"],
    n_nonzero: int,
    *,
    tol: float | None = None,
) -> OMPResult:
    """OMP of each target row on the dictionary rows (atoms); forms G and Xy, then `omp_gram`."""
    if dictionary.ndim != 2 or targets.ndim != 2 or dictionary.shape[1] != targets.shape[1]:
        raise ConfigError(
            f"dictionary [atom, embed] and targets [target, embed] must share embed, got "
            f"{tuple(dictionary.shape)} and {tuple(targets.shape)}"
        )
    targets = targets.to(dictionary.dtype)
    norms = (targets * targets).sum(dim=1) if tol is not None else None
    return omp_gram(dictionary @ dictionary.T, targets @ dictionary.T, n_nonzero, tol=tol, norms_squared=norms)


def reference_dictionary(
    text_embeddings: Float[Tensor, "text embed"],
    *,
    coefficient: float = REFERENCE_COEFFICIENT,
) -> Float[Tensor, "text embed"]:
    """The text dictionary exactly as the second-order reference code builds it.

    The paper (§4) only says "scikit-learn's implementation of orthogonal matching pursuit" over a
    pool of text representations. The reference code (compute_text_set_projection.py, then
    compute_sparse_decomposition.py) does, in this order:
      1. unit-normalise each text embedding and multiply by `coefficient` (100);
      2. subtract the mean text (centre across texts, per dimension);
      3. divide each dimension by its L2 norm over texts (column-wise), times `coefficient` (100).
    Step 1's ×100 cancels in step 3; it is kept for fidelity. The resulting atoms are *not*
    unit-norm and sklearn's OMP (SparseCoder(transform_algorithm="omp"), i.e.
    orthogonal_mp_gram with G = X Xᵀ, Xy = X r, tol None; its transform_alpha is ignored when
    n_nonzero_coefs is set) uses them as they are. The reference reconstructs r̂ = coef @ X in
    this preprocessed space.
    """
    if text_embeddings.ndim != 2:
        raise ConfigError(f"text_embeddings must be [text, embed], got shape {tuple(text_embeddings.shape)}")
    x = coefficient * text_embeddings / text_embeddings.norm(dim=1, keepdim=True)
    x = x - x.mean(dim=0, keepdim=True)
    col = x.norm(dim=0, keepdim=True)
    if bool((col == 0).any()):
        raise ConfigError("text_embeddings has an embedding dimension that is constant across texts")
    return coefficient * x / col


class OMPPath(NamedTuple):
    """support: atoms in pick order for the largest m (−1 = none); coef[i, b, k]: coefficient of
    support[b, k] in the m_i-atom solution (0 for k ≥ m_i and for empty slots)."""

    support: Int[Tensor, "target pick"]
    coef: Float[Tensor, "sparsity target pick"]


def omp_path(
    gram: Float[Tensor, "atom atom2"],
    xy: Float[Tensor, "target atom"],
    sparsities: tuple[int, ...],
    *,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> OMPPath:
    """OMP for several sparsities m from one greedy run at the largest.

    OMP is greedy and its pick at step k depends only on the earlier picks (ties included: the
    swapped atom order evolves identically), so the support of sklearn's m-atom solution is the first
    m picks of the largest run; only the coefficients differ — the least-squares solution on those
    m atoms. The Cholesky factor of a leading principal block is the leading block of the factor, so
    one factorisation of G restricted to the full support serves every m.
    """
    if not sparsities or any(isinstance(m, bool) or not isinstance(m, int) for m in sparsities):
        raise ConfigError(f"sparsities must be a non-empty tuple of integers, got {sparsities!r}")
    if list(sparsities) != sorted(set(sparsities)):
        raise ConfigError(f"sparsities must be strictly increasing, got {sparsities!r}")
    m_max = sparsities[-1]
    support = omp_gram(gram, xy, m_max, block_bytes=block_bytes).support
    xy = xy.to(gram.dtype)
    active = support >= 0
    index = support.clamp(min=0)
    g_ss = gram[index[:, :, None], index[:, None, :]]  # [target, m_max, m_max]
    # Empty slots (a target that stopped early) become identity rows with a zero right-hand side.
    both = active[:, :, None] & active[:, None, :]
    eye = torch.eye(m_max, dtype=gram.dtype, device=gram.device).expand_as(g_ss)
    g_ss = torch.where(both, g_ss, eye)
    rhs = torch.where(active, xy.gather(1, index), torch.zeros((), dtype=gram.dtype, device=gram.device))
    chol, info = torch.linalg.cholesky_ex(g_ss)
    if bool((info > 0).any()):
        raise ConfigError("the dictionary restricted to an OMP support is numerically singular "
                          "(nearly linearly dependent atoms); its coefficients are not determined")
    coef = torch.zeros(len(sparsities), *support.shape, dtype=gram.dtype, device=gram.device)
    for i, m in enumerate(sparsities):
        coef[i, :, :m] = torch.cholesky_solve(rhs[:, :m, None], chol[:, :m, :m], upper=False)[:, :, 0]
    return OMPPath(support, coef)


def path_reconstruction(
    dictionary: Float[Tensor, "atom embed"],
    support: Int[Tensor, "target pick"],
    coef: Float[Tensor, "sparsity target pick"],
) -> Float[Tensor, "sparsity target embed"]:
    """r̂ = Σ_k coef[i, b, k] · dictionary[support[b, k]] for every sparsity i of an `omp_path`
    (empty slots, support −1, carry coefficient 0)."""
    if support.shape != coef.shape[1:]:
        raise ConfigError(f"support {tuple(support.shape)} and coef {tuple(coef.shape)} do not match")
    chosen = dictionary.to(coef.dtype)[support.clamp(min=0)]  # [target pick embed]
    return torch.einsum("itp,tpe->ite", coef, chosen)
