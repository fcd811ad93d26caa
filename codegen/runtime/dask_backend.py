"""The Dask backend of the executors (docs/distributed.md): a dask.distributed.Client, given or
opened on a scheduler address, runs each sample's task on its home worker.

Installing scatters each worker's samples to it and runs one `install_samples` task there (the
module travels as its directory name); the bound samples then live in that worker process's
memory, outside Dask's store. A hypergradient is one Dask task per worker thread
(`run_samples` on that worker's samples, split by thread), each carrying only theta, the
options and the starting points that are not already there. Tasks are pinned to their home
worker but may run elsewhere (loose restrictions): on a worker that does not hold a sample, its
outcome is SampleMissing naming that worker, and the sample is installed there and run again
from explicit arrays. A batch lost with its worker (KilledWorker, a cancelled future, a closed
connection) has its samples installed on a live worker and run again; after MAX_ATTEMPTS
losses of a sample the call raises ExecutorError naming it. Dask is imported here only.
"""
from __future__ import annotations

import uuid
from typing import Any

from .sample_worker import (
    MAX_ATTEMPTS,
    ExecutorError,
    Pair,
    SampleMissing,
    SampleTask,
    fetch_arrays,
    first_error,
    forget_samples,
    install_samples,
    run_samples,
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
        return Client(executor, timeout=CONNECT_TIMEOUT), True  # type: ignore[no-untyped-call]
    except (OSError, TimeoutError) as exc:
        raise ExecutorError(f"cannot reach the Dask scheduler at {executor}: {exc}") from None


class _Lost:
    """A batch lost with its worker (or cancelled): its samples are sent again elsewhere."""

    def __init__(self, why: str):
        self.why = why

    def __str__(self) -> str:
        return self.why


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

    def _submit(self, tasks: dict[int, SampleTask]) -> list[tuple[Any, list[SampleTask]]]:
        """One Dask task per worker thread: each home worker's tasks split into as many
        batches as it has threads (the scheduler then handles workers x threads tasks per
        call, not one per sample)."""
        threads = self.client.nthreads()
        by_worker: dict[str, list[SampleTask]] = {}
        for s in sorted(tasks):
            by_worker.setdefault(self.home[s], []).append(tasks[s])
        out = []
        for worker, mine in by_worker.items():
            count = max(1, min(len(mine), int(threads.get(worker, 1))))
            for b in range(count):
                batch = mine[b::count]
                out.append((self.client.submit(
                    run_samples, batch, workers=[worker], allow_other_workers=True, pure=False,
                    key=f"hypergen-samples-{batch[0].index}-{uuid.uuid4().hex}"), batch))
        return out

    def run(self, pairs: list[Pair]) -> list[bytes]:
        full = {first.index: make_full for first, make_full in pairs}
        send = {first.index: first for first, _ in pairs}
        results: dict[int, bytes] = {}
        errors: dict[int, BaseException] = {}
        losses: dict[int, int] = {}
        reinstall = self._rehome(list(send))
        while send:
            if reinstall:
                self._install(sorted(reinstall))
                send.update({s: full[s]() for s in reinstall if s in send})
            batches, send, reinstall = self._submit(send), {}, set()
            for future, batch in batches:
                for task, outcome in zip(batch, self._outcomes(future, batch)):
                    s = task.index
                    if isinstance(outcome, bytes):
                        results[s] = outcome
                    elif isinstance(outcome, (SampleMissing, _Lost)):
                        losses[s] = losses.get(s, 0) + 1
                        if losses[s] >= MAX_ATTEMPTS:
                            errors[s] = ExecutorError(
                                f"samples [{s}] could not be computed: lost {losses[s]} times "
                                f"on the Dask workers (last: {outcome}); no partial mean is "
                                "returned")
                        else:
                            if isinstance(outcome, SampleMissing):
                                self.home[s] = outcome.worker
                            send[s], reinstall = full[s](), reinstall | {s}
                    else:
                        errors[s] = outcome
            if errors:
                break
            reinstall |= self._rehome(list(send))
        if errors:
            raise first_error(errors)
        return [results[first.index] for first, _ in pairs]

    def fetch(self, items: list[tuple[int, str, int, int]]) -> dict[int, Any]:
        """One fetch task per home worker; a lost one gives an exception per sample (the
        caller computes those arrays again, on the sample's new home)."""
        self._rehome([s for s, _, _, _ in items])
        by_worker: dict[str, list[tuple[int, str, int, int]]] = {}
        for item in items:
            by_worker.setdefault(self.home[item[0]], []).append(item)
        futures = [(self.client.submit(fetch_arrays, [i[1:] for i in mine], workers=[worker],
                                       allow_other_workers=True, pure=False,
                                       key=f"hypergen-fetch-{uuid.uuid4().hex}"),
                    mine) for worker, mine in by_worker.items()]
        out: dict[int, Any] = {}
        for future, mine in futures:
            try:
                arrays = future.result()
            except _loss_types() as exc:
                arrays = [_Lost(f"{type(exc).__name__}: {exc}")] * len(mine)
            out.update((s, a) for (s, _, _, _), a in zip(mine, arrays))
        return out

    def _rehome(self, samples: list[int]) -> set[int]:
        """The samples whose home worker is gone, given a live one (to be installed there)."""
        live = self.workers()
        moved = {s for s in samples if self.home[s] not in live}
        for n, s in enumerate(sorted(moved)):
            self.home[s] = live[n % len(live)]
        return moved

    def _outcomes(self, future: Any, batch: list[SampleTask]) -> list[Any]:
        """The batch's per-sample outcomes; a lost batch is a _Lost for each of its samples."""
        try:
            outcomes: list[Any] = future.result()
            return outcomes
        except _loss_types() as exc:
            return [_Lost(f"{type(exc).__name__}: {exc}")] * len(batch)
        except Exception as exc:  # noqa: BLE001 - the batch failed as a whole: each sample
            return [exc] * len(batch)

    def close(self) -> None:
        """Forget the samples on the workers; close the Client if this backend opened it."""
        try:
            self.client.run(forget_samples, [token for token, _ in self.items.values()])
        except Exception:  # noqa: BLE001 - a cluster already gone holds nothing to forget
            pass
        if self.owned:
            self.client.close()
