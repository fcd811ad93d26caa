"""The lower Hessian as one BLAS product, A^T diag(w) A + R, where g has that form
(codegen/compiler/gram.py; docs/solvers.md 8.3).

A generalised linear loss has the Hessian A^T diag(w) A plus the Hessian R of its theta terms.
Assembled from HVPs it costs n passes over A (n / 2 with the pair kernel); from the weights w
(one kernel call, one pass) it is one symmetric rank-m update, which BLAS runs at its
compute-bound rate. Measured at one thread against one HVP (the logistic example): the product
took the time of n / 11 HVPs at 500 x 50, n / 18 at 2000 x 200, n / 20 at 4000 x 400 and
10000 x 500, n / 27 at 5000 x 1000 and n / 43 at 20000 x 1000. The whole assembly of a held
factor (the weights' pass, the product, the factorisation, the theta terms' Hessian and the
Python around them) took 15-30 HVPs from 300 x 40 to 4000 x 400 (`logistic_weights`). So it is
priced at n / GRAM_SPEEDUP + ASSEMBLY_OVERHEAD HVPs: the work it reports and the stale CG steps
after which a held factor is assembled again (held_factor.py).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import numpy as np

from ..errors import KernelError
from ..threads import in_threads

__all__ = ["GRAM_SPEEDUP", "ASSEMBLY_OVERHEAD", "data_hessian_at", "gram_at", "gram_info",
           "gram_price", "has_gram_form", "kept_gram", "rests_on_theta", "weighted_gram"]

#: The weighted Gram product costs the time of n / GRAM_SPEEDUP HVPs ...
GRAM_SPEEDUP = 20
#: ... and the rest of an assembly about ASSEMBLY_OVERHEAD HVPs more.
ASSEMBLY_OVERHEAD = 10

#: Entries of A per block of rows: each block is scaled into a buffer of its own (8 MB). Fixed,
#: so that the sum runs in the same order, to the same bits, for every number of workers.
BLOCK_ENTRIES = 1 << 20

#: (x, theta, workers) -> (a dense Hessian, or None where a kernel's output is not finite; the
#: HVPs its assembly is worth: `gram_price`, or 1 where it scaled the bind's kept A^T A).
GramAt = Callable[[np.ndarray, np.ndarray, int], tuple[Optional[np.ndarray], int]]
#: (x, theta) -> the Hessian of g's theta terms, or None (`dense.theta_part`).
ThetaPart = Callable[[np.ndarray, np.ndarray], Optional[np.ndarray]]


def gram_price(n: int) -> int:
    """The HVPs an assembly by the weighted Gram product is worth, for x of n entries."""
    return math.ceil(n / GRAM_SPEEDUP) + ASSEMBLY_OVERHEAD


def data_hessian_at(k: Any) -> GramAt | None:
    """(x, theta, workers) -> A^T diag(w) A, the Hessian of g's terms that read the data
    matrix, or None where k's module has no Gram form (or k is not a generated bound problem).
    Where the rest R is the Hessian of g's theta terms (`rests_on_theta`), this is the Hessian
    of its theta-free terms, the direct solvers' fixed part (dense.py)."""
    info = gram_info(k)
    if info is None:
        return None
    A = np.asarray(k.data[info["data"]], dtype=np.float64)
    if A.ndim != 2 or A.shape[1] != k.x_size:
        return None
    weights = k.kernels["lower_gram_weights"]

    def hessian(x: np.ndarray, theta: np.ndarray,
                workers: int = 1) -> tuple[np.ndarray | None, int]:
        w = np.empty(A.shape[0])
        try:
            weights({k.x_name: x, k.theta_name: theta}, w)
        except (KernelError, FloatingPointError, OverflowError):
            return None, 1
        H, spent = _kept_multiple(k, w), 1
        if H is None:
            H, spent = weighted_gram(A, w, workers), gram_price(A.shape[1])
        return (H if np.isfinite(H).all() else None), spent
    return hessian


def kept_gram(k: Any) -> np.ndarray | None:
    """A^T A of the data matrix of k's Gram form where the bind kept it (a least-squares g whose
    data constants formed it: `BoundProblem.data_gram`), else None."""
    info, kept = gram_info(k), getattr(k, "data_gram", None)
    return None if info is None or kept is None else kept(info["data"])


def _kept_multiple(k: Any, w: np.ndarray) -> np.ndarray | None:
    """w_0 A^T A where every weight is w_0 (a least-squares loss) and the bind kept A^T A
    (`kept_gram`), else None: the same matrix as `weighted_gram`'s to rounding, for the weights'
    one pass instead of a second product over A."""
    G = kept_gram(k)
    if G is None or not w.size or not w.min() == w.max():
        return None
    scaled: np.ndarray = G * w[0]
    return scaled


def gram_info(k: Any) -> dict[str, Any] | None:
    """k's module meta "gram" ({"data": A's name, "rest": R's kernel or None}) where k is a
    generated bound problem with `lower_gram_weights`, else None."""
    meta = getattr(getattr(k, "module", None), "meta", None)
    kernels = getattr(k, "kernels", None)
    info = meta.get("gram") if isinstance(meta, dict) else None
    if not info or not isinstance(kernels, dict) or "lower_gram_weights" not in kernels:
        return None
    return dict(info)


def has_gram_form(k: Any) -> bool:
    """Whether k's lower Hessian is A^T diag(w) A + R with its weights kernel."""
    return gram_info(k) is not None


def rests_on_theta(k: Any) -> bool:
    """Whether the rest R of k's Gram form is the Hessian of g's theta terms (else R = 0)."""
    info = gram_info(k)
    return bool(info and info["rest"])


def gram_at(k: Any, theta_part: ThetaPart | None) -> GramAt | None:
    """The whole lower Hessian A^T diag(w) A + R of k, R from `theta_part` (`dense.theta_part`
    of k) where R is the theta terms' Hessian; None where k has no Gram form, or R is needed
    and theta_part is None."""
    data, needs_rest = data_hessian_at(k), rests_on_theta(k)
    rest = theta_part if needs_rest else None
    if data is None or (needs_rest and rest is None):
        return None

    def hessian(x: np.ndarray, theta: np.ndarray,
                workers: int = 1) -> tuple[np.ndarray | None, int]:
        H, spent = data(x, theta, workers)
        if H is None or rest is None:
            return H, spent
        R = rest(x, theta)
        if R is None:
            return None, spent
        H += 0.5 * (R + R.T)
        return H, spent
    return hessian


def weighted_gram(A: np.ndarray, w: np.ndarray, workers: int = 1) -> np.ndarray:
    """A^T diag(w) A, symmetric: sum over blocks of rows of B^T B with B = diag(sqrt(w)) A_block
    (a symmetric rank-k update, half the flops of a general product), minus the same for the
    rows with w < 0. The blocks run on up to `workers` Python threads (each BLAS call at the
    caller's thread count, which `one_blas_thread` makes one) and are summed in order: the same
    bits for every `workers`."""
    m, n = A.shape
    rows = max(1, BLOCK_ENTRIES // max(n, 1))

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
