"""The direct solvers (lower="direct", adjoint="direct") and the dense-matrix kernels.

(a) lower_hessian / cross_matrix equal the HVP / cross-JVP columns bit for bit (they run the
    same kernel on unit vectors) and the closed forms 2 D^T D, 2 D^T C of the paper quadratic;
    data-only matrices are cached per bind, read-only, and still check their arguments;
(b) the hypergradient with direct solves meets the closed form / a tight Newton reference within
    its certified bound, on generated and on plain-NumPy kernels (HVP-column fallback), in one
    rtol round;
(c) failure modes are statuses, never numbers: an indefinite Hessian is "not SPD", a delta below
    the rounding level is "capped" with its reason, a wrong L_A = 0 (a stale factor) still ends
    with the TRUE residual, and x larger than DIRECT_MAX_SIZE is refused by name.
"""
import math

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from codegen.errors import BindError
from codegen.hypergrad import SolverError, dense, hypergradient, solve_adjoint, solve_lower
from codegen.hypergrad.adjoint.direct import DIRECT_REFINEMENTS

from conftest import TINY, built_example
from quadratic_kernels import Logistic, PaperQuadratic


def _columns(fn, x, theta, count):
    return np.column_stack([fn(x, theta, np.eye(count)[c]) for c in range(count)])


@pytest.mark.parametrize("name", ["ridge", "logistic", "logistic_sparse", "quadratic", "tv1d",
                                  "tv2d", "hypercleaning"])
def test_dense_kernels_are_the_columns(build_dir, name):
    _, module, ns = built_example(name, build_dir)
    prob = module.bind(**ns["example_data"](seed=1, **TINY[name]))
    rng = np.random.default_rng(2)
    x = 0.3 * rng.standard_normal(prob.x_size)
    theta = 0.2 * rng.standard_normal(prob.theta_size)
    H = prob.lower_hessian(x, theta)
    B = prob.cross_matrix(x, theta)
    assert H.shape == (prob.x_size, prob.x_size) and B.shape == (prob.x_size, prob.theta_size)
    np.testing.assert_array_equal(H, _columns(prob.lower_hvp, x, theta, prob.x_size))
    np.testing.assert_array_equal(B, _columns(prob.cross_jvp, x, theta, prob.theta_size))
    np.testing.assert_allclose(H, H.T, rtol=0, atol=1e-12 * np.abs(H).max())


def test_data_only_matrices_are_cached_and_checked(build_dir):
    _, module, ns = built_example("quadratic", build_dir)
    data = ns["example_data"](seed=3, **TINY["quadratic"])
    prob = module.bind(**data)
    assert module.meta["data_only"] == ["lower_hvp", "cross_jvp"]
    assert repr(module).endswith("upper_theta_grad, upper_hvp, lower_tvp, cross_hvp, cross_tvp, "
                                 "lower_gram_weights, lower_gram_weights_jvp, lower_hessian, cross_matrix>")
    D, C = data["D"], data["C"]
    scale = np.abs(2 * D.T @ D).max()
    for seed in range(3):  # any x, any theta: the same matrices
        rng = np.random.default_rng(seed)
        x, theta = rng.standard_normal(prob.x_size), rng.standard_normal(prob.theta_size)
        np.testing.assert_allclose(prob.lower_hessian(x, theta), 2 * D.T @ D, rtol=0,
                                   atol=1e-13 * scale)
        np.testing.assert_allclose(prob.cross_matrix(x, theta), 2 * D.T @ C, rtol=0,
                                   atol=1e-13 * np.abs(2 * D.T @ C).max())
    H = prob.lower_hessian(x, theta)
    assert H is prob.lower_hessian(x + 1, theta) and not H.flags.writeable
    with pytest.raises(BindError, match="x must have 3 entries"):
        prob.lower_hessian(np.ones(4), theta)
    with pytest.raises(BindError, match="theta"):
        prob.cross_matrix(x, np.ones(5))
    # ridge: the Hessian depends on theta, B on x: never cached (only the Hessian of its
    # theta-free term, lower_hvp_fixed, is data-only)
    _, ridge, rns = built_example("ridge", build_dir)
    assert ridge.meta["data_only"] == ["lower_hvp_fixed"]
    rprob = ridge.bind(**rns["example_data"](seed=1, **TINY["ridge"]))
    xr = np.ones(rprob.x_size)
    H0, H1 = rprob.lower_hessian(xr, [0.0]), rprob.lower_hessian(xr, [1.0])
    np.testing.assert_allclose(H1 - H0, (math.e - 1) * np.eye(rprob.x_size), atol=1e-12)


def _ridge_exact(data, theta):
    """Ridge's closed-form hypergradient: x* = H^{-1} A^T b, H = A^T A + e^theta I, and
    dF/dtheta = grad f(x*) . dx*/dtheta = -e^theta grad f(x*) . H^{-1} x*."""
    A, b, Av, bv = data["A"], data["b"], data["Av"], data["bv"]
    H = A.T @ A + math.exp(theta) * np.eye(A.shape[1])
    x = np.linalg.solve(H, A.T @ b)
    grad_f = Av.T @ (Av @ x - bv) / Av.shape[0]
    return np.array([-math.exp(theta) * grad_f @ np.linalg.solve(H, x)])


@pytest.mark.parametrize("name", ["ridge", "tv1d"])
def test_split_hessian_is_the_hessian_and_its_fixed_part_is_kept_per_bind(build_dir, name):
    """Where g splits into theta-free terms with a Hessian fixed by the data and terms with theta,
    the direct solvers form the Hessian as the fixed part (once per bind, read-only) plus the
    varying part: the same matrix as lower_hessian up to rounding, at any x and theta. The
    fixed part costs only its first call: ridge's by one BLAS product (its Gram form, at 24
    entries priced at gram_price(n) < n HVPs), TV's from n HVPs."""
    from codegen.hypergrad.gram import gram_price

    _, module, ns = built_example(name, build_dir)
    sizes = dict(m=40, n=24, p=10) if name == "ridge" else TINY[name]
    prob = module.bind(**ns["example_data"](seed=2, **sizes))
    assert dense.split_parts(prob) is not None
    rng = np.random.default_rng(4)
    kept = None
    n = prob.x_size
    for call in range(3):
        x = rng.standard_normal(n)
        theta = rng.standard_normal(prob.theta_size)
        H, spent, msg = dense.assembled_hessian(prob, x, theta)
        want = prob.lower_hessian(x, theta)
        assert msg == ""
        assert spent == (0 if call else gram_price(n) if name == "ridge" else n)
        np.testing.assert_allclose(H, want.T, rtol=0, atol=1e-13 * np.abs(want).max())
        fixed = prob.fixed_memo("lower_hvp_fixed")["hessian"]
        assert kept is None or fixed is kept
        assert not fixed.flags.writeable
        kept = fixed
    other = module.bind(**ns["example_data"](seed=3, **sizes))
    assert other.fixed_memo("lower_hvp_fixed") == {}  # formed on first use, per bind
    dense.assembled_hessian(other, np.zeros(other.x_size), np.zeros(other.theta_size))
    assert other.fixed_memo("lower_hvp_fixed")["hessian"] is not kept


def test_ridge_direct_with_the_split_hessian_meets_the_closed_form(build_dir):
    """Ridge's direct + direct hypergradient (A^T A kept per bind, e^theta I added per theta)
    meets the closed form within its certified bound at several thetas of one bind."""
    _, module, ns = built_example("ridge", build_dir)
    data = ns["example_data"](seed=0, m=60, n=12, p=20)
    prob = module.bind(**data)
    for theta in (0.0, -2.0, 1.5):
        hg = prob.hypergradient(theta, lower="direct", adjoint="direct", rtol=1e-8)
        exact = _ridge_exact(data, theta)
        assert hg.status == "ok" and hg.certified
        assert hg.lower_solver == "direct" and hg.adjoint_solver == "direct"
        assert np.linalg.norm(hg.grad - exact) <= hg.bound <= 1e-8 * np.linalg.norm(exact)


@pytest.mark.parametrize("kernel", ["generated", "numpy"])
def test_quadratic_hypergradient_to_rounding_in_one_round(build_dir, kernel):
    if kernel == "generated":
        _, module, ns = built_example("quadratic", build_dir)
        data = ns["example_data"](seed=0)
        k = module.bind(**data)
        ref = PaperQuadratic(data["M"], data["b"], data["C"], data["D"], data["e"])
    else:
        k = ref = PaperQuadratic.generate(seed=0, m1=300, m2=300, d=10, p=10)
    theta = np.linspace(-1.0, 1.0, 10)
    exact = ref.exact_hypergradient(theta)
    hg = hypergradient(k, theta, lower="direct", adjoint="direct", rtol=1e-10)
    err = np.linalg.norm(hg.grad - exact)
    assert hg.status == "ok" and hg.certified
    assert hg.notes[-1].count("eps=") == 1  # one round: the solves are exact to rounding
    assert err <= hg.bound <= 1e-10 * np.linalg.norm(exact)
    assert hg.lower.solver == "direct" and hg.lower.iterations == 1  # one exact Newton step
    # one Hessian, reused by the adjoint (L_A = 0), + the residual HVP; the Hessian costs d HVPs,
    # or the weights' one pass where the bind kept D^T D (the generated module: its data
    # constants formed it for lambda_min)
    assembly = 1 if kernel == "generated" else k.x_size
    assert hg.work["hvps"] == assembly + 1 and hg.work["cross"] == 1 + k.theta_size


def test_fixed_hessian_factor_and_norm_are_reused_per_bind(build_dir):
    """The paper quadratic's Hessian and B read neither x nor theta: the first hypergradient of a
    bind factors the Hessian (2 D^T D from the Gram matrix its data constants formed: the
    weights' one pass) and norms B (p JVPs), later ones at other thetas reuse both and still
    meet the closed form within their bound; a second bind has its own."""
    _, module, ns = built_example("quadratic", build_dir)
    data = ns["example_data"](seed=0)
    prob = module.bind(**data)
    ref = PaperQuadratic(data["M"], data["b"], data["C"], data["D"], data["e"])
    works = []
    for theta in (np.linspace(-1.0, 1.0, 10), np.full(10, 2.0), np.zeros(10)):
        hg = prob.hypergradient(theta, lower="direct", adjoint="direct", rtol=1e-10)
        exact = ref.exact_hypergradient(theta)
        assert hg.status == "ok" and hg.certified
        assert np.linalg.norm(hg.grad - exact) <= hg.bound <= 1e-10 * np.linalg.norm(exact)
        works.append((hg.work["hvps"], hg.work["cross"]))
    assert works == [(2, prob.theta_size + 1), (1, 1), (1, 1)]
    assert prob.fixed_memo("lower_hvp")["factor"] is not None
    other = module.bind(**ns["example_data"](seed=5))
    assert other.fixed_memo("lower_hvp") == {}  # nothing shared between binds
    _, ridge, rns = built_example("ridge", build_dir)  # theta in the Hessian, x in B
    rprob = ridge.bind(**rns["example_data"](seed=1, **TINY["ridge"]))
    assert rprob.fixed_memo("lower_hvp") is None and rprob.fixed_memo("cross_jvp") is None


def test_logistic_direct_matches_newton_and_the_reference():
    k = Logistic.generate(seed=4, m=120, d=9, pv=60)
    theta = np.array([-1.5])
    low = solve_lower(k, theta, solver="direct", tol=1e-12)
    ref = solve_lower(k, theta, solver="newton", tol=1e-12)
    assert low.status == "converged" and low.bound <= 1e-12 and 2 <= low.iterations <= 8
    assert np.linalg.norm(low.x - ref.x) <= low.bound + ref.bound
    exact = k.exact_hypergradient(theta)
    hg = hypergradient(k, theta, lower="direct", adjoint="direct", eps=1e-12, delta=1e-12)
    assert hg.status == "ok"
    assert np.linalg.norm(hg.grad - exact) <= hg.bound <= 1e-9 * np.linalg.norm(exact)
    # L_A > 0: the adjoint refactors at x_eps, one Hessian (d HVPs) per Newton step + one more
    assert hg.work["hvps"] >= (low.iterations + 1) * k.x_size


class _Negated:
    """A kernel whose Hessian is -A: indefinite, against its own mu > 0."""

    def __init__(self, k):
        self._k = k

    def __getattr__(self, name):
        return getattr(self._k, name)

    def lower_hvp(self, x, theta, v):
        return -self._k.lower_hvp(x, theta, v)


def test_indefinite_hessian_is_not_spd():
    k = _Negated(PaperQuadratic.generate(seed=1, m1=50, m2=50, d=5, p=3))
    theta = np.zeros(3)
    adj = solve_adjoint(k, np.zeros(5), theta, solver="direct", delta=1e-8)
    assert adj.status == "not SPD" and "Cholesky" in adj.message and adj.residual == math.inf
    hg = hypergradient(k, theta, lower="direct", adjoint="direct")
    assert "not SPD" in hg.status and not hg.certified and not hg.usable


def test_delta_below_rounding_is_the_rounding_floor_with_its_reason():
    k = PaperQuadratic.generate(seed=2, m1=80, m2=80, d=6, p=2)
    x = solve_lower(k, np.zeros(2), solver="direct", tol=1e-12).x
    adj = solve_adjoint(k, x, np.zeros(2), solver="direct", delta=1e-300)
    assert adj.status == "rounding floor" and "stalled" in adj.message
    assert 0 < adj.residual < 1e-9 * np.linalg.norm(k.upper_grad(x, np.zeros(2)))
    assert adj.n_hvp <= k.x_size + 1 + DIRECT_REFINEMENTS


class _ClaimsQuadratic:
    """Logistic kernels whose constants wrongly claim L_A = 0 (a constant Hessian): the Hessian
    factor of the lower solve's first point is reused where it no longer holds."""

    def __init__(self, k):
        self._k = k

    def __getattr__(self, name):
        return getattr(self._k, name)

    def constants(self, theta):
        return dict(self._k.constants(theta), L_A=0.0)


def test_stale_factor_shows_in_the_true_residual():
    k = _ClaimsQuadratic(Logistic.generate(seed=5, m=150, d=7, pv=40))
    theta = np.array([-2.0])
    hg = hypergradient(k, theta, lower="direct", adjoint="direct", eps=1e-10, delta=1e-12)
    A = np.column_stack([k.lower_hvp(hg.x, theta, e) for e in np.eye(k.x_size)])
    true_R = np.linalg.norm(A @ hg.q - k.upper_grad(hg.x, theta))
    assert hg.R == pytest.approx(true_R, rel=1e-6, abs=1e-15)
    # the stale factor is a chord method: the lower solve still converges (slowly, on its own
    # certificate), the adjoint's refinement does not reach delta and says so
    assert hg.lower.status == "converged" and hg.lower.iterations > 5
    assert hg.adjoint.status == "capped" and hg.R > 1e-12 and hg.status != "ok"


def test_too_large_for_direct_is_refused(monkeypatch):
    monkeypatch.setattr(dense, "DIRECT_MAX_SIZE", 4)
    k = PaperQuadratic.generate(seed=0, m1=20, m2=20, d=5, p=2)
    with pytest.raises(SolverError, match=r"x has 5 entries, more than DIRECT_MAX_SIZE = 4"):
        hypergradient(k, np.zeros(2), lower="direct", adjoint="cg")
    with pytest.raises(SolverError, match="DIRECT_MAX_SIZE"):
        solve_adjoint(k, np.zeros(5), np.zeros(2), solver="direct")


@pytest.mark.parametrize("n", [1, 10, 50, 120, 200])
def test_hessian_factor_is_the_cholesky_factor_of_the_symmetric_part(n):
    """HessianFactor.factor on an SPD matrix with rounding-size asymmetry, passed read-only (as
    a data-only Hessian is): its factor is NumPy's Cholesky factor of (H + H^T)/2, its solves
    match a dense solve, and the input is left as it was; from ONE_THREAD_FACTOR_FROM on it
    runs at one BLAS thread and leaves the caller's count as it was."""
    rng = np.random.default_rng(n)
    M = rng.standard_normal((n, n))
    H = M @ M.T + n * np.eye(n)
    H += 1e-14 * np.abs(H).max() * rng.standard_normal((n, n))  # not exactly symmetric
    H.setflags(write=False)
    before = H.copy()
    x = rng.standard_normal(n)
    with threadpool_limits(2, user_api="blas"):
        threads = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
        fac, why = dense.HessianFactor.factor(H, x)
        assert [lib["num_threads"] for lib in threadpool_info()
                if lib["user_api"] == "blas"] == threads
    assert why == "" and fac is not None
    S = 0.5 * (H + H.T)
    L = np.tril(fac.lower)
    np.testing.assert_allclose(L, np.linalg.cholesky(S), rtol=1e-12, atol=1e-12 * np.abs(L).max())
    b = rng.standard_normal(n)
    np.testing.assert_allclose(fac.solve(b), np.linalg.solve(S, b), rtol=1e-10)
    np.testing.assert_array_equal(H, before)
    assert fac.holds_at(x, False) and not fac.holds_at(x + 1.0, False) and fac.holds_at(x + 1, True)
