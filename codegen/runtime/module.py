"""The generated module at run time: bind data, validate it, call the compiled kernels.

A built problem directory holds `hg_<name>.c`, `hg_<name>.h`, `meta.json` (the kernel table and
array shapes) and `constants.json`. `GeneratedModule` loads them (compiling through the cache only
if needed) and `bind` returns a `BoundProblem`: the object every solver works on. Validation is
done once at bind time, so the per-call path only checks the vector arguments.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import sympy as sp

from ..errors import BindError, HypergenError
from ..jit import file_sha256, load_published
from ..threads import serial_openmp_after_fork
from ..version import ABI_VERSION
from .bound_problem import BoundProblem, BoundSamples
from .executors import check_executor, make_executor
from .validation import as_csr, as_float64, check_facts, check_finite, frozen_copy


class GeneratedModule:
    """One built problem: its metadata, compiled library and `bind` / `bind_samples`."""

    def __init__(self, directory, lib_module, meta: dict, constants: dict | None):
        self.directory = Path(directory)
        self.meta = meta
        self.name = meta["name"]
        self.extension = lib_module
        self.ffi, self.lib = lib_module.ffi, lib_module.lib
        self.constants_json = constants
        self.fingerprint: str | None = None  # the digest of its checksums (`load_directory`)
        self._sizes = [sp.Symbol(s, integer=True, positive=True) for s in meta["sizes"]]
        env = {s.name: s for s in self._sizes}
        self.shapes = {a["name"]: tuple(sp.sympify(e, locals=env) for e in a["shape"])
                       for a in meta["arrays"] + meta.get("hvp_cache", [])}
        # each row kernel's output (docs/bounds.md 15.10), under the kernel's name
        self.shapes.update({r["kernel"]: tuple(sp.sympify(e, locals=env) for e in r["shape"])
                            for r in meta.get("third_rows", [])})
        self._work = [sp.sympify(e, locals=env) for e in meta.get("work", [])]

    def __repr__(self):
        kernels = ", ".join(k["name"] for k in self.meta["kernels"])
        return f"<hypergen module {self.name!r}: kernels {kernels}>"

    def __reduce__(self) -> tuple:
        """Pickled as its directory and fingerprint, unpickled by loading it from there: how a
        worker process gets the module the parent built (the compiled extension is reused, not
        rebuilt). The fingerprint makes a directory that holds another build by then (a
        problem of the same name loaded since) an error: workers had computed that problem's
        numbers, status "ok"."""
        return load_directory, (str(self.directory), self.fingerprint)

    def bind(self, data=None, /, **arrays) -> "BoundProblem":
        """Bind one sample's data (NumPy arrays by the problem's data names), as a dict or as
        keywords; `data` is positional only, so that data arrays named data or self bind as
        keywords too."""
        data = dict(data or {}, **arrays)
        return BoundProblem(self, self.validate(data))

    def bind_samples(self, samples, executor=None, *, workers: int | None = None
                     ) -> "BoundSamples":
        """Several samples, one lower-level problem each; the upper objective is their mean.

        executor: None or "local" (serial, in this process), "processes" (a pool of `workers`
        local processes, default one per core), a dask.distributed.Client or a Dask scheduler
        address ("tcp://host:8786"). With an executor each sample's hypergradient runs on its
        home worker, where its data were sent once (docs/distributed.md); the numbers equal the
        serial ones. Data are validated here first, so a bad sample is named before any worker
        starts. Close the executor with `prob.close()` (or `with ... as prob`)."""
        if not isinstance(samples, Sequence) or isinstance(samples, str) or not samples:
            raise BindError(f"bind_samples expects a non-empty list of dicts of arrays, got "
                            f"{type(samples).__name__}")
        for s, data in enumerate(samples):
            if not isinstance(data, dict):
                raise BindError(f"bind_samples expects a list of dicts of arrays; sample {s} is "
                                f"a {type(data).__name__}")
        check_executor(executor, workers)
        bound = []
        for s, data in enumerate(samples):
            try:
                bound.append(self.bind(data))
            except BindError as exc:
                raise BindError(f"sample {s}: {exc}") from None
        self._check_one_theta(bound)
        return BoundSamples(bound, make_executor(executor, self, [b.data for b in bound],
                                                 workers))

    def _check_one_theta(self, bound: list) -> None:
        """BindError naming the first sample whose theta has another size than sample 0's: the
        samples share one theta (with theta of shape (m,), one weight per training row, each
        sample's m sets it). Accepted, every later call failed with contradictory sizes."""
        spec = next(a for a in self.meta["arrays"] if a["role"] == "theta")
        for s, b in enumerate(bound):
            if b.theta_size != bound[0].theta_size:
                sizes = ", ".join(f"{d} = {b.sizes[d]} (sample 0: {bound[0].sizes[d]})"
                                  for d in spec["shape"] if d in b.sizes)
                raise BindError(
                    f"sample {s}: theta has {b.theta_size} entries, sample 0's has "
                    f"{bound[0].theta_size}; the samples share one theta, so the sizes in its "
                    f"shape ({', '.join(spec['shape'])}) must agree: {sizes}")

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
        for n in names:
            refuse_if_rounded(n, data[n])
            refuse_if_masked(n, data[n])
        arrays = {n: as_csr(n, data[n]) if n in sparse else frozen_copy(as_float64(n, data[n]))
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
        self.check_memory(sizes)
        for n in names:
            want = self.extent(n, sizes)
            if arrays[n].shape != want:
                raise BindError(f"{n} has shape {arrays[n].shape} but the problem declares "
                                f"{tuple(map(str, self.shapes[n]))} = {want}")
            check_finite(n, arrays[n])
        for a in self.meta["arrays"]:
            if a.get("facts"):
                check_facts(a["name"], arrays[a["name"]], a["facts"])
        return {"arrays": arrays, "sizes": {s.name: sizes[s.name] for s in self._sizes}}

    def check_memory(self, sizes: dict) -> None:
        """Refuse sizes whose solver vectors or kernel temporaries cannot fit in this machine's
        memory, naming x and its size or the temporaries' total, before any allocation (m = 1e9
        once ended in NumPy's MemoryError, or the OOM killer; temporaries of 2^63 doubles wrapped
        the C work_size to 18 and crashed the first kernel call)."""
        x = self.meta["x"]
        entries = math.prod(self.extent(x, sizes))
        cache = sum(math.prod(self.extent(a["name"], sizes)) for a in self.meta.get("hvp_cache", []))
        subs = {s: sizes[s.name] for s in self._sizes if s.name in sizes}
        work = max((int(w.xreplace(subs)) for w in self._work), default=0)
        needed = 8 * (SOLVER_VECTORS * entries + cache + work)
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if needed > memory and work > SOLVER_VECTORS * entries + cache:
            raise BindError(
                f"the kernels' temporaries would take {work:,} doubles ({8 * work / 1e9:.3g} GB; "
                f"sizes {sizes}), and this machine has {memory / 1e9:.3g} GB of memory")
        if needed > memory:
            raise BindError(
                f"{x} would have {entries:,} entries ({8 * entries / 1e9:.3g} GB per vector; sizes "
                f"{sizes}): the solvers keep at least {SOLVER_VECTORS} such vectors, "
                f"{needed / 1e9:.3g} GB, and this machine has {memory / 1e9:.3g} GB of memory")

    def extent(self, name: str, sizes: dict) -> tuple:
        """The concrete shape of array `name` for bound sizes ({size name: int})."""
        subs = {s: sizes[s.name] for s in self._sizes if s.name in sizes}
        return tuple(int(e.xreplace(subs)) for e in self.shapes[name])


#: x-sized float64 vectors a hypergradient keeps at least (x, gradient, adjoint, direction).
SOLVER_VECTORS = 4


def refuse_if_masked(name: str, value: object) -> None:
    """A NumPy masked array with masked entries is refused: the kernels read every entry, and
    np.asarray drops the mask, so a masked-out outlier was computed with, silently."""
    if isinstance(value, np.ma.MaskedArray):
        masked = int(np.count_nonzero(np.ma.getmaskarray(value)))
        if masked:
            raise BindError(f"{name} is a masked array with {masked} masked entries; the kernels "
                            f"read every entry, the mask would be dropped: pass {name}.filled(v) "
                            f"with the value you mean, or only the entries you keep")


def refuse_if_rounded(name: str, value: object) -> None:
    """Data wider than float64 (longdouble) bind only when every value is a float64 number: the
    kernels compute in float64, and bind converts exactly or refuses (docs/interface.md 3)."""
    if not isinstance(value, (np.ndarray, np.generic)) or value.dtype.kind != "f" \
            or value.dtype.itemsize <= 8:
        return
    changed = int(np.count_nonzero(np.asarray(value).astype(np.float64) != value))
    if changed:
        raise BindError(f"{name} has dtype {value.dtype}, and {changed} of its {np.size(value)} "
                        f"values are not float64 numbers (hypergen computes in float64); pass "
                        f"{name}.astype(np.float64) to round them")


def load_directory(directory, expected: str | None = None) -> GeneratedModule:
    """Load a built problem directory (what `hypergen build` wrote), compiling only on a miss;
    with `expected`, refuse a directory whose fingerprint (the digest of its checksums) is not
    that: it holds another build than the one a pickled module named."""
    directory = Path(directory)
    meta = _read_json(directory / "meta.json")
    if not isinstance(meta, dict) or not {"name", "cdef", "kernels"} <= meta.keys():
        raise HypergenError(f"{directory / 'meta.json'} is not a hypergen module description: "
                            "run `hypergen build` on its problem file again")
    if meta.get("abi") != ABI_VERSION:
        raise HypergenError(
            f"{directory} was generated for kernel ABI {meta.get('abi')} (hypergen "
            f"{meta.get('version')}), this hypergen reads ABI {ABI_VERSION}: run `hypergen build` "
            f"on its problem file again")
    prefix = f"hg_{meta['name']}"
    constants_path = directory / "constants.json"
    constants = _read_json(constants_path) if constants_path.exists() else None
    recorded = verify_manifest(directory, (f"{prefix}.c", "meta.json", "constants.json"))
    source = (directory / f"{prefix}.c").read_text()
    fingerprint = hashlib.sha256(json.dumps(
        sorted(recorded.items()) if recorded is not None else [source, meta]).encode()).hexdigest()
    if expected is not None and fingerprint != expected:
        raise HypergenError(
            f"{directory} now holds another build of problem {meta['name']!r} than the one this "
            f"process was handed (a problem of the same name was built or loaded there since): "
            f"load the problem file again with codegen.load, and bind again")
    lib_module = load_published(meta["name"], source, meta["cdef"], directory)
    serial_openmp_after_fork()
    module = GeneratedModule(directory, lib_module, meta, constants)
    module.fingerprint = fingerprint
    return module


#: sha256sum-format list of the files `hypergen build` wrote into a module directory
MANIFEST = "checksums.sha256"


def read_manifest(directory: Path) -> dict[str, str] | None:
    """{file name: sha256} from DIR/checksums.sha256, or None when there is none (or it is damaged)."""
    try:
        lines = (Path(directory) / MANIFEST).read_text().splitlines()
        return {name: digest for digest, name in (line.split("  ", 1) for line in lines if line)}
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        return None


def verify_manifest(directory: Path, required: tuple[str, ...] = ()) -> dict[str, str] | None:
    """Refuse a module directory whose files differ from what `hypergen build` wrote: an edited
    constants.json gives wrong certified bounds, an edited C source a wrong kernel. A manifest
    that does not list a `required` file present in the directory is refused too: an emptied
    one had verified nothing, silently, and an edited constants.json was then trusted. Returns
    the manifest (None where there is none, with a warning)."""
    recorded = read_manifest(directory)
    if recorded is None:
        warnings.warn(f"hypergen: {directory / MANIFEST} is missing or unreadable: the files of "
                      f"{directory} are not verified (run `hypergen build` again to write it)",
                      RuntimeWarning, stacklevel=3)
        return None
    unlisted = [name for name in required if name not in recorded and (directory / name).exists()]
    if unlisted:
        raise HypergenError(f"{directory / MANIFEST} does not list {', '.join(unlisted)} "
                            "(truncated or edited): run `hypergen build` on the problem file to "
                            "write this module again")
    for name, digest in recorded.items():
        path = directory / name
        if path.exists() and file_sha256(path) != digest:
            raise HypergenError(f"{path} does not match its checksum in {directory / MANIFEST} "
                                "(edited or damaged since it was written): run `hypergen build` "
                                "on the problem file to write this module again")
    return recorded


def _read_json(path: Path):
    """A file `hypergen build` wrote, parsed; a missing or damaged one is named with the fix
    (a truncated file, from a full disk or a killed copy, must not surface as a JSON traceback)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise HypergenError(f"{path} is missing: run `hypergen build` on the problem file "
                            "to write this module again") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise HypergenError(f"{path} cannot be read ({exc}): run `hypergen build` on the problem "
                            "file to write this module again") from None
