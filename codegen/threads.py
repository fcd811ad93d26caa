"""BLAS at one thread around small dense algebra that runs between kernel calls.

OpenBLAS's threads spin for about 0.1 s after a threaded call and take the cores the compiled
kernels' OpenMP threads need next. Measured on 2 cores: the Galerkin solve's 25 x 25 eigh made
a 2000 x 500 ridge hypergradient take 24 ms instead of 8, and the data constants' Gram matrix,
Lanczos estimate and Cholesky certificate made the first Newton solve of a fresh bind of the
2000 x 500 logistic example take 60-250 ms instead of 5. The dense algebra these wrap is small
or short enough that one thread loses little (the constants of that bind: 14 ms at one thread,
22-30 ms at two).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from threadpoolctl import ThreadpoolController

__all__ = ["one_blas_thread"]

_BLAS: list[ThreadpoolController] = []  # this process's controller, made at the first use


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """BLAS and LAPACK at one thread inside the block, the caller's count restored after. The
    controller (a walk over the loaded libraries, 1-2 ms) is made once per process; a limit
    costs microseconds."""
    if not _BLAS:
        _BLAS.append(ThreadpoolController())
    with _BLAS[0].limit(limits=1, user_api="blas"):
        yield
