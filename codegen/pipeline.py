"""The whole pipeline for one problem file: load -> lower/differentiate -> render -> build.

`build_problem` writes DIR/<name>/ (C source, header, meta.json, constants.json, __init__.py)
and compiles it through the cache; `load_problem_file` runs a problem file and reports errors in
it as one message with the file and line.
"""
from __future__ import annotations

import hashlib
import json
import os
import runpy
import traceback
import warnings
from pathlib import Path
from typing import Any, Union

import sympy as sp

from .compiler import ir
from .compiler.contraction import third_row_kernels
from .compiler.emit.render import (
    ColumnsRenderer,
    KernelRenderer,
    environment,
    kernel_renderers,
    render_module,
    template_digest,
)
from .compiler.gram import GRAM_DATA, GRAM_REST
from .compiler.kernels import kernel_specs
from .compiler.problem import Problem
from .constants import derive
from .errors import HypergenError, ProblemError
from .jit import cache_root, file_sha256, publish, writable_dir, write_atomically
from .runtime import GeneratedModule, load_directory
from .runtime.module import MANIFEST, read_manifest
from .version import ABI_VERSION, __version__

PathLike = Union[str, "os.PathLike[str]"]


def load_problem_file(path: PathLike) -> list[Problem]:
    """Run a problem file; return its module-level Problems (errors name the file and line)."""
    path = Path(path)
    if not path.exists():
        raise HypergenError(f"{path}: no such problem file")
    try:
        namespace = runpy.run_path(str(path), run_name=f"hypergen_problem_{path.stem}")
    except (Exception, SystemExit) as exc:  # a problem file may raise anything; report where
        frames = [f for f in traceback.extract_tb(exc.__traceback__)
                  if Path(f.filename).resolve() == path.resolve()]
        where = f"{path}:{frames[-1].lineno}" if frames else str(path)
        if isinstance(exc, SystemExit):  # sys.exit(0) would end hypergen "successfully" unbuilt
            raise HypergenError(f"{where}: the problem file called sys.exit({exc.code!r}) while "
                                "being loaded; it must define its Problems, not exit") from None
        # hypergen's own errors keep their class (a ProblemError stays one for `except`)
        kind = type(exc) if isinstance(exc, HypergenError) else HypergenError
        raise kind(f"{where}: {type(exc).__name__}: {exc}") from None
    problems = list({id(v): v for v in namespace.values() if isinstance(v, Problem)}.values())
    # (one Problem bound to two names, `default = ridge`, is one problem)
    if not problems:
        raise HypergenError(f"{path}: defines no codegen.Problem at module level")
    names = [p.name for p in problems]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise HypergenError(f"{path}: several problems are named {dup[0]!r}")
    return problems


def generate(problem: Problem, allow_uncertified: bool = False) -> dict[str, Any]:
    """Every generated text of one problem, in memory: source, header, cdef, meta, constants.

    A lower level whose strong convexity cannot be proved is an error unless `allow_uncertified`
    (then every bound computed with its constants says it is uncertified).
    """
    constants = _derive_constants(problem, allow_uncertified)
    third_rows = third_row_kernels(problem, constants.get("contractions", {}))
    specs = kernel_specs(problem, third_rows)
    source, header, cdef = render_module(problem, specs)
    by_name = {s.name: s for s in specs}
    reads = {s.name: {ir.read_name(r) for st in s.program.statements for u in st.updates
                      for r in ir.reads_of(u.expr, s.program.arrays)} for s in specs}
    theta = problem.theta_spec.name
    apply = by_name.get("lower_hvp_apply")
    weights = by_name.get("lower_gram_weights")
    renderers = kernel_renderers(problem, specs)
    meta = {
        "name": problem.name,
        "version": __version__,
        "abi": ABI_VERSION,
        "x": problem.x_spec.name,
        "theta": theta,
        "theta_names": problem.theta_names,
        "sizes": [s.name for s in problem.sizes],
        "arrays": [{"name": a.name, "role": a.role, "shape": [str(e) for e in a.shape],
                    "sparse": a.sparse, **({"facts": list(a.facts)} if a.facts else {})}
                   for a in problem.arrays.values()],
        "kernels": [_kernel_meta(k) for k in renderers],
        # the doubles of `work` each kernel's temporaries take, SymPy text in the sizes: bind
        # refuses sizes they cannot be allocated for (the C work_size is an int64, which wrapped
        # past 2^63 to 18 doubles, and the first kernel call crashed)
        "work": sorted({str(k.work_size()) for k in renderers
                        if isinstance(k, KernelRenderer) and k.work_arrays()}),
        # the prepared HVP's cache arrays, in buffer order ([] when the HVP has none)
        "hvp_cache": [] if apply is None else [
            {"name": name, "shape": [str(e) for e in apply.program.arrays[name].shape]}
            for name in apply.cache],
        "cdef": cdef,
        # d2g/dx2 = A^T diag(w) A + R (compiler/gram.py): the data matrix A, R's kernel, and
        # whether R reads x (the energy-norm terms need R constant in x, docs/bounds.md 15.9)
        "gram": None if weights is None else {
            "data": weights.program.meta[GRAM_DATA], "rest": weights.program.meta[GRAM_REST],
            "rest_reads_x": bool(weights.program.meta[GRAM_REST])
            and problem.x_spec.name in reads["lower_hvp_varying"]},
        "is_quadratic": problem.x_spec.name not in reads["lower_hvp"],
        # f quadratic in x: the DWR correction's second-order term needs L_f only (docs/bounds.md 15.2)
        "upper_is_quadratic": problem.x_spec.name not in reads["upper_hvp"],
        # kernels that read neither x nor theta: a linear map of their direction fixed by the
        # data, so their dense matrices (lower_hessian, cross_matrix) are computed once per bind
        "data_only": [name for name in ("lower_hvp", "cross_jvp", "lower_hvp_fixed")
                      if name in reads and not {problem.x_spec.name, theta} & reads[name]],
        "upper_depends_on_theta": any(str(r.base.label) == theta for r in problem.f.atoms(sp.Indexed)),
        # the row kernels of the data-local third derivative (docs/bounds.md 15.10): term,
        # kernel, the atom's number of arguments and the output's shape
        "third_rows": [row[5] for row in third_rows],
        "stated_constants": None if problem.constants is None else
        {k: sp.srepr(v) for k, v in sorted(problem.constants.items())},
    }
    return {"source": source, "header": header, "cdef": cdef, "meta": meta,
            "constants": constants}


def generate_cached(problem: Problem, allow_uncertified: bool = False) -> dict[str, Any]:
    """`generate`, memoised on disk: an unchanged problem skips every SymPy stage.

    The key covers the canonical problem (srepr of its expressions and arrays), the flag, and a
    digest of the generator's own sources and templates, so any change to either misses. A
    corrupt entry is regenerated; entries are published atomically (os.replace).
    """
    key = symbolic_key(problem, allow_uncertified)
    path = cache_root(None) / "symbolic" / key[:2] / f"{key}.json"
    cached = _read_symbolic_entry(path)
    if cached is not None:
        return cached
    texts = generate(problem, allow_uncertified)
    entry = {"sha256": _texts_digest(texts), "texts": texts}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(entry).encode())
    except OSError:
        pass  # an unwritable cache only costs the next build its speed
    return texts


def _texts_digest(texts: Any) -> str:
    return hashlib.sha256(json.dumps(texts, sort_keys=True).encode()).hexdigest()


def _read_symbolic_entry(path: Path) -> dict[str, Any] | None:
    """The generated texts a symbolic-cache entry holds, or None (missing, or damaged: then warn).

    An entry is {"sha256", "texts"} with the digest of the texts: an entry that was truncated,
    edited by hand or replaced by `{}` is regenerated, never compiled and trusted.
    """
    try:
        entry = json.loads(path.read_text())
        texts = entry["texts"]
        if isinstance(texts, dict) and entry["sha256"] == _texts_digest(texts):
            return texts
        problem = "its sha256 does not match its texts (edited or damaged)"
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        problem = f"it is unreadable ({type(exc).__name__}: {exc})"
    warnings.warn(f"hypergen: symbolic cache entry {path} failed its check: {problem}; "
                  "regenerating it", RuntimeWarning, stacklevel=3)
    return None


def symbolic_key(problem: Problem, allow_uncertified: bool) -> str:
    """The symbolic cache's key: what the generated texts depend on (docs/compiler.md 10)."""
    h = hashlib.sha256()
    canonical = [problem.name, sp.srepr(problem.g), sp.srepr(problem.f), sp.srepr(problem.r),
                 [(a.name, a.role, a.sparse, [sp.srepr(e) for e in a.shape], list(a.facts))
                  for a in problem.arrays.values()],
                 None if problem.constants is None else
                 {k: sp.srepr(v) for k, v in sorted(problem.constants.items())},
                 problem.theta_names, allow_uncertified, __version__]
    h.update(json.dumps(canonical, sort_keys=True).encode())
    h.update(_generator_digest().encode())
    return h.hexdigest()


def _generator_digest() -> str:
    """Digest of the generator's sources and templates (catches edits in a source checkout)."""
    h = hashlib.sha256(template_digest().encode())
    package = Path(__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        h.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _kernel_meta(renderer: KernelRenderer | ColumnsRenderer) -> dict[str, Any]:
    return {"name": renderer.name, "doc": renderer.doc,
            "params": [{"name": p.name, "role": p.role, "ctype": p.ctype}
                       for p in renderer.params()]}


def _derive_constants(problem: Problem, allow_uncertified: bool) -> dict[str, Any]:
    """constants.json content: the derivation tree of mu, L, L_A, L_B, L_f (codegen.constants)."""
    tree: dict[str, Any] = json.loads(derive(problem, allow_uncertified=allow_uncertified).to_json())
    return tree


def write_outputs(problem: Problem, texts: dict[str, Any], out_dir: PathLike,
                  source_file: str | None = None) -> Path:
    """Write DIR/<name>/; files whose content is unchanged are not touched."""
    target = Path(out_dir) / problem.name
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # --out naming a file, a read-only or full file system
        raise HypergenError(f"cannot create the output directory {target}: "
                            f"{exc.strerror or exc}") from None
    prefix = f"hg_{problem.name}"
    init = environment().get_template("package_init.py.j2").render(
        version=__version__, name=problem.name, source=source_file,
        data=[a.name for a in problem.data_specs])
    files = {
        f"{prefix}.c": texts["source"],
        f"{prefix}.h": texts["header"],
        "meta.json": json.dumps(texts["meta"], indent=1, sort_keys=True) + "\n",
        "__init__.py": init,
    }
    if texts["constants"] is not None:
        files["constants.json"] = json.dumps(texts["constants"], indent=1, sort_keys=True) + "\n"
    recorded = read_manifest(target) or {}
    for name, text in files.items():
        path = target / name
        try:
            if path.exists() and path.read_text() == text:
                continue
            if name in recorded and path.exists() and file_sha256(path) != recorded[name]:
                warnings.warn(f"hypergen: {path} was changed since hypergen wrote it; "
                              "writing it again", RuntimeWarning, stacklevel=2)
            write_atomically(path, text.encode())
        except OSError as exc:
            raise HypergenError(f"cannot write {path}: {exc.strerror or exc}") from None
    digests = "".join(f"{hashlib.sha256(text.encode()).hexdigest()}  {name}\n"
                      for name, text in sorted(files.items()))
    try:  # last: the files it vouches for are all in place
        if not (target / MANIFEST).exists() or (target / MANIFEST).read_text() != digests:
            write_atomically(target / MANIFEST, digests.encode())
    except OSError as exc:
        raise HypergenError(f"cannot write {target / MANIFEST}: {exc.strerror or exc}") from None
    return target


def build_problem(problem: Problem, out_dir: PathLike, source_file: str | None = None,
                  allow_uncertified: bool = False) -> GeneratedModule:
    """Generate, write and compile one problem; return the loaded GeneratedModule."""
    try:
        texts = generate_cached(problem, allow_uncertified)
    except ProblemError as exc:  # found after the file ran (convexity, say): name where it is
        if source_file is None:
            raise
        raise ProblemError(f"{_definition(source_file, problem.name)}: {exc}") from None
    target = write_outputs(problem, texts, out_dir, source_file)
    module = load_directory(target)
    publish(module.extension, target)
    return module


def _definition(source_file: str, name: str) -> str:
    """FILE:LINE of the Problem called `name` (the first line that says name="..."), or FILE."""
    try:
        lines = Path(source_file).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return source_file
    for number, line in enumerate(lines, start=1):
        if f'name="{name}"' in line or f"name='{name}'" in line:
            return f"{source_file}:{number}"
    return source_file


def choose_problem(problems: list[Problem], name: str | None, path: PathLike) -> Problem:
    """The problem called `name` (None: the only one); an error lists the names to choose from."""
    names = ", ".join(p.name for p in problems)
    if name is None and len(problems) > 1:
        raise HypergenError(f"{path} defines several problems ({names}): pass name=... "
                            "(on the command line: --name NAME)")
    chosen = problems[0] if name is None else next((p for p in problems if p.name == name), None)
    if chosen is None:
        raise HypergenError(f"{path} defines no problem named {name!r}; it defines {names}")
    return chosen


def load(path: PathLike, name: str | None = None, out: PathLike | None = None,
         allow_uncertified: bool = False) -> GeneratedModule:
    """codegen.load: build the problems of a file (cached) and return the one asked for."""
    problems = load_problem_file(path)
    chosen = choose_problem(problems, name, path)
    # an unwritable cache publishes into the private temp directory, with a warning
    out = Path(out) if out is not None else writable_dir(None, "modules", stacklevel=3)
    return build_problem(chosen, out, source_file=str(path), allow_uncertified=allow_uncertified)
