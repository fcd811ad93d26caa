"""Krylov reuse: the quadratic lower CG's directions, kept, and a Galerkin solve on them
(docs/bounds.md 15.7).

With g quadratic in x the lower CG's directions d_i and their products A d_i span a Krylov
space of the one Hessian A. The correction's forward solve A v = B u has that same A, and
where B u lies in (or near) the space, as it does for a weight on ||x||^2 (B = a x_eps), the
Galerkin solution v = S (S^T A S)^+ S^T B u from the kept pairs costs no product with A. It is
only a starting point: the forward CG recomputes its true residual (one product) and goes on
from there, so the bound never depends on how good it is. In exact arithmetic it is never worse
than the cold start 0, which lies in the space: Galerkin is the A-norm-best point of it.
"""
from __future__ import annotations

import numpy as np

from ..threads import one_blas_thread

__all__ = ["KrylovBasis", "galerkin", "basis_steps", "BASIS_MAX_BYTES", "BASIS_MIN_STEPS"]

#: The kept directions and products of one lower solve take at most this many bytes.
BASIS_MAX_BYTES = 64 << 20

#: Fewer directions than this are not kept at all (a span too small to start from).
BASIS_MIN_STEPS = 8


def basis_steps(n: int, per_entry: float) -> int:
    """How many directions a lower CG keeps for x of n entries whose data hold `per_entry`
    numbers per entry (`fused.data_per_entry`): at most BASIS_MAX_BYTES and per_entry. The
    Galerkin solve of k directions costs about 2 k^2 n flops, a cold forward CG as long as the
    lower solve about k products of 2 n per_entry flops each, so it pays while k <= per_entry:
    dense data keep hundreds, a stencil none. Not n: in floating point an ill-conditioned CG's
    directions lose their independence, and its first n span less than R^n (ridge with
    condition number 1e3 at n = 100 takes 260-410 steps, and needs them all).
    0 (keep none) below BASIS_MIN_STEPS."""
    steps = int(min(BASIS_MAX_BYTES // (16 * max(n, 1)), per_entry))
    return steps if steps >= BASIS_MIN_STEPS else 0


class KrylovBasis:
    """The (d, A d) pairs of one lower CG solve, over its restart segments, up to `cap` of
    them. `slots` lends the fused C loop a buffer, `list_for_python` is `krylov.cg`'s list."""

    def __init__(self, n: int, cap: int) -> None:
        self.n, self.cap = n, cap
        self.blocks: list[np.ndarray] = []
        self.pairs: list[tuple[np.ndarray, np.ndarray]] = []

    def kept(self) -> int:
        return sum(int(b.shape[0]) for b in self.blocks) + len(self.pairs)

    def slots(self, steps: int) -> np.ndarray | None:
        """A (k, 2, n) buffer for the next fused segment of at most `steps` steps, or None when
        the byte budget is spent (np.empty: only the rows the loop writes are touched)."""
        room = min(steps, self.cap - self.kept())
        return np.empty((room, 2, self.n)) if room > 0 else None

    def took(self, buffer: np.ndarray | None, steps: int) -> None:
        """Keep the first `steps` rows the fused loop wrote into `buffer`."""
        if buffer is not None and steps > 0:
            self.blocks.append(buffer[:min(steps, buffer.shape[0])])

    def list_for_python(self) -> list[tuple[np.ndarray, np.ndarray]] | None:
        """`krylov.cg`'s basis list while the budget lasts (None: keep no more)."""
        return self.pairs if self.kept() < self.cap else None

    def matrices(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(S, A S) with the directions as rows, or None when nothing was kept."""
        rows = [b[:, 0, :] for b in self.blocks] + [p[0][None, :] for p in self.pairs]
        products = [b[:, 1, :] for b in self.blocks] + [p[1][None, :] for p in self.pairs]
        if not rows:
            return None
        k = min(sum(r.shape[0] for r in rows), self.cap)
        return np.vstack(rows)[:k], np.vstack(products)[:k]


def galerkin(S: np.ndarray, AS: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """v = S^T y with (S A S^T) y = S b, S's rows the kept directions: the A-norm-best
    approximation of A^{-1} b in their span; None when there are none, when some d^T (A d) is
    not positive (these cannot be an SPD matrix's products) or the projection is not finite.
    The Galerkin matrix is symmetrised and scaled to a unit diagonal (the directions are
    A-conjugate in exact arithmetic, nearly so in floating point), and its eigenvalues below
    1e-12 of the largest are dropped (directions that lost their independence)."""
    if S.shape[0] == 0:
        return None
    with one_blas_thread():  # small dense algebra between kernel calls (`one_blas_thread`)
        return _projected(S, AS, b)


def _projected(S: np.ndarray, AS: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """`galerkin`'s projection (BLAS already at one thread)."""
    G = S @ AS.T
    G = 0.5 * (G + G.T)
    diagonal = np.diag(G)
    if not (np.all(np.isfinite(G)) and np.all(diagonal > 0)):
        return None  # not the products of an SPD matrix: d^T A d > 0 for every kept d
    scale = np.sqrt(diagonal)
    try:
        w, V = np.linalg.eigh(G / np.outer(scale, scale))
    except np.linalg.LinAlgError:
        return None
    keep = w > 1e-12 * w[-1]
    y = V[:, keep] @ ((V[:, keep].T @ ((S @ b) / scale)) / w[keep]) / scale
    v = S.T @ y
    return v if np.all(np.isfinite(v)) else None
