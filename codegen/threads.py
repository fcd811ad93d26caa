"""BLAS at one thread around dense algebra that runs between kernel calls, and Python threads
for the dense algebra that is worth parallelising.

OpenBLAS's threads spin for about 0.1 s after a threaded call and take the cores the compiled
kernels' OpenMP threads need next. Measured on 2 cores: the Galerkin solve's 25 x 25 eigh made
a 2000 x 500 ridge hypergradient take 24 ms instead of 8, and the data constants' Gram matrix,
Lanczos estimate and Cholesky certificate made the first Newton solve of a fresh bind of the
2000 x 500 logistic example take 60-250 ms instead of 5. So BLAS runs at one thread there
(`one_blas_thread`), and the constants' large sums of block Grams, the only part worth more
cores, run their blocks on as many Python threads as the caller's BLAS had (`in_threads`;
NumPy's BLAS and LAPACK calls release the GIL, and a one-thread BLAS call leaves no pool
spinning): 1.75x on 2 cores for the block sums of 20000 x 2000 and the float32 Gram of
10000 x 500.
"""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, TypeVar

from threadpoolctl import ThreadpoolController

__all__ = ["one_blas_thread", "blas_threads", "in_threads", "serial_openmp_after_fork"]

_BLAS: list[ThreadpoolController] = []  # this process's controller, made at the first use

Item = TypeVar("Item")
Result = TypeVar("Result")


_FORK_HOOK: list[bool] = []  # registered once per process


def serial_openmp_after_fork() -> None:
    """Make a child forked from this process run OpenMP at one thread (registered once, when a
    module is loaded). GNU libgomp's thread pool does not survive fork: after one kernel had run
    a parallel loop here, a child of a `fork` Pool hung for ever in its first kernel call. The
    child's kernels run serially instead (their sums in another order: other last bits). The
    sample executors' workers start from a server process that loaded no module, so they keep
    their threads."""
    if _FORK_HOOK:
        return
    _FORK_HOOK.append(True)
    os.register_at_fork(after_in_child=_one_openmp_thread)


def _one_openmp_thread() -> None:
    ThreadpoolController().select(user_api="openmp").limit(limits=1)


def _controller() -> ThreadpoolController:
    """This process's controller, made at the first use (a walk over the loaded libraries)."""
    if not _BLAS:
        _BLAS.append(ThreadpoolController())
    return _BLAS[0]


@contextmanager
def one_blas_thread() -> Iterator[int]:
    """BLAS and LAPACK at one thread inside the block, the caller's count restored after;
    yields the caller's count (at least 1), the threads `in_threads` may use instead. The
    controller (a walk over the loaded libraries, 1-2 ms) is made once per process; a limit
    costs microseconds."""
    blas = _controller().select(user_api="blas")
    before = max([int(lib["num_threads"]) for lib in blas.info()] + [1])
    with blas.limit(limits=1):
        yield before


@contextmanager
def blas_threads(count: int) -> Iterator[None]:
    """BLAS and LAPACK at `count` threads inside the block (the enclosing count restored
    after): for one large dense operation inside `one_blas_thread` that saves more time on
    the caller's threads than the pool's spinning afterwards costs the next kernel (about 0.1
    s at most; eigvalsh of a 2000 x 2000 Gram matrix: 464 ms at one thread, 265 at two)."""
    with _controller().limit(limits=max(int(count), 1), user_api="blas"):
        yield


def in_threads(fn: Callable[[Item], Result], items: Iterable[Item],
               workers: int) -> Iterator[Result]:
    """fn(item) for item in items, on up to `workers` Python threads, yielded in the items'
    order: a caller who sums them in that order gets the same bits for every `workers`. At
    most workers + 1 items are submitted ahead of the caller's consumption (a window, not
    `pool.map`, which submits every item at once), so a slow consumer holds at most that many
    results (a group's Gram is side x side: 32 MB at side 2000), whatever their number."""
    todo = list(items)
    if workers <= 1 or len(todo) <= 1:
        yield from (fn(item) for item in todo)
        return
    with ThreadPoolExecutor(max_workers=min(workers, len(todo))) as pool:
        window: deque[Future[Result]] = deque()
        for item in todo:
            window.append(pool.submit(fn, item))
            if len(window) > workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
