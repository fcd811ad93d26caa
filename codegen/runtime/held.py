"""Results whose large arrays stay on the workers (docs/distributed.md 3): the parent's side.

A worker sends a sample's result back without x, q and the lower gradient (sample_worker.slim);
`load` puts a `HeldArray` in their place, which fetches its array from the worker the first
time it is read (np.asarray, an attribute, an index, arithmetic). The parent needs none of them
to form the mean, so a hypergradient over many samples moves a few hundred bytes per sample
back instead of three vectors of the sample's size.

A `HeldResult` is one sample's result of one call as its worker holds it; its HeldArrays keep it
alive, and the executor keeps each sample's latest. When none is left, the executor tells the
worker to drop the arrays. A `Step` is how that call was made (theta, options, starting
points: None, the parent's own copy of an explicit array, or an earlier step's slot): a sample
whose worker is lost is computed again on another worker from its steps, to the same bits.
"""
from __future__ import annotations

import io
import pickle
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

from ..hypergrad import HypergradientOptions
from .sample_worker import SLOTS, Held, SampleTask

__all__ = ["HeldArray", "HeldResult", "FetchedStart", "Step", "materialized", "load", "MAX_REPLAY"]

#: The most calls a lost sample is computed again from (its steps): a step whose start is an
#: earlier step's array this many calls deep fetches that array first, so that the parent holds
#: its bits, and the steps before it are forgotten.
MAX_REPLAY = 16


@dataclass(frozen=True)
class FetchedStart:
    """A start that is an earlier call's array, which the parent fetched: it need not travel
    to the worker that holds it, and a worker that lost it gets it from the parent (the step
    that made it is never computed again, nor kept)."""

    run: int
    slot: int
    array: np.ndarray


@dataclass(eq=False)
class Step:
    """How one sample's result of call `run` was made. x0 / q0: None, an array the parent owns
    (a copy of what its caller passed), (an earlier Step, slot), or a FetchedStart."""

    sample: int
    run: int
    theta: np.ndarray
    options: HypergradientOptions
    threads: dict[str, int] | None
    x0: Any
    q0: Any
    depth: int = 1

    def chain(self) -> list[Step]:
        """This step and every earlier step it starts from, oldest first."""
        seen: dict[int, Step] = {}
        todo = [self]
        while todo:
            step = todo.pop()
            if step.run not in seen:
                seen[step.run] = step
                todo.extend(src[0] for src in (step.x0, step.q0) if isinstance(src, tuple))
        return [seen[run] for run in sorted(seen)]

    def task(self, token: str, inline: int, full: bool = False) -> SampleTask:
        """The step as a task: earlier steps' arrays as Held references, except, with `full`
        (to a worker that lost them), those the parent fetched, which then travel."""
        def start(src: Any) -> Any:
            if isinstance(src, tuple):
                return Held(src[0].run, src[1])
            if isinstance(src, FetchedStart):
                return src.array if full else Held(src.run, src.slot)
            return src
        return SampleTask(self.sample, token, self.theta, self.options, start(self.x0),
                          start(self.q0), self.run, self.threads, inline)


@dataclass(eq=False)
class HeldResult:
    """One sample's result of one call, held by its worker: the slots it holds that did not come
    back inline, and the parent's own copies of those fetched or sent inline (`pristine`:
    compared with an explicit x0 / q0 to find that it is a held array)."""

    step: Step
    owner: weakref.ref[Any]  # the SampleExecutor (weak: it keeps each sample's latest HeldResult)
    pristine: dict[int, np.ndarray] = field(default_factory=dict)
    slots: set[int] = field(default_factory=set)

    @property
    def sample(self) -> int:
        return self.step.sample

    @property
    def run(self) -> int:
        return self.step.run


class HeldArray(NDArrayOperatorsMixin):
    """An array of a sample's result that its worker holds: read it (np.asarray(a), a[i],
    a.copy(), a + 1, ...) and it is fetched once and kept here. Known without fetching:
    `shape`, `dtype`, `size`, `ndim`, `norm` (the float np.linalg.norm gives for it as float64;
    None unless real) and `all_finite` (np.all(np.isfinite(a)); None unless numeric). Passed
    back as x0 / q0 to the same BoundSamples before it is read, nothing travels (the worker
    starts from its own copy). Pickles as its array."""

    __array_priority__ = 20.0

    def __init__(self, made: HeldResult, slot: int, shape: tuple[int, ...], dtype: np.dtype,
                 facts: dict[str, Any]):
        self.made, self.slot = made, slot
        self.norm: float | None = facts["norm"]
        self.all_finite: bool | None = facts["all_finite"]
        self.owner: Any = made.owner()  # the executor that fetches it stays while it does
        self.shape, self.dtype = shape, dtype
        self._array: np.ndarray | None = None

    @property
    def fetched(self) -> bool:
        return self._array is not None

    def value(self) -> np.ndarray:
        """The array itself (fetched from the worker the first time)."""
        if self._array is None:
            self._array = np.array(self.owner.fetch(self.made, self.slot))
        return self._array

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self.value()
        return array if dtype is None else array.astype(dtype, copy=False)

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        inputs = tuple(materialized(v) for v in inputs)
        if "out" in kwargs:
            kwargs["out"] = tuple(materialized(v) for v in kwargs["out"])
        return getattr(ufunc, method)(*inputs, **kwargs)

    def __getitem__(self, key: Any) -> Any:
        return self.value()[key]

    def __setitem__(self, key: Any, item: Any) -> None:
        self.value()[key] = item

    def __iter__(self) -> Any:
        return iter(self.value())

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("made", "slot", "owner", "shape", "dtype", "norm",
                                             "all_finite", "_array"):
            raise AttributeError(name)
        return getattr(self.value(), name)

    def __reduce__(self) -> tuple[Any, ...]:
        return (np.array, (self.value(),))

    def __copy__(self) -> np.ndarray:
        return np.array(self.value())

    def __deepcopy__(self, memo: Any) -> np.ndarray:
        return np.array(self.value())

    def __repr__(self) -> str:
        if self._array is not None:
            return repr(self._array)
        return (f"HeldArray({SLOTS[self.slot]} of sample {self.made.sample}, call "
                f"{self.made.run}, shape={self.shape}, dtype={self.dtype}: on its worker)")


def materialized(value: Any) -> Any:
    """value, with a HeldArray replaced by its array."""
    return value.value() if isinstance(value, HeldArray) else value


class _Loader(pickle.Unpickler):
    """Unpickles a slim result (sample_worker.slim): each held array becomes a HeldArray of
    `made`, or, sent inline, a plain array (the parent keeps a copy in made.pristine)."""

    def __init__(self, blob: bytes, made: HeldResult):
        super().__init__(io.BytesIO(blob))
        self.made = made
        self.seen: dict[int, Any] = {}

    def persistent_load(self, pid: Any) -> Any:
        slot, shape, dtype, raw, facts = pid
        if slot not in self.seen:
            if raw is None:
                self.made.slots.add(slot)
                self.seen[slot] = HeldArray(self.made, slot, tuple(shape), np.dtype(dtype),
                                            facts)
            else:
                self.made.pristine[slot] = np.frombuffer(raw, np.dtype(dtype)).reshape(shape)
                self.seen[slot] = np.array(self.made.pristine[slot])
        return self.seen[slot]


def load(blob: bytes, made: HeldResult) -> Any:
    """The per-sample result a worker sent (sample_worker.slim), with HeldArrays of `made`."""
    return _Loader(blob, made).load()
