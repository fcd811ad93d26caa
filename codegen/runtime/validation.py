"""Data validation at bind time: exact float64 conversion, private read-only copies, CSR checks.

Everything a kernel reads passes through here once, so the per-call path only checks vector
lengths. A value that cannot be converted exactly is refused with its name, never reinterpreted.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sps

from ..compiler.facts import DATA_FACTS
from ..errors import BindError


def as_float64(name: str, value: npt.ArrayLike) -> np.ndarray:
    """Convert to a C-contiguous float64 array exactly, or refuse; never reinterpret bytes."""
    if type(value) is np.ndarray and value.dtype == np.float64 and value.flags.c_contiguous:
        return value  # the per-call fast path: solvers pass such arrays thousands of times
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:  # a ragged nested list, say
        raise BindError(f"{name}: cannot be read as an array of numbers ({exc})") from None
    if arr.dtype == np.float64:
        return np.require(arr, requirements="C")
    if arr.dtype.kind in "biu":
        out = arr.astype(np.float64)
        if arr.size and np.any(out.astype(arr.dtype) != arr):
            raise BindError(f"{name}: integer values beyond 2**53 cannot be represented as float64")
        return np.require(out, requirements="C")
    if arr.dtype.kind == "f":
        return np.require(arr.astype(np.float64), requirements="C")  # float16/32 widen exactly
    if hasattr(value, "toarray") and hasattr(value, "nnz"):
        raise BindError(f"{name}: a scipy.sparse matrix where the problem expects a dense array; "
                        f"declare it sparse in the Problem (sparse=(\"{name}\",)) or pass "
                        f"{name}.toarray()")
    raise BindError(f"{name}: expected real numbers (float64), got dtype {arr.dtype}")


def frozen_copy(arr: np.ndarray) -> np.ndarray:
    """A private read-only copy: the constants derived from the data at bind time must keep
    describing the data the kernels read, whatever the caller does to its arrays later. Made
    with NumPy's own float64 dtype: an unpickled array (a worker's sample) carries an equal but
    distinct dtype object, which np.array(..., copy=True) keeps and np.asarray(a, float64) then
    copies again (the data constants read the data matrix so, and a copy is not the bound
    array, whose Gram matrix the bind keeps: `BoundProblem.data_gram`)."""
    out = np.empty(np.shape(arr), dtype=np.float64)
    np.copyto(out, arr)
    out.flags.writeable = False
    return out


def as_csr(name: str, value: Any) -> Any:  # scipy.sparse is untyped
    """A CSR matrix with float64 values, int64 indices, sorted and without duplicates."""
    try:
        csr = sps.csr_array(value, copy=True)  # private: sorting below must not touch the caller's
    except (TypeError, ValueError) as exc:
        raise BindError(f"{name} is declared sparse: pass a 2-D scipy.sparse matrix or array "
                        f"({exc})") from None
    csr = sps.csr_array((as_float64(name, csr.data), csr.indices, csr.indptr), shape=csr.shape)
    try:
        csr.check_format(full_check=True)  # indices inside the shape, indptr monotone
    except ValueError as exc:
        raise BindError(f"{name}: invalid CSR structure: {exc}") from None
    csr.sum_duplicates()
    csr.sort_indices()
    csr.indices = np.ascontiguousarray(csr.indices, dtype=np.int64)
    csr.indptr = np.ascontiguousarray(csr.indptr, dtype=np.int64)
    for part in (csr.data, csr.indices, csr.indptr):
        part.flags.writeable = False
    return csr


def check_finite(name: str, arr: Any) -> None:
    """Refuse a non-finite entry, naming where it is. A finite sum proves every entry finite (an
    inf or NaN stays non-finite through every addition), in one read of the data without the
    boolean temporary of isfinite: 1.1 ms instead of 1.9 ms for a 10000 x 500 matrix at bind.
    Only a non-finite sum (a bad entry, or an overflow of finite ones) takes the entrywise
    test."""
    if hasattr(arr, "tocsr"):
        if not np.all(np.isfinite(arr.data)):
            raise BindError(f"{name} contains a non-finite stored value")
        return
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.sum(arr)):
            return
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        where = tuple(int(b) for b in bad) if arr.ndim else ()
        raise BindError(f"{name} contains a non-finite value ({arr[tuple(bad)]}) at index {where}")


def check_facts(name: str, arr: Any, facts: list[str]) -> None:
    """Refuse a value that breaks what the problem declares of `name` (positive=True, ...),
    naming the first such entry: SymPy simplified the problem with the declaration, so the
    kernels and the certified constants hold only for values that keep it (compiler/facts.py).
    A sparse matrix's implicit zeros count as values."""
    values = arr.data if hasattr(arr, "tocsr") else np.asarray(arr)
    for fact in facts:
        test, says = DATA_FACTS[fact]
        if hasattr(arr, "tocsr") and arr.nnz < np.prod(arr.shape) and not bool(test(np.zeros(1))[0]):
            raise BindError(f"{name} is declared {fact}=True in the problem, so every value must "
                            f"be {says}, but its implicit zeros are not")
        ok = test(values)
        if not bool(np.all(ok)):
            bad = np.argwhere(~np.asarray(ok))[0] if values.ndim else ()
            where = tuple(int(b) for b in bad)
            if hasattr(arr, "tocsr"):  # a stored value: its (row, column) in the matrix
                row = int(np.searchsorted(arr.indptr, where[0], side="right")) - 1
                where = (row, int(arr.indices[where[0]]))
            shown = f"{name}{list(where)}" if where else name
            raise BindError(f"{name} is declared {fact}=True in the problem, so every value must be "
                            f"{says}, but {shown} = {float(values[tuple(bad)])!r}: SymPy has simplified "
                            f"the problem with that declaration (with positive=True, sqrt({name}**2) "
                            f"is {name}), so its kernels and constants would be wrong for this value")
