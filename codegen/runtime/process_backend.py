"""The "processes" executor's backend: a pool of local worker processes, one pipe each
(docs/distributed.md 2). `SampleExecutor` (codegen/runtime/executors.py) drives it as it drives
the Dask backend: install samples, run one request per worker and call, fetch held arrays."""
from __future__ import annotations

import multiprocessing
import pickle
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

from .sample_worker import (
    MAX_ATTEMPTS,
    ExecutorError,
    Pair,
    Receive,
    SampleMissing,
    SampleTask,
    first_error,
    homes,
    serve,
)

__all__ = ["ProcessBackend", "PIPELINE_DEPTH", "AHEAD_BYTES"]


def _start_context() -> Any:
    """"forkserver" where there is one (a server process imports hypergen once; each worker is
    a fork of it: a pool starts in a fraction of a second), else "spawn". Neither forks the
    caller, whose threads and locks a fork would copy mid-use."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([serve.__module__])
    return context


#: Requests one worker may have outstanding (sent, reply not read yet): with 2, the next task
#: already waits in the worker's pipe when it sends a reply, so it does not sit idle while the
#: parent reads the reply (a 128 x 128 tv2d result is 395 KB) and sends the next request.
PIPELINE_DEPTH = 2

#: The largest request sent while another is outstanding. A worker reads requests only between
#: tasks and the parent reads replies only between its sends, so a request larger than the
#: socket's buffer (about 200 KB on Linux) sent to a busy worker could block both sides, each
#: writing while the other writes: install requests and tasks with explicit x0 / q0 wait until
#: their worker is idle. A task with the warm start held is about 600 bytes.
AHEAD_BYTES = 16 * 1024


@dataclass
class _Item:
    """A request queued for one worker process: install samples, run tasks (`tasks`, one per
    sample, and `fulls`, each to send again where the worker lost its sample), or fetch held
    arrays (`fetch`: (token, call, slot) per sample); `request` holds its pickled bytes once
    made (kept while it waits for an idle worker)."""

    kind: str  # "install" | "run" | "fetch" | "stale" (a reply to drop: its call was interrupted)
    samples: list[int]
    tasks: list[SampleTask] = field(default_factory=list)
    fulls: list[Callable[[], SampleTask]] = field(default_factory=list)
    request: bytes | None = None
    fetch: list[tuple[str, int, int]] | None = None


def _resent(full: SampleTask) -> Pair:
    """A full task sent again: it is its own full task."""
    return full, lambda: full


def _run_item(pairs: list[Pair]) -> _Item:
    """One worker's share of a call: a single request (the worker runs its samples in turn and
    answers once: the parent reads two messages per call, not one per sample)."""
    return _Item("run", [task.index for task, _ in pairs], [task for task, _ in pairs],
                 [full for _, full in pairs])


@dataclass
class _Process:
    """One worker process: its queue of requests to send, and `sent`, the requests sent whose
    replies are still to be read (in order: a worker answers its requests one by one)."""

    process: Any
    connection: Connection
    queue: deque[_Item] = field(default_factory=deque)
    sent: deque[_Item] = field(default_factory=deque)
    alive: bool = True


class ProcessBackend:
    """A pool of local worker processes (forked from a server process that imported hypergen,
    or spawned; each loads the module from its directory). A sample lives where `homes`
    places it (samples of one size: sample s on worker s mod n), and moves only when its
    worker dies. Requests to one worker go one at a time, in order,
    over its own pipe, up to PIPELINE_DEPTH of them outstanding; a call is one request per
    worker, with all its samples' tasks."""

    def __init__(self, count: int):
        context = _start_context()
        self.workers: list[_Process] = []
        for _ in range(count):
            parent_end, child_end = context.Pipe(duplex=True)
            process = context.Process(target=serve, args=(child_end,), daemon=True,
                                      name="hypergen-sample-worker")
            process.start()
            child_end.close()  # the parent sees EOF when the child dies
            self.workers.append(_Process(process, parent_end))
        self.description = f"processes ({count} workers)"
        self.module: Any = None
        self.items: dict[int, tuple[str, dict[str, Any]]] = {}
        self.home: dict[int, int] = {}
        self.receive: Receive = lambda s, blob: None  # the running call's (`run`)

    @property
    def pids(self) -> list[int]:
        """The worker processes' ids (a test kills one to see its samples recomputed)."""
        return [int(w.process.pid) for w in self.workers]

    def install(self, module: Any, items: list[tuple[int, str, dict[str, Any]]]) -> None:
        self.module = module
        for (s, token, data), home in zip(items, homes([d for _, _, d in items],
                                                      len(self.workers))):
            self.items[s] = (token, data)
            self.home[s] = home
        for position, worker in enumerate(self.workers):
            mine = [s for s, _, _ in items if self.home[s] == position]
            if mine:
                worker.queue.append(_Item("install", mine))
        self._drive({})

    def _homes(self, samples: list[int]) -> None:
        """Samples whose home worker died in an earlier call are installed on a live one; with
        none left, ExecutorError names them."""
        live = [p for p, w in enumerate(self.workers) if w.alive]
        moved = [s for s in samples if not self.workers[self.home[s]].alive]
        if moved and not live:
            raise ExecutorError(f"samples {moved} could not be computed: no worker process is "
                                "left; no partial mean is returned")
        for n, s in enumerate(moved):
            self.home[s] = live[n % len(live)]
            self.workers[self.home[s]].queue.append(_Item("install", [s]))

    def run(self, pairs: list[Pair], receive: Receive) -> None:
        self._homes([first.index for first, _ in pairs])
        by_worker: dict[int, list[Pair]] = {}
        for pair in pairs:
            by_worker.setdefault(self.home[pair[0].index], []).append(pair)
        for position, mine in by_worker.items():
            self.workers[position].queue.append(_run_item(mine))
        self.receive = receive
        try:
            self._drive({})
        finally:
            self.receive = lambda s, blob: None

    def fetch(self, items: list[tuple[int, str, int, int]]) -> dict[int, Any]:
        self._homes([s for s, _, _, _ in items])
        by_worker: dict[int, list[tuple[int, str, int, int]]] = {}
        for item in items:
            by_worker.setdefault(self.home[item[0]], []).append(item)
        for position, mine in by_worker.items():
            self.workers[position].queue.append(_Item(
                "fetch", [s for s, _, _, _ in mine], fetch=[i[1:] for i in mine]))
        results: dict[int, Any] = {}
        self._drive(results)
        return results

    def _drive(self, results: dict[int, Any]) -> None:
        """_exchange, and after an interruption (Ctrl-C, an error) the requests still out
        marked stale: their replies are read and dropped before the next call's, so a late
        reply can never be taken for a result of another theta."""
        try:
            self._exchange(results)
        except BaseException:
            for worker in self.workers:
                worker.queue.clear()
                worker.sent = deque(_Item("stale", item.samples) for item in worker.sent)
            raise

    def _exchange(self, results: dict[int, Any]) -> None:
        """Send each worker its queue, up to PIPELINE_DEPTH requests outstanding, until every
        queue is empty; move the requests of a worker that died; raise the first sample's
        error."""
        errors: dict[int, BaseException] = {}
        attempts: dict[int, int] = {}
        while True:
            for worker in self.workers:
                self._fill(worker, results, attempts, errors)
            busy = [w for w in self.workers if w.sent]
            if not busy:
                break
            ready = wait([w.connection for w in busy] + [w.process.sentinel for w in busy])
            for worker in busy:
                if worker.connection in ready or worker.process.sentinel in ready:
                    self._receive(worker, results, attempts, errors)
        if errors:
            raise first_error(errors)

    def _fill(self, worker: _Process, results: dict[int, Any], attempts: dict[int, int],
              errors: dict[int, BaseException]) -> None:
        """Send the worker's queued requests while fewer than PIPELINE_DEPTH are outstanding;
        one larger than AHEAD_BYTES waits until the worker has none outstanding."""
        while worker.alive and worker.queue and len(worker.sent) < PIPELINE_DEPTH:
            item = worker.queue[0]
            if errors and item.kind == "run":
                worker.queue.popleft()  # a sample failed: the call raises; do not start more
                continue
            if item.request is None:
                payload: Any = ((self.module, [self.items[s] for s in item.samples])
                                if item.kind == "install" else
                                item.fetch if item.kind == "fetch" else item.tasks)
                item.request = pickle.dumps((item.kind, payload), pickle.HIGHEST_PROTOCOL)
            if worker.sent and len(item.request) > AHEAD_BYTES:
                return
            worker.queue.popleft()
            worker.sent.append(item)
            try:
                worker.connection.send_bytes(item.request)
            except (OSError, EOFError):
                self._lost(worker, results, attempts, errors)
                return

    def _receive(self, worker: _Process, results: dict[int, Any],
                 attempts: dict[int, int], errors: dict[int, BaseException]) -> None:
        try:
            status, value = pickle.loads(worker.connection.recv_bytes())
        except (OSError, EOFError):
            self._lost(worker, results, attempts, errors)
            return
        item = worker.sent.popleft()
        if item.kind == "stale":
            return
        if status == "ok":
            if item.kind == "run":
                self._outcomes(worker, item, value, results, attempts, errors)
            elif item.kind == "fetch":
                results.update(zip(item.samples, value))
            return
        exc, text = value
        if isinstance(exc, BaseException):
            errors[item.samples[0]] = exc
        else:
            errors[item.samples[0]] = ExecutorError(f"sample {item.samples[0]}: {text}")

    def _outcomes(self, worker: _Process, item: _Item, outcomes: list[Any],
                  results: dict[int, Any], attempts: dict[int, int],
                  errors: dict[int, BaseException]) -> None:
        """A run request's per-sample outcomes: a result (to `receive`), SampleMissing (the
        worker does not hold the sample or an array its task starts from: install it and send
        the full task, MAX_ATTEMPTS times at most), or the sample's own error."""
        again = []
        for task, make_full, outcome in zip(item.tasks, item.fulls, outcomes):
            s = task.index
            if isinstance(outcome, bytes):
                self.receive(s, outcome)
            elif isinstance(outcome, SampleMissing):
                attempts[s] = attempts.get(s, 0) + 1
                if attempts[s] >= MAX_ATTEMPTS:
                    errors[s] = ExecutorError(f"samples [{s}] could not be computed: {outcome} "
                                              f"{MAX_ATTEMPTS} times; no partial mean is returned")
                again.append(_resent(make_full()))
            else:
                errors[s] = outcome
        if again and not errors:
            worker.queue.extendleft([_run_item(again),
                                     _Item("install", [full.index for full, _ in again])])

    def _lost(self, worker: _Process, results: dict[int, Any], attempts: dict[int, int],
              errors: dict[int, BaseException]) -> None:
        """worker died: its samples are installed on the live workers and its run requests
        go there, with the earlier steps their held starts came from (`full`); its fetches
        come back as lost (the caller computes those arrays again)."""
        worker.alive = False
        pending = list(worker.sent) + list(worker.queue)
        worker.sent, worker.queue = deque(), deque()
        for item in pending:
            if item.kind == "fetch":
                results.update((s, ExecutorError(f"sample {s}: its worker process died"))
                               for s in item.samples)
        live = [p for p, w in enumerate(self.workers) if w.alive]
        runs = [item for item in pending if item.kind == "run"]
        dead = self.workers.index(worker)
        moved = sorted(s for s, home in self.home.items() if home == dead)
        for item in runs:
            for s in item.samples:
                attempts[s] = attempts.get(s, 0) + 1
        failed = [s for s in moved if attempts.get(s, 0) >= MAX_ATTEMPTS or not live]
        if failed:
            why = ("no worker process is left" if not live else
                   f"they lost their worker process {MAX_ATTEMPTS} times")
            errors[failed[0]] = ExecutorError(
                f"samples {failed} could not be computed: {why} (exit code "
                f"{worker.process.exitcode}); no partial mean is returned")
            return
        for n, s in enumerate(moved):
            self.home[s] = live[n % len(live)]
            self.workers[self.home[s]].queue.append(_Item("install", [s]))
        by_worker: dict[int, list[Pair]] = {}
        for item in runs:
            for make_full in item.fulls:
                full = make_full()
                by_worker.setdefault(self.home[full.index], []).append(_resent(full))
        for position, mine in by_worker.items():
            self.workers[position].queue.append(_run_item(mine))

    def close(self) -> None:
        for worker in self.workers:
            if worker.alive:
                try:
                    worker.connection.send_bytes(pickle.dumps(("stop", None)))
                except (OSError, EOFError):
                    pass
        for worker in self.workers:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.terminate()
            worker.connection.close()
            worker.alive = False
