"""The unrolled SymPy oracle (tests/oracle.py) against closed forms, and every example problem
against its own oracle (symmetry, transposes, finite differences) at tiny sizes."""
import sys

import numpy as np
import pytest
import sympy as sp

from codegen import Problem

from oracle import Oracle, bind_sizes
from support import load_example

# Smaller than support.TINY: the oracle's own Hessians and cross matrices unroll everything.
TINY = {
    "ridge": dict(m=5, n=4, p=3),
    "logistic": dict(m=5, n=3, p=4),
    "quadratic": dict(m1=5, m2=5, d=4, p=3),
    "tv1d": dict(n=5),
    "hypercleaning": dict(c=3, n=4, m=5, mv=3),
}


# -- the oracle against closed forms ----------------------------------------------------------
def test_ridge_closed_forms():
    prob, ns = load_example("ridge")
    data = ns["example_data"](seed=3, m=5, n=4, p=3)
    orc = Oracle(prob, data)
    assert orc.sizes == {"m": 5, "n": 4, "p": 3}
    assert (orc.x_size, orc.theta_size) == (4, 1)
    A, b, Av, bv = data["A"], data["b"], data["Av"], data["bv"]
    rng = np.random.default_rng(0)
    x, th = rng.standard_normal(4), np.array([0.3])
    al = np.exp(th[0])
    close = dict(rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(orc.lower_value(x, th),
                               0.5 * np.sum((A @ x - b) ** 2) + al / 2 * x @ x, **close)
    np.testing.assert_allclose(orc.lower_grad(x, th), A.T @ (A @ x - b) + al * x, **close)
    H = A.T @ A + al * np.eye(4)
    np.testing.assert_allclose(orc.hessian(x, th), H, **close)
    v = rng.standard_normal(4)
    np.testing.assert_allclose(orc.lower_hvp(x, th, v), H @ v, **close)
    np.testing.assert_allclose(orc.cross(x, th), (al * x)[:, None], **close)
    np.testing.assert_allclose(orc.cross_vjp(x, th, v), [al * x @ v], **close)
    np.testing.assert_allclose(orc.cross_jvp(x, th, [0.7]), 0.7 * al * x, **close)
    np.testing.assert_allclose(orc.upper_value(x, th), np.sum((Av @ x - bv) ** 2) / 6, **close)
    np.testing.assert_allclose(orc.upper_grad(x, th), Av.T @ (Av @ x - bv) / 3, **close)
    np.testing.assert_allclose(orc.upper_theta_grad(x, th), [0.0], atol=0)
    assert orc.lower_value(x, 0.3) == orc.lower_value(x, th)  # a float theta is accepted


def test_shifted_index_by_hand():
    """g = 1/2 sum_{i<n-1} (x[i+1] - x[i])^2 + e^t/2 sum_i w[i] (x[i] - y[i])^2 + s x[0]^3, n = 3."""
    n = sp.Symbol("n", integer=True, positive=True)
    i = sp.Idx("i", n)
    x, y, w = (sp.IndexedBase(s, shape=(n,)) for s in "xyw")
    t, s = sp.Symbol("t0"), sp.Symbol("s")
    prob = Problem(
        name="shifted", x=x, theta=t,
        lower=sp.Sum((x[i + 1] - x[i]) ** 2, (i, 0, n - 2)) / 2
              + sp.exp(t) / 2 * sp.Sum(w[i] * (x[i] - y[i]) ** 2, (i, 0, n - 1)) + s * x[0] ** 3,
        upper=sp.Sum(x[i], (i, 0, n - 1)) * t ** 2, regulariser=t ** 4)
    yv, wv, sv = np.array([1.0, -2.0, 0.5]), np.array([1.0, 2.0, 3.0]), 0.25
    orc = Oracle(prob, {"y": yv, "w": wv, "s": sv})
    xv, th = np.array([0.5, 1.5, -1.0]), np.array([np.log(2.0)])  # e^t = 2
    # by hand: differences (1, -2.5); weighted residuals w (x - y) = (-0.5, 7, -4.5)
    assert orc.lower_value(xv, th) == pytest.approx(
        (1 + 6.25) / 2 + (0.25 + 2 * 12.25 + 3 * 2.25) + 0.25 * 0.125, rel=1e-14)
    np.testing.assert_allclose(orc.lower_grad(xv, th),
                               [-1 + 2 * -0.5 + 0.75 * 0.25, 1 + 2.5 + 2 * 7, -2.5 + 2 * -4.5],
                               rtol=1e-14)
    np.testing.assert_allclose(orc.hessian(xv, th),
                               [[1 + 2 + 1.5 * 0.5, -1, 0], [-1, 2 + 4, -1], [0, -1, 1 + 6]],
                               rtol=1e-14)
    np.testing.assert_allclose(orc.cross(xv, th)[:, 0], [-1.0, 14.0, -9.0], rtol=1e-14)
    np.testing.assert_allclose(orc.upper_value(xv, th), 1.0 * th[0] ** 2 + th[0] ** 4, rtol=1e-14)
    np.testing.assert_allclose(orc.upper_grad(xv, th), [th[0] ** 2] * 3, rtol=1e-14)
    np.testing.assert_allclose(orc.upper_theta_grad(xv, th), [2 * th[0] + 4 * th[0] ** 3],
                               rtol=1e-14)


def test_two_d_variable_is_flattened_in_c_order():
    r, c = sp.symbols("r c", integer=True, positive=True)
    a, b = sp.Idx("a", r), sp.Idx("b", c)
    X, P = sp.IndexedBase("X", shape=(r, c)), sp.IndexedBase("P", shape=(r, c))
    th = sp.IndexedBase("theta", shape=(c,))
    prob = Problem(name="flat", x=X, theta=th,
                   lower=sp.Sum(P[a, b] * X[a, b] ** 2 / 2 + th[b] * X[a, b], (a, 0, r - 1), (b, 0, c - 1)),
                   upper=sp.Sum(X[a, b], (a, 0, r - 1), (b, 0, c - 1)))
    Pv = np.arange(1.0, 7.0).reshape(2, 3)
    orc = Oracle(prob, {"P": Pv})
    assert (orc.sizes, orc.x_size, orc.theta_size) == ({"r": 2, "c": 3}, 6, 3)
    xv = np.linspace(-1, 1, 6)
    tv = np.array([0.1, 0.2, 0.3])
    np.testing.assert_allclose(orc.lower_grad(xv, tv), Pv.ravel() * xv + np.tile(tv, 2), rtol=1e-14)
    np.testing.assert_allclose(orc.hessian(xv, tv), np.diag(Pv.ravel()), rtol=1e-14)
    np.testing.assert_allclose(orc.cross(xv, tv), np.tile(np.eye(3), (2, 1)), rtol=1e-14)


def test_size_and_data_errors():
    prob, ns = load_example("ridge")
    data = ns["example_data"](m=5, n=4, p=3)
    with pytest.raises(ValueError, match="size m"):
        Oracle(prob, {**data, "b": np.zeros(6)})
    with pytest.raises(ValueError, match="dimensions"):
        Oracle(prob, {**data, "A": np.zeros(20)})
    with pytest.raises(ValueError, match="missing"):
        Oracle(prob, {k: v for k, v in data.items() if k != "bv"})
    with pytest.raises(ValueError, match="unknown"):
        Oracle(prob, {**data, "extra": np.zeros(3)})
    orc = Oracle(prob, data)
    with pytest.raises(ValueError, match="entries"):
        orc.lower_grad(np.zeros(5), 0.0)


# -- every example against its oracle ------------------------------------------------------------
@pytest.fixture(scope="module", params=sorted(TINY))
def example(request):
    name = request.param
    prob, ns = load_example(name)
    data = ns["example_data"](seed=1, **TINY[name])
    orc = Oracle(prob, data)
    rng = np.random.default_rng(7)
    th0 = np.broadcast_to(np.asarray(ns["THETA0"], dtype=float), (orc.theta_size,))
    x = 0.5 * rng.standard_normal(orc.x_size)
    th = th0 + 0.3 * rng.standard_normal(orc.theta_size)
    return name, prob, ns, data, orc, x, th, rng


def _fd(fun, z, h=1e-5):
    out = []
    for a in range(z.size):
        e = np.zeros_like(z)
        e[a] = h
        out.append((fun(z + e) - fun(z - e)) / (2 * h))
    return np.array(out)


def test_example_default_data(example):
    name, prob, ns, *_ = example
    data = ns["example_data"]()
    assert set(data) == {s.name for s in prob.data_specs}
    for key, val in data.items():
        assert np.asarray(val).dtype == np.float64, key
        assert np.all(np.isfinite(val)), key
    sizes = bind_sizes(prob, data)  # consistent at the default sizes too (no unrolling)
    th0 = np.atleast_1d(np.asarray(ns["THETA0"], dtype=float))
    assert th0.ndim == 1 and th0.size in (1, int(sp.sympify(prob.theta_spec.shape[0]).subs(
        {s: sizes[s.name] for s in prob.sizes})))


def test_example_oracle_consistency(example):
    name, prob, ns, data, orc, x, th, rng = example
    H = orc.hessian(x, th)  # symmetric by construction: checked below against differences
    assert np.linalg.eigvalsh(H).min() > 0, "lower level not strongly convex at this point"
    v = rng.standard_normal(orc.x_size)
    np.testing.assert_allclose(orc.lower_hvp(x, th, v), H @ v, rtol=1e-12, atol=1e-13 * np.abs(H).max())
    B = orc.cross(x, th)
    assert B.shape == (orc.x_size, orc.theta_size)
    q, t = rng.standard_normal(orc.x_size), rng.standard_normal(orc.theta_size)
    Bt, BTq = orc.cross_jvp(x, th, t), orc.cross_vjp(x, th, q)
    np.testing.assert_allclose(Bt @ q, t @ BTq, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(Bt, B @ t, rtol=1e-12, atol=1e-14)
    # derivatives against central differences of the level below
    fd = dict(rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(orc.lower_grad(x, th), _fd(lambda z: orc.lower_value(z, th), x), **fd)
    np.testing.assert_allclose(H, _fd(lambda z: orc.lower_grad(z, th), x), **fd)
    np.testing.assert_allclose(B, _fd(lambda s: orc.lower_grad(x, s), th).T, **fd)
    np.testing.assert_allclose(orc.upper_grad(x, th), _fd(lambda z: orc.upper_value(z, th), x), **fd)
    np.testing.assert_allclose(orc.upper_theta_grad(x, th),
                               _fd(lambda s: orc.upper_value(x, s), th), **fd)


def test_quadratic_closed_forms():
    prob, ns = load_example("quadratic")
    data = ns["example_data"](seed=2, **TINY["quadratic"])
    orc = Oracle(prob, data)
    C, D, e = data["C"], data["D"], data["e"]
    x, th = np.linspace(-1, 1, 4), np.ones(3)
    np.testing.assert_allclose(orc.hessian(x, th), 2 * D.T @ D, rtol=1e-13)
    np.testing.assert_allclose(orc.cross(x, th), 2 * D.T @ C, rtol=1e-13)
    np.testing.assert_allclose(orc.lower_grad(x, th), 2 * D.T @ (C @ th + D @ x - e), rtol=1e-12)


def test_hypercleaning_data():
    _, ns = load_example("hypercleaning")
    data = ns["example_data"](seed=0, c=4, n=6, m=200, mv=50)
    assert data["A"].shape == (200, 6) and data["Y"].shape == (200, 4)
    np.testing.assert_array_equal(data["A"][:, -1], 1.0)  # bias column
    np.testing.assert_array_equal(data["Y"].sum(axis=1), 1.0)  # one-hot
    assert float(data["lam"]) == 1e-3
    labels = data["Y"].argmax(axis=1)
    assert np.bincount(labels, minlength=4).min() > 0


def test_hypercleaning_digits_source(monkeypatch):
    """source="digits" goes through sklearn.load_digits; a stand-in module when it is missing."""
    try:
        import sklearn.datasets  # noqa: F401
    except ImportError:
        import types

        rng = np.random.default_rng(0)
        fake = types.ModuleType("sklearn.datasets")
        fake.load_digits = lambda return_X_y=False: (rng.integers(0, 17, (1797, 64)).astype(float),
                                                     rng.integers(0, 10, 1797))
        monkeypatch.setitem(sys.modules, "sklearn", types.ModuleType("sklearn"))
        monkeypatch.setitem(sys.modules, "sklearn.datasets", fake)
    _, ns = load_example("hypercleaning")
    digits = ns["example_data"](source="digits", m=100, mv=50)
    assert digits["A"].shape == (100, 65) and digits["Yv"].shape == (50, 10)
    assert 0 <= digits["A"].min() and digits["A"].max() <= 1
    with pytest.raises(ValueError, match="c=10"):
        ns["example_data"](source="digits", c=3)
