"""The package's structure, read with `ast` (the layout's rules as a test; no module is imported).

* 0 import cycles between modules (all imports, function-level ones included: a cycle held
  together by an import inside a function is still a cycle; imports under
  `if TYPE_CHECKING:` are excluded, they never run);
* 0 backward imports across layers (`LAYERS` below: a module imports only from its own layer
  or from the layers its layer lists);
* 0 private (`_name`) names imported from another module, or read as `module._name`;
* at most `INNER_IMPORTS_PER_1000` imports inside functions per 1,000 code lines outside the
  CLI; an import of an optional dependency (`OPTIONAL_DEPENDENCIES`) is allowed inside a
  function and not counted;
* no function over `MAX_FUNCTION_LINES` code lines, no module over `MAX_MODULE_LINES` lines;
* 0 references to files the repository does not hold: every `*.md` path, every `../` path and
  every path from the root (`codegen/jit.py`, `templates/module.c.j2`) cited in codegen/,
  tests/, examples/, benchmarks/, docs/ and README.md resolves, from the citing file's folder
  or from the repository root, to a file inside the repository, and a cited section number
  (`docs/framework.md 7`, `docs/interface.md section 3.1`) is a heading of that page.

"Code lines" are physical lines that are not blank, not a comment and not part of a
docstring. A failure lists every offender, so one run shows all that is left to do.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "codegen"

MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 600
INNER_IMPORTS_PER_1000 = 1.5
# Optional dependencies imported where they are used, so that importing hypergen does not need
# them (or pay for them): progress bars, plots, SciPy's optimisers, dask collections.
OPTIONAL_DEPENDENCIES = ("tqdm", "matplotlib", "scipy.optimize", "dask")

BASE = {"errors", "primitives", "version", "threads", "floats"}
# Layer of a module: its first component under codegen/ (constants_runtime belongs to constants).
# Each layer may import itself, the layers listed here and BASE.
LAYERS = {
    "__init__": "*",  # the public facade `codegen`: re-exports from any layer
    "__main__": "*",  # `python -m codegen`
    "cli": {"pipeline", "runtime", "learn", "hypergrad", "constants", "jit", "compiler"},
    "pipeline": {"runtime", "learn", "hypergrad", "constants", "jit", "compiler"},
    "runtime": {"learn", "hypergrad", "constants", "jit", "compiler"},
    "learn": {"hypergrad"},
    "hypergrad": set(),
    "constants": set(),  # derives from SymPy expressions only: it needs no compiler stage
    "jit": set(),
    "compiler": set(),
    **{name: set() for name in BASE},
}
LAYER_ALIASES = {"constants_runtime": "constants"}


@dataclass
class Module:
    name: str  # dotted, e.g. codegen.compiler.passes
    path: Path
    tree: ast.Module
    lines: list
    imports: list = field(default_factory=list)  # Import records, TYPE_CHECKING ones excluded

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"

    @property
    def layer(self) -> str:
        parts = self.name.split(".")
        first = parts[1] if len(parts) > 1 else "__init__"
        return LAYER_ALIASES.get(first, first)


@dataclass
class Import:
    line: int
    target: str  # the module imported from (a package's __init__ for names it defines)
    name: str | None  # the imported name for `from X import name`, None for `import X`
    in_function: bool


def _discover() -> dict:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        source = path.read_text()
        modules[".".join(parts)] = Module(".".join(parts), path, ast.parse(source, str(path)),
                                          source.splitlines())
    return modules


def _type_checking_nodes(tree: ast.AST) -> set:
    """ids of the nodes under `if TYPE_CHECKING:` / `if typing.TYPE_CHECKING:`."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                skipped |= {id(sub) for stmt in node.body for sub in ast.walk(stmt)}
    return skipped


def _function_nodes(tree: ast.AST) -> set:
    """ids of every node inside a function body."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside |= {id(sub) for sub in ast.walk(node) if sub is not node}
    return inside


def _resolve(module: Module, node, modules: dict) -> list:
    """(target module, imported name) pairs of one import statement."""
    if isinstance(node, ast.Import):
        return [(alias.name, None) for alias in node.names]
    if node.level:
        base = module.name.split(".")
        if not module.is_package:
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    out = []
    for alias in node.names:
        submodule = f"{target}.{alias.name}"
        out.append((submodule, None) if submodule in modules else (target, alias.name))
    return out


def _analyse(modules: dict) -> None:
    for module in modules.values():
        skipped = _type_checking_nodes(module.tree)
        in_function = _function_nodes(module.tree)
        for node in ast.walk(module.tree):
            if id(node) in skipped or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target, name in _resolve(module, node, modules):
                module.imports.append(Import(node.lineno, target, name, id(node) in in_function))


MODULES = _discover()
_analyse(MODULES)


def _internal(module: Module):
    """The imports of `module` that name another module of the package."""
    return [imp for imp in module.imports if imp.target in MODULES and imp.target != module.name]


def _docstring_lines(tree: ast.AST) -> set:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                lines |= set(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def _code_lines(module: Module, first: int = 1, last: int | None = None) -> int:
    """Physical lines first..last that are not blank, a comment or a docstring."""
    docstrings = _docstring_lines(module.tree)
    last = len(module.lines) if last is None else last
    return sum(1 for number in range(first, last + 1)
               if number not in docstrings
               and module.lines[number - 1].strip()
               and not module.lines[number - 1].strip().startswith("#"))


def import_graph() -> dict:
    return {name: {imp.target for imp in _internal(m)} for name, m in MODULES.items()}


def import_cycles(graph: dict) -> list:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def _cycle_edges(component: list) -> list:
    members = set(component)
    return sorted(f"{m}:{imp.line} -> {imp.target}" + (" (in a function)" if imp.in_function else "")
                  for m in component for imp in _internal(MODULES[m]) if imp.target in members)


def test_the_analysis_sees_the_package():
    """The reader itself: it finds the modules and resolves relative imports of every form."""
    assert {"codegen", "codegen.compiler.passes", "codegen.compiler.emit.loopnest",
            "codegen.pipeline", "codegen.errors"} <= set(MODULES)
    targets = {imp.target for imp in MODULES["codegen.compiler.emit.loopnest"].imports}
    assert {"codegen.compiler.ir", "codegen.errors", "codegen.compiler.passes"} <= targets
    assert MODULES["codegen.compiler.emit.loopnest"].layer == "compiler"
    assert MODULES["codegen"].layer == "__init__"
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert all(module.layer in LAYERS for module in MODULES.values()), \
        sorted({m.layer for m in MODULES.values()} - set(LAYERS))


def test_no_import_cycles():
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(
        "  " + " <-> ".join(c) + "\n" + "\n".join("      " + e for e in _cycle_edges(c))
        for c in cycles)


def test_imports_go_one_way_across_layers():
    backward = []
    for module in MODULES.values():
        allowed = LAYERS[module.layer]
        if allowed == "*":
            continue
        for imp in _internal(module):
            layer = MODULES[imp.target].layer
            if layer != module.layer and layer not in BASE and layer not in allowed:
                backward.append(f"{module.name}:{imp.line} ({module.layer}) imports "
                                f"{imp.target} ({layer})")
    assert not backward, "imports against the layer order:\n  " + "\n  ".join(backward)


def _private(name: str | None) -> bool:
    return bool(name) and name.startswith("_") and not name.startswith("__")


def test_no_private_names_across_modules():
    found = []
    for module in MODULES.values():
        aliases = {}  # local name -> module, for `from . import ir` / `import codegen.x as y`
        for node in ast.walk(module.tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias, (target, name) in zip(node.names, _resolve(module, node, MODULES)):
                    if name is None and target in MODULES and target != module.name:
                        aliases[alias.asname or alias.name.split(".")[0]] = target
        for imp in _internal(module):
            if _private(imp.name):
                found.append(f"{module.name}:{imp.line} imports {imp.name} from {imp.target}")
        for node in ast.walk(module.tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and _private(node.attr)):
                found.append(f"{module.name}:{node.lineno} reads "
                             f"{aliases[node.value.id]}.{node.attr}")
    assert not found, f"{len(found)} private names used across modules:\n  " + "\n  ".join(found)


def _optional(target: str) -> bool:
    return any(target == dep or target.startswith(dep + ".") for dep in OPTIONAL_DEPENDENCIES)


def test_imports_at_module_top():
    inner, code_lines = [], 0
    for module in MODULES.values():
        if module.layer == "cli":
            continue
        code_lines += _code_lines(module)
        lines = {imp.line for imp in module.imports if imp.in_function and not _optional(imp.target)}
        inner += [f"{module.name}:{line}: {module.lines[line - 1].strip()}" for line in sorted(lines)]
    rate = 1000 * len(inner) / code_lines
    assert rate <= INNER_IMPORTS_PER_1000, (
        f"{len(inner)} imports inside functions in {code_lines} code lines outside the CLI "
        f"({rate:.2f} per 1,000, at most {INNER_IMPORTS_PER_1000}):\n  " + "\n  ".join(inner))


def test_functions_are_short():
    long = []
    for module in MODULES.values():
        for node in ast.walk(module.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                count = _code_lines(module, first, node.end_lineno)
                if count > MAX_FUNCTION_LINES:
                    long.append(f"{module.name}.{node.name} (line {node.lineno}): {count} code lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} code lines:\n  " + "\n  ".join(long)


def test_modules_are_short():
    long = [f"{m.name}: {len(m.lines)} lines" for m in MODULES.values()
            if len(m.lines) > MAX_MODULE_LINES]
    assert not long, f"modules over {MAX_MODULE_LINES} lines:\n  " + "\n  ".join(long)


# -- references to files ---------------------------------------------------------------------
SCANNED = ("codegen", "tests", "examples", "benchmarks", "docs", "README.md")
SCANNED_SUFFIXES = {".py", ".md", ".j2", ".txt", ".toml", ".cfg", ".sh", ""}
URL = re.compile(r"[a-z][a-z0-9+.-]*://\S+")
MD_PATH = re.compile(r"(?<![\w./-])((?:\.{1,2}/)*[\w.-]+(?:/[\w.-]+)*\.md)(?![\w/])")
PARENT_PATH = re.compile(r"(?<![\w.])(\.\./[\w./-]*[\w-])")
ROOT_PATH = re.compile(r"(?<![\w./-])((?:codegen|tests|examples|benchmarks|docs|templates|generated)"
                       r"/[\w./-]*\.(?:py|md|j2|json|c|h|toml|npz))(?![\w/])")
# `docs/x.md 7`, `x.md 10.1`, `x.md section 3`, `x.md sections 2-5`, `x.md 4, items 4-5`
SECTION = re.compile(r"\.md\)?(?: sections?)? (\d+(?:\.\d+)*)(?:-(\d+(?:\.\d+)*))?")


def _scanned_files() -> list:
    files = []
    for entry in SCANNED:
        path = ROOT / entry
        candidates = [path] if path.is_file() else sorted(path.rglob("*"))
        files += [p for p in candidates if p.is_file() and p.suffix in SCANNED_SUFFIXES
                  and "__pycache__" not in p.parts and not p.name.startswith(".")]
    return files


def _resolve_reference(citing: Path, ref: str) -> Path | None:
    """The file inside the repository `ref` names, from the citing file's folder or the root."""
    for base in (citing.parent, ROOT):
        candidate = (base / ref).resolve()
        if candidate.is_file() and ROOT in candidate.parents:
            return candidate
    return None


def _references():
    """(citing file, line number, reference, resolved path or None, text after the reference)."""
    for path in _scanned_files():
        if path == Path(__file__).resolve():
            continue  # this docstring cites example references
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            line = URL.sub("", line)
            for pattern in (MD_PATH, PARENT_PATH, ROOT_PATH):
                for match in pattern.finditer(line):
                    ref = match.group(1)
                    yield path, number, ref, _resolve_reference(path, ref), line[match.start():]


def test_references_point_into_the_repository():
    missing = sorted({f"{path.relative_to(ROOT)}:{number}: {ref}"
                      for path, number, ref, found, _ in _references() if found is None})
    assert not missing, (f"{len(missing)} references to files the repository does not hold:\n  "
                         + "\n  ".join(missing))


def _headings(page: Path) -> set:
    return set(re.findall(r"^#+ (\d+(?:\.\d+)*)[. ]", page.read_text(), re.M))


def test_cited_sections_exist():
    wrong = []
    for path, number, ref, found, rest in _references():
        match = SECTION.match(rest[len(ref) - len(".md"):]) if found else None
        if match is None or found.suffix != ".md":
            continue
        headings = _headings(found)
        for section in filter(None, match.groups()):
            if section not in headings:
                wrong.append(f"{path.relative_to(ROOT)}:{number}: {ref} {section}")
    assert not wrong, "cited sections that are not headings of the page:\n  " + "\n  ".join(
        sorted(set(wrong)))


@pytest.mark.parametrize("pattern, text, want", [
    (MD_PATH, "see docs/framework.md 7.", ["docs/framework.md"]),
    (MD_PATH, "(`../shared/notes/x.md`)", ["../shared/notes/x.md"]),
    (MD_PATH, "[a](docs/bounds.md) and https://example.org/a.md", ["docs/bounds.md"]),
    (MD_PATH, "codegen.py and README.md", ["README.md"]),
    (PARENT_PATH, "read ../shared/notes/x.md first", ["../shared/notes/x.md"]),
    (ROOT_PATH, "(`codegen/compiler/ir.py`), templates/module.c.j2.", ["codegen/compiler/ir.py",
                                                                     "templates/module.c.j2"]),
    (ROOT_PATH, "codegen.compiler and generated/<name>/hg_<name>.c", []),
])
def test_reference_patterns(pattern, text, want):
    assert [m.group(1) for m in pattern.finditer(URL.sub("", text))] == want


def test_section_pattern():
    assert SECTION.match(".md 12, items 4-5").groups() == ("12", None)
    assert SECTION.match(".md sections 2-5)").groups() == ("2", "5")
    assert SECTION.match(".md section 3.1.").groups() == ("3.1", None)
    assert SECTION.match(".md, for the proofs") is None
