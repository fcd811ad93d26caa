"""The Dask backend of the executors (docs/distributed.md): a dask.distributed.Client, given or
opened on a scheduler address, runs each sample's work on its home worker.

The work reaches a worker through a Dask actor, `SampleHost`, one per worker that holds samples:
a call on it goes from the client to that worker and back (directly, or relayed by the
scheduler when the Client does not connect to workers directly), with no task graph, no
scheduling and no gather. A hypergradient is one such call per worker with that worker's share,
answered once: a round trip of 2 calls took 3 ms on a LocalCluster of 2 workers, where 2 Dask
tasks (a submit and a gather per worker, and the scheduler's messages in between) took 22 ms
(docs/distributed.md 5). Installing sends each worker's samples in one call too (the module
travels as its directory name); the bound samples then live in that worker process's memory
(codegen/runtime/sample_worker.py), outside Dask's store.

A call that cannot reach its worker's actor (the worker died or was replaced: a closed
connection, an unknown actor) loses its batch: the samples are installed on a live worker and
run again from explicit arrays; a worker that answers SampleMissing (it no longer holds the
sample) gets it installed again. After MAX_ATTEMPTS losses of a sample the call raises
ExecutorError naming it. Dask is imported here only when a backend is made.
"""
from __future__ import annotations

import asyncio
import queue
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .sample_worker import (
    MAX_ATTEMPTS,
    ExecutorError,
    Pair,
    Receive,
    SampleMissing,
    SampleTask,
    fetch_arrays,
    first_error,
    forget_samples,
    homes,
    install_samples,
    run_samples,
    thread_counts,
)

__all__ = ["DaskBackend", "SampleHost"]

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


class SampleHost:
    """The actor on one Dask worker through which the parent installs, runs and fetches that
    worker's samples (sample_worker's functions). A Dask worker runs every actor's methods on
    one thread of its own; a call's share split into several batches (a worker with several
    threads) runs them on a pool of that many threads here, as Dask would run several tasks."""

    def __init__(self) -> None:
        self.pools: dict[int, ThreadPoolExecutor] = {}

    def install(self, module: Any, items: list[tuple[str, dict[str, Any]]]) -> str:
        return install_samples(module, items)

    def run(self, batches: list[list[SampleTask]]) -> list[list[bytes | Exception]]:
        if len(batches) == 1:
            return [run_samples(batches[0])]
        count = len(batches)
        if count not in self.pools:
            self.pools[count] = ThreadPoolExecutor(count, thread_name_prefix="hypergen")
        return list(self.pools[count].map(run_samples, batches))

    def fetch(self, items: list[tuple[str, int, int]]) -> list[Any]:
        return fetch_arrays(items)

    def thread_counts(self) -> dict[str, int] | None:
        """The BLAS and OpenMP thread counts of the thread the samples run on (OpenMP's is per
        thread: each task sets the parent's, sample_worker.SampleTask.threads)."""
        return thread_counts()


class _Lost:
    """A call lost with its worker (or its actor): its samples are sent again elsewhere."""

    def __init__(self, why: str):
        self.why = why

    def __str__(self) -> str:
        return self.why


@dataclass
class _Host:
    """A SampleHost actor: its future (which keeps it alive), key and the worker's threads."""

    future: Any
    key: str
    threads: int


class DaskBackend:
    """Samples on the workers of a Dask cluster (see the module docstring)."""

    def __init__(self, executor: Any):
        self.client, self.owned = _client(executor)
        self.description = f"Dask scheduler {self.client.scheduler.address}"
        self.module: Any = None
        self.items: dict[int, tuple[str, dict[str, Any]]] = {}
        self.home: dict[int, str] = {}
        self.hosts: dict[str, _Host] = {}
        self.threads: dict[str, int] = {}
        self.moved: set[int] = set()  # samples to install again before their next task

    def workers(self, avoid: frozenset[str] = frozenset()) -> list[str]:
        """The addresses of the cluster's workers now, those in `avoid` last resort (they lost
        a call just now: the scheduler may not have noticed yet); waits for a first one."""
        self.threads = {str(w): int(n) for w, n in self.client.nthreads().items()}
        if not self.threads:
            try:
                self.client.wait_for_workers(1, timeout=CONNECT_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - a timeout, or a scheduler gone
                raise ExecutorError(f"the Dask cluster at {self.description} has no worker "
                                    f"({exc})") from None
            self.threads = {str(w): int(n) for w, n in self.client.nthreads().items()}
        names = sorted(self.threads)
        return [w for w in names if w not in avoid] or names

    def install(self, module: Any, items: list[tuple[int, str, dict[str, Any]]]) -> None:
        self.module = module
        workers = self.workers()
        for (s, token, data), home in zip(items, homes([d for _, _, d in items], len(workers))):
            self.items[s] = (token, data)
            self.home[s] = workers[home]
        self._install([s for s, _, _ in items])

    def _host(self, worker: str) -> str:
        """The worker's SampleHost, made if it has none; returns the worker it lives on (the
        one asked for unless that one left meanwhile). Making it is a Dask task: on a cluster
        busy with other work it waits for a free thread, as any task would."""
        if worker in self.hosts:
            return worker
        from dask.distributed import wait
        key = f"hypergen-host-{uuid.uuid4().hex}"
        future = self.client.submit(SampleHost, workers=[worker], allow_other_workers=True,
                                    actor=True, pure=False, key=key)
        try:
            wait(future)  # type: ignore[no-untyped-call]
            where = [str(w) for w in self.client.who_has(future).get(key, ())]
        except Exception as exc:  # noqa: BLE001 - a scheduler gone
            where, why = [], f"{type(exc).__name__}: {exc}"
        else:
            why = future.status
        if future.status != "finished" or not where:
            raise ExecutorError(f"no hypergen actor could be started on the Dask worker "
                                f"{worker} ({why})")
        self.hosts[where[0]] = _Host(future, key, self.threads.get(where[0], 1))
        return where[0]

    def _install(self, samples: list[int]) -> None:
        """Send the samples to their home workers (one actor call per worker)."""
        by_worker: dict[str, list[int]] = {}
        for s in samples:
            by_worker.setdefault(self._host(self.home[s]), []).append(s)
        replies = self._call([(worker, "install", (self.module, [self.items[s] for s in mine]))
                              for worker, mine in by_worker.items()])
        for reply, (worker, mine) in zip(replies, by_worker.items()):
            if not isinstance(reply, str):
                raise ExecutorError(f"samples {sorted(mine)} could not be installed on the "
                                    f"Dask worker {worker}: {reply}") from None
            for s in mine:
                self.home[s] = reply  # where they now live
                self.moved.discard(s)

    def _call(self, calls: list[tuple[str, str, tuple[Any, ...]]]) -> list[Any]:
        """Each (worker, method, args) on that worker's SampleHost, all at once; the replies in
        order (see _replies)."""
        replies: list[Any] = [None] * len(calls)
        for position, reply in self._replies(calls):
            replies[position] = reply
        return replies

    def _replies(self, calls: list[tuple[str, str, tuple[Any, ...]]]
                 ) -> Iterator[tuple[int, Any]]:
        """Each (worker, method, args) on that worker's SampleHost, all at once; (its position
        in `calls`, its reply) as each one comes back, here in the caller's thread while the
        others still run: the method's value, the exception it raised, or _Lost where the
        worker or its actor could not be reached (the worker is then forgotten: an actor is
        made anew).

        The calls use the worker's `actor_execute` RPC, which the public Actor proxy wraps: the
        proxy catches only OSError, so a worker restarted since (it answers KeyError: no such
        actor) would leave its future unresolved and the call waiting forever. Checked against
        distributed 2023.1.0 (the oldest pyproject.toml admits) and the current release."""
        from distributed.actor import ProxyRPC
        from distributed.protocol.serialize import to_serialize
        client = self.client
        done: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
        running: set[Any] = set()  # the event loop keeps only weak references to tasks

        async def reply(worker: str, method: str, args: tuple[Any, ...]) -> Any:
            status = self.hosts[worker].future.status
            if status != "finished":  # the scheduler saw the actor's worker go (a restart
                # cancels it, a death loses it): calling its address would wait out the 30 s
                # connect timeout first
                return _Lost(f"the actor on {worker} is {status}")
            rpc = client.rpc(worker) if client.direct_to_workers else \
                ProxyRPC(client.scheduler, worker)  # type: ignore[no-untyped-call]
            try:
                out = await rpc.actor_execute(actor=self.hosts[worker].key, function=method,
                                              args=[to_serialize(a) for a in args],  # type: ignore[no-untyped-call]
                                              kwargs={})
            except Exception as exc:  # noqa: BLE001 - the worker, or its actor, is gone
                return _Lost(f"{type(exc).__name__}: {exc}")
            return out["result"] if out["status"] == "OK" else out["exception"]

        async def one(position: int, call: tuple[str, str, tuple[Any, ...]]) -> None:
            out: Any = _Lost("the call was cancelled")
            try:
                out = await reply(*call)
            finally:
                done.put((position, out))

        async def start() -> None:
            for position, call in enumerate(calls):
                task = asyncio.ensure_future(one(position, call))
                running.add(task)
                task.add_done_callback(running.discard)

        client.sync(start)
        for _ in calls:
            while True:
                try:  # a timeout, so that Ctrl-C is seen while waiting
                    position, out = done.get(timeout=1.0)
                    break
                except queue.Empty:
                    continue
            if isinstance(out, _Lost):
                self._forget_host(calls[position][0])
            yield position, out

    def _forget_host(self, worker: str) -> None:
        """A worker that lost a call: its actor is dropped, its samples get a new home."""
        host = self.hosts.pop(worker, None)
        if host is not None:
            try:
                self.client.cancel([host.future])
            except Exception:  # noqa: BLE001 - a cluster already gone holds nothing
                pass
        lost = [s for s, w in self.home.items() if w == worker]
        live = self.workers(avoid=frozenset({worker}))
        for n, s in enumerate(sorted(lost)):
            self.home[s] = live[n % len(live)]
        self.moved.update(lost)

    def _batches(self, tasks: dict[int, SampleTask]) -> dict[str, list[list[SampleTask]]]:
        """Each home worker's tasks, split into as many batches as it has threads."""
        by_worker: dict[str, list[SampleTask]] = {}
        for s in sorted(tasks):
            by_worker.setdefault(self.home[s], []).append(tasks[s])
        out = {}
        for worker, mine in by_worker.items():
            count = max(1, min(len(mine), self.hosts[worker].threads))
            out[worker] = [mine[b::count] for b in range(count)]
        return out

    def run(self, pairs: list[Pair], receive: Receive) -> None:
        full = {first.index: make_full for first, make_full in pairs}
        send = {first.index: first for first, _ in pairs}
        errors: dict[int, BaseException] = {}
        losses: dict[int, int] = {}
        while send:
            reinstall = sorted(self.moved & set(send))
            if reinstall:
                self._install(reinstall)
                send.update({s: full[s]() for s in reinstall})
            by_worker = list(self._batches(send).items())
            send = {}
            for position, reply in self._replies([(w, "run", (b,)) for w, b in by_worker]):
                for task, outcome in self._outcomes(by_worker[position][1], reply):
                    s = task.index
                    if isinstance(outcome, bytes):
                        receive(s, outcome)
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
                                self.moved.add(s)
                            send[s] = full[s]()
                    else:
                        errors[s] = outcome
            if errors:
                break
        if errors:
            raise first_error(errors)

    @staticmethod
    def _outcomes(batches: list[list[SampleTask]], reply: Any) -> list[tuple[SampleTask, Any]]:
        """(task, its outcome) for a worker's reply: per-sample outcomes, or the whole call's
        loss or error for each of its tasks."""
        tasks = [task for batch in batches for task in batch]
        if isinstance(reply, list):
            return list(zip(tasks, [o for outcomes in reply for o in outcomes]))
        return [(task, reply) for task in tasks]

    def fetch(self, items: list[tuple[int, str, int, int]]) -> dict[int, Any]:
        """One fetch call per home worker; a lost one gives a _Lost per sample (the caller
        computes those arrays again, on the sample's new home)."""
        out: dict[int, Any] = {}
        by_worker: dict[str, list[tuple[int, str, int, int]]] = {}
        for item in items:
            if item[0] in self.moved:  # its worker is gone: nothing to fetch
                out[item[0]] = _Lost(f"sample {item[0]} lost its worker")
            else:
                by_worker.setdefault(self.home[item[0]], []).append(item)
        replies = self._call([(w, "fetch", ([i[1:] for i in mine],))
                              for w, mine in by_worker.items()])
        for reply, mine in zip(replies, by_worker.values()):
            arrays = reply if isinstance(reply, list) else [reply] * len(mine)
            out.update((s, a) for (s, _, _, _), a in zip(mine, arrays))
        return out

    def close(self) -> None:
        """Forget the samples on the workers and drop the actors; close the Client if this
        backend opened it."""
        try:
            self.client.run(forget_samples, [token for token, _ in self.items.values()])
            self.client.cancel([host.future for host in self.hosts.values()])
        except Exception:  # noqa: BLE001 - a cluster already gone holds nothing to forget
            pass
        self.hosts.clear()
        if self.owned:
            self.client.close()
