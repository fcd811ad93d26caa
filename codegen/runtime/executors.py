"""Many samples on several processes or machines: the parent's side (docs/distributed.md).

`bind_samples(samples, executor=...)` validates every sample here, then gives each one a home
worker and sends its data there once (`install`). A hypergradient then sends each worker only
theta, the options and, per sample, its starting points, or a reference to them where that
worker holds them (a HeldArray of its result, or an array with the bits of one the parent
fetched): the warm starts of an upper-level run stay on the workers. Each worker runs
`hypergradient` on its samples (codegen/runtime/sample_worker.py), the same function with the
same arguments as the serial path, keeps x, q and the lower gradient, and sends the rest back;
the parent forms the mean in sample order (`hypergradient_samples(..., per_sample=...)`), so
the numbers are the serial ones bit for bit (given the same NumPy / BLAS build on the workers;
each task carries the parent's BLAS and OpenMP thread counts, see `thread_counts`). The arrays
left on the workers are HeldArrays in the results, fetched when read (codegen/runtime/held.py).

A sample whose worker is gone, or whose worker no longer holds it, is installed on a live worker
and run again there from the same starts: those the parent holds travel, and those that were
on the lost worker are computed again first from the steps that made them (`Step`); after
MAX_ATTEMPTS losses, or with no worker left, the call raises ExecutorError naming the samples.
A mean over the samples that did finish is never returned.
"""
from __future__ import annotations

import itertools
import os
import threading
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from ..hypergrad import HypergradientOptions, HypergradientResult
from .dask_backend import DaskBackend
from .held import MAX_REPLAY, FetchedStart, HeldArray, HeldResult, Step, load, materialized
from .process_backend import ProcessBackend
from .sample_worker import (
    MAX_ATTEMPTS,
    SLOTS,
    ExecutorError,
    Pair,
    Receive,
    SampleTask,
    thread_controller,
    thread_counts,
)

__all__ = ["ExecutorError", "SampleExecutor", "ProcessBackend", "check_executor",
           "make_executor", "MAX_ATTEMPTS", "HeldArray", "INLINE_BYTES"]

_SERIAL = (None, "local")


class Backend(Protocol):
    """What runs the tasks: a pool of local processes, or a Dask cluster."""

    description: str

    def install(self, module: Any, items: list[tuple[int, str, dict[str, Any]]]) -> None: ...

    def run(self, pairs: list[Pair], receive: Receive) -> None:
        """Each pair's first task on its sample's worker (the second where that worker lost
        the sample); each slim result (sample_worker.slim) given to `receive` as it arrives,
        so the parent reads a worker's results while the others still compute."""
        ...

    def fetch(self, items: list[tuple[int, str, int, int]]) -> dict[int, Any]:
        """Held arrays (sample, token, call, slot), one per sample: sample -> the array, or an
        exception where its worker does not hold it (lost, or replaced)."""
        ...

    def close(self) -> None: ...


def is_address(value: Any) -> bool:
    """A Dask scheduler address: "tcp://host:port", "tls://...", "host:port"."""
    return isinstance(value, str) and ("://" in value or value.rsplit(":", 1)[-1].isdigit())


def check_executor(executor: Any, workers: int | None) -> None:
    """Refuse, before any sample is bound, an executor value that names no executor."""
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool)
                                or workers < 1):
        raise ExecutorError(f"workers must be a positive integer, got {workers!r}")
    if isinstance(executor, str) and executor.partition(":")[0] in ("processes", "local") \
            and executor not in ("processes", "local"):
        raise ExecutorError(
            f"executor {executor!r} is not an executor (nor a Dask scheduler address): for N "
            "worker processes use executor='processes', workers=N; 'local' is serial")
    if executor in _SERIAL or executor == "processes" or is_address(executor):
        if workers is not None and executor != "processes":
            raise ExecutorError(f"workers={workers} is for executor='processes' (the Dask "
                                f"cluster decides its own workers), got executor={executor!r}")
        return
    if type(executor).__name__ == "Client" and hasattr(executor, "submit"):
        return
    raise ExecutorError(
        f"executor {executor!r} is not an executor: use None or 'local' (serial), "
        "'processes' (local worker processes), a dask.distributed.Client, or a Dask scheduler "
        "address such as 'tcp://10.0.0.5:8786'")


def make_executor(executor: Any, module: Any, data: list[dict[str, Any]],
                  workers: int | None) -> SampleExecutor | None:
    """The executor bind_samples asked for, with every sample installed; None for serial."""
    check_executor(executor, workers)
    if executor in _SERIAL:
        return None
    backend: Backend
    if executor == "processes":
        count = min(len(data), workers or os.cpu_count() or 1)
        backend = ProcessBackend(count)
    else:
        backend = DaskBackend(executor)  # imports dask (an optional extra) only now
    try:
        return SampleExecutor(backend, module, data)
    except BaseException:
        backend.close()
        raise


def _same_bits(value: Any, held: np.ndarray) -> bool:
    """Whether `value` is the held array bit for bit: dtype, shape and bytes. A byte comparison
    of 64 pairs of 16384 doubles costs about 0.5 ms; a blake2b digest of both sides cost 16 ms
    of the parent's time per call, a sixth of the executor's overhead at 64 samples of 128 x 128."""
    return (isinstance(value, np.ndarray) and value.dtype == held.dtype
            and value.shape == held.shape and value.tobytes() == held.tobytes())


#: A held array of at most this many bytes (512 doubles) also comes back with its result, so a
#: small problem's x and q are plain arrays, read without a round trip to the worker.
INLINE_BYTES = 4096


@dataclass
class SampleExecutor:
    """The parent's bookkeeping for one BoundSamples: tokens, what the workers hold, the backend.

    made[s]: sample s's results whose arrays its worker holds, by call number (alive while a
    HeldArray of theirs, or `latest[s]`, is). warm_count: how many samples of the last call
    started from an array their worker held (their x0 did not travel). inline_bytes: see
    INLINE_BYTES."""

    backend: Backend
    module: Any
    data: list[dict[str, Any]]
    tokens: list[str] = field(init=False)
    made: list[weakref.WeakValueDictionary[int, HeldResult]] = field(init=False)
    latest: list[HeldResult | None] = field(init=False)
    warm_count: int = 0
    inline_bytes: int = INLINE_BYTES
    closed: bool = False
    _released: list[tuple[int, int]] = field(default_factory=list, repr=False)
    _finalizer: Any = field(init=False, repr=False)
    _pools: Any = field(default_factory=thread_controller, repr=False)  # see thread_controller
    _lock: Any = field(default_factory=threading.RLock, repr=False)
    # run numbers are never reused: a task of an interrupted call that finishes late on its
    # worker leaves arrays under a number no result of the parent refers to
    _runs: Iterator[int] = field(default_factory=lambda: itertools.count(1), repr=False)

    def __post_init__(self) -> None:
        prefix = uuid.uuid4().hex[:12]
        self.tokens = [f"{prefix}-{s}" for s in range(len(self.data))]
        self.made = [weakref.WeakValueDictionary() for _ in self.data]
        self.latest = [None for _ in self.data]
        self.backend.install(self.module, [(s, self.tokens[s], d) for s, d in
                                           enumerate(self.data)])
        self.data = []  # the backend keeps what it needs to install a sample again
        self._finalizer = weakref.finalize(self, self.backend.close)

    @property
    def description(self) -> str:
        return self.backend.description

    def per_sample(self, theta: np.ndarray, options: HypergradientOptions, x0: Any,
                   q0: Any) -> list[HypergradientResult]:
        """Each sample's hypergradient on its worker (hypergradient_samples' per_sample), its
        x, q and lower gradient left there (HeldArrays)."""
        with self._lock:  # one call at a time
            self._check_open()
            threads, run = thread_counts(self._pools), next(self._runs)
            count = len(self.tokens)
            starts = [self._starts(s, None if x0 is None else x0[s],
                                   None if q0 is None else q0[s]) for s in range(count)]
            self._cut_deep(starts)
            steps = [Step(s, run, theta, options, threads, xs, qs,
                           1 + max([src[0].depth for src in (xs, qs) if isinstance(src, tuple)],
                                   default=0))
                     for s, (xs, qs) in enumerate(starts)]
            self.warm_count = sum(isinstance(step.x0, (tuple, FetchedStart)) for step in steps)
            drops = self._drops()
            made: dict[int, HeldResult] = {}
            loaded: dict[int, HypergradientResult] = {}

            def receive(s: int, blob: bytes) -> None:  # a worker's results, as they arrive
                made[s] = HeldResult(steps[s], weakref.ref(self))
                loaded[s] = load(blob, made[s])
            try:
                self.backend.run([self._pair(step, drops.get(step.sample, ()))
                                  for step in steps], receive)
            except BaseException:  # what the workers computed of this call is not referred to
                self._released.extend((step.sample, run) for step in steps)
                for s, runs in drops.items():
                    self._released.extend((s, r) for r in runs)
                raise
            for step in steps:
                self._keep(made[step.sample])
            return [loaded[step.sample] for step in steps]

    def _starts(self, s: int, x0: Any, q0: Any) -> tuple[Any, Any]:
        return self._source(s, x0), self._source(s, q0)

    def _source(self, s: int, value: Any) -> Any:
        """A starting point as a Step input: (the step that made it, slot) when sample s's
        worker holds it (a HeldArray of it not read yet, or an array with the bits of one the
        parent fetched), else the parent's own copy (the caller may change theirs later)."""
        if value is None:
            return None
        if isinstance(value, HeldArray) and not value.fetched and value.made.sample == s \
                and self.made[s].get(value.made.run) is value.made:
            return value.made.step, value.slot
        value = materialized(value)
        if isinstance(value, np.ndarray):  # newest first: usually the last call's x or q
            for _, made in sorted(self.made[s].items(), reverse=True):
                for slot, pristine in made.pristine.items():
                    if _same_bits(value, pristine):
                        return made.step, slot
            return np.array(value)
        return value

    def _cut_deep(self, starts: list[tuple[Any, Any]]) -> None:
        """Starts at an earlier step MAX_REPLAY calls deep are fetched (in place in `starts`,
        as FetchedStart): they still do not travel, but the parent holds their bits, and a lost sample
        is never computed again from further back."""
        for s, pair in enumerate(starts):
            cut = []
            for src in pair:
                if isinstance(src, tuple) and src[0].depth >= MAX_REPLAY:
                    made = self.made[s].get(src[0].run)
                    if made is not None:
                        src = FetchedStart(made.run, src[1], self.fetch(made, src[1]))
                cut.append(src)
            starts[s] = (cut[0], cut[1])

    def _keep(self, made: HeldResult) -> None:
        """Register a result the worker holds; when it is no longer referenced, its arrays are
        dropped on the worker (with the sample's next task)."""
        self.made[made.sample][made.run] = made
        self.latest[made.sample] = made
        weakref.finalize(made, self._released.append, (made.sample, made.run))

    def _drops(self) -> dict[int, tuple[int, ...]]:
        """The calls whose arrays each sample's worker may forget, taken from the queue (one
        pop at a time: a finalizer may append while this runs)."""
        drops: dict[int, list[int]] = {}
        while self._released:
            s, run = self._released.pop()
            drops.setdefault(s, []).append(run)
        return {s: tuple(runs) for s, runs in drops.items()}

    def _pair(self, step: Step, drop: tuple[int, ...]) -> Pair:
        """(the task to send first, a function making the task to send again to a worker that
        lost the sample: with the earlier steps its held starts come from, to compute them
        again first; made only when needed)."""
        token = self.tokens[step.sample]
        first = replace(step.task(token, self.inline_bytes), drop=drop)

        def full() -> SampleTask:
            chain = step.chain()[:-1]
            alive = self.made[step.sample]
            extra = tuple(e.run for e in chain if e.run not in alive)
            return replace(step.task(token, self.inline_bytes, full=True),
                           replay=tuple(e.task(token, 0, full=True) for e in chain),
                           drop=drop + extra)
        return first, full

    def fetch(self, made: HeldResult, slot: int) -> np.ndarray:
        """made's array in `slot`, fetched with the same slot of every other sample of that
        call not fetched yet (a caller that reads one sample's x usually reads them all); a
        sample its worker lost is computed again first from its steps."""
        with self._lock:
            if slot in made.pristine:
                return made.pristine[slot]
            self._check_open()
            wanted = [m for m in (self.made[s].get(made.run) for s in range(len(self.tokens)))
                      if m is not None and slot not in m.pristine]
            for _attempt in range(MAX_ATTEMPTS):
                got = self.backend.fetch([(m.sample, self.tokens[m.sample], m.run, slot)
                                          for m in wanted])
                missing = []
                for m in wanted:
                    value = got.get(m.sample)
                    if isinstance(value, np.ndarray):
                        m.pristine[slot] = value
                    else:
                        missing.append(m)
                if made not in missing:
                    return made.pristine[slot]
                self._recompute(made)
                wanted = [made]
            raise ExecutorError(f"the {SLOTS[slot]} of sample {made.sample} (call {made.run}) "
                                f"could not be fetched: its worker lost it {MAX_ATTEMPTS} times "
                                f"(last: {got.get(made.sample)})")

    def _recompute(self, made: HeldResult) -> None:
        """Compute made's call again on the sample's (new) worker from its steps: the same
        calls from the same starts give the same bits."""
        full = self._pair(made.step, ())[1]()
        self.backend.run([(full, lambda: full)], lambda s, blob: None)

    def close(self) -> None:
        """Fetch the held arrays of the results still referenced (they stay readable), then
        stop the worker processes (or leave a Client that was passed in, closing only one this
        executor opened) and forget the installed samples."""
        with self._lock:
            if not self.closed:
                self.latest = [None for _ in self.tokens]  # the results nobody holds go
                try:
                    for by_run in self.made:
                        for made in list(by_run.values()):
                            for slot in made.slots:
                                self.fetch(made, slot)
                except ExecutorError:  # a worker already gone: those arrays are lost
                    pass
                self.closed = True
        self._finalizer()

    def _check_open(self) -> None:
        if self.closed:
            raise ExecutorError(f"the samples' executor ({self.description}) is closed")
