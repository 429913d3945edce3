"""Batched orthogonal matching pursuit on a Gram matrix (second-order paper §4).

Same semantics as `sklearn.linear_model.orthogonal_mp_gram` (no intercept, no normalisation of
the atoms), run for B targets at once as one tensor program (CPU or CUDA, float64 arithmetic).
Per step k, for every target of a block at once:
  α = Xy − γ·G[S, :]                  the correlations of every atom with the residual (the rows
                                      G[S, :] are kept per target, one new row per step);
  λ = argmax |α|                      ties: the first in sklearn's swapped atom order, see below;
  l = L⁻¹ G[S, λ],  L ← [[L, 0], [lᵀ, √(G_λλ − lᵀl)]]
                                      the Cholesky factor of G_SS grown by one row (one triangular
                                      solve, O(k²)), never refactorised;
  w ← [w, (Xy_λ − lᵀw) / L_kk]        L w = Xy_S grown by one entry (forward substitution);
  γ = L⁻ᵀ w                           one back substitution (O(k²)).
Ties: sklearn swaps each chosen atom to the front of its working order and takes the first
maximum of |α| in that order, so the swapped order is tracked per target (position ↔ atom) and
consulted only for targets whose maximum is tied. Early stops, as sklearn: a target stops (fewer
atoms, support padded with −1, its γ frozen) when the best atom is already chosen, when α_λ² is
below the dtype's eps, or when G_λλ − lᵀl ≤ eps (λ linearly dependent on the chosen atoms). With
`tol`, a target also stops once its squared residual (sklearn's running ‖y‖² − γ·β_S) is ≤ tol;
sklearn then ignores n_nonzero_coefs, here it stays a cap (pass M for sklearn's behaviour).

The picks are nested (step k depends only on steps < k, ties included), and w is nested too
(forward substitution), so one run to the largest m gives every smaller m's solution by one back
substitution on the leading block of L (`omp_path`): the m-atom solution of sklearn for the cost
of one run.

Cost per step k and target: O(M·k) for α (a batched product with the cached rows; memory bound:
B·k·M·8 bytes are read), O(M) for the argmax, O(k²) for the two triangular solves. With a
dictionary X instead of G (`omp`, `dictionary_omp_path`) only the rows of the atoms that some
target picks are formed (U distinct atoms: U·M·D instead of M²·D for the whole Gram).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

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


class OMPPath(NamedTuple):
    """support: atoms in pick order for the largest m (−1 = none); coef[i, b, k]: coefficient of
    support[b, k] in the m_i-atom solution (0 for k ≥ m_i and for empty slots)."""

    support: Int[Tensor, "target pick"]
    coef: Float[Tensor, "sparsity target pick"]


class _Rows(Protocol):
    n_atoms: int

    def rows(self, atoms: Tensor, out: Tensor) -> None: ...

    def diagonal(self, atoms: Tensor) -> Tensor: ...


class _GramRows:
    """Rows of a given Gram matrix."""

    def __init__(self, gram: Tensor) -> None:
        self.gram, self.n_atoms = gram, gram.shape[0]

    def rows(self, atoms: Tensor, out: Tensor) -> None:
        torch.index_select(self.gram, 0, atoms, out=out)

    def diagonal(self, atoms: Tensor) -> Tensor:
        return self.gram[atoms, atoms]


class _LazyGramRows:
    """Rows of G = X Xᵀ formed on first use and kept (shared by every target and block)."""

    def __init__(self, dictionary: Tensor, expected: int = 0) -> None:
        """`expected`: rows to reserve at once (at most every atom), so that the kept rows rarely move."""
        self.x, self.n_atoms = dictionary, dictionary.shape[0]
        self.slot = torch.full((self.n_atoms,), -1, dtype=torch.long, device=dictionary.device)
        self.kept = dictionary.new_empty(min(self.n_atoms, max(expected, 0)), self.n_atoms)
        self.filled = 0

    def rows(self, atoms: Tensor, out: Tensor) -> None:
        missing = torch.unique(atoms[self.slot[atoms] < 0])
        if missing.numel():
            need = self.filled + missing.numel()
            if need > self.kept.shape[0]:  # grow geometrically: amortised O(1) copies per row
                grown = self.x.new_empty(min(self.n_atoms, max(need, 2 * self.kept.shape[0])), self.n_atoms)
                grown[: self.filled] = self.kept[: self.filled]
                self.kept = grown
            torch.mm(self.x.index_select(0, missing), self.x.T, out=self.kept[self.filled : need])
            self.slot[missing] = torch.arange(self.filled, need, device=self.x.device)
            self.filled = need
        torch.index_select(self.kept, 0, self.slot[atoms], out=out)

    def diagonal(self, atoms: Tensor) -> Tensor:
        chosen = self.x.index_select(0, atoms)
        return (chosen * chosen).sum(dim=1)


class _Greedy(NamedTuple):
    support: Tensor  # [B, m] atoms in pick order, −1 past a target's stop
    chol: Tensor  # [B, m, m] Cholesky factor of G_SS, identity past a target's stop
    w: Tensor  # [B, m] L⁻¹ Xy_S, 0 past a target's stop
    gamma: Tensor  # [B, m] the final coefficients on the support


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
    _check_gram(gram)
    eps = torch.finfo(gram.dtype).eps
    xy, norms = _check_targets(gram.shape[0], xy, n_nonzero, tol, norms_squared, block_bytes)
    greedy = _blocks(_GramRows(gram.to(torch.float64)), xy, n_nonzero, tol, norms, eps, block_bytes)
    return OMPResult(_dense(greedy.support, greedy.gamma, gram.shape[0]), greedy.support)


def omp(
    dictionary: Float[Tensor, "atom embed"],
    targets: Float[Tensor, "target embed"],
    n_nonzero: int,
    *,
    tol: float | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> OMPResult:
    """OMP of each target row on the dictionary rows (atoms): `omp_gram` on G = X Xᵀ and Xy = y Xᵀ,
    with only the rows of G that are picked ever formed."""
    x, xy, eps = _dictionary_inputs(dictionary, targets)
    norms = (targets.to(torch.float64) ** 2).sum(dim=1) if tol is not None else None
    xy, norms = _check_targets(x.shape[0], xy, n_nonzero, tol, norms, block_bytes)
    greedy = _blocks(_LazyGramRows(x, xy.shape[0] * n_nonzero), xy, n_nonzero, tol, norms, eps, block_bytes)
    return OMPResult(_dense(greedy.support, greedy.gamma, x.shape[0]), greedy.support)


def omp_path(
    gram: Float[Tensor, "atom atom2"],
    xy: Float[Tensor, "target atom"],
    sparsities: tuple[int, ...],
    *,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> OMPPath:
    """OMP for several sparsities m from one greedy run at the largest.

    OMP is greedy and its pick at step k depends only on the earlier picks (ties included: the
    swapped atom order evolves identically), so the support of sklearn's m-atom solution is the
    first m picks of the largest run; only the coefficients differ, the least-squares solution on
    those m atoms: the Cholesky factor of a leading block is the leading block of the factor and
    the forward substitution L w = Xy_S is nested, so each m costs one back substitution.
    """
    _check_sparsities(sparsities)
    _check_gram(gram)
    eps = torch.finfo(gram.dtype).eps
    xy, _ = _check_targets(gram.shape[0], xy, sparsities[-1], None, None, block_bytes)
    return _path(_blocks(_GramRows(gram.to(torch.float64)), xy, sparsities[-1], None, None, eps, block_bytes),
                 sparsities)


def dictionary_omp_path(
    dictionary: Float[Tensor, "atom embed"],
    targets: Float[Tensor, "target embed"],
    sparsities: tuple[int, ...],
    *,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> OMPPath:
    """`omp_path` on G = X Xᵀ and Xy = y Xᵀ, forming only the rows of G that are picked."""
    _check_sparsities(sparsities)
    x, xy, eps = _dictionary_inputs(dictionary, targets)
    xy, _ = _check_targets(x.shape[0], xy, sparsities[-1], None, None, block_bytes)
    rows = _LazyGramRows(x, xy.shape[0] * sparsities[-1])
    return _path(_blocks(rows, xy, sparsities[-1], None, None, eps, block_bytes), sparsities)


def _path(greedy: _Greedy, sparsities: tuple[int, ...]) -> OMPPath:
    support, chol, w = greedy.support, greedy.chol, greedy.w
    coef = torch.zeros(len(sparsities), *support.shape, dtype=w.dtype, device=w.device)
    for i, m in enumerate(sparsities[:-1]):
        upper = chol[:, :m, :m].mT
        coef[i, :, :m] = torch.linalg.solve_triangular(upper, w[:, :m, None], upper=True)[:, :, 0]
    coef[-1] = greedy.gamma  # the largest m: the run's own solution, bit for bit `omp_gram`'s
    return OMPPath(support, coef)


def _check_gram(gram: Tensor) -> None:
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ConfigError(f"gram must be a square [atom, atom] matrix, got shape {tuple(gram.shape)}")


def _check_sparsities(sparsities: tuple[int, ...]) -> None:
    if not sparsities or any(isinstance(m, bool) or not isinstance(m, int) for m in sparsities):
        raise ConfigError(f"sparsities must be a non-empty tuple of integers, got {sparsities!r}")
    if list(sparsities) != sorted(set(sparsities)):
        raise ConfigError(f"sparsities must be strictly increasing, got {sparsities!r}")


def _dictionary_inputs(dictionary: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, float]:
    if dictionary.ndim != 2 or targets.ndim != 2 or dictionary.shape[1] != targets.shape[1]:
        raise ConfigError(
            f"dictionary [atom, embed] and targets [target, embed] must share embed, got "
            f"{tuple(dictionary.shape)} and {tuple(targets.shape)}"
        )
    x = dictionary.to(torch.float64)
    return x, targets.to(device=x.device, dtype=torch.float64) @ x.T, torch.finfo(dictionary.dtype).eps


def _check_targets(
    n_atoms: int, xy: Tensor, n_nonzero: int, tol: float | None, norms_squared: Tensor | None, block_bytes: int
) -> tuple[Tensor, Tensor | None]:
    if xy.ndim != 2 or xy.shape[1] != n_atoms:
        raise ConfigError(f"xy must have shape [target, {n_atoms}], got {tuple(xy.shape)}")
    if isinstance(n_nonzero, bool) or not isinstance(n_nonzero, int) or not 1 <= n_nonzero <= n_atoms:
        raise ConfigError(f"n_nonzero must be an integer in [1, {n_atoms}], got {n_nonzero!r}")
    if tol is not None:
        if tol < 0:
            raise ConfigError(f"tol must be ≥ 0, got {tol}")
        if norms_squared is None or norms_squared.shape != (xy.shape[0],):
            raise ConfigError(f"tol needs norms_squared of shape ({xy.shape[0]},) (‖y‖² per target)")
    if isinstance(block_bytes, bool) or not isinstance(block_bytes, int) or block_bytes < 1:
        raise ConfigError(f"block_bytes must be an integer ≥ 1, got {block_bytes!r}")
    norms = None if norms_squared is None else norms_squared.to(device=xy.device, dtype=torch.float64)
    return xy.to(torch.float64), norms


def _blocks(
    source: _Rows, xy: Tensor, m: int, tol: float | None, norms: Tensor | None, eps: float, block_bytes: int
) -> _Greedy:
    block = max(1, block_bytes // ((m + 4) * source.n_atoms * 8))  # cached rows, α, positions, order
    parts = [
        _greedy(source, xy[i : i + block], m, tol, None if norms is None else norms[i : i + block], eps)
        for i in range(0, xy.shape[0], block)
    ]
    if len(parts) == 1:
        return parts[0]
    return _Greedy(*(torch.cat(fields) for fields in zip(*parts, strict=True)))


def _dense(support: Tensor, gamma: Tensor, n_atoms: int) -> Tensor:
    """Coefficients [B, M]; empty slots (−1) go to a spill column that is dropped."""
    slots = torch.where(support >= 0, support, torch.full_like(support, n_atoms))
    coef = gamma.new_zeros(support.shape[0], n_atoms + 1)
    coef.scatter_(1, slots, gamma)
    return coef[:, :n_atoms]


def _pick(magnitude: Tensor, position: Tensor) -> Tensor:
    """argmax |α| per target, ties resolved to the atom first in the target's swapped order."""
    best, atom = magnitude.max(dim=1)
    at_best = magnitude == best[:, None]
    tied = torch.nonzero(at_best.sum(dim=1) > 1)[:, 0]
    if tied.numel():
        atom[tied] = torch.where(at_best[tied], position[tied], position.shape[1]).argmin(dim=1)
    return atom


def _greedy(source: _Rows, xy: Tensor, m: int, tol: float | None, norms: Tensor | None, eps: float) -> _Greedy:
    n_targets, n_atoms = xy.shape
    device, dtype = xy.device, xy.dtype
    rows = torch.arange(n_targets, device=device)
    support = torch.full((n_targets, m), -1, dtype=torch.long, device=device)
    chol = torch.eye(m, dtype=dtype, device=device).repeat(n_targets, 1, 1)
    w = xy.new_zeros(n_targets, m)
    gamma = xy.new_zeros(n_targets, m)
    cached = xy.new_empty(m, n_targets, n_atoms)  # cached[j, b] = G[s_j(b), :] (slot j written at step j)
    order = torch.arange(n_atoms, device=device).repeat(n_targets, 1)  # swapped position → atom
    position = order.clone()  # atom → swapped position
    running = torch.ones(n_targets, dtype=torch.bool, device=device)
    remaining, delta = (norms.clone(), torch.zeros_like(norms)) if norms is not None else (None, None)
    magnitude = xy.abs()
    for k in range(m):
        lam = _pick(magnitude, position)
        pos = position[rows, lam]
        stop = (pos < k) | (magnitude[rows, lam] ** 2 < eps)
        if k + 1 < m or tol is not None:
            source.rows(lam, out=cached[k])  # a stopped target's slot is written but never weighted (γ_k = 0)
            pivot = cached[k, rows, lam]
        else:  # the last pick needs G_λλ only (its row would weight no later correlation)
            pivot = source.diagonal(lam)
        xy_lam = xy[rows, lam]
        if k:
            cross = cached[:k].gather(2, lam[None, :, None].expand(k, -1, 1)).permute(1, 0, 2)  # G[s_j, λ]
            lower = torch.linalg.solve_triangular(chol[:, :k, :k], cross, upper=False)[:, :, 0]
            pivot = pivot - (lower * lower).sum(dim=1)
            stop |= pivot <= eps
            running &= ~stop
            lower = torch.where(running[:, None], lower, 0.0)
            chol[:, k, :k] = lower
            xy_lam = xy_lam - (lower * w[:, :k]).sum(dim=1)
        else:
            running &= ~stop
        if not bool(running.any()):
            break
        diag = torch.where(running, pivot, 1.0).sqrt()
        chol[:, k, k] = diag
        w[:, k] = torch.where(running, xy_lam / diag, 0.0)
        support[:, k] = torch.where(running, lam, -1)
        _swap(order, position, rows[running], lam[running], pos[running], k)
        solved = torch.linalg.solve_triangular(chol[:, : k + 1, : k + 1].mT, w[:, : k + 1, None], upper=True)
        gamma[:, : k + 1] = torch.where(running[:, None], solved[:, :, 0], gamma[:, : k + 1])
        if tol is not None:
            running = _tol_step(running, gamma, cached, support, remaining, delta, k, tol)
        if k + 1 < m:  # α = Xy − γ·G[S, :]
            magnitude = torch.einsum("bj,jba->ba", gamma[:, : k + 1], cached[: k + 1])
            magnitude = torch.sub(xy, magnitude, out=magnitude).abs_()
    return _Greedy(support, chol, w, gamma)


def _swap(order: Tensor, position: Tensor, moving: Tensor, lam: Tensor, pos: Tensor, k: int) -> None:
    """sklearn's swap for the targets `moving`: λ to position k, the atom that was there to λ's position."""
    front = order[moving, k]
    order[moving, pos] = front
    order[moving, k] = lam
    position[moving, front] = pos
    position[moving, lam] = k


def _tol_step(
    running: Tensor, gamma: Tensor, cached: Tensor, support: Tensor, remaining: Tensor, delta: Tensor, k: int,
    tol: float,
) -> Tensor:
    """sklearn's running squared residual: remaining += δ_old; δ = γ·(G_SS γ); remaining −= δ."""
    index = support[:, : k + 1].clamp(min=0)
    g_ss = cached[: k + 1].gather(2, index[None].expand(k + 1, -1, -1)).permute(1, 0, 2)  # G[s_i, s_j]
    beta = (g_ss @ gamma[:, : k + 1, None])[:, :, 0]
    update = remaining + delta
    new_delta = (gamma[:, : k + 1] * beta).sum(dim=1)
    update = update - new_delta
    remaining.copy_(torch.where(running, update, remaining))
    delta.copy_(torch.where(running, new_delta, delta))
    return running & ~(remaining.abs() <= tol)


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
