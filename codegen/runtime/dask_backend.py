"""The Dask backend of the executors (docs/distributed.md): a dask.distributed.Client, given or
opened on a scheduler address, runs each sample's task on its home worker.

Installing scatters each worker's samples to it and runs one `install_samples` task there (the
module travels as its directory name); the bound samples then live in that worker process's
memory, outside Dask's store, so a task carries only theta, the options and the starting points
that are not already there. Tasks are pinned to their home worker but may run elsewhere (loose
restrictions): on a worker that does not hold the sample, the task raises SampleMissing naming
that worker, and the sample is installed there and run again from explicit arrays. A worker that
dies while running a task has the task rerun elsewhere by the scheduler (the same path); Dask's
KilledWorker, a cancelled future or a closed connection counts as a loss, and after
MAX_ATTEMPTS losses the call raises ExecutorError naming the samples. Dask is imported here only.
"""
from __future__ import annotations

import uuid
from typing import Any

from ..hypergrad import HypergradientResult
from .sample_worker import (
    MAX_ATTEMPTS,
    ExecutorError,
    SampleMissing,
    SampleTask,
    forget_samples,
    install_samples,
    run_sample,
)

__all__ = ["DaskBackend"]

#: Seconds to wait for a scheduler to answer, and for its first worker to join.
CONNECT_TIMEOUT = 30.0


def _client(executor: Any) -> tuple[Any, bool]:
    """(a Client, whether this backend opened it) for a Client or a scheduler address."""
    try:
        from dask.distributed import Client
    except ImportError:
        raise ExecutorError(f"executor {executor!r} needs Dask: pip install 'hypergen[dask]' "
                            "(dask[distributed])") from None
    if not isinstance(executor, str):
        return executor, False
    try:
        return Client(executor, timeout=CONNECT_TIMEOUT), True
    except (OSError, TimeoutError) as exc:
        raise ExecutorError(f"cannot reach the Dask scheduler at {executor}: {exc}") from None


def _loss_types() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the worker or the task was lost", not "the sample failed"."""
    from dask.distributed import CancelledError, KilledWorker, TimeoutError
    return (KilledWorker, CancelledError, TimeoutError, OSError)


class DaskBackend:
    """Samples on the workers of a Dask cluster (see the module docstring)."""

    def __init__(self, executor: Any):
        self.client, self.owned = _client(executor)
        self.description = f"Dask scheduler {self.client.scheduler.address}"
        self.module: Any = None
        self.items: dict[int, tuple[str, dict[str, Any]]] = {}
        self.home: dict[int, str] = {}

    def workers(self) -> list[str]:
        """The addresses of the cluster's workers now (waiting for a first one to join)."""
        names = sorted(self.client.nthreads())
        if not names:
            try:
                self.client.wait_for_workers(1, timeout=CONNECT_TIMEOUT)
            except _loss_types() as exc:
                raise ExecutorError(f"the Dask cluster at {self.description} has no worker "
                                    f"({exc})") from None
            names = sorted(self.client.nthreads())
        return names

    def install(self, module: Any, items: list[tuple[int, str, dict[str, Any]]]) -> None:
        self.module = module
        workers = self.workers()
        for s, token, data in items:
            self.items[s] = (token, data)
            self.home[s] = workers[s % len(workers)]
        self._install([s for s, _, _ in items])

    def _install(self, samples: list[int]) -> None:
        """Send the samples to their home workers (one scattered batch and one task each)."""
        by_worker: dict[str, list[int]] = {}
        for s in samples:
            by_worker.setdefault(self.home[s], []).append(s)
        futures = []
        for worker, mine in by_worker.items():
            data = self.client.scatter([self.items[s][1] for s in mine], workers=[worker],
                                       hash=False)
            futures.append(self.client.submit(
                install_samples, self.module, [(self.items[s][0], d) for s, d in zip(mine, data)],
                workers=[worker], allow_other_workers=True, pure=False,
                key=f"hypergen-install-{uuid.uuid4().hex}"))
        try:
            labels = self.client.gather(futures)
        except _loss_types() as exc:
            raise ExecutorError(f"samples {sorted(samples)} could not be installed on the Dask "
                                f"workers: {type(exc).__name__}: {exc}") from None
        for label, mine in zip(labels, by_worker.values()):
            for s in mine:
                self.home[s] = label  # where the install task ran

    def _submit(self, task: SampleTask) -> Any:
        return self.client.submit(run_sample, task, workers=[self.home[task.index]],
                                  allow_other_workers=True, pure=False,
                                  key=f"hypergen-sample-{task.index}-{uuid.uuid4().hex}")

    def run(self, pairs: list[tuple[SampleTask, SampleTask]]) -> list[HypergradientResult]:
        live = set(self.workers())
        moved = [warm.index for warm, _ in pairs if self.home[warm.index] not in live]
        if moved:
            names = sorted(live)
            for n, s in enumerate(moved):
                self.home[s] = names[n % len(names)]
            self._install(moved)
        futures = {warm.index: self._submit(full if warm.index in moved else warm)
                   for warm, full in pairs}
        results: dict[int, HypergradientResult] = {}
        errors: dict[int, BaseException] = {}
        for warm, full in pairs:
            outcome = self._collect(futures[warm.index], full)
            if isinstance(outcome, BaseException):
                errors[warm.index] = outcome
            else:
                results[warm.index] = outcome
        if errors:
            for future in futures.values():
                future.cancel()
            raise errors[min(errors)]
        return [results[warm.index] for warm, _ in pairs]

    def _collect(self, future: Any, full: SampleTask) -> HypergradientResult | BaseException:
        """The task's result; after a loss or a missing sample, the sample installed on a live
        worker and run again from explicit arrays (at most MAX_ATTEMPTS losses)."""
        losses = 0
        s = full.index
        while True:
            try:
                result: HypergradientResult = future.result()
                return result
            except SampleMissing as missing:
                self.home[s] = missing.worker
            except _loss_types() as exc:
                losses += 1
                if losses >= MAX_ATTEMPTS:
                    return ExecutorError(
                        f"samples [{s}] could not be computed: their Dask task was lost "
                        f"{losses} times (last: {type(exc).__name__}: {exc}); no partial mean "
                        "is returned")
                workers = self.workers()
                if self.home[s] not in workers:
                    self.home[s] = workers[s % len(workers)]
            except Exception as exc:  # noqa: BLE001 - the sample's own error, raised by run
                return exc
            try:
                self._install([s])
            except ExecutorError as exc:
                return exc
            future = self._submit(full)

    def close(self) -> None:
        """Forget the samples on the workers; close the Client if this backend opened it."""
        try:
            self.client.run(forget_samples, [token for token, _ in self.items.values()])
        except Exception:  # noqa: BLE001 - a cluster already gone holds nothing to forget
            pass
        if self.owned:
            self.client.close()
