"""The language is general: shapes of problems none of the examples has, against the oracle.

Offsets (a sum from 1), triangular sums (an inner range bounded by the outer index),
convolutions (x[i + k]), vector theta inside an atom, products and quotients of sums,
fractional powers, 2-D x with one theta per row and a log-sum-exp upper level, and an index
used as a number; a matrix product inside an atom (the HVP caches it: a prepared HVP).
"""
import numpy as np
import pytest
import sympy as sp

from codegen import Problem, sigmoid
from codegen.pipeline import build_problem

from oracle import Oracle
from support.overlap import build_alongside

n, K, m = sp.symbols("n K m", integer=True, positive=True)
i, j, k, r = sp.Idx("i", n), sp.Idx("j", n), sp.Idx("k", K), sp.Idx("r", m)
x, y = sp.IndexedBase("x", shape=(n,)), sp.IndexedBase("y", shape=(n,))
w, cw = sp.IndexedBase("w", shape=(K,)), sp.IndexedBase("cw", shape=(m,))
th, tm, t0 = sp.IndexedBase("th", shape=(n,)), sp.IndexedBase("tm", shape=(m,)), sp.Symbol("t0")
X = sp.IndexedBase("X", shape=(m, n))
Q = sp.IndexedBase("Q", shape=(K, n))
ALL = (i, 0, n - 1)
RIDGE = sp.exp(t0) * sp.Sum(x[i] ** 2, ALL)

CASES = {
    "offset_lo": dict(x=x, theta=t0, lower=sp.Sum((x[i] - x[i - 1]) ** 2, (i, 1, n - 1)) + RIDGE,
                      upper=sp.Sum((x[i] - y[i]) ** 2, ALL)),
    "triangular": dict(x=x, theta=t0, lower=sp.Sum(sp.Sum(x[j], (j, 0, i)) ** 2, ALL) + RIDGE,
                       upper=sp.Sum(y[i] * x[i], ALL)),
    "conv": dict(x=x, theta=t0, upper=sp.Sum(x[i] ** 2, ALL),
                 lower=sp.Sum((sp.Sum(w[k] * x[i + k], (k, 0, K - 1)) - y[i]) ** 2, (i, 0, n - K))
                 + RIDGE),
    "theta_in_atom": dict(x=x, theta=th,
                          lower=sp.Sum(sp.exp(th[i]) * x[i] ** 2 + sp.log(1 + sp.exp(x[i] * y[i])), ALL),
                          upper=sp.Sum((x[i] - y[i]) ** 2, ALL) + sp.Sum(th[i] ** 2, ALL)),
    "sum_products": dict(x=x, theta=t0,
                         lower=sp.Sum(x[i] ** 2, ALL) * (1 + sp.Sum(y[i] ** 2 * x[i] ** 2, ALL))
                         + t0 ** 2 * sp.Sum(x[i], ALL) ** 2,
                         upper=sp.Sum(x[i], ALL) / sp.Sum(y[i] ** 2, ALL)),
    "pow_frac": dict(x=x, theta=t0, lower=sp.Sum((x[i] ** 2 + sp.exp(t0)) ** sp.Rational(3, 2), ALL),
                     upper=sp.sqrt(sp.Sum(x[i] ** 2 * y[i] ** 2, ALL) + 1) * sp.exp(t0)),
    "rows_theta": dict(x=X, theta=tm,
                       lower=sp.Sum(sigmoid(tm[r]) * sp.Sum((X[r, j] - y[j] * cw[r]) ** 2, (j, 0, n - 1)),
                                    (r, 0, m - 1)) + sp.Sum(X[r, j] ** 2, (r, 0, m - 1), (j, 0, n - 1)),
                       upper=sp.Sum(sp.log(sp.Sum(sp.exp(X[r, j]), (j, 0, n - 1))), (r, 0, m - 1))),
    "index_value": dict(x=x, theta=t0, lower=sp.Sum((i + 1) * x[i] ** 2 + sp.cos(t0 * i) * x[i], ALL),
                        upper=sp.Sum(i * x[i] * y[i], ALL)),
    # log cosh (robust regression): printed as the stable hg_logcosh, derivatives in tanh
    "logcosh": dict(x=x, theta=t0, lower=sp.Sum(sp.log(sp.cosh(x[i] - y[i])), ALL) + RIDGE,
                    upper=sp.Sum((x[i] - y[i]) ** 2, ALL)),
    # a matrix product inside an atom: the HVP caches Q X^T (a prepared HVP, three loops)
    "matrix_product": dict(x=X, theta=t0,
                           lower=sp.Sum(sp.log(1 + sp.exp(sp.Sum(Q[k, j] * X[r, j], (j, 0, n - 1)))),
                                        (r, 0, m - 1), (k, 0, K - 1))
                           + sp.exp(t0) * sp.Sum(X[r, j] ** 2, (r, 0, m - 1), (j, 0, n - 1)),
                           upper=sp.Sum((X[r, j] - cw[r] * y[j]) ** 2, (r, 0, m - 1), (j, 0, n - 1))),
    # one body summed per row r (inside sqrt) and over all (r, j) in one Sum with two limits:
    # two temporaries, each with its own shape (they were one, read with the wrong shape); the
    # second orders the two sums the other way round in SymPy's canonical Add
    "shared_body": dict(x=X, theta=t0,
                        lower=sp.Sum(sp.sqrt(sp.Sum(X[r, j] ** 2, (j, 0, n - 1)) + 1), (r, 0, m - 1))
                        + sp.exp(t0) * sp.Sum(X[r, j] ** 2, (r, 0, m - 1), (j, 0, n - 1)),
                        upper=sp.Sum((X[r, j] - cw[r] * y[j]) ** 2, (r, 0, m - 1), (j, 0, n - 1))),
    "shared_body_swapped": dict(
        x=X, theta=t0, upper=sp.Sum((X[r, j] - cw[r]) ** 2, (r, 0, m - 1), (j, 0, n - 1)),
        lower=sp.exp(t0) * sp.Sum(sp.sqrt(sp.Sum((X[r, j] - y[j]) ** 2, (j, 0, n - 1)) + 1),
                                  (r, 0, m - 1))
        + sp.Sum((X[r, j] - y[j]) ** 2, (r, 0, m - 1), (j, 0, n - 1))),
}
# n = 11 and m = 10 exceed the generator's JAM (8): the jammed loops and their remainders run.
SHAPES = {"y": (11,), "w": (3,), "cw": (10,), "Q": (3, 11)}
# With x = X of shape (m, n) the rows r (m = 10) are jammed and n only sets the length of the
# inner loops: n = 3 keeps jam and remainder and shrinks the oracle's unrolled Hessian from
# 110 x 110 to 30 x 30 (matrix_product 44.6 s -> 12.7 s here, most of it now the C build).
ROWS_CASES = {"y": (3,), "Q": (3, 3)}
SHAPES_OF = {name: {**SHAPES, **ROWS_CASES}
             for name in ("matrix_product", "rows_theta", "shared_body", "shared_body_swapped")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_unseen_problem_shapes_match_oracle(name, build_dir):
    """The C compiles (support/overlap.py) while the oracle computes every kernel's reference."""
    problem = Problem(name=name, **CASES[name])
    rng = np.random.default_rng(1)
    shapes = SHAPES_OF.get(name, SHAPES)
    data = {a.name: rng.standard_normal(shapes[a.name]) for a in problem.data_specs}
    oracle = Oracle(problem, data)
    x0, t = rng.standard_normal(oracle.x_size), 0.5 * rng.standard_normal(oracle.theta_size)
    v, tt = rng.standard_normal(oracle.x_size), rng.standard_normal(oracle.theta_size)
    calls = [("lower_value", (x0, t)), ("lower_grad", (x0, t)), ("lower_hvp", (x0, t, v)),
             ("cross_vjp", (x0, t, v)), ("cross_jvp", (x0, t, tt)), ("upper_value", (x0, t)),
             ("upper_grad", (x0, t)), ("upper_theta_grad", (x0, t))]
    module, wants = build_alongside(
        problem, build_dir, lambda: [np.atleast_1d(np.asarray(getattr(oracle, kernel)(*args),
                                                              dtype=float))
                                     for kernel, args in calls], allow_uncertified=True)
    prob = module.bind(**data)
    assert (prob.x_size, prob.theta_size) == (oracle.x_size, oracle.theta_size)
    for (kernel, args), want in zip(calls, wants):
        got = np.atleast_1d(getattr(prob, kernel)(*args))
        err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-300)
        assert err <= 1e-12, f"{name}.{kernel}: relative error {err:.1e}"
    want = wants[2]  # lower_hvp at (x0, t, v): the prepared HVP where it pays
    err = np.max(np.abs(prob.hvp_at(x0, t)(v) - want)) / max(np.max(np.abs(want)), 1e-300)
    assert err <= 1e-12, f"{name}.hvp_at: relative error {err:.1e}"


def test_log_cosh_stays_finite_where_cosh_overflows(build_dir):
    """log(cosh(u)) with |u| up to 2000 (cosh overflows above 710, and SymPy's derivatives of
    log cosh are sinh / cosh, inf / inf there): the value |u| - log 2, the gradient tanh(u) and
    the HVP (1 - tanh(u)^2) v, each against NumPy, all finite."""
    problem = Problem(name="logcosh_far", **CASES["logcosh"])
    prob = build_problem(problem, build_dir).bind(y=np.linspace(-2000.0, 2000.0, 11))
    x0, v, t = np.zeros(11), np.ones(11), np.array([0.5])
    u = x0 - np.linspace(-2000.0, 2000.0, 11)
    want = np.sum(np.logaddexp(u, -u) - np.log(2.0)) + np.exp(0.5) * np.sum(x0 ** 2)
    assert prob.lower_value(x0, t) == pytest.approx(want, rel=1e-14)
    assert np.allclose(prob.lower_grad(x0, t), np.tanh(u) + 2 * np.exp(0.5) * x0,
                       rtol=0, atol=1e-15)
    assert np.allclose(prob.lower_hvp(x0, t, v), (1 - np.tanh(u) ** 2 + 2 * np.exp(0.5)) * v,
                       rtol=0, atol=1e-15)
