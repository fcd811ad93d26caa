"""Certified upper bounds on ||K||^2 = lambda_max(K^T K) whose cost scales with the data
(docs/constants.md 4).

Four methods, chosen by the cost of a dense Gram matrix (`method_for`,
`quantities.operator_quantities`):

- eigvalsh of the smaller Gram matrix G (side <= EIGH_SIDE_LIMIT, R D side <= LMIN_FLOP_LIMIT):
  exact eigenvalues plus the rounding margin `gram_margin` (forming G, and eigvalsh's backward
  error); gives lambda_min too.
- Cholesky certificate (Gram formed, side <= CHOLESKY_SIDE_LIMIT, R D side <= GRAM_FLOP_LIMIT): a
  Lanczos estimate theta of lambda_max(G) (from below: only a guess) picks c = theta (1 + s); if
  the floating-point Cholesky factorisation of M = fl(c I - G) runs to completion, then (Higham,
  Accuracy and Stability, Thm 10.3, any summation order, so blocked LAPACK too) M + dM = R^T R >= 0
  with |dM| <= g d d^T, d_i = sqrt((M + dM)_ii), g = gamma_{n+1}, hence
  ||dM||_2 <= g tr(M + dM) <= g/(1 - g) tr(M), and forming M's diagonal adds at most
  u max|c - G_ii|. So lambda_max(G) <= c + g/(1 - g) tr(M) + u max|c - G_ii|, and
  ||K||^2 <= that + the Gram rounding margin. n^3/3 flops instead of an eigensolve. If the
  factorisation breaks down, c was below lambda_max(G): s grows and it tries again.
- Where lambda_min is not read and the Gram side is above CERTIFY_SIDE, the Cholesky certificate
  replaces eigvalsh at every side, and the Gram matrix is summed from float32 blocks (`gram32`,
  half the time; its rigorous margin at most GRAM32_LOOSENESS of ||K||_F^2 / side).
- Where lambda_min is read (ridge: mu = lambda_min + e^theta) and the side is above
  EIGH_SIDE_LIMIT, its mirror certifies lambda_min from below (`cholesky_floor`): if fl(G - s I)
  factors, lambda_min(G) >= s - g/(1 - g) tr(M) - u max|G_ii - s|, s just below the same Lanczos
  run's bottom estimate (or, where that is off, an estimate from a Lanczos run on G^-1 with G's
  own factor). Two factorisations instead of an eigensolve (3x faster at 2000).
- Block sums (dense K above the Gram limit): K^T K = sum_b K_b^T K_b over blocks K_b of s
  consecutive rows (columns if K is wide), so ||K||^2 <= sum_b ||K_b||^2 (the triangle
  inequality), each ||K_b||^2 the largest eigenvalue of the s x s Gram K_b K_b^T by eigvalsh +
  its margin. R D s flops with s = BLOCK_ROWS: O(nnz), a few passes' worth of BLAS-3 work. Exact
  when every block shares K's top right singular vector (a dominant mean direction, as in
  non-negative data); up to about min(R, D)/s times ||K||^2 for isotropic data (Gaussian
  20000 x 2000, s = 32: 44x, against 1160x for ||K||_F^2).
- O(nnz) for sparse K above the Gram limit: min(||K||_F^2, Collatz-Wielandt bound of |K|^T |K|).
  ||K|| <= || |K| || and, for the non-negative symmetric A = |K|^T |K| and ANY positive w,
  lambda_max(A) <= max_j (A w)_j / w_j (Collatz-Wielandt); w from a few power steps on A makes
  the bound decrease towards || |K| ||^2 (exact for non-negative data), w = 1 gives at most
  ||K||_1 ||K||_inf. The power steps only choose w: every w gives a valid bound, so nothing rests
  on their convergence.

No deterministic certificate of ||K||^2 <= c within a constant factor for general dense
mixed-sign K is known to cost less than a Gram matrix: k < min(R, D) products with K or K^T
leave a direction unseen (an adversary adds mass there), and entrywise bounds (Frobenius, Schur
and Collatz-Wielandt tests) bound || |K| ||, about sqrt(min(R, D)) times ||K|| for random signs.
Block sums trade the factor against the cost linearly.

A power iteration or Lanczos value is never used as a bound by itself: it approaches
lambda_max from below.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
from scipy.linalg import lapack

from ...threads import in_threads

U = 2.0 ** -53
EIGH_SIDE_LIMIT = 1000  # Gram side up to which eigvalsh gives normsq and lmin at once
CERTIFY_SIDE = 128  # ... and above which normsq alone takes the Cholesky certificate instead
CHOLESKY_SIDE_LIMIT = 4000  # largest Gram side for the Cholesky certificate
GRAM_FLOP_LIMIT = 4.0e9  # largest R D min(R, D) for which the whole Gram matrix is formed
LMIN_FLOP_LIMIT = 1.0e11  # ... where lambda_min is needed too (above it: the trivial bound 0)
BLOCK_ROWS = 32  # rows per block of the block sums: R D 32 flops, about 10 passes over K
LANCZOS_STEPS = 40
U32 = 2.0 ** -24  # float32's unit roundoff
ETA32 = 2.0 ** -149  # float32's smallest subnormal: a bound on an underflowed result's error
GRAM32_ROWS = 512  # rows per float32 block Gram of `gram32` (its margin grows with them)
GRAM64_ROWS = 512  # rows per float64 block Gram (`quantities._gram64`; threads share the blocks)
#: Gram side from which the float64 Gram and its eigvalsh run on the caller's BLAS threads
#: (`threads.blas_threads`) instead of one thread: at 2000 (20000 x 2000 data, 2 cores) the
#: eigvalsh takes 265 ms instead of 464 and one product K^T K 821 ms instead of 968 by blocks
#: on Python threads, more than the ~0.1 s the spinning pool then costs the first solve; at
#: 1000 the eigvalsh saves 16 ms, less.
THREADED_SIDE = 1500
GRAM32_LOOSENESS = 0.02  # largest margin of `gram32`, relative to ||K||_F^2 / min(R, D)
GRAM32_MIN_FLOPS = 1e8  # R D min(R, D) below which the float64 Gram (a few ms) is kept
CW_STEPS = 8  # at most this many power steps on |K|^T |K| choose the Collatz-Wielandt vector
CW_STALL = 1e-3  # ... and they stop once a step improves the bound by less than this
CHUNK_ENTRIES = 2 ** 22  # entries of |K| per block of rows (a 32 MB buffer; few BLAS calls)
SLACKS = (1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)  # c = estimate (1 + s), in turn
#: lambda_min's shifts s = estimate (1 - t), in turn (`cholesky_floor`): few, since a failed
#: factorisation costs up to a whole one, and eigvalsh is the fallback
FLOOR_SLACKS = (1e-3, 3e-2, 0.3)
FLOOR_STEPS = 20  # Lanczos steps on G^-1 after the first shift failed


def gram_margin(rows: int, cols: int, fro2: float) -> float:
    """Rounding margin of lambda(G) for G = K^T K (or K K^T) formed in float64 and eigvalsh's
    backward error: (max + 10 min + 10) u ||K||_F^2 (covers gamma_R || |K|^T |K| || too)."""
    return (max(rows, cols) + 10 * min(rows, cols) + 10) * U * fro2 * 1.01


def method_for(rows: int, cols: int, sparse: bool = False, want_lmin: bool = False,
               tight: bool = False) -> str:
    """The method for ||K||^2 at this size: eigvalsh, cholesky, blocks (dense) or nnz (sparse)
    (module docstring). A Gram side up to EIGH_SIDE_LIMIT keeps the exact eigvalsh up to
    LMIN_FLOP_LIMIT (a step size 1/L of a first-order solver wants ||K||^2 exact; 20000 x 785
    hypercleaning is 1.2e10 flops); a larger side forms the Gram matrix only up to GRAM_FLOP_LIMIT,
    or up to LMIN_FLOP_LIMIT with `want_lmin` (lambda_min has no cheaper certified lower bound
    than 0 than one from the Gram matrix: eigvalsh, or `cholesky_floor` above EIGH_SIDE_LIMIT) or
    `tight` (step sizes 1/L of a first-order solver, on request:
    `quantities.compute_data_quantities(..., tight=True)`)."""
    side = min(rows, cols)
    flops = float(rows) * cols * side
    if side <= EIGH_SIDE_LIMIT and flops <= LMIN_FLOP_LIMIT:
        return "eigvalsh"
    if side <= CHOLESKY_SIDE_LIMIT and flops <= (LMIN_FLOP_LIMIT if want_lmin or tight
                                                 else GRAM_FLOP_LIMIT):
        return "cholesky"
    return "nnz" if sparse else "blocks"


def block_rows(rows: int, cols: int, size: int | None = None) -> int:
    """Rows (of the long side) per block of `block_sums`: `size` if given, else BLOCK_ROWS, at
    most the short side. Fixed, so the cost stays proportional to the data (R D s) at every
    size."""
    return max(1, min(size or BLOCK_ROWS, rows, cols))


class BlockSums(NamedTuple):
    """What `block_sums` computed: the sum of the blocks' lambda_max, how many blocks of how
    many rows, the short side, and the Grams' diagonals in order (the long side's squared row
    norms: ||k_i||^2 of K's rows when K is tall)."""

    total: float
    blocks: int
    size: int
    short: int
    diagonal: np.ndarray


def block_sums(K: np.ndarray, size: int | None = None, workers: int = 1) -> BlockSums | None:
    """sum_b lambda_max(K_b K_b^T) over blocks of s consecutive rows of K (of columns if K is
    wide: rows of K^T), s = `size` or `block_rows`, and the Grams' diagonals; None when a
    Gram is not finite (squares that overflow). K dense. The parts of CHUNK_ENTRIES entries run
    on up to `workers` threads (`threads.in_threads`) and are summed in order: the same bits for
    every `workers`. `block_bound` turns the sum into a certified bound.

    A diagonal entry is ||k_i||^2 summed by BLAS in some order: within gamma_D of it, as
    einsum's sum is, so the rounding margins that hold for one hold for the other."""
    long_side = K if K.shape[0] >= K.shape[1] else K.T
    n_long, short = long_side.shape
    s = block_rows(n_long, short, size)
    per_part = max(s, (CHUNK_ENTRIES // max(short, 1)) // s * s)  # whole blocks per BLAS call

    def part_sum(start: int) -> tuple[float, int, np.ndarray] | None:
        part = np.ascontiguousarray(long_side[start:start + per_part], dtype=np.float64)
        whole = part.shape[0] // s
        stacks = [part[:whole * s].reshape(whole, s, short)] if whole else []
        if part.shape[0] > whole * s:
            stacks.append(part[whole * s:][None])
        total, blocks, diagonals = 0.0, 0, []
        for stack in stacks:
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is tested below
                grams = stack @ stack.transpose(0, 2, 1)
            if not np.isfinite(grams).all():
                return None
            top = np.linalg.eigvalsh(grams)[:, -1]
            total += float(np.maximum(top, 0.0).sum())
            blocks += stack.shape[0]
            diagonals.append(np.einsum("bii->bi", grams).reshape(-1))
        return total, blocks, np.concatenate(diagonals)

    parts = list(in_threads(part_sum, range(0, n_long, per_part), workers))
    if any(p is None for p in parts):
        return None
    done = [p for p in parts if p is not None]
    return BlockSums(sum(t for t, _, _ in done), sum(b for _, b, _ in done), s, short,
                     np.concatenate([d for _, _, d in done]))


def block_bound(sums: BlockSums, fro2: float) -> float:
    """A certified ||K||^2 <= sums.total + margins, fro2 a certified upper bound on ||K||_F^2.

    Rounding: each block's Gram and eigvalsh are covered by `gram_margin(s, D, ||K_b||_F^2)`; their
    sum over blocks is at most (D + 10 s + 10) u 1.01 fro2; eigenvalues are clipped at 0 and the
    sum of the nb non-negative terms is rounded up by (1 + 2 (nb + 1) u)."""
    margin = (sums.short + 10 * sums.size + 10) * U * fro2 * 1.01
    bound = (sums.total + margin) * (1 + 2 * (sums.blocks + 2) * U)
    return bound if math.isfinite(bound) else math.inf


def block_sum_bound(K: np.ndarray, fro2: float, size: int | None = None,
                    workers: int = 1) -> tuple[float, int, int]:
    """(bound, blocks, s): `block_bound` of `block_sums` (inf when a Gram overflows)."""
    sums = block_sums(K, size, workers)
    if sums is None:
        return math.inf, 0, block_rows(max(K.shape), min(K.shape), size)
    return block_bound(sums, fro2), sums.blocks, sums.size


def gram32(K: np.ndarray, fro2: float,
           workers: int = 1) -> tuple[np.ndarray, float, float] | None:
    """(G, add, shift) with ||K||^2 <= (sqrt(lambda + add) + shift)^2 for every certified
    lambda >= lambda_max(G) (`lift`), G the float64 sum of float32 Grams of blocks of s =
    GRAM32_ROWS rows of K (columns if K is wide); or None where that would loosen ||K||^2 by
    more than GRAM32_LOOSENESS of its cheap lower bound ||K||_F^2 / min(R, D), or K is small.
    Half the time of the float64 Gram (single-precision syrk); fro2 a certified ||K||_F^2.

    Rounding (Higham, Accuracy and Stability, 3.5, any summation order): K32 = fl32(K) has
    |K - K32| <= u32 |K| + eta (eta = 2^-149 where it underflows), so ||K|| <= ||K32|| + shift,
    shift = u32 ||K||_F + sqrt(R D) eta. Each block Gram has |fl32(K_b^T K_b) - K_b^T K_b| <=
    gamma_s(u32) |K_b|^T |K_b| + s eta (underflowed products), summing the nb blocks in float64
    adds gamma_nb(u) of the sum of their moduli, and |X| <= Y gives ||X||_2 <= ||Y||_2 <=
    ||Y||_F, ||(|K32|^T |K32|)||_2 <= ||K32||_F^2 =: F. So ||K32^T K32 - G||_2 <= gamma_s(u32) F
    + gamma_nb(u) (1 + gamma_s(u32)) F + abs, and the eigensolver's margin (10 side + 10) u F
    is added as in `gram_margin`."""
    R, D = K.shape
    long_side = K if R >= D else K.T
    n_long, side = long_side.shape
    s = min(GRAM32_ROWS, n_long)
    if float(R) * D * side < GRAM32_MIN_FLOPS or not 0.0 < fro2 <= 1e30:
        return None
    blocks = -(-n_long // s)
    root = math.sqrt(fro2)
    F = (root * (1 + U32) + math.sqrt(float(R) * D) * ETA32) ** 2 * (1 + 4 * U)
    gam = s * U32 / (1 - s * U32)
    floor = 2.0 * n_long * side * ETA32
    acc = blocks * U / (1 - blocks * U) * ((1 + gam) * F + floor)
    eig = (10 * side + 10) * U * ((1 + gam) * F + floor + acc) * 1.01
    add = (gam * F + floor + acc + eig) * (1 + 8 * U)
    if add > GRAM32_LOOSENESS * fro2 / side:
        return None
    G = summed_grams(long_side, s, np.float32, workers)
    shift = (U32 * root + math.sqrt(float(R) * D) * ETA32) * (1 + 4 * U)
    return G, add, shift


#: Blocks per group of `summed_grams`: a group's Gram is one task of its threads. Fixed, so the
#: summation order (and the bits of G) do not depend on the number of threads.
GRAM_GROUP_BLOCKS = 2


def summed_grams(long_side: np.ndarray, rows: int, dtype: type,
                 workers: int = 1) -> np.ndarray:
    """G = sum over blocks of `rows` rows of long_side of part^T part, each part in `dtype`
    (syrk: NumPy detects the transposed operand), summed in float64 by groups of
    GRAM_GROUP_BLOCKS blocks on up to `workers` threads, the groups then in order."""
    n_long, side = long_side.shape
    group = rows * GRAM_GROUP_BLOCKS

    def group_sum(start: int) -> np.ndarray:
        G = np.zeros((side, side))
        for lo in range(start, min(start + group, n_long), rows):
            part = np.asarray(long_side[lo:lo + rows], dtype=dtype, order="C")
            G += part.T @ part
        return G

    G = np.zeros((side, side))
    for partial in in_threads(group_sum, range(0, n_long, group), workers):
        G += partial
    return G


def lift(lam: float, add: float, shift: float) -> float:
    """(sqrt(lam + add) + shift)^2 rounded up: `gram32`'s bound on ||K||^2 from a certified
    lam >= lambda_max(G)."""
    bound = (math.sqrt(max(lam, 0.0) + add) * (1 + 2 * U) + shift) ** 2 * (1 + 8 * U)
    return bound if math.isfinite(bound) else math.inf


def gram_flops(rows: int, cols: int) -> int:
    """Flops of the smaller Gram matrix by syrk: long side x side x (side + 1), half a general
    product's (a multiply-add counts 2)."""
    side = min(rows, cols)
    return max(rows, cols) * side * (side + 1)


def certificate_flops(side: int, tries: int, steps: int = LANCZOS_STEPS) -> int:
    """Flops of `lanczos_max` (a product with G and two reorthogonalisations per step) and of
    `tries` Cholesky factorisations (side^3 / 3 each)."""
    steps = min(steps, side)
    return steps * 2 * side * side + 4 * steps * steps * side + tries * side ** 3 // 3


def lanczos_max(G: np.ndarray, steps: int = LANCZOS_STEPS) -> float:
    """The Rayleigh quotient of the top Ritz vector of G (symmetric) after `steps` Lanczos steps
    with full reorthogonalisation: <= lambda_max(G) up to rounding, an ESTIMATE (never a bound)."""
    basis, vectors, _ = _lanczos(lambda v: G @ v, G.shape[0], steps)
    return _rayleigh(G, basis.T @ vectors[:, -1])


def lanczos_ends(G: np.ndarray, steps: int = LANCZOS_STEPS) -> tuple[float, float]:
    """(low, high): the Rayleigh quotients of G's bottom and top Ritz vectors after `steps`
    Lanczos steps. A Rayleigh quotient lies in [lambda_min, lambda_max] up to rounding even
    where Q lost orthogonality (a graded G: the top Ritz value itself came out 130x too large):
    ESTIMATES from inside, never bounds."""
    basis, vectors, _ = _lanczos(lambda v: G @ v, G.shape[0], steps)
    return _rayleigh(G, basis.T @ vectors[:, 0]), _rayleigh(G, basis.T @ vectors[:, -1])


def _rayleigh(G: np.ndarray, v: np.ndarray) -> float:
    """v^T G v / v^T v (0 for v = 0): in [lambda_min, lambda_max] up to rounding, for any v."""
    vv = float(v @ v)
    return float(v @ (G @ v)) / vv if vv > 0 else 0.0


def _lanczos(apply: Callable[[np.ndarray], np.ndarray], n: int,
             steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Q, the eigenvectors and the eigenvalues of T) after `steps` Lanczos steps on the
    symmetric operator `apply`, full reorthogonalisation, from a seeded random start."""
    steps = max(1, min(steps, n))
    Q = np.zeros((steps, n))
    q = np.random.default_rng(0).standard_normal(n)
    q /= np.linalg.norm(q)
    alpha, beta = [], []
    for k in range(steps):
        Q[k] = q
        w = apply(q)
        alpha.append(float(q @ w))
        w -= Q[:k + 1].T @ (Q[:k + 1] @ w)  # full reorthogonalisation (twice is enough)
        w -= Q[:k + 1].T @ (Q[:k + 1] @ w)
        b = float(np.linalg.norm(w))
        if b <= 1e-12 * max(abs(alpha[-1]), 1e-300) or k == steps - 1:
            break
        beta.append(b)
        q = w / b
    T = np.diag(alpha) + np.diag(beta[:len(alpha) - 1], 1) + np.diag(beta[:len(alpha) - 1], -1)
    values, vectors = np.linalg.eigh(T)
    return Q[:len(alpha)], vectors, values


def cholesky_certificate(G: np.ndarray, estimate: float) -> tuple[float, int] | None:
    """(c', tries): a certified lambda_max(G) <= c' from the first c = estimate (1 + s) for which
    fl(c I - G) has a Cholesky factor (module docstring); None if every slack fails."""
    n = G.shape[0]
    diag = np.diag(G).copy()
    if not (math.isfinite(estimate) and np.all(np.isfinite(G))):
        return None
    g = (n + 1) * U / (1 - (n + 1) * U)
    g = 2 * g  # safety factor over Higham's gamma_{n+1}
    scale = max(estimate, float(diag.max(initial=0.0)), 1e-300)
    for tries, s in enumerate(SLACKS, start=1):
        c = max(estimate, 0.0) * (1 + s) + s * 1e-12 * scale
        M = -G  # a copy, negated exactly
        M[np.diag_indices(n)] += c
        if not _factors(M):
            continue
        trace_m = float(np.sum(c - diag))
        bound = c + g / (1 - g) * abs(trace_m) * (1 + 4 * n * U) + U * float(np.max(np.abs(c - diag)))
        bound *= 1 + 4 * U
        return (bound, tries) if math.isfinite(bound) else None
    return None


def cholesky_floor(G: np.ndarray, estimate: float) -> tuple[float, int] | None:
    """(s', tries): a certified lambda_min(G) >= s' > 0 from the first shift s for which
    fl(G - s I) has a Cholesky factor; None if none does (the caller falls back to eigvalsh).
    The shifts are estimate (1 - t), t in FLOOR_SLACKS; where the first fails (G's Lanczos run
    left lambda_min unconverged: a graded or ill-conditioned G), G itself is factored and a
    Lanczos run on G^-1, whose top end converges fast, gives a new estimate first. The mirror
    of `cholesky_certificate`: M + dM = R^T R >= 0 with ||dM||_2 <= g/(1 - g) tr(M) (Higham,
    Thm 10.3), and forming M's diagonal adds at most u max|G_ii - s|, so G - s I >= -(that)
    and lambda_min(G) >= s - that."""
    n = G.shape[0]
    if not (math.isfinite(estimate) and estimate > 0 and np.all(np.isfinite(G))):
        return None
    found = _shifted_factor(G, estimate * (1 - FLOOR_SLACKS[0]))
    if found is not None:
        return found, 1
    R = G.copy()  # the Lanczos estimate was above lambda_min by more than its slack
    if not _factors(R):
        return None  # G itself is not positive definite in floating point
    top = _lanczos(lambda v: lapack.dpotrs(R.T, v, lower=0)[0], n, FLOOR_STEPS)[2][-1]
    if not top > 0:
        return None
    for tries, t in enumerate(FLOOR_SLACKS, start=3):
        found = _shifted_factor(G, (1 - t) / top)  # a Ritz value of G^-1: 1/top >= lambda_min
        if found is not None:
            return found, tries
    return None


def _shifted_factor(G: np.ndarray, shift: float) -> float | None:
    """s' > 0 with lambda_min(G) >= s' if fl(G - shift I) has a Cholesky factor, else None
    (`cholesky_floor`'s certificate)."""
    n = G.shape[0]
    diag = np.diag(G).copy()
    M = G.copy()
    M[np.diag_indices(n)] -= shift
    if not _factors(M):
        return None
    g = 2 * (n + 1) * U / (1 - (n + 1) * U)  # a safety factor 2 over Higham's gamma_{n+1}
    trace_m = float(np.sum(diag - shift))
    loss = g / (1 - g) * abs(trace_m) * (1 + 4 * n * U) + U * float(np.max(np.abs(diag - shift)))
    floor = (shift - loss) * (1 - 4 * U)
    return floor if floor > 0 and math.isfinite(floor) else None


def _factors(M: np.ndarray) -> bool:
    """Whether LAPACK's Cholesky factorisation of the symmetric M runs to completion (potrf's
    info = 0: every pivot > 0 and not NaN). M.T is M's Fortran-ordered view (M is symmetric), so
    potrf works in place with no copy and no zeroed triangle: 2x faster than np.linalg.cholesky
    at 500 x 500."""
    _, info = lapack.dpotrf(M.T, lower=0, overwrite_a=1, clean=0)
    return bool(info == 0)


def collatz_wielandt(K, steps: int = CW_STEPS) -> tuple[float, int]:
    """min over w_0 = 1, w_1, ... (w_{k+1} = A w_k / max, floored > 0; at most `steps`, until
    a step improves by less than CW_STALL) of max_j (A w)_j / w_j with A = |K|^T |K|: a
    certified upper bound on || |K| ||^2 >= ||K||^2 (outward rounding: every entry of A w is a
    sum of non-negative products), and the number of products A w it took."""
    R, D = K.shape
    times_abs_gram = _abs_gram_product(K)
    w = np.ones(D)
    best, passes = math.inf, 0
    grow = 1 + 4 * (R + D + 4) * U  # relative error of each entry of A w (non-negative sums)
    for _ in range(steps + 1):
        Aw = times_abs_gram(w)
        passes += 1
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(Aw > 0, Aw / w, 0.0)
        value = float(ratio.max(initial=0.0)) * grow * (1 + 2 * U)
        if not math.isfinite(value):  # overflow: no information (inf stays the answer)
            break
        if value > best * (1 - CW_STALL):  # converged: more passes over the data buy < 0.1%
            best = min(best, value)
            break
        best = min(best, value)
        top = float(Aw.max(initial=0.0))
        if top == 0.0 or not math.isfinite(top):
            break
        w = np.maximum(Aw / top, 1e-8)  # any positive w gives a valid bound
    return best, passes


def _abs_gram_product(K):
    """w -> |K|^T (|K| w). Sparse K: |K| once (a copy of the stored values only). Dense K: |K|
    by blocks of rows into one reused buffer, never a second matrix the size of K (allocating
    one cost more than all the products at 20000 x 2000)."""
    if hasattr(K, "toarray"):
        absK = abs(K)
        return lambda w: np.asarray(absK.T @ np.asarray(absK @ w).reshape(-1)).reshape(-1)
    R, D = K.shape
    rows = max(1, min(R, int(CHUNK_ENTRIES // max(D, 1))))
    buffer = np.empty((rows, D))

    def product(w: np.ndarray) -> np.ndarray:
        out = np.zeros(D)
        for start in range(0, R, rows):
            block = np.abs(K[start:start + rows], out=buffer[:min(rows, R - start)])
            out += block.T @ (block @ w)
        return out

    return product


FILTER_GRID_POINTS = 2 ** 16  # frequencies of a 2-D (or higher) filter's response
FILTER_GRID_1D = 2 ** 12  # ... and a 1-D filter's (delta^2/2 = 3e-7: the margin is negligible)
FFT_REL = 1e-9  # FFT rounding margin, relative to ||c||_1 (Higham's bound is ~1e-12 here)


def filter_gain_sq(shifts: np.ndarray, taps: np.ndarray) -> float:
    """A certified upper bound on sup_omega |c^(omega)|^2, c^(omega) = sum_s c_s exp(i omega.s):
    the squared norm of the convolution by c on l2(Z^k), hence of every in-bounds section of it
    (a filter restricted to the rows whose window lies inside x; docs/constants.md 8).

    F = |c^|^2 = sum_{s,t} c_s c_t cos(omega.(s - t)) is computed by an FFT of the taps padded to
    a grid of M^k frequencies (spacing h = 2 pi/M per axis); the maximiser omega* of F has
    grad F = 0 and lies within delta = h sqrt(k)/2 of a grid point g, so
    F(g) >= F(omega*) - H delta^2/2 with H = sum_{s,t} |c_s c_t| ||s - t||^2 >= ||grad^2 F||.
    Rounding: the FFT's error in each c^(g) is at most log2(N) eta sqrt(N) ||c||_2 (Higham,
    Accuracy and Stability, Thm 24.2; eta ~ 5u), about 2e-12 ||c||_1 here; FFT_REL ||c||_1 = e is
    taken, so F(g) is off by at most 2 e ||c||_1 + e^2. Never above ||c||_1^2 (Young)."""
    shifts = np.asarray(shifts, dtype=np.int64).reshape(len(taps), -1)
    c = np.asarray(taps, dtype=np.float64)
    l1 = float(np.sum(np.abs(c)))
    if not math.isfinite(l1):
        return math.inf
    if l1 == 0.0:
        return 0.0
    dims = shifts.shape[1]
    shifts = shifts - shifts.min(axis=0)
    points = FILTER_GRID_1D if dims == 1 else FILTER_GRID_POINTS
    per_axis = max(8, int(round(points ** (1.0 / dims))), 2 * int(shifts.max()) + 2)
    grid = np.zeros((per_axis,) * dims)
    np.add.at(grid, tuple(shifts.T), c)
    response = np.abs(np.fft.fftn(grid)) ** 2
    diff = shifts[:, None, :] - shifts[None, :, :]
    curvature = float(np.sum(np.abs(np.outer(c, c)) * np.sum(diff * diff, axis=2)))
    delta = (2 * np.pi / per_axis) * math.sqrt(dims) / 2
    err = FFT_REL * l1
    bound = float(response.max()) + curvature * delta ** 2 / 2 + 2 * err * l1 + err ** 2
    return min(bound * (1 + 4 * U), l1 * l1 * (1 + 4 * U))
