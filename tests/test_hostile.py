"""Hostile input and damaged files: a clear error that names the culprit, never code run from a
file name, never a traceback from deep inside a parser."""
import ast
import json
import shutil

import pytest

from codegen import HypergenError
from codegen.compiler.emit.render import environment
from codegen.runtime import load_directory
from conftest import built_example


@pytest.mark.parametrize("source", [
    'a"""\nimport os; os.system("echo pwned")\n"""b.py',
    "x\\\"\"\"; raise SystemExit(3) #.py",
    "C:\\new\\table.py",
])
def test_problem_file_path_stays_inside_the_docstring(source):
    """The problem file's path is written into the generated package's docstring: quotes and
    backslashes in it must not end the docstring (the rest would run at import)."""
    text = environment().get_template("package_init.py.j2").render(
        version="0", name="ridge", source=source, data=["A"])
    tree = ast.parse(text)
    assert [type(n).__name__ for n in tree.body] == [
        "Expr", "ImportFrom", "ImportFrom", "Assign", "Assign", "Assign"]
    assert source.replace("\\", "") in ast.get_docstring(tree).replace("\\", "")


def _copy_of_built(build_dir, tmp_path):
    _, module, _ = built_example("ridge", build_dir)
    target = tmp_path / "ridge"
    shutil.copytree(module.directory, target)
    return target


@pytest.mark.parametrize("damage, says", [
    (lambda p: p.write_text(p.read_text()[: len(p.read_text()) // 2]), "cannot be read"),
    (lambda p: p.write_text("{}"), "not a hypergen module description"),
    (lambda p: p.write_text("[]"), "not a hypergen module description"),
    (lambda p: p.unlink(), "is missing"),
])
def test_damaged_meta_json_names_the_file(build_dir, tmp_path, damage, says):
    target = _copy_of_built(build_dir, tmp_path)
    damage(target / "meta.json")
    with pytest.raises(HypergenError, match=says) as info:
        load_directory(target)
    assert "meta.json" in str(info.value) and "hypergen build" in str(info.value)


def test_truncated_constants_json_names_the_file(build_dir, tmp_path):
    target = _copy_of_built(build_dir, tmp_path)
    path = target / "constants.json"
    path.write_text(path.read_text()[:100])
    with pytest.raises(HypergenError, match="constants.json cannot be read"):
        load_directory(target)
    json.loads((build_dir / "ridge" / "constants.json").read_text())  # the original is intact


def _ridge_like(index="i", data="y", size="n", sparse_clash=None):
    import sympy as sp

    from codegen import Problem

    n = sp.Symbol(size, integer=True, positive=True)
    i = sp.Idx(index, n)
    x, y = sp.IndexedBase("x", shape=(n,)), sp.IndexedBase(data, shape=(n,))
    theta = sp.Symbol("theta")
    lower = sp.Sum((x[i] - y[i]) ** 2 + sp.exp(theta) * x[i] ** 2, (i, 0, n - 1))
    return Problem(name="p", x=x, theta=theta, lower=lower,
                   upper=sp.Sum((x[i] - y[i]) ** 2, (i, 0, n - 1)))


@pytest.mark.parametrize("slot", ["index", "data", "size"])
@pytest.mark.parametrize("name, says", [
    ("i\n#define exp(a) (1.0)\n", "not a valid C identifier"),
    ('i"\n#include "/etc/hostname', "not a valid C identifier"),
    ("s0", "reserved"), ("value", "reserved"), ("need", "reserved"), ("hg_x", "reserved"),
    ("_i", "not a valid C identifier"), ("exp", "C keyword or C library"), ("NAN", "C keyword or C library"),
    ("int", "C keyword or C library"), ("i\u00e9", "not a valid C identifier"),
])
def test_every_identifier_slot_is_checked(slot, name, says):
    """A name reaching the C source either builds a correct kernel or is refused naming itself:
    an index label holding a #define once built and returned a wrong hypergradient marked ok."""
    from codegen import ProblemError

    with pytest.raises(ProblemError, match=says) as info:
        _ridge_like(**{slot: name})
    assert repr(name) in str(info.value)


def test_plain_names_still_build():
    problem = _ridge_like(index="row", data="target", size="count")
    assert {"x", "theta", "target"} <= set(problem.arrays)
