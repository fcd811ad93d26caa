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
