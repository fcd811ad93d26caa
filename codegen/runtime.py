"""The generated module at run time: bind data, validate it, call the compiled kernels.

A built problem directory holds `hg_<name>.c`, `hg_<name>.h`, `meta.json` (the kernel table and
array shapes) and `constants.json`. `GeneratedModule` loads them (compiling through the cache only
if needed) and `bind` returns a `BoundProblem`: the object every solver works on. Validation is
done once at bind time, so the per-call path only checks the vector arguments.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import sympy as sp

from .errors import BindError, HypergenError, KernelError

if TYPE_CHECKING:  # bound.py imports this module; the names are for annotations only
    from .bound import BoundProblem, BoundSamples


def _as_float64(name: str, value) -> np.ndarray:
    """Convert to a C-contiguous float64 array exactly, or refuse; never reinterpret bytes."""
    if type(value) is np.ndarray and value.dtype == np.float64 and value.flags.c_contiguous:
        return value  # the per-call fast path: solvers pass such arrays thousands of times
    arr = np.asarray(value)
    if arr.dtype == np.float64:
        return np.require(arr, requirements="C")
    if arr.dtype.kind in "biu":
        out = arr.astype(np.float64)
        if arr.size and np.any(out.astype(arr.dtype) != arr):
            raise BindError(f"{name}: integer values beyond 2**53 cannot be represented as float64")
        return np.require(out, requirements="C")
    if arr.dtype.kind == "f":
        return np.require(arr.astype(np.float64), requirements="C")  # float16/32 widen exactly
    raise BindError(f"{name}: expected real numbers (float64), got dtype {arr.dtype}")


def _frozen_copy(arr: np.ndarray) -> np.ndarray:
    """A private read-only copy: the constants derived from the data at bind time must keep
    describing the data the kernels read, whatever the caller does to its arrays later."""
    out = np.array(arr, dtype=np.float64, order="C", copy=True)
    out.flags.writeable = False
    return out


def _as_csr(name: str, value):
    """A CSR matrix with float64 values, int64 indices, sorted and without duplicates."""
    import scipy.sparse as sps

    try:
        csr = sps.csr_array(value, copy=True)  # private: sorting below must not touch the caller's
    except (TypeError, ValueError) as exc:
        raise BindError(f"{name} is declared sparse: pass a 2-D scipy.sparse matrix or array "
                        f"({exc})") from None
    csr = sps.csr_array((_as_float64(name, csr.data), csr.indices, csr.indptr), shape=csr.shape)
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


def _check_finite(name: str, arr) -> None:
    if hasattr(arr, "tocsr"):
        if not np.all(np.isfinite(arr.data)):
            raise BindError(f"{name} contains a non-finite stored value")
        return
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        where = tuple(int(b) for b in bad) if arr.ndim else ()
        raise BindError(f"{name} contains a non-finite value ({arr[tuple(bad)]}) at index {where}")


class GeneratedModule:
    """One built problem: its metadata, compiled library and `bind` / `bind_samples`."""

    def __init__(self, directory, lib_module, meta: dict, constants: dict | None):
        self.directory = Path(directory)
        self.meta = meta
        self.name = meta["name"]
        self.extension = lib_module
        self.ffi, self.lib = lib_module.ffi, lib_module.lib
        self.constants_json = constants
        self._sizes = [sp.Symbol(s, integer=True, positive=True) for s in meta["sizes"]]
        env = {s.name: s for s in self._sizes}
        self.shapes = {a["name"]: tuple(sp.sympify(e, locals=env) for e in a["shape"])
                       for a in meta["arrays"] + meta.get("hvp_cache", [])}

    def __repr__(self):
        kernels = ", ".join(k["name"] for k in self.meta["kernels"])
        return f"<hypergen module {self.name!r}: kernels {kernels}>"

    def bind(self, data=None, **arrays) -> "BoundProblem":
        """Bind one sample's data (NumPy arrays by the problem's data names)."""
        from .bound import BoundProblem

        data = dict(data or {}, **arrays)
        return BoundProblem(self, self.validate(data))

    def bind_samples(self, samples) -> "BoundSamples":
        """Several samples, one lower-level problem each; the upper objective is their mean."""
        from .bound import BoundSamples

        if isinstance(samples, dict) or not samples:
            raise BindError("bind_samples expects a non-empty list of dicts of arrays")
        bound = []
        for s, data in enumerate(samples):
            try:
                bound.append(self.bind(data))
            except BindError as exc:
                raise BindError(f"sample {s}: {exc}") from None
        return BoundSamples(bound)

    # -- validation ------------------------------------------------------------------------
    def validate(self, data: dict) -> dict:
        """Arrays converted and checked against the declared shapes; sizes bound from them."""
        names = [a["name"] for a in self.meta["arrays"] if a["role"] == "data"]
        missing = [n for n in names if n not in data]
        if missing:
            raise BindError(f"missing data for {self.name}: {', '.join(missing)} "
                            f"(expected {', '.join(names)})")
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise BindError(f"unknown data {', '.join(unknown)} for {self.name}; "
                            f"the data names are {', '.join(names)}")
        sparse = {a["name"] for a in self.meta["arrays"] if a.get("sparse")}
        arrays = {n: _as_csr(n, data[n]) if n in sparse else _frozen_copy(_as_float64(n, data[n]))
                  for n in names}
        sizes = {}
        for n in names:
            shape = self.shapes[n]
            if arrays[n].ndim != len(shape):
                raise BindError(f"{n} must have {len(shape)} dimension(s) {tuple(map(str, shape))}, "
                                f"got shape {arrays[n].shape}")
            for axis, (expr, got) in enumerate(zip(shape, arrays[n].shape)):
                if isinstance(expr, sp.Symbol):
                    if expr.name in sizes and sizes[expr.name][0] != got:
                        first = sizes[expr.name]
                        raise BindError(
                            f"inconsistent size {expr.name}: {first[1]} gives {first[0]} but "
                            f"{n} (axis {axis}) gives {got}")
                    sizes.setdefault(expr.name, (got, f"{n} (axis {axis})"))
        sizes = {k: v[0] for k, v in sizes.items()}
        for name, size in sizes.items():
            if size < 1:
                raise BindError(f"size {name} is {size}; every size must be at least 1")
        for n in names:
            want = self.extent(n, sizes)
            if arrays[n].shape != want:
                raise BindError(f"{n} has shape {arrays[n].shape} but the problem declares "
                                f"{tuple(map(str, self.shapes[n]))} = {want}")
            _check_finite(n, arrays[n])
        return {"arrays": arrays, "sizes": {s.name: sizes[s.name] for s in self._sizes}}

    def extent(self, name: str, sizes: dict) -> tuple:
        """The concrete shape of array `name` for bound sizes ({size name: int})."""
        subs = {s: sizes[s.name] for s in self._sizes if s.name in sizes}
        return tuple(int(e.xreplace(subs)) for e in self.shapes[name])


def load_directory(directory) -> GeneratedModule:
    """Load a built problem directory (what `hypergen build` wrote), compiling only on a miss."""
    from .build import load_published

    from .render import ABI_VERSION

    directory = Path(directory)
    meta = json.loads((directory / "meta.json").read_text())
    if meta.get("abi") != ABI_VERSION:
        raise HypergenError(
            f"{directory} was generated for kernel ABI {meta.get('abi')} (hypergen "
            f"{meta.get('version')}), this hypergen reads ABI {ABI_VERSION}: run `hypergen build` "
            f"on its problem file again")
    prefix = f"hg_{meta['name']}"
    source = (directory / f"{prefix}.c").read_text()
    cdef = meta["cdef"]
    lib_module = load_published(meta["name"], source, cdef, directory)
    constants_path = directory / "constants.json"
    constants = json.loads(constants_path.read_text()) if constants_path.exists() else None
    return GeneratedModule(directory, lib_module, meta, constants)


class KernelCaller:
    """Calls one compiled kernel with the bound arrays; checks vector arguments per call."""

    def __init__(self, module: GeneratedModule, kernel: dict, arrays: dict, sizes: dict, work,
                 lock):
        self.name = kernel["name"]
        self.fn = getattr(module.lib, f"hg_{module.name}_{kernel['name']}")
        self.ffi = module.ffi
        self.params = kernel["params"]
        self.fixed = {}
        for p in self.params:
            if p["role"] == "size":
                self.fixed[p["name"]] = sizes[p["name"]]
            elif p["role"] == "data":
                self.fixed[p["name"]] = self.ffi.from_buffer("double[]", arrays[p["name"]])
            elif p["role"].startswith("csr_"):
                field = p["role"][len("csr_"):]  # data, indices or indptr
                csr = arrays[p["name"][: -len(field) - 1]]
                ctype = "double[]" if field == "data" else "int64_t[]"
                self.fixed[p["name"]] = self.ffi.from_buffer(ctype, getattr(csr, field))
            elif p["role"] == "scalar":
                self.fixed[p["name"]] = float(arrays[p["name"]])
            elif p["role"] == "work":
                self.fixed[p["name"]] = self.ffi.from_buffer("double[]", work)
        self.keep = (arrays, work)
        # cffi releases the GIL during the call and `work` is shared by the bound problem's
        # kernels: two threads must not use it at once (a race would be a silently wrong result).
        self.lock = lock

        # Per call, only the vector arguments change: (position, name, is the output) of each,
        # the rest fixed.
        self.template = [self.fixed.get(p["name"]) for p in self.params]
        self.slots = [(k, p["name"], p["role"] == "output") for k, p in enumerate(self.params)
                      if p["name"] not in self.fixed]

    def __call__(self, vectors: dict, out: np.ndarray):
        args = list(self.template)
        from_buffer = self.ffi.from_buffer
        for k, name, is_output in self.slots:
            args[k] = from_buffer("double[]", out if is_output else vectors[name])
        with self.lock:
            status = self.fn(*args)
        if status == 2:
            raise KernelError(f"{self.name}: invalid size (every size must be at least 1)")
        return status
