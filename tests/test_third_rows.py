"""The data-local third derivative (docs/bounds.md 15.10): the row kernels and the bound
||DA(x)[u]|| <= Lambda_u they give, against the exact matrix DA(x)[u] (columns of `lower_tvp`,
itself checked against the unrolled SymPy oracle in test_kernels), against closed forms of the
atoms' third derivatives, and in the DWR corrections (per direction and block) against the
true error of the hypergradient."""
import math

import numpy as np
import pytest
import sympy as sp

from codegen import Problem
from codegen.constants import derive, format_tree
from codegen.hypergrad import hypergradient, plans
from codegen.hypergrad.local_third import LOCAL_Q, ball_q_curvature
from codegen.pipeline import build_problem

from support import TINY, built_example

EXAMPLES_WITH_ROWS = ["tv1d", "tv2d", "logistic", "logistic_sparse"]


def _bound(name, build_dir, sizes=None, seed=0):
    _, module, ns = built_example(name, build_dir)
    prob = module.bind(**ns["example_data"](seed=seed, **(sizes or TINY[name])))
    theta0 = ns.get("THETA0", 0.0)
    theta = (np.full(prob.theta_size, float(theta0)) if np.ndim(theta0) == 0
             else np.asarray(theta0, dtype=float))
    return prob, theta


def _exact_norm(prob, x, theta, u):
    """||DA(x)[u]||_2 from the dense matrix whose column j is DA(x)[u] e_j = lower_tvp(x, u, e_j)."""
    M = np.column_stack([prob.lower_tvp(x, theta, u, e) for e in np.eye(prob.x_size)])
    assert np.allclose(M, M.T, atol=1e-12 * max(np.abs(M).max(), 1e-300))
    return float(np.linalg.norm(0.5 * (M + M.T), 2))


@pytest.mark.parametrize("name", EXAMPLES_WITH_ROWS)
def test_local_bound_holds_and_beats_the_global_one(name, build_dir):
    """exact <= Lambda_u <= 6 exact over random x and u (the slack: ||K||^2 against the norm
    DA[u] realises), and Lambda_u below L_A ||u||, the global form, on every draw."""
    prob, theta = _bound(name, build_dir)
    assert prob.has_third_contraction
    rng = np.random.default_rng(3)
    L_A = prob.constants(theta)["L_A"]
    for _ in range(4):
        x, u = rng.standard_normal(prob.x_size), rng.standard_normal(prob.x_size)
        exact = _exact_norm(prob, x, theta, u)
        local = prob.third_contraction(x, theta, u)
        assert exact * (1 - 1e-12) <= local <= 6 * exact, (exact, local)
        assert local <= L_A * np.linalg.norm(u)


def test_tv_rows_match_the_closed_form(build_dir):
    """lower_third_rows_g2 of the 1-D TV example writes |psi'''(t_i) (v_{i+1} - v_i)| with
    psi(t) = sqrt(t^2 + nu^2), psi'''(t) = -3 nu^2 t / (t^2 + nu^2)^(5/2), t_i = x_{i+1} - x_i."""
    prob, theta = _bound("tv1d", build_dir, sizes=dict(n=40))
    rng = np.random.default_rng(0)
    x, v = rng.standard_normal(40), rng.standard_normal(40)
    out = np.empty(39)
    assert prob.kernels["lower_third_rows_g2"]({"x": x, "theta": theta, "v": v}, out) == 0
    nu2 = math.exp(2 * theta[1])
    t = np.diff(x)
    want = np.abs(3 * nu2 * t / (t * t + nu2) ** 2.5 * np.diff(v))
    assert np.allclose(out, want, rtol=1e-13, atol=1e-15 * want.max())


def test_isotropic_tv_rows_match_the_closed_form(build_dir):
    """The 2-D example's group atom sqrt(a^2 + b^2 + nu^2): each row is the spectral norm of the
    2 x 2 matrix sum_c psi_abc (D_p v)_c, here against NumPy's eigenvalues of the matrix from
    the atom's third derivatives written out by hand."""
    prob, theta = _bound("tv2d", build_dir, sizes=dict(h=7, w=6))
    rng = np.random.default_rng(1)
    X, V = rng.standard_normal((7, 6)), rng.standard_normal((7, 6))
    out = np.empty(6 * 5)
    assert prob.kernels["lower_third_rows_g2"](
        {"X": X.ravel(), "theta": theta, "v": V.ravel()}, out) == 0
    nu2 = math.exp(2 * theta[1])
    a, b = (X[1:, :-1] - X[:-1, :-1]).ravel(), (X[:-1, 1:] - X[:-1, :-1]).ravel()
    da, db = (V[1:, :-1] - V[:-1, :-1]).ravel(), (V[:-1, 1:] - V[:-1, :-1]).ravel()
    s = a * a + b * b + nu2
    # psi_abc of r = sqrt(s): -(delta_ab z_c + delta_ac z_b + delta_bc z_a)/s^1.5 + 3 z_a z_b z_c/s^2.5
    z = np.stack([a, b])
    w = np.stack([da, db])
    third = np.empty((2, 2, 2, s.size))
    for i in range(2):
        for j in range(2):
            for k in range(2):
                delta = ((i == j) * z[k] + (i == k) * z[j] + (j == k) * z[i])
                third[i, j, k] = -delta / s ** 1.5 + 3 * z[i] * z[j] * z[k] / s ** 2.5
    M = np.einsum("ijkr,kr->rij", third, w)
    want = np.abs(np.linalg.eigvalsh(M)).max(axis=1)
    assert np.allclose(out, want, rtol=1e-12, atol=1e-14 * want.max())


def _separable(build_dir, tmp_name):
    """g = 1/2 ||x - y||^2 + e^theta0 sum_i x_i^4 / 4 + e^theta1 sum_i log cosh(x_i - c_i): K = I,
    so DA(x)[u] = diag(6 e^theta0 x_i u_i - 2 e^theta1 tanh sech^2 (x_i - c_i) u_i) and
    Lambda_u is exact when one term is switched off."""
    n = sp.Symbol("n", integer=True, positive=True)
    i = sp.Idx("i", n)
    x, y, c = (sp.IndexedBase(s, shape=(n,)) for s in ("x", "y", "c"))
    theta = sp.IndexedBase("theta", shape=(2,))
    problem = Problem(
        name=tmp_name, x=x, theta=theta,
        lower=sp.Sum((x[i] - y[i]) ** 2, (i, 0, n - 1)) / 2
        + sp.exp(theta[0]) * sp.Sum(x[i] ** 4, (i, 0, n - 1)) / 4
        + sp.exp(theta[1]) * sp.Sum(sp.log(sp.cosh(x[i] - c[i])), (i, 0, n - 1)),
        upper=sp.Sum((x[i] - c[i]) ** 2, (i, 0, n - 1)) / 2)
    return build_problem(problem, build_dir)


def test_separable_atoms_are_exact(build_dir):
    """With K = I (||K||^2 = 1) and one atom term on, the bound is the exact norm max_i |s_i|
    (to its rounding margin); with both on, their sum bounds the norm of the sum."""
    module = _separable(build_dir, "third_rows_separable")
    rng = np.random.default_rng(2)
    prob = module.bind(y=rng.standard_normal(9), c=rng.standard_normal(9))
    x, u = rng.standard_normal(9), rng.standard_normal(9)
    d4 = 6 * x * u
    tanh = np.tanh(x - prob.data["c"])
    dcosh = -2 * tanh * (1 - tanh ** 2) * u
    for theta in (np.array([0.3, -60.0]), np.array([-60.0, 0.2])):
        want = np.exp(theta[0]) * d4 + np.exp(theta[1]) * dcosh
        exact = float(np.abs(want).max())
        got = prob.third_contraction(x, theta, u)
        assert exact * (1 - 1e-12) <= got <= exact * (1 + 1e-6) + 1e-300
        assert np.isclose(got, _exact_norm(prob, x, theta, u), rtol=1e-6)
    both = np.array([0.1, 0.4])
    assert _exact_norm(prob, x, both, u) <= prob.third_contraction(x, both, u)


def test_group_atom_of_three_arguments(build_dir):
    """A group atom of three differences, sqrt(d1^2 + d2^2 + d3^2 + nu^2): its kernel writes the
    six entries a <= b of each row's 3 x 3 matrix and the runtime takes their eigenvalues; the
    bound holds against the exact norm and is within a factor 6 of it."""
    n = sp.Symbol("n", integer=True, positive=True)
    i = sp.Idx("i", n)
    x, y = sp.IndexedBase("x", shape=(n,)), sp.IndexedBase("y", shape=(n,))
    theta = sp.IndexedBase("theta", shape=(2,))
    d = [x[i + 1] - x[i], x[i + 2] - x[i + 1], x[i + 3] - x[i + 2]]
    problem = Problem(
        name="third_rows_group3", x=x, theta=theta,
        lower=sp.Sum((x[i] - y[i]) ** 2, (i, 0, n - 1)) / 2 + sp.exp(theta[0]) * sp.Sum(
            sp.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2 + sp.exp(2 * theta[1])), (i, 0, n - 4)),
        upper=sp.Sum((x[i] - y[i]) ** 2, (i, 0, n - 1)) / 2)
    module = build_problem(problem, build_dir)
    assert [(r["args"], r["shape"]) for r in module.meta["third_rows"]] == [(3, ["6", "n - 3"])]
    rng = np.random.default_rng(0)
    prob = module.bind(y=rng.standard_normal(12))
    theta = np.array([0.0, math.log(0.3)])
    for _ in range(3):
        x0, u = rng.standard_normal(12), rng.standard_normal(12)
        exact = _exact_norm(prob, x0, theta, u)
        assert exact * (1 - 1e-12) <= prob.third_contraction(x0, theta, u) <= 6 * exact


def test_no_rows_where_a_term_has_no_rule_or_no_third_derivative(build_dir):
    """Log-sum-exp (hypercleaning's softmax) has no row rule: no kernels, no local bound, and
    the corrections keep Corollary 15.3's terms; quadratic g has no third derivative."""
    for name in ("hypercleaning", "ridge", "quadratic"):
        _, module, _ = built_example(name, build_dir)
        assert module.meta["third_rows"] == []
        assert not any(k["name"].startswith("lower_third_rows") for k in module.meta["kernels"])


def _truth(prob, theta):
    return hypergradient(prob, theta, lower="newton", adjoint="cg", eps=1e-13, delta=1e-13)


def test_tight_correction_sharpened_on_tv(build_dir, monkeypatch):
    """tv1d (n = 256, the example's nu = 0.05: L_A ||q|| is 1000 times ||DA[q]||): the same
    tight hypergradient with and without the local bound; h is the same, both bounds are above
    its true error, the local one several times closer; vE shrinks by two orders; the result's
    note names 15.10 where it took part and its constants keep Lambda_q (computed once for both
    directions). Without the sharpening of a met bound (`plans.sharpen_budget`), which
    would solve the plain run's forward and dual solves on until vE is small too."""
    monkeypatch.setattr(plans, "SHARPEN_BUDGET", 0.0)
    prob, theta = _bound("tv1d", build_dir, sizes=dict(n=256))
    truth = _truth(prob, theta)
    sharp = hypergradient(prob, theta, rtol=1e-6, certificate="tight")
    monkeypatch.setattr(prob, "has_third_contraction", False)
    plain = hypergradient(prob, theta, rtol=1e-6, certificate="tight")
    assert np.array_equal(sharp.grad, plain.grad)
    err = np.linalg.norm(sharp.grad - truth.grad) - truth.bound
    assert err <= sharp.bound <= plain.bound / 2.5
    assert sharp.correction_terms["vE"] <= plain.correction_terms["vE"] / 100
    assert "from the data (15.10)" in sharp.notes[-1] and "15.10" not in plain.notes[-1]
    assert sharp.work["units"] - plain.work["units"] <= 1 + 2 * len(theta)  # q once, v and lam
    assert sharp.constants[LOCAL_Q] <= sharp.constants["L_A"] * sharp.q_norm / 100
    assert LOCAL_Q not in plain.constants


def test_block_correction_reads_the_local_q(build_dir):
    """tv2d with Newton takes the block correction: its round's constants carry LA_q, at most
    L_A ||q||, and the bound stays above the true error at three targets."""
    prob, theta = _bound("tv2d", build_dir, sizes=dict(h=16, w=16))
    truth = _truth(prob, theta)
    for rtol in (1e-3, 1e-6, 1e-8):
        hg = hypergradient(prob, theta, rtol=rtol, lower="newton", adjoint="cg",
                           certificate="block")
        c = hg.constants
        assert c[LOCAL_Q] <= c["L_A"] * hg.q_norm
        assert "||DA[q]|| from the data, 15.10" in hg.notes[-1]
        err = np.linalg.norm(hg.grad - truth.grad)
        assert err <= hg.bound + truth.bound


def test_audit_names_the_rows(build_dir):
    """`hypergen audit`'s text lists each term's scale and atom where the rows exist, and says
    nothing of them where a log-sum-exp term has none."""
    problem, _, _ = built_example("tv2d", build_dir)
    text = format_tree(derive(problem))
    assert "docs/bounds.md 15.10): term g2: 8*exp(la) * max over rows" in text
    problem, _, _ = built_example("hypercleaning", build_dir)
    assert "15.10" not in format_tree(derive(problem))


def test_an_infinite_local_bound_leaves_the_global_one(build_dir, monkeypatch):
    """Where the rows are not finite (third_contraction returns inf), the corrections keep
    Corollary 15.3's and Theorem 15.8's terms: the same bounds as without rows, no LA_q in the
    result's constants, no 15.10 in its note."""
    prob, theta = _bound("tv1d", build_dir, sizes=dict(n=128))
    monkeypatch.setattr(prob, "has_third_contraction", False)
    plain = hypergradient(prob, theta, rtol=1e-6, certificate="tight")
    monkeypatch.setattr(prob, "has_third_contraction", True)
    monkeypatch.setattr(prob, "third_contraction", lambda x, theta, u: math.inf)
    failed = hypergradient(prob, theta, rtol=1e-6, certificate="tight")
    assert failed.bound == plain.bound and np.array_equal(failed.grad, plain.grad)
    assert LOCAL_Q not in failed.constants and "15.10" not in failed.notes[-1]
    block = hypergradient(prob, theta, rtol=1e-6, lower="newton", certificate="block")
    assert LOCAL_Q not in block.constants and "15.10" not in block.notes[-1]


@pytest.mark.parametrize("name, sizes", [("logistic", dict(m=80, n=12, p=60)),
                                         ("tv1d", dict(n=48))])
def test_er_bound_reads_the_q_curvature_on_the_ball(name, sizes, build_dir, monkeypatch):
    """E&R's q form with ||(A(x*) - A(x_eps)) q|| <= a e, a = Lambda_q + L_3 ||q|| e / 2, in place
    of L_A ||q|| e (docs/bounds.md 3): the product against its exact value from the dense
    Hessians at x_eps and x*, the bound above h's true error at four eps and below the plain
    E&R bound (the same h), Lambda_q kept in the constants, its one pass counted."""
    prob, theta = _bound(name, build_dir, sizes=sizes)
    truth = _truth(prob, theta)
    for eps in (1e-2, 1e-4, 1e-6, 1e-8):
        kw = dict(lower="newton", adjoint="cg", eps=eps, delta=1e-3 * eps, refine_iter=0)
        hg = hypergradient(prob, theta, **kw)
        with monkeypatch.context() as m:
            m.setattr(prob, "has_third_contraction", False)
            plain = hypergradient(prob, theta, **kw)
        assert np.array_equal(hg.grad, plain.grad) and LOCAL_Q not in plain.constants
        err = np.linalg.norm(hg.grad - truth.grad) + truth.bound
        assert err <= hg.bound < plain.bound, (eps, err, hg.bound, plain.bound)
        assert hg.constants[LOCAL_Q] <= hg.constants["L_A"] * hg.q_norm
        assert hg.work["units"] == plain.work["units"] + 1
        _, a, _ = ball_q_curvature(prob, theta, hg.x, hg.q, hg.e)
        d = np.linalg.norm(hg.x - truth.x) + truth.e
        change = (prob.lower_hessian(truth.x, theta) - prob.lower_hessian(hg.x, theta)) @ hg.q
        assert np.linalg.norm(change) <= a * d * (1 + 1e-9) + 1e-13 and d <= hg.e
        assert a < hg.constants["L_A"] * hg.q_norm / 2
