"""The lower Hessian as one BLAS product, A^T diag(w) A + R, where g has that form
(codegen/compiler/gram.py; docs/solvers.md 8.2).

A generalised linear loss has the Hessian A^T diag(w) A plus the Hessian R of its theta terms.
Assembled from HVPs it costs n passes over A (n / 2 with the pair kernel); from the weights w
(one kernel call, one pass) it is one symmetric rank-m update, which BLAS runs at its
compute-bound rate. Measured at one thread against one HVP (the logistic example): the product
took the time of n / 11 HVPs at 500 x 50, n / 18 at 2000 x 200, n / 20 at 4000 x 400 and
10000 x 500, n / 27 at 5000 x 1000 and n / 43 at 20000 x 1000. GRAM_SPEEDUP prices it at
n / 20 HVPs: the work it reports and the stale CG steps after which a held factor is assembled
again (held_factor.py).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import numpy as np

from ..errors import KernelError
from ..threads import in_threads
from .dense import theta_part

__all__ = ["GRAM_SPEEDUP", "gram_at", "gram_price", "weighted_gram"]

#: An assembly by the weighted Gram product costs the time of n / GRAM_SPEEDUP HVPs.
GRAM_SPEEDUP = 20

#: Entries of A per block of rows: each block is scaled into a buffer of its own (32 MB).
BLOCK_ENTRIES = 1 << 22

#: (x, theta, workers) -> the dense lower Hessian, or None where a kernel's output is not finite.
GramAt = Callable[[np.ndarray, np.ndarray, int], Optional[np.ndarray]]


def gram_price(n: int) -> int:
    """The HVPs an assembly by the weighted Gram product is worth, for x of n entries."""
    return max(1, math.ceil(n / GRAM_SPEEDUP))


def gram_at(k: Any) -> GramAt | None:
    """The weighted-Gram assembly of k's lower Hessian, or None where its module has no Gram
    form (or k is not a generated bound problem)."""
    meta = getattr(getattr(k, "module", None), "meta", None)
    kernels = getattr(k, "kernels", None)
    info = meta.get("gram") if isinstance(meta, dict) else None
    if not info or not isinstance(kernels, dict) or "lower_gram_weights" not in kernels:
        return None
    A = np.asarray(k.data[info["data"]], dtype=np.float64)
    rest = theta_part(k) if info["rest"] else None
    if A.ndim != 2 or A.shape[1] != k.x_size or (info["rest"] and rest is None):
        return None
    weights = kernels["lower_gram_weights"]

    def hessian(x: np.ndarray, theta: np.ndarray, workers: int = 1) -> np.ndarray | None:
        w = np.empty(A.shape[0])
        try:
            weights({k.x_name: x, k.theta_name: theta}, w)
        except (KernelError, FloatingPointError, OverflowError):
            return None
        H = weighted_gram(A, w, workers)
        if rest is not None:
            R = rest(x, theta)
            if R is None:
                return None
            H += 0.5 * (R + R.T)
        return H if np.isfinite(H).all() else None
    return hessian


def weighted_gram(A: np.ndarray, w: np.ndarray, workers: int = 1) -> np.ndarray:
    """A^T diag(w) A, symmetric: sum over blocks of rows of B^T B with B = diag(sqrt(w)) A_block
    (a symmetric rank-k update, half the flops of a general product), minus the same for the
    rows with w < 0. The blocks, at least one per worker, run on up to `workers` Python threads
    (each BLAS call at the caller's thread count, which `one_blas_thread` makes one) and are
    summed in order."""
    m, n = A.shape
    rows = max(1, min(BLOCK_ENTRIES // max(n, 1), -(-m // max(workers, 1))))

    def block(start: int) -> np.ndarray:
        part, wp = A[start:start + rows], w[start:start + rows]
        scaled = part * np.sqrt(np.abs(wp))[:, None]
        if (wp >= 0).all():
            product: np.ndarray = scaled.T @ scaled
            return product
        pos, neg = scaled * (wp > 0)[:, None], scaled * (wp < 0)[:, None]
        difference: np.ndarray = pos.T @ pos - neg.T @ neg
        return difference

    out = np.zeros((n, n))
    for part in in_threads(block, range(0, m, rows), workers):
        out += part
    return out
