"""The constants of the DWR certificate when B = d_theta grad_x g is not affine in x
(docs/bounds.md 15.3, docs/constants.md 3.5): L_DB, the Lipschitz constant of x -> d(B u)/dx per
||u||, and L_3 for log-sum-exp atoms (sup of the fourth derivative of log-sum-exp = 1/2).

References are exact: SymPy derivatives of log-sum-exp, and dense matrices assembled from the
generated kernels (cross_hvp, lower_tvp; themselves checked against the unrolled oracle in
tests/test_kernels.py) at random points of the tiny hypercleaning problem.
"""
from __future__ import annotations

import numpy as np
import pytest
import sympy as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from codegen.constants.derivation import atoms

from support import TINY, built_example


def _lse_derivatives(c: int):
    """(fourth directional derivative d^4/ds^4 lse(z + s h) at s = 0, the Hessian's mixed second
    derivative d^2/da de H(z + a a_vec + e e_vec)) as NumPy functions, exact (SymPy)."""
    z = sp.symbols(f"z0:{c}", real=True)
    h = sp.symbols(f"h0:{c}", real=True)
    a = sp.symbols(f"a0:{c}", real=True)
    e = sp.symbols(f"e0:{c}", real=True)
    s, t, r = sp.symbols("s t r", real=True)
    lse = sp.log(sum(sp.exp(zk) for zk in z))
    along = lse.subs({zk: zk + s * hk for zk, hk in zip(z, h)}, simultaneous=True)
    d4 = sp.lambdify([z, h], sp.diff(along, s, 4).subs(s, 0), "numpy")
    H = sp.hessian(lse, z)
    shift = {zk: zk + t * ak + r * ek for zk, ak, ek in zip(z, a, e)}
    mixed = H.subs(shift, simultaneous=True).diff(t).diff(r).subs({t: 0, r: 0})
    return d4, sp.lambdify([z, a, e], mixed, "numpy")


@pytest.mark.parametrize("c", [2, 3, 5])
def test_lse_fourth_derivative_bound_holds_and_is_attained(c):
    """|D^4 lse[h,h,h,h]| <= ||h||^4/2 and ||D^4 lse[a, e, ., .]|| <= ||a|| ||e||/2 (the norm of
    the symmetric form) at random points and directions, and the fourth cumulant lies in
    [-r^4/8, r^4/12] with r = max h - min h; the bound is attained at z = 0, h = (1, -1)/sqrt2."""
    d4, mixed = _lse_derivatives(c)
    bound = float(atoms.lse_facts().d4)
    assert bound == 0.5
    rng = np.random.default_rng(c)
    for _ in range(300):
        z = rng.standard_normal(c) * rng.choice([0.1, 1.0, 5.0])
        h, a, e = (rng.standard_normal(c) for _ in range(3))
        val = float(d4(z, h))
        r = float(np.ptp(h))
        assert -r ** 4 / 8 * (1 + 1e-9) <= val <= r ** 4 / 12 * (1 + 1e-9), (z, h, val)
        assert abs(val) <= bound * np.linalg.norm(h) ** 4 * (1 + 1e-12)
        M = np.array(mixed(z, a, e), dtype=float)
        assert np.linalg.norm(M, 2) <= bound * np.linalg.norm(a) * np.linalg.norm(e) * (1 + 1e-12)
    h = np.zeros(c)
    h[:2] = [1 / np.sqrt(2), -1 / np.sqrt(2)]
    z = np.full(c, -40.0)
    z[:2] = 0.0
    assert abs(float(d4(z, h))) >= bound * (1 - 1e-12)


def _dense(columns, n):
    return np.column_stack([columns(j) for j in range(n)])


def _unit(n, j):
    out = np.zeros(n)
    out[j] = 1.0
    return out


@pytest.fixture(scope="module")
def cleaning(build_dir):
    problem, module, ns = built_example("hypercleaning", build_dir)
    data = ns["example_data"](seed=4, **TINY["hypercleaning"])
    return module.bind(**data)


def _cross_hvp(prob, x, theta, t, w):
    """grad_x (w^T B(x) t) (the generated cross_hvp kernel)."""
    if hasattr(prob, "cross_hvp"):
        return prob.cross_hvp(x, theta, t, w)
    out = np.empty(prob.x_size)
    prob.kernels["cross_hvp"]({prob.x_name: np.asarray(x, dtype=np.float64),
                               prob.theta_name: np.asarray(theta, dtype=np.float64),
                               "t": np.asarray(t, dtype=np.float64),
                               "hg_w": np.asarray(w, dtype=np.float64)}, out)
    return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 31), spread=st.sampled_from([1e-4, 0.3, 3.0]),
       scale=st.sampled_from([0.5, 3.0]))
def test_hypercleaning_L_DB_and_L_3_bound_the_exact_changes(cleaning, seed, spread, scale):
    """At theta and points y, z = y + spread d: ||D_u(y) - D_u(z)|| <= L_DB ||u|| ||y - z|| with
    D_u = d(B u)/dx assembled from cross_hvp, and ||DA(y)[w] - DA(z)[w]|| <= L_3 ||y - z|| ||w||
    with DA[w] from lower_tvp; the constants are the derived ones (sigmoid weights, log-sum-exp
    atoms) evaluated at theta by the bound problem."""
    prob = cleaning
    rng = np.random.default_rng(seed)
    n, p = prob.x_size, prob.theta_size
    theta = rng.standard_normal(p)
    c = prob.constants(theta)
    L_DB, L_3 = float(c["L_DB"]), float(c["L_3"])
    assert np.isfinite(L_DB) and np.isfinite(L_3) and L_DB > 0 and L_3 > 0
    y = scale * rng.standard_normal(n)
    z = y + spread * rng.standard_normal(n)
    u, w = rng.standard_normal(p), rng.standard_normal(n)
    D = [_dense(lambda j, x=x: _cross_hvp(prob, x, theta, u, _unit(n, j)), n) for x in (y, z)]
    T = [_dense(lambda j, x=x: prob.lower_tvp(x, theta, _unit(n, j), w), n) for x in (y, z)]
    dist = np.linalg.norm(y - z)
    assert np.allclose(D[0], D[0].T, rtol=1e-10, atol=1e-14 * np.abs(D[0]).max())
    assert np.linalg.norm(D[0] - D[1], 2) <= L_DB * np.linalg.norm(u) * dist * (1 + 1e-9)
    assert np.linalg.norm(T[0] - T[1], 2) <= L_3 * np.linalg.norm(w) * dist * (1 + 1e-9)


def test_hypercleaning_L_DB_within_a_modest_factor_of_the_worst_direction(cleaning):
    """L_DB is not loose by orders of magnitude: at z = 0 (uniform softmax), u = e_i for the
    sample with the longest row and the direction along that row's logits, the measured
    derivative of D_u is within a factor 50 of L_DB (the rule pays ||A||^2 max||a_i|| / m for
    max||a_i||^3 / m and the trilinear norm 1/sqrt2 for the measured third cumulant)."""
    prob = cleaning
    n, p = prob.x_size, prob.theta_size
    theta = np.zeros(p)
    L_DB = float(prob.constants(theta)["L_DB"])
    A = prob.data["A"]
    i = int(np.argmax(np.linalg.norm(A, axis=1)))
    classes = prob.x_shape[0]
    best = 0.0
    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = rng.standard_normal(classes)
        step = (np.outer(logits, A[i]) / np.linalg.norm(A[i]) ** 2).reshape(-1)
        step /= np.linalg.norm(step)
        h = 1e-4
        D = [_dense(lambda j, x=x: _cross_hvp(prob, x, theta, _unit(p, i), _unit(n, j)), n)
             for x in (0.5 * step, 0.5 * step + h * step)]
        best = max(best, np.linalg.norm(D[1] - D[0], 2) / h)
    assert best <= L_DB * (1 + 1e-6)
    assert L_DB <= 50 * best, (L_DB, best)
    print(f"\nL_DB / measured = {L_DB / best:.3g}")


@pytest.fixture(scope="module")
def tv_weight(build_dir):
    from nonquadratic_kernels import TV_WEIGHT, tv_weight_data

    from codegen.pipeline import build_problem
    return build_problem(TV_WEIGHT, build_dir).bind(**tv_weight_data(seed=1, n=12, gam=0.1))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 31), spread=st.sampled_from([1e-4, 0.05, 1.0]),
       t=st.floats(-3.0, 2.0))
def test_tv_weight_L_DB_bounds_the_exact_change(tv_weight, seed, spread, t):
    """A weight e^t on smoothed TV: ||D_u(y) - D_u(z)|| <= L_DB |u| ||y - z|| with D_u from
    cross_hvp, L_DB = e^t sup|psi'''| ||D||^2 max||d_i|| derived by the constants (the rule for
    theta in a coefficient); points near a kink (differences about gam/2, where psi''' peaks)."""
    prob = tv_weight
    rng = np.random.default_rng(seed)
    n = prob.x_size
    theta = np.array([t])
    L_DB = float(prob.constants(theta)["L_DB"])
    assert 0 < L_DB < np.inf
    y = np.cumsum(rng.choice([-0.05, 0.05, 0.5], size=n))
    z = y + spread * rng.standard_normal(n)
    u = np.array([rng.standard_normal()])
    D = [_dense(lambda j, x=x: _cross_hvp(prob, x, theta, u, _unit(n, j)), n) for x in (y, z)]
    assert np.linalg.norm(D[0] - D[1], 2) <= L_DB * abs(u[0]) * np.linalg.norm(y - z) * (1 + 1e-9)


def test_tv_weight_L_DB_within_a_factor_2_of_the_measured_derivative(tv_weight):
    """The rule is not loose on this problem: with steps of +-gam/2 between neighbours (where
    psi''' peaks) the derivative of D_u along random unit directions reaches more than half of
    L_DB (measured 1.74x below it)."""
    prob = tv_weight
    n, theta = prob.x_size, np.array([0.0])
    L_DB = float(prob.constants(theta)["L_DB"])
    rng = np.random.default_rng(0)
    best, h = 0.0, 1e-5
    for _ in range(200):
        y = np.cumsum(rng.choice([-0.05, 0.05, 0.5], size=n))
        d = rng.standard_normal(n)
        d /= np.linalg.norm(d)
        D0, D1 = (_dense(lambda j, x=x: _cross_hvp(prob, x, theta, np.ones(1), _unit(n, j)), n)
                  for x in (y, y + h * d))
        best = max(best, np.linalg.norm(D1 - D0, 2) / h)
    assert best <= L_DB * (1 + 1e-4) and L_DB <= 2 * best, (L_DB, best)


def test_an_interrupt_while_the_cross_grams_build_loses_nothing(build_dir):
    """A KeyboardInterrupt in CrossNorm._grams' offsets loop (where a Ctrl-C landed in a timing
    run) had left its Gram matrices set and its offsets half built: every later ||B|| bound of
    that bind was inf. The next call now builds them again, and the bound is a fresh bind's.
    The interrupt is raised by a trace function at that loop's line, as SIGINT would."""
    import inspect
    import sys

    from codegen.constants.evaluation import cross

    _, module, ns = built_example("hypercleaning", build_dir)
    data = ns["example_data"](seed=0, m=300, mv=100, c=4, n=10)
    theta = np.full(300, 0.05)
    want = module.bind(**data).hypergradient(theta, rtol=1e-8)
    source, first = inspect.getsourcelines(cross.CrossNorm._grams)
    line = first + next(k for k, text in enumerate(source) if "offsets.append(np.abs" in text)
    fired = []

    def tracer(frame, event, arg):
        if frame.f_code is not cross.CrossNorm._grams.__code__:
            return None

        def local(frame, event, arg):
            if event == "line" and frame.f_lineno == line and not fired:
                fired.append(True)
                raise KeyboardInterrupt
            return local
        return local

    prob = module.bind(**data)
    sys.settrace(tracer)
    try:
        with pytest.raises(KeyboardInterrupt):
            prob.hypergradient(theta, rtol=1e-8)
    finally:
        sys.settrace(None)
    assert fired
    got = prob.hypergradient(theta, rtol=1e-8)
    assert np.isfinite(prob.cross_norm_bound(got.x, theta))
    assert got.norm_B == want.norm_B and got.bound == want.bound
