"""TextSpan (thesis Alg. 1, reference-code semantics) from streamed sufficient statistics.

The literal algorithm, per head, with C ∈ R^{K×D} (head contributions over K images) and a text
pool R ∈ R^{M×D}:
  1. project R onto the span of the top-r right singular vectors of the *uncentred* C;
  2. centre C over images;
  3. m times: j* = argmax_j Var_images(C R_jᵀ) (unbiased; rows of R are not re-normalised), then
     remove the unit direction u = R_{j*}/‖R_{j*}‖ from every row of C and of R.

Everything depends on C only through K, ΣC and ΣCᵀC:
  * the right singular vectors of C are the eigenvectors of G = ΣCᵀC (same order, same span);
  * Var_images(C v) = vᵀ Σ_c v with Σ_c = (ΣCᵀC − K μμᵀ)/(K − 1);
  * removing a unit u from every row of C maps Σ_c → (I − uuᵀ) Σ_c (I − uuᵀ).
All projected texts, hence every u, lie in the span V_r of the top-r eigenvectors, so the rounds
run in r coordinates: R̃ = R V_r, Σ̃ = V_rᵀ Σ_c V_r. The cost is O(D³ + M·D·r + m·(M·r + r²)),
independent of K. The statistics merge exactly (tree reduce over row blocks).

The picks equal the literal algorithm's whenever the top-r singular subspace is well defined; if
C is rank-deficient or σ_r = σ_{r+1}, both pick an arbitrary basis of the tie and may differ.
At most r picks exist (after r the projected texts are exhausted), so basis_size ≤ min(r, K, D).

Span rank. The reference code's default r = 80 was made for ViT-H heads (width 80); a narrower
head's C has a lower rank (a ViT-B head's ≤ 66), and the singular directions past it are float
noise, which makes the picks change under noise of 1e-7 relative to the data. `span_rank="auto"`
(the default) uses min(80, numerical rank of the statistics): the number of singular values of the
uncentred C above `rank_rtol` (default 1e-5, far above float32 rounding, far below a real
direction's share) times the largest. An integer is used literally (to reproduce the reference).

Statistics are kept relative to a fixed per-dimension `shift` (any constant; a block's mean is a
good choice) so that the centred covariance does not come from cancelling two huge numbers when
the contributions have a large mean. With shift 0 the fields are the plain ΣC and ΣCᵀC.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from clipscope.errors import ConfigError, DataError

REFERENCE_SPAN_RANK = 80
"""The reference code's r (made for ViT-H heads, width 80)."""
DEFAULT_SPAN_RANK = "auto"
"""min(REFERENCE_SPAN_RANK, numerical rank of the head's statistics)."""
DEFAULT_RANK_RTOL = 1e-5
"""Relative tolerance on singular values (of the uncentred C) for the numerical rank."""


@dataclass(frozen=True)
class TextSpanStats:
    """Sufficient statistics of one head's contributions C (float64), relative to `shift`.

    count = K, sum = Σ_k (c_k − shift), gram = Σ_k (c_k − shift)(c_k − shift)ᵀ.
    """

    count: int
    sum: Float[Tensor, "embed"]
    gram: Float[Tensor, "embed embed2"]
    shift: Float[Tensor, "embed"]
    spectrum: tuple[Tensor, Tensor] | None = field(default=None, compare=False, repr=False)
    """Optional cache (a stored reduction keeps it): (eigenvalues, eigenvectors) of the symmetrised
    uncentred Gram exactly as `uncentred_eigenvalues` / `uncentred_eigenvectors` compute them."""

    @property
    def dim(self) -> int:
        return int(self.sum.shape[0])

    @property
    def mean(self) -> Float[Tensor, "embed"]:
        """Mean contribution over the K images."""
        return self.shift + self.sum / self.count

    def uncentred_gram(self) -> Float[Tensor, "embed embed2"]:
        """ΣCᵀC without shift."""
        s, t = self.shift, self.sum
        return self.gram + torch.outer(t, s) + torch.outer(s, t) + self.count * torch.outer(s, s)

    def _symmetric_gram(self) -> Float[Tensor, "embed embed2"]:
        gram = self.uncentred_gram()
        return 0.5 * (gram + gram.T)

    def uncentred_eigenvalues(self) -> Float[Tensor, "embed"]:
        """Eigenvalues (ascending) of ΣCᵀC: the squared singular values of the uncentred C."""
        return self.spectrum[0] if self.spectrum is not None else torch.linalg.eigvalsh(self._symmetric_gram())

    def uncentred_eigenvectors(self) -> Float[Tensor, "embed embed2"]:
        """Eigenvectors (columns, ascending eigenvalue) of ΣCᵀC: the right singular vectors of C."""
        return self.spectrum[1] if self.spectrum is not None else torch.linalg.eigh(self._symmetric_gram())[1]

    def with_spectrum(self) -> "TextSpanStats":
        """The same statistics carrying their (computed once) spectrum, so later searches skip both eigh."""
        return dataclasses.replace(self, spectrum=(self.uncentred_eigenvalues(), self.uncentred_eigenvectors()))

    def covariance(self) -> Float[Tensor, "embed embed2"]:
        """Unbiased covariance Σ_c of the contributions over images."""
        if self.count < 2:
            raise DataError(f"TextSpan needs at least 2 images for a variance, got count={self.count}")
        centred = self.gram - torch.outer(self.sum, self.sum) / self.count
        centred = 0.5 * (centred + centred.T)
        return centred / (self.count - 1)

    def rebased(self, shift: Float[Tensor, "embed"]) -> "TextSpanStats":
        """The same statistics expressed relative to another shift (exact up to rounding)."""
        shift = shift.to(self.sum)
        d = self.shift - shift
        t = self.sum
        gram = self.gram + torch.outer(t, d) + torch.outer(d, t) + self.count * torch.outer(d, d)
        return TextSpanStats(self.count, t + self.count * d, gram, shift.clone())


@dataclass(frozen=True)
class TextSpanResult:
    """Output of TextSpan for one head; the i-th entry of every field belongs to the i-th pick.

    indices           picked rows of the text pool, in pick order
    variances         the pick criterion Var_images(C R_jᵀ) at pick time (R_j residualised, not
                      re-normalised) — the values the literal algorithm maximises
    explained         variance of C along the pick's unit direction, uᵀ Σ_c u (Σ_c already
                      residualised by the earlier picks); the picks' directions are orthonormal,
                      so cumulative sums are the variance of C inside the span of the picks
    explained_ratio   explained / total_variance
    residual_variance total variance left in C after each pick (= trace of the residual Σ_c)
    basis             the picked texts as the algorithm used them: projected onto the span of C
                      and residualised against earlier picks (embedding space, not normalised)
    directions        basis rows divided by their norms (orthonormal)
    total_variance    trace(Σ_c) before any pick
    mean              mean contribution over images (add it back when reconstructing)
    span_rank         number of singular directions actually used (`resolve_span_rank`: min(r, K, D),
                      r = min(80, numerical rank) under "auto")
    """

    indices: Tensor
    variances: Float[Tensor, "pick"]
    explained: Float[Tensor, "pick"]
    explained_ratio: Float[Tensor, "pick"]
    residual_variance: Float[Tensor, "pick"]
    basis: Float[Tensor, "pick embed"]
    directions: Float[Tensor, "pick embed"]
    total_variance: Float[Tensor, ""]
    mean: Float[Tensor, "embed"]
    span_rank: int


def _check_rows(name: str, x: Tensor) -> None:
    if x.ndim != 2:
        raise ConfigError(f"{name} must be a 2-d [row, embed] tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ConfigError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def textspan_stats(
    contributions: Float[Tensor, "sample embed"],
    *,
    shift: Float[Tensor, "embed"] | None = None,
) -> TextSpanStats:
    """Sufficient statistics of a block of contribution rows, accumulated in float64.

    `shift` (default 0) is subtracted before summing; blocks with different shifts still merge.
    """
    _check_rows("contributions", contributions)
    c = contributions.to(torch.float64)
    dim = c.shape[1]
    if shift is None:
        s = torch.zeros(dim, dtype=torch.float64, device=c.device)
    else:
        if shift.shape != (dim,):
            raise ConfigError(f"shift must have shape ({dim},), got {tuple(shift.shape)}")
        s = shift.to(c).clone()
        c = c - s
    return TextSpanStats(int(c.shape[0]), c.sum(dim=0), c.T @ c, s)


def merge_stats(a: TextSpanStats, b: TextSpanStats) -> TextSpanStats:
    """Statistics of the union of two disjoint row sets (b is rebased onto a's shift if needed)."""
    if a.dim != b.dim:
        raise ConfigError(f"cannot merge TextSpan stats of embed dims {a.dim} and {b.dim}")
    if not torch.equal(a.shift, b.shift):
        b = b.rebased(a.shift)
    return TextSpanStats(a.count + b.count, a.sum + b.sum, a.gram + b.gram, a.shift)


def numerical_rank(stats: TextSpanStats, rtol: float = DEFAULT_RANK_RTOL) -> int:
    """Number of singular values of the uncentred C greater than `rtol` times the largest (0 if C = 0)."""
    if not isinstance(rtol, (int, float)) or isinstance(rtol, bool) or not 0 < rtol < 1:
        raise ConfigError(f"rank_rtol must be a number in (0, 1), got {rtol!r}")
    eig = stats.uncentred_eigenvalues().clamp_min(0)
    singular = eig.sqrt()
    top = singular.max()
    if not bool(top > 0):
        return 0
    return int((singular > rtol * top).sum())


def resolve_span_rank(
    stats: TextSpanStats, span_rank: int | str = DEFAULT_SPAN_RANK, rank_rtol: float = DEFAULT_RANK_RTOL
) -> int:
    """The number of singular directions TextSpan projects on: `"auto"` → min(80, numerical rank),
    an integer → itself; both capped by the count of images and the embedding dimension."""
    if span_rank == "auto":
        rank = min(REFERENCE_SPAN_RANK, numerical_rank(stats, rank_rtol))
        if rank < 1:
            raise DataError("TextSpan: the head's contributions are all zero (numerical rank 0)")
    elif isinstance(span_rank, int) and not isinstance(span_rank, bool) and span_rank >= 1:
        rank = span_rank
    else:
        raise ConfigError(f"span_rank must be 'auto' or an integer ≥ 1, got {span_rank!r}")
    return min(rank, stats.count, stats.dim)


def span_basis(stats: TextSpanStats, span_rank: int) -> Float[Tensor, "embed rank"]:
    """Top-`span_rank` right singular vectors of the uncentred C (columns, by decreasing value)."""
    rank = min(span_rank, stats.count, stats.dim)
    return stats.uncentred_eigenvectors()[:, -rank:].flip(-1)


def textspan_from_stats(
    stats: TextSpanStats,
    texts: Float[Tensor, "text embed"],
    *,
    basis_size: int,
    span_rank: int | str = DEFAULT_SPAN_RANK,
    rank_rtol: float = DEFAULT_RANK_RTOL,
) -> TextSpanResult:
    """Greedy TextSpan picks from the statistics of one head (see the module docstring).

    `span_rank`: "auto" (min(80, numerical rank at `rank_rtol`)) or an integer used literally.
    Ties in the pick criterion go to the lowest text index; a text is never picked twice.
    """
    _check_rows("texts", texts)
    if texts.shape[1] != stats.dim:
        raise ConfigError(f"texts must have embed dim {stats.dim} like the statistics, got {texts.shape[1]}")
    if stats.count < 2:
        raise DataError(f"TextSpan needs at least 2 images for a variance, got count={stats.count}")
    rank = resolve_span_rank(stats, span_rank, rank_rtol)
    n_texts = texts.shape[0]
    if not isinstance(basis_size, int) or not 1 <= basis_size <= min(rank, n_texts):
        raise ConfigError(
            f"basis_size must be an integer in [1, min(span rank {rank}, texts {n_texts})], got {basis_size!r}"
        )
    cov = stats.covariance()
    basis_vectors = span_basis(stats, rank)  # [D, r]
    r_coord = texts.to(cov) @ basis_vectors  # texts projected onto the span, in its coordinates
    cov_coord = basis_vectors.T @ cov @ basis_vectors
    cov_coord = 0.5 * (cov_coord + cov_coord.T)
    total = torch.trace(cov)
    # W = R̃ Σ̃ is kept up to date so each round costs O(M·r): var_j = ⟨W_j, R̃_j⟩.
    weighted = r_coord @ cov_coord
    scale = r_coord.norm(dim=1).max()
    picked = torch.zeros(n_texts, dtype=torch.bool, device=cov.device)
    indices, variances, explained, basis = [], [], [], []
    for round_ in range(basis_size):
        var = torch.einsum("mr,mr->m", weighted, r_coord).masked_fill(picked, float("-inf"))
        j = int(torch.argmax(var))
        w = r_coord[j].clone()
        norm = w.norm()
        if not bool(norm > 1e-12 * scale):
            raise DataError(
                f"TextSpan ran out of text directions after {round_} picks (remaining texts have no "
                f"component in the span of C); lower basis_size"
            )
        u = w / norm
        a = r_coord @ u
        cov_u = cov_coord @ u
        s = u @ cov_u
        b = weighted @ u
        weighted.addr_(a, cov_u, alpha=-1).addr_(b - s * a, u, alpha=-1)
        r_coord.addr_(a, u, alpha=-1)
        cov_coord = cov_coord - torch.outer(u, cov_u) - torch.outer(cov_u, u) + s * torch.outer(u, u)
        picked[j] = True
        indices.append(j)
        variances.append(var[j])
        explained.append(s)
        basis.append(w)
    explained_t = torch.stack(explained)
    basis_coord = torch.stack(basis)
    basis_emb = basis_coord @ basis_vectors.T
    return TextSpanResult(
        indices=torch.tensor(indices, dtype=torch.long, device=cov.device),
        variances=torch.stack(variances),
        explained=explained_t,
        explained_ratio=explained_t / total,
        residual_variance=total - torch.cumsum(explained_t, dim=0),
        basis=basis_emb,
        directions=basis_emb / basis_emb.norm(dim=1, keepdim=True),
        total_variance=total,
        mean=stats.mean,
        span_rank=int(basis_vectors.shape[1]),
    )


def textspan(
    contributions: Float[Tensor, "sample embed"],
    texts: Float[Tensor, "text embed"],
    *,
    basis_size: int,
    span_rank: int | str = DEFAULT_SPAN_RANK,
    rank_rtol: float = DEFAULT_RANK_RTOL,
) -> TextSpanResult:
    """TextSpan on an in-memory C (statistics with the mean as shift, then `textspan_from_stats`)."""
    _check_rows("contributions", contributions)
    shift = contributions.to(torch.float64).mean(dim=0)
    return textspan_from_stats(
        textspan_stats(contributions, shift=shift), texts, basis_size=basis_size, span_rank=span_rank,
        rank_rtol=rank_rtol,
    )
