"""Krylov reuse (docs/bounds.md 15.7): the quadratic lower CG keeps its directions, the fused C
loop keeps the same ones as the Python loop, the Galerkin solution on them is the A-norm-best
point of their span, it solves a Tikhonov weight's forward system almost for free, and a
wrong basis changes the work, never the certificate."""
import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_correction import GroupRidge, QuadraticRidge
from threadpoolctl import threadpool_info, threadpool_limits

from codegen.hypergrad import hypergradient, solve_lower
from codegen.hypergrad.certificates import BLOCK_FROM
from codegen.hypergrad.correction import correct
from codegen.hypergrad.fused import fused_cg, loops_for
from codegen.hypergrad.galerkin import basis_steps, galerkin
from codegen.hypergrad.krylov import cg
from codegen.hypergrad.results import evolve
from codegen.threads import one_blas_thread

from support import built_example


def _spd(n, cond, seed):
    rs = np.random.RandomState(seed)
    Q, _ = np.linalg.qr(rs.randn(n, n))
    return (Q * np.logspace(0, np.log10(cond), n)) @ Q.T


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_galerkin_is_the_a_norm_best_point_of_the_kept_span(seed):
    """Against an independent projection (an orthonormal basis of the same span by QR and a
    dense solve): the same point to 1e-7, and never farther from A^{-1} c in the A-norm than
    the cold start 0, for a right-hand side c unrelated to the space."""
    A = _spd(80, 1e3, seed)
    rs = np.random.RandomState(seed + 10)
    basis = []
    cg(lambda v: A @ v, rs.randn(80), max_iter=25, basis=basis)
    S = np.array([d for d, _ in basis])
    AS = np.array([Ad for _, Ad in basis])
    assert S.shape == (25, 80) and np.allclose(AS, S @ A, rtol=0, atol=1e-12 * np.abs(AS).max())
    c = rs.randn(80)
    v = galerkin(S, AS, c)
    Q, _ = np.linalg.qr(S.T)
    v_ref = Q @ np.linalg.solve(Q.T @ A @ Q, Q.T @ c)
    assert np.linalg.norm(v - v_ref) <= 1e-7 * np.linalg.norm(v_ref)
    exact = np.linalg.solve(A, c)

    def a_norm(w):
        return float(np.sqrt(w @ A @ w))

    assert a_norm(v - exact) <= a_norm(exact)


@pytest.mark.parametrize("tol,limit", [(1e-3, 1e-2), (1e-6, 1e-5), (1e-9, 1e-8)])
def test_the_lower_basis_solves_a_tikhonov_forward_system(tol, limit):
    """g = 1/2||K x - y||^2 + e^theta/2 ||x||^2: B u = e^theta x_eps lies in the lower CG's
    Krylov space, and the Galerkin solution on the kept directions solves A v = B u to a
    relative residual near the lower solve's own (measured 1.7e-7 to 2.7e-7 at tol 1e-6,
    2.7e-10 to 4.2e-10 at 1e-9, 1e-4 to 1.5e-4 at 1e-3), where the cold start has 1."""
    for seed in range(3):
        k = QuadraticRidge.generate(seed=seed, m=300, d=120, pv=150)
        th = np.array([-1.0])
        low = solve_lower(k, th, "cg", tol, keep_basis=True)
        S, AS = low.krylov
        assert S.shape == (low.iterations, k.x_size)
        Bu = k.cross_jvp(low.x, th, np.ones(1))
        v = galerkin(S, AS, Bu)
        A = k.dense(th)[0]
        assert np.linalg.norm(A @ v - Bu) <= limit * np.linalg.norm(Bu), (seed, tol)
        assert solve_lower(k, th, "cg", tol).krylov is None  # kept only when asked


def test_fused_loop_keeps_the_python_loops_directions(build_dir):
    """The C loop_cg's basis buffer against krylov.cg's list on the generated ridge example:
    the same directions and products (to rounding: the loops share their arithmetic, the
    compiler may contract it differently), for the steps that fit the buffer, and nothing
    written beyond it."""
    _, module, ns = built_example("ridge", build_dir)
    prob = module.bind(**ns["example_data"](m=60, n=20, p=15))
    th = np.atleast_1d(np.float64(ns["THETA0"]))
    loops = loops_for(prob)
    assert loops is not None
    x = np.zeros(prob.x_size)
    b = -prob.lower_grad(x, th)
    pairs = []
    cg(lambda v: prob.lower_hvp(x, th, v), b, max_iter=12, basis=pairs)
    buffer = np.full((8 + 1, 2, prob.x_size), 7.0)  # 8 slots and a guard row
    out = fused_cg(loops, x, th, b, max_iter=12, basis=buffer[:8])
    assert out.iterations == 12
    for i in range(8):
        assert np.allclose(buffer[i, 0], pairs[i][0], rtol=1e-10, atol=1e-14)
        assert np.allclose(buffer[i, 1], pairs[i][1], rtol=1e-10, atol=1e-14)
    assert np.all(buffer[8] == 7.0)
    with pytest.raises(ValueError, match="basis must be C-contiguous"):
        fused_cg(loops, x, th, b, basis=np.zeros((3, 2, prob.x_size + 1)))


@pytest.mark.parametrize("rtol", [1e-3, 1e-6, 1e-8])
def test_tight_with_a_cg_lower_solve_holds_within_3x(rtol):
    """certificate="tight" with lower="cg" (a kept basis in every round) on the Tikhonov ridge:
    the bound holds against the exact gradient and stays within 3x of the error."""
    k = QuadraticRidge.generate(seed=4, m=300, d=120, pv=150)
    th = np.array([-1.0])
    exact = k.exact_hypergradient(th)
    hg = hypergradient(k, th, lower="cg", adjoint="cg", rtol=rtol, certificate="tight")
    err = float(np.linalg.norm(hg.grad - exact))
    assert hg.certificate == "tight" and err <= hg.bound <= 3 * max(err, 1e-13), (err, hg.bound)


@pytest.mark.parametrize("eps", [1e-4, 1e-8])
def test_the_forward_solve_from_the_kept_basis_is_almost_free(eps):
    """The correction at one lower point with the basis its CG kept spends at most 2 products
    on the forward solve (the start's true residual and, at most, one step) where the same
    correction without it spends a cold CG's (at least 5 here)."""
    k = QuadraticRidge.generate(seed=4, m=300, d=120, pv=150)
    th, u = np.array([-1.0]), np.ones(1)
    plain = hypergradient(k, th, lower="cg", adjoint="cg", eps=eps, delta=eps, certificate="er")
    low = solve_lower(k, th, "cg", eps, keep_basis=True)
    assert np.array_equal(low.x, plain.x) and low.krylov is not None
    Bu = k.cross_jvp(plain.x, th, u)
    tol = 1e-3 * np.linalg.norm(Bu)
    cold = cg(lambda v: k.lower_hvp(plain.x, th, v), Bu, tol=tol).matvecs
    with_basis = correct(k, evolve(plain, lower=low), [u], [tol], [None], [None], [None],
                         10_000).work["hvps"]
    without = correct(k, plain, [u], [tol], [None], [None], [None], 10_000).work["hvps"]
    assert cold >= 5 and with_basis <= without - cold + 2, (with_basis, without, cold)


def test_a_wrong_basis_changes_the_work_never_the_certificate():
    """The correction with a lower result whose kept 'basis' is random vectors with 'products'
    unrelated to A (a Galerkin point is formed, a poor start) or of the wrong sign (refused, a
    cold start): the bounds on u . h_c and on u . h still hold against the exact gradient."""
    k = QuadraticRidge.generate(seed=5, m=300, d=120, pv=150)
    th = np.array([-0.5])
    exact = k.exact_hypergradient(th)
    hg = hypergradient(k, th, lower="cg", adjoint="cg", eps=1e-5, delta=1e-5, certificate="er")
    rs = np.random.RandomState(0)
    S = rs.randn(6, k.x_size)
    AS = S + 1e-3 * rs.randn(6, k.x_size)  # positive d^T (A d): a Galerkin point is formed
    unrelated = evolve(hg, lower=dataclasses.replace(hg.lower, krylov=(S, AS)))
    indefinite = evolve(hg, lower=dataclasses.replace(hg.lower, krylov=(S, -AS)))
    assert galerkin(S, AS, np.ones(k.x_size)) is not None
    assert galerkin(S, -AS, np.ones(k.x_size)) is None  # refused: cold start
    u = np.ones(1)
    for case in (hg, unrelated, indefinite):
        corr = correct(k, case, [u], [1e-8], [1e-8], [None], [None], 10_000)
        part = corr.parts[0]
        assert abs(part.value - exact[0]) <= part.bound
        assert abs(part.plain - exact[0]) <= part.plain_bound


def test_basis_steps_keep_what_the_galerkin_solve_pays_for():
    """Dense data (hundreds of numbers per entry of x) keep that many directions, a stencil
    (two per entry) keeps none, and 64 MiB caps what a huge x keeps (here below 8: none)."""
    assert basis_steps(100, 606.0) == 606
    assert basis_steps(2000, float("inf")) == (64 << 20) // (16 * 2000)
    assert basis_steps(65536, 2.0) == 0
    assert basis_steps(10**6, 1e9) == 0


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), groups=st.booleans(), log_rtol=st.floats(-9, -2))
def test_the_default_with_cg_holds_on_drawn_problems(seed, groups, log_rtol):
    """Hypothesis-drawn ridge problems (B u = a x_eps in the kept span) and group weights
    (B u = a x_G, only partly in it): the default certificate with lower="cg" is the tight one
    (its forward solves start from the kept basis) for one weight and the block one from
    BLOCK_FROM weights, and its bound is never below h's error."""
    rs = np.random.RandomState(seed)
    if groups:
        p = int(rs.randint(1, 4))
        k, theta = GroupRidge(seed=seed, p=p, d=int(rs.randint(3 * p + 2, 40))), \
            rs.uniform(-3, 1, size=p)
    else:
        k = QuadraticRidge.generate(seed=seed, m=int(rs.randint(40, 200)),
                                    d=int(rs.randint(10, 60)), pv=int(rs.randint(20, 80)))
        theta = np.array([rs.uniform(-3, 1)])
    hg = hypergradient(k, theta, lower="cg", adjoint="cg", rtol=10.0 ** log_rtol)
    if not hg.usable:
        return
    exact = k.exact_hypergradient(theta)
    err = float(np.linalg.norm(hg.grad - exact))
    assert hg.certificate == ("tight" if theta.size < BLOCK_FROM else "block")
    assert err <= hg.bound or err <= 1e-13 * np.linalg.norm(exact), (hg.bound, err, hg.status)


def test_one_blas_thread_limits_and_restores(build_dir):
    """The Galerkin solve's small dense algebra runs BLAS at one thread (OpenBLAS's spinning
    threads would take the OpenMP kernels' cores) and gives the caller's count back after."""
    def blas_threads():
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    with threadpool_limits(2, user_api="blas"):
        before = blas_threads()
        with one_blas_thread():
            assert all(n == 1 for n in blas_threads())
        assert blas_threads() == before
        # a fresh bind's data constants run at one thread too, and restore the count
        _, module, ns = built_example("logistic", build_dir)
        prob = module.bind(**ns["example_data"](0, m=300, n=40, p=100))
        prob.constants(np.zeros(prob.theta_size))
        assert blas_threads() == before


@pytest.mark.parametrize("adjoint,delta", [("cg", 1e-9), ("cg", 1e3), ("gd", 1e-6)])
def test_the_adjoint_keeps_its_true_residual_and_the_correction_reads_it(adjoint, delta,
                                                                         build_dir):
    """The adjoint's recomputed true residual, kept in `AdjointResult.true_residual`, is
    A q - grad f at the returned q (after steps; where a warm start already met delta; with
    GD's iteration), and the correction takes it instead of recomputing it: one HVP less, the
    same bound."""
    _, module, ns = built_example("logistic", build_dir)
    prob = module.bind(**ns["example_data"](0, m=300, n=60, p=100))
    th = np.array([-2.0])
    hg = prob.hypergradient(th, lower="newton", adjoint=adjoint, eps=1e-9, delta=delta,
                            q0=np.full(prob.x_size, 1e-3))
    kept = hg.adjoint.true_residual
    want = prob.lower_hvp(hg.x, th, hg.q) - prob.upper_grad(hg.x, th)
    np.testing.assert_allclose(kept, want, rtol=1e-13, atol=1e-15 * np.abs(want).max())
    assert np.linalg.norm(kept) == pytest.approx(hg.R, rel=1e-13)
    dirs, tols = [np.ones(1)], [1e-3 * np.linalg.norm(want)]
    reading = correct(prob, hg, dirs, tols, tols, [None], [None], 1000)
    recomputing = correct(prob, evolve(hg, adjoint=dataclasses.replace(
        hg.adjoint, true_residual=None)), dirs, tols, tols, [None], [None], 1000)
    assert reading.work["hvps"] == recomputing.work["hvps"] - 1
    assert reading.parts[0].bound == pytest.approx(recomputing.parts[0].bound, rel=1e-12)
