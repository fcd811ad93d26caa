"""The pipeline's own behaviour: the symbolic cache in front of the SymPy stages, the CLI."""
import json
import subprocess
import sys

import sympy as sp

from codegen import Problem
from codegen.pipeline import generate, generate_cached, symbolic_key

from support import ROOT

n = sp.Symbol("n", integer=True, positive=True)
j = sp.Idx("j", n)
x, y = sp.IndexedBase("x", shape=(n,)), sp.IndexedBase("y", shape=(n,))
th = sp.Symbol("th")


def _problem(weight=1):
    return Problem(name="cached", x=x, theta=th,
                   lower=sp.Sum((x[j] - y[j]) ** 2, (j, 0, n - 1)) * weight
                   + sp.exp(th) * sp.Sum(x[j] ** 2, (j, 0, n - 1)),
                   upper=sp.Sum(x[j] ** 2, (j, 0, n - 1)))


def test_symbolic_cache_hits_misses_and_heals(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERGEN_CACHE_DIR", str(tmp_path))
    problem = _problem()
    first = generate_cached(problem)
    assert first == json.loads(json.dumps(generate(problem)))
    entries = list((tmp_path / "symbolic").rglob("*.json"))
    assert len(entries) == 1
    assert generate_cached(problem) == first  # a hit reads the entry
    assert symbolic_key(_problem(weight=2), False) != symbolic_key(problem, False)
    assert symbolic_key(problem, True) != symbolic_key(problem, False)
    entries[0].write_text("{ truncated")  # a corrupt entry is regenerated, not trusted
    assert generate_cached(problem) == first


def test_cli_reports_problem_file_errors_with_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import sympy as sp\nfrom codegen import Problem\n\n"
                   "P = Problem(name='p', x=sp.Symbol('a'), theta=sp.Symbol('t'),\n"
                   "            lower=sp.besselj(0, sp.Symbol('a')), upper=sp.Symbol('a'))\n")
    res = subprocess.run([sys.executable, "-m", "codegen", "build", str(bad), "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2
    assert f"{bad}:4: ProblemError: lower: function besselj" in res.stderr
    assert "Traceback" not in res.stderr


def test_directory_from_another_abi_is_refused(tmp_path):
    import pytest

    from codegen import HypergenError
    from codegen.pipeline import write_outputs
    from codegen.runtime.module import load_directory

    problem = _problem()
    target = write_outputs(problem, generate(problem), tmp_path)
    meta = json.loads((target / "meta.json").read_text())
    meta["abi"] = 0
    (target / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(HypergenError, match="run `hypergen build`"):
        load_directory(target)


def test_stated_constants_stand_in_when_convexity_is_unknown(tmp_path):
    """Unknown convexity + stated constants builds without --allow-uncertified; the results
    say the constants are assumed (never certified)."""
    import numpy as np
    import pytest

    from codegen.pipeline import build_problem

    a, c, t = sp.symbols("a c t")
    problem = Problem(name="stated", x=[a, c], theta=t, lower=sp.cosh(a * c) + sp.exp(t) * (a ** 2 + c ** 2),
                      upper=(a - 1) ** 2 + c ** 2, constants={"mu": sp.exp(t), "L": 10 + sp.exp(t)})
    prob = build_problem(problem, tmp_path).bind()
    consts = prob.constants(0.0)
    assert consts["mu"] == pytest.approx(1.0) and consts["L"] == pytest.approx(11.0)
    assert consts["certified"] is False
    hg = prob.hypergradient(0.0)
    assert not hg.certified and "stated constants" in hg.status
    assert np.isfinite(hg.grad).all()


def test_a_file_with_two_problems_builds_both(tmp_path):
    import codegen
    from codegen import HypergenError

    src = tmp_path / "two.py"
    src.write_text(
        "import sympy as sp\nfrom codegen import Problem\n"
        "n = sp.Symbol('n', integer=True, positive=True)\nj = sp.Idx('j', n)\n"
        "x, y = sp.IndexedBase('x', shape=(n,)), sp.IndexedBase('y', shape=(n,))\nt = sp.Symbol('t')\n"
        "g = sp.Sum((x[j] - y[j]) ** 2, (j, 0, n - 1)) + sp.exp(t) * sp.Sum(x[j] ** 2, (j, 0, n - 1))\n"
        "first = Problem(name='first', x=x, theta=t, lower=g, upper=sp.Sum(x[j], (j, 0, n - 1)))\n"
        "second = Problem(name='second', x=x, theta=t, lower=g, upper=sp.Sum(x[j] ** 2, (j, 0, n - 1)))\n")
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "codegen", "build", str(src), "--out", str(out)],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert (out / "first" / "hg_first.c").is_file() and (out / "second" / "hg_second.c").is_file()
    second = codegen.load(src, name="second", out=out)
    assert second.name == "second"
    import pytest

    with pytest.raises(HypergenError, match="pass name="):
        codegen.load(src, out=out)
