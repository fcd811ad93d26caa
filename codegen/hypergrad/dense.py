"""Dense Hessians for small lower levels: assembled once, factored by Cholesky, reused.

For a lower variable of a few dozen entries an iterative solve is all overhead: each CG step
is a kernel call whose Python and cffi cost exceeds its arithmetic, and a certified tolerance
it meets only approximately takes a second warm-started round. A factorisation solves to
rounding level in one go. It changes nothing in the certificates: the solvers recompute
grad g and the adjoint's true residual with the kernels at the returned point, and the factor
only proposes steps (a stale or wrong factor shows as a large residual, never as a wrong
number). Used by lower="direct" (Newton's method with exact steps) and adjoint="direct".

A generated module whose g splits into terms without theta, with a Hessian fixed by the data,
and terms with theta (`lower_hessian_fixed`, `lower_hessian_varying`: codegen/compiler/kernels.py
split_hessian) has the first part formed once per bind and only the second per (x, theta):
ridge's A^T A once, e^theta I each time (at 200 x 50, 110 us of HVPs through A become 2 us).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
from scipy.linalg import lapack

from ..errors import KernelError
from ..threads import one_blas_thread
from .common import SolverError, call_kernel, fixed_memo, hvp_at
from .gram import data_hessian_at, gram_at, gram_price, kept_gram, rests_on_theta
from .results import Status

__all__ = ["DIRECT_MAX_SIZE", "HessianFactor", "dense_factor", "hvp_columns", "theta_part"]

#: Largest x for the direct solvers: the Hessian takes n HVPs and 8 n^2 bytes (2000: 32 MB).
DIRECT_MAX_SIZE = 2000
#: From this size on, a factorisation runs with BLAS at one thread (`threads.one_blas_thread`):
#: OpenBLAS threads dpotrf from n = 128, after which its spinning pool made the next HVP of a
#: 2000 x 500 ridge take 4-8 ms instead of 0.2 on 2 cores (one_blas_thread costs about 18 us).
ONE_THREAD_FACTOR_FROM = 64

class HessianFactor:
    """The Cholesky factor of a symmetric positive definite Hessian A(x, theta) at one x, or at
    no recorded x (x None: a learning run's preconditioner, which no solve asks `holds_at`).

    `factor` returns None (and the reason) when A is not positive definite: mu > 0 says it
    must be, so the caller reports "not SPD" rather than trusting any step.
    """

    def __init__(self, lower: np.ndarray, x: np.ndarray | None):
        self.lower, self.x = lower, x

    @classmethod
    def factor(cls, hessian: np.ndarray, x: np.ndarray | None = None
               ) -> tuple[HessianFactor | None, str]:
        """LAPACK's dpotrf itself: scipy.linalg.cho_factor costs 5x more on a 10 x 10 matrix,
        which is what a small problem's hypergradient factors. The symmetrised copy is our own,
        so dpotrf may overwrite it, and its transpose (the same matrix) is Fortran-ordered, so
        the wrapper copies nothing: 8.6 against 9.4 us at n = 50, 76 against 89 us at 100."""
        symmetric = hessian + hessian.T  # HVP columns agree with rows up to rounding
        symmetric *= 0.5
        if len(symmetric) < ONE_THREAD_FACTOR_FROM:
            lower, info = lapack.dpotrf(symmetric.T, lower=1, clean=0, overwrite_a=1)
        else:
            with one_blas_thread():  # before the kernels run again (`codegen.threads`)
                lower, info = lapack.dpotrf(symmetric.T, lower=1, clean=0, overwrite_a=1)
        if info > 0:
            return None, (f"Cholesky factorisation failed (leading minor {info} not positive): "
                          "the Hessian is not SPD")
        if info < 0 or not np.isfinite(lower).all():
            return None, f"Cholesky factorisation failed (dpotrf info {info}, or not finite)"
        return cls(lower, None if x is None else x.copy()), ""

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        out: np.ndarray
        out, info = lapack.dpotrs(self.lower, rhs, lower=1)
        if info != 0:  # only an invalid argument, i.e. a bug here
            raise ValueError(f"dpotrs: invalid argument {-info}")
        return out

    def holds_at(self, x: np.ndarray, hessian_constant: bool) -> bool:
        """Can this factor serve at x? At its own x always; elsewhere when A does not depend on
        x (L_A = 0)."""
        return hessian_constant or (self.x is not None and np.array_equal(self.x, x))


def dense_factor(k: Any, x: np.ndarray, th: np.ndarray, c: dict[str, Any], dense: dict[str, Any]
                 ) -> tuple[HessianFactor | None, int, tuple[Status, str] | None]:
    """(HessianFactor or None, HVPs spent, None or (status, message)) for A(x, theta).

    The factor cached in `dense` is reused where it holds (at its own x, or anywhere when
    L_A = 0); otherwise the Hessian is assembled, by k.lower_hessian in one kernel call when the
    kernel has it, else column by column from n HVPs (n HVPs of work either way), and factored.
    A Hessian fixed by the data (k.fixed_memo) is factored once per bind instead of per call.
    """
    memo = fixed_memo(k, "lower_hvp")
    if memo is not None:
        dense = memo
    held = dense.get("factor")
    if held is not None and held.holds_at(x, c["L_A"] == 0.0 or memo is not None):
        return held, 0, None
    n = x.size
    if n > DIRECT_MAX_SIZE:
        raise SolverError(
            f"the direct solvers form the dense {n} x {n} Hessian ({n} HVPs, "
            f"{8 * n * n / 1e6:.0f} MB); x has {n} entries, more than DIRECT_MAX_SIZE = "
            f"{DIRECT_MAX_SIZE}: use lower='newton' or 'cg' and adjoint='cg'")
    H, spent, msg = assembled_hessian(k, x, th)
    if H is None:
        return None, spent, (Status.NON_FINITE, f"Hessian: {msg}")
    fac, msg = HessianFactor.factor(H, x)
    if fac is None:
        return None, spent, (Status.NOT_SPD, msg)
    dense["factor"] = fac
    return fac, spent, None


def assembled_hessian(k: Any, x: np.ndarray, th: np.ndarray
                      ) -> tuple[np.ndarray | None, int, str]:
    """(A(x, theta) as an (n, n) array, or its transpose; the HVPs it cost; "") or (None, the
    HVPs spent, the reason).

    The fixed part plus the varying part when the module has the split (`split_parts`; the
    fixed part costs only the call that forms it, the varying part no pass over the data), else
    the Gram form where it pays (`_gram_pays`: one BLAS product priced below n HVPs, or the
    A^T A the bind kept; `gram.py`), else
    k.lower_hessian in one kernel call, else n HVP columns (plain-NumPy kernels). Either
    orientation serves: the factor symmetrises."""
    n = x.size
    parts = split_parts(k)
    if parts is not None:
        fixed, spent = _fixed_part(k, parts[0], x, th)
        if fixed is None:
            return None, spent, "non-finite kernel output (the Hessian of g's theta-free terms)"
        varying, msg = _columns_of(k, parts[1], x, th)
        return (None, spent, msg) if varying is None else (varying + fixed, spent, "")
    whole = gram_at(k, theta_part(k)) if _gram_pays(k, n) else None
    if whole is not None:
        with one_blas_thread() as workers:
            H, spent = whole(x, th, workers)
        return H, spent, "" if H is not None else "non-finite kernel output"
    if hasattr(k, "lower_hessian"):
        H, msg = call_kernel(k.lower_hessian, x, th)
        return (None, n, msg) if H is None else (H.reshape(n, n), n, "")
    H, _, msg = hvp_columns(hvp_at(k, x, th), n)
    return H, n, msg


def _gram_pays(k: Any, n: int) -> bool:
    """Whether the Gram form assembles the Hessian for less than n HVPs: by the product priced
    below n, or from the A^T A the bind kept (one pass for the weights, where they are all equal;
    per-row weights with a kept A^T A, a weighted least-squares loss, still take the product)."""
    return gram_price(n) < n or kept_gram(k) is not None


def hvp_columns(hvp: Any, n: int, pair: Any = None) -> tuple[np.ndarray | None, int, str]:
    """(the n x n matrix whose columns are A e_j, kernel calls spent, ""), or (None, calls,
    the reason) when a product fails: from hvp, or two columns a call from `pair` ((v, w) ->
    the (2, n) rows A v, A w in one pass over the data: `hvp_pair_at`) where there is one."""
    unit = np.eye(n)
    A = np.empty((n, n))
    j = calls = 0
    while j < n:
        calls += 1
        if pair is not None and j + 1 < n:
            both, msg = call_kernel(pair, unit[j], unit[j + 1])
            if both is None:
                return None, calls, msg
            A[:, j], A[:, j + 1] = both[0], both[1]
            j += 2
            continue
        column, msg = call_kernel(hvp, unit[j])
        if column is None:
            return None, calls, msg
        A[:, j] = column
        j += 1
    return A, calls, ""


def split_parts(k: Any) -> tuple[Any, Any] | None:
    """(lower_hessian_fixed, lower_hessian_varying) kernel callers of a generated bound problem
    whose g splits so, else None."""
    kernels = getattr(k, "kernels", None)
    if not isinstance(kernels, dict) or "lower_hessian_fixed" not in kernels:
        return None
    return kernels["lower_hessian_fixed"], kernels["lower_hessian_varying"]


def theta_part(k: Any) -> Callable[[np.ndarray, np.ndarray], np.ndarray | None] | None:
    """(x, theta) -> the Hessian of g's terms with theta (None when not finite), from the
    module's `lower_hessian_varying`, or None when it has none: a learning run's held factor
    swaps it at a new theta (held_factor.py)."""
    kernels = getattr(k, "kernels", None)
    if not isinstance(kernels, dict) or "lower_hessian_varying" not in kernels:
        return None
    caller = kernels["lower_hessian_varying"]
    return lambda x, th: _columns_of(k, caller, x, th)[0]


def _columns_of(k: Any, caller: Any, x: np.ndarray, th: np.ndarray
                ) -> tuple[np.ndarray | None, str]:
    """A dense-matrix kernel's n x n output (column c in row c: the transpose), or None and why
    when it raises or is not finite."""
    n = x.size
    out = np.empty((n, n))
    try:
        caller({k.x_name: np.ascontiguousarray(x, dtype=np.float64),
                k.theta_name: np.ascontiguousarray(th, dtype=np.float64)}, out)
    except (KernelError, FloatingPointError, OverflowError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    if not np.isfinite(out).all():
        return None, "non-finite kernel output"
    return out, ""


def _fixed_part(k: Any, caller: Any, x: np.ndarray, th: np.ndarray
                ) -> tuple[np.ndarray | None, int]:
    """(the Hessian of g's theta-free terms, the HVPs it cost now). It reads neither x nor theta
    (the compiler emits the split only then, and lists lower_hvp_fixed as data-only): computed
    on first use from the Gram form where g's theta-free terms are its data terms and it pays
    (`_gram_pays`; ridge's A^T A / m: the bind's kept A^T A scaled, or one BLAS product), else
    from n HVPs, and kept read-only in the bind's store (k.fixed_memo). None when not finite
    (then not kept)."""
    memo = fixed_memo(k, "lower_hvp_fixed")
    held: np.ndarray | None = None if memo is None else memo.get("hessian")
    if held is not None:
        return held, 0
    data = data_hessian_at(k) if rests_on_theta(k) and _gram_pays(k, x.size) else None
    if data is not None:
        with one_blas_thread() as workers:  # dense algebra between kernel calls
            fixed, spent = data(x, th, workers)
    else:
        (fixed, _), spent = _columns_of(k, caller, x, th), x.size
    if fixed is not None and memo is not None:
        fixed.flags.writeable = False
        memo["hessian"] = fixed
    return fixed, spent
