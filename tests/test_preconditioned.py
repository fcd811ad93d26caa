"""The preconditioners a learning run holds (codegen/hypergrad/preconditioners.py, deflation.py,
held_factor.py; docs/solvers.md 8): preconditioned CG solves what CG solves, whatever the
preconditioner; the Ritz vectors a deflation keeps are the isolated small eigenvalues; a held
factor is assembled when the steps it would save have cost its price; and a stale or wrong
preconditioner changes the work, never a certified answer."""
from __future__ import annotations

import math

import numpy as np
import pytest

from codegen.hypergrad import deflation, preconditioners
from codegen.hypergrad.deflation import Deflation
from codegen.hypergrad.dense import HessianFactor
from codegen.hypergrad.held_factor import HeldFactor
from codegen.hypergrad.krylov import cg
from codegen.hypergrad.preconditioners import held_for, holding
from codegen.hypergrad.results import Status


def _spd(n: int, small: tuple[float, ...], seed: int = 0) -> np.ndarray:
    """A random SPD matrix whose spectrum is `small` below a bulk spread over [0.05, 1]."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    values = np.concatenate([small, np.linspace(0.05, 1.0, n - len(small))])
    return (Q * values) @ Q.T


@pytest.mark.parametrize("which", ["identity", "exact", "random"])
def test_preconditioned_cg_meets_the_true_residual_with_any_spd_preconditioner(which):
    """The stopping test is on the unpreconditioned residual: the true residual of the
    preconditioned CG's answer meets tol as the plain CG's does, with the identity (the same
    iterations), the exact inverse (one step) or an unrelated SPD matrix."""
    A = _spd(80, (1e-3,))
    b = np.random.default_rng(1).standard_normal(80)
    rng = np.random.default_rng(2)
    G = rng.standard_normal((80, 80))
    M = {"identity": np.eye(80), "exact": np.linalg.inv(A), "random": G @ G.T + np.eye(80)}[which]
    tol = 1e-8
    out = cg(lambda v: A @ v, b, tol=tol, max_iter=1000, precondition=lambda r: M @ r)
    assert out.status is Status.CONVERGED
    assert np.linalg.norm(b - A @ out.x) <= 10 * tol
    plain = cg(lambda v: A @ v, b, tol=tol, max_iter=1000)
    if which == "identity":
        assert out.iterations == plain.iterations
    if which == "exact":
        assert out.iterations <= 2


def test_deflation_keeps_the_isolated_eigenvalue_and_saves_products():
    """After one solve the kept Ritz value is the outlier (1e-3, 50x below the bulk) to 1%, and
    the next solve, with another right-hand side, takes fewer products than plain CG."""
    n = 300
    A = _spd(n, (1e-3,))
    rng = np.random.default_rng(3)
    held = Deflation()
    theta = np.zeros(1)
    first = held.solve(lambda v: A @ v, np.zeros(n), theta, rng.standard_normal(n), tol=1e-10,
                       max_iter=500)
    assert first.status is Status.CONVERGED and held.V is not None and held.V.shape[1] == 1
    assert abs(held.values[0] - 1e-3) <= 1e-5
    b = rng.standard_normal(n)
    second = held.solve(lambda v: A @ v, np.zeros(n), theta, b, tol=1e-10, max_iter=500)
    plain = cg(lambda v: A @ v, b, tol=1e-10, max_iter=500)
    print(f"\nproducts: deflated {second.matvecs}, plain CG {plain.matvecs}")
    assert second.status is Status.CONVERGED
    assert np.linalg.norm(b - A @ second.x) <= 1e-9
    assert second.matvecs < 0.9 * plain.matvecs


def test_no_gap_keeps_nothing():
    """A spectrum without an isolated bottom gives no Ritz value RITZ_GAP below the next one:
    nothing is kept, and the solves are plain CG."""
    A = _spd(120, ())
    held = Deflation()
    held.solve(lambda v: A @ v, np.zeros(120), np.zeros(1), np.ones(120), tol=1e-10, max_iter=500)
    assert held.V is None


def test_a_wrong_deflation_only_costs_iterations():
    """Kept vectors that are not eigenvectors, with values 1e6 times off, at a stale theta: the
    refresh recomputes the values at the new theta, and the answer still meets tol."""
    n = 200
    A = _spd(n, (1e-3, 2e-3))
    rng = np.random.default_rng(4)
    held = Deflation()
    held.V, _ = np.linalg.qr(rng.standard_normal((n, 3)))
    held.AV, held.values, held.scale = held.V * 1e-9, np.full(3, 1e-9), 1e3
    held.theta = np.ones(1)
    b = rng.standard_normal(n)
    out = held.solve(lambda v: A @ v, np.zeros(n), np.zeros(1), b, tol=1e-9, max_iter=2000)
    assert out.status is Status.CONVERGED
    assert np.linalg.norm(b - A @ out.x) <= 1e-8


def test_holding_is_scoped_to_its_block():
    """Inside `holding` a run holds the Hessian's factor where n^2 is at most the data's numbers
    and those are FACTOR_MIN_DATA or more (with a deflation as its fallback where one is held
    too), a deflation from DEFLATION_MIN_SIZE entries and DEFLATION_MIN_DATA numbers on, and
    nothing for less data (a cheap HVP: the fused loops); outside the block nothing is held."""
    class K:
        def __init__(self, n, rows=None):
            self.x_size = n
            if rows is not None:
                self.data = {"A": np.zeros((rows, n))}
    n = deflation.DEFLATION_MIN_SIZE
    least = preconditioners.DEFLATION_MIN_DATA
    rows = -(-least // n)  # enough rows of n numbers for a deflation
    big, small = K(n), K(n - 1)  # no data: a kernel of its own, counted as much data
    heavy, light = K(n, rows), K(n, rows - 1)
    square = K(n, n - 1)  # n^2 above its numbers: a triangular solve would cost more than an HVP
    wide = K(1024, least // 1024)  # n^2 = 4 x its numbers, enough for a deflation
    few = K(30, preconditioners.FACTOR_MIN_DATA // 30 - 1)
    kernels = [big, small, heavy, light, square, wide, few]
    with holding(kernels):
        for k in (big, heavy):
            held = held_for(k)
            assert isinstance(held, HeldFactor) and isinstance(held.fallback, Deflation)
        for k in (small, light):
            held = held_for(k)
            assert isinstance(held, HeldFactor) and held.fallback is None
        assert isinstance(held_for(wide), Deflation)
        assert held_for(square) is None and held_for(few) is None
    assert all(held_for(k) is None for k in kernels)


def _nothing_held(monkeypatch) -> None:
    """Make every learning run hold nothing (the plain run the preconditioned ones face)."""
    monkeypatch.setattr(preconditioners, "DEFLATION_MIN_DATA", math.inf)
    monkeypatch.setattr(preconditioners, "FACTOR_MIN_DATA", math.inf)


def _drifting(n: int, step: float):
    """Products with A_t = A + t step diag(d) for t = 0, 1, ...: nearby SPD matrices, as
    along a learning run."""
    A = _spd(n, (1e-3,))
    d = np.random.default_rng(6).random(n)
    return lambda t: (lambda v: A @ v + t * step * d * v), lambda t: A + np.diag(t * step * d)


@pytest.mark.parametrize("fallback", [None, "deflation"])
def test_held_factor_is_assembled_once_the_stale_steps_cost_its_price(fallback):
    """A fresh HeldFactor runs plain CG (or its fallback deflation's) until the steps beyond one
    per solve add up to n; the next solve assembles the factor there (its n products counted in
    matvecs) and then takes at most 2 steps, and solves at nearby matrices take a few, each
    meeting tol by its true residual."""
    n = 60
    hvp_at, matrix = _drifting(n, 1e-3)
    rng = np.random.default_rng(7)
    factor = HeldFactor(None if fallback is None else Deflation())
    t, stale = 0, 0
    while not factor.due(n):
        b = rng.standard_normal(n)
        out = factor.solve(hvp_at(t), np.zeros(n), np.full(1, float(t)), b, tol=1e-9,
                           max_iter=500)
        assert factor.factor is None and out.status is Status.CONVERGED
        assert np.linalg.norm(b - matrix(t) @ out.x) <= 1e-8
        stale += out.iterations - 1
        t += 1
    assert stale >= n and factor.assemblies == 0
    if fallback is not None:
        assert factor.fallback is not None and factor.fallback.V is not None  # it learned
    b = rng.standard_normal(n)
    out = factor.solve(hvp_at(t), np.zeros(n), np.full(1, float(t)), b, tol=1e-9, max_iter=500)
    assert factor.assemblies == 1 and out.iterations <= 2 and out.matvecs <= n + 3
    assert np.linalg.norm(b - matrix(t) @ out.x) <= 1e-8
    for later in range(t + 1, t + 4):
        b = rng.standard_normal(n)
        out = factor.solve(hvp_at(later), np.zeros(n), np.full(1, float(later)), b, tol=1e-9,
                           max_iter=500)
        plain = cg(hvp_at(later), b, tol=1e-9, max_iter=500)
        assert out.status is Status.CONVERGED and np.linalg.norm(b - matrix(later) @ out.x) <= 1e-8
        assert out.iterations <= 0.5 * plain.iterations
    assert factor.assemblies == 1


def test_held_factor_swaps_the_theta_terms_at_a_new_theta():
    """A(theta) = A0 + diag(e^theta) with the theta part known (as `dense.theta_part` gives a
    generated module's): after one assembly at theta0, a solve at a theta far off takes at most
    2 steps (the factor is of A(theta) itself), where the factor without the swap takes more;
    a theta part that fails leaves the factor as it was, and the answers meet tol."""
    n = 50
    A0 = _spd(n, (1e-3,))
    rng = np.random.default_rng(9)
    theta0, theta1 = np.zeros(n), rng.uniform(-6.0, 0.0, n)

    def hvp(theta):
        return lambda v: A0 @ v + np.exp(theta) * v

    def theta_part(x, theta):
        return np.diag(np.exp(theta))

    swapping, plain = HeldFactor(theta_part=theta_part), HeldFactor()
    for held in (swapping, plain):
        held.stale_steps = n  # due: the first solve assembles at theta0
        held.solve(hvp(theta0), np.zeros(n), theta0, rng.standard_normal(n), tol=1e-9,
                   max_iter=500)
        assert held.assemblies == 1
    np.testing.assert_allclose(swapping.rest, A0, atol=1e-12)
    b = rng.standard_normal(n)
    moved = swapping.solve(hvp(theta1), np.zeros(n), theta1, b, tol=1e-9, max_iter=500)
    stale = plain.solve(hvp(theta1), np.zeros(n), theta1, b, tol=1e-9, max_iter=500)
    A1 = A0 + np.diag(np.exp(theta1))
    for out in (moved, stale):
        assert out.status is Status.CONVERGED and np.linalg.norm(b - A1 @ out.x) <= 1e-8
    assert moved.iterations <= 2 < stale.iterations
    failing = HeldFactor(
        theta_part=lambda x, theta: None if theta[0] != 0.0 else theta_part(x, theta))
    failing.stale_steps = n
    failing.solve(hvp(theta0), np.zeros(n), theta0, b, tol=1e-9, max_iter=500)
    before = failing.factor
    out = failing.solve(hvp(theta1), np.zeros(n), theta1, b, tol=1e-9, max_iter=500)
    assert failing.factor is before and np.linalg.norm(b - A1 @ out.x) <= 1e-8
    assert np.array_equal(failing.theta, theta1)  # not tried again at theta1


def test_a_wrong_held_factor_only_costs_iterations():
    """A held factor of an unrelated SPD matrix: the answer still meets tol by its true
    residual, and the stale steps it costs bring the next assembly due."""
    n = 80
    A = _spd(n, (1e-3,))
    G = np.random.default_rng(8).standard_normal((n, n))
    factor = HeldFactor()
    factor.factor, _ = HessianFactor.factor(G @ G.T + 1e-3 * np.eye(n))
    b = np.ones(n)
    out = factor.solve(lambda v: A @ v, np.zeros(n), np.zeros(1), b, tol=1e-9, max_iter=2000)
    assert out.status is Status.CONVERGED and factor.assemblies == 0
    assert np.linalg.norm(b - A @ out.x) <= 1e-8
    assert factor.stale_steps == out.iterations - 1


@pytest.fixture(scope="module")
def logistic_256(build_dir):
    from conftest import built_example
    _, module, ns = built_example("logistic", build_dir)
    return module.bind(**ns["example_data"](0, m=3000, n=256, p=400))


@pytest.mark.parametrize("gram", [False, True])
def test_learning_run_with_deflation_keeps_its_certificate(logistic_256, monkeypatch, gram):
    """On the logistic example at 3000 x 256 (x at DEFLATION_MIN_SIZE) from a small weight, the
    default run holds a factor with a deflation as its fallback. Without the Gram assembly the
    deflation does all the preconditioning (the run's stale steps stay below 256: no
    assembly); with it (the module has the form) the factor is assembled once the stale steps
    reach 23. Either run converges, its certified ||grad F|| bound holds against a tight
    hypergradient, it ends at the F the run without a preconditioner ends at (within 10 ftol
    |F|, ftol = 1e-7 the stopping rule's) and takes fewer work units, the Gram products' price
    included."""
    prob = logistic_256
    if not gram:
        monkeypatch.setattr(preconditioners, "gram_at", lambda k, part: None)
    with holding([prob]):
        held = held_for(prob)
        assert isinstance(held, HeldFactor) and (held.gram is not None) == gram
    res = prob.optimize(-6.0, progress=False)
    _nothing_held(monkeypatch)
    plain = prob.optimize(-6.0, progress=False)
    tight = prob.hypergradient(res.theta, rtol=1e-8)
    print(f"\nunits: preconditioned {res.work}, plain {plain.work}; theta {res.theta} {plain.theta}")
    assert res.status == plain.status == "converged", res.message
    assert float(np.linalg.norm(tight.grad)) - tight.bound <= res.stationarity
    other = prob.hypergradient(plain.theta, rtol=1e-8)
    assert abs(tight.value - other.value) <= 1e-6 * abs(other.value)
    # measured 248 (deflation) and 202 (Gram factor) against 329
    assert res.work < (0.65 if gram else 0.85) * plain.work


def test_held_factor_assembly_by_pairs_is_the_hessian(logistic_256):
    """The held factor's assembly from the pair kernel (two columns a pass) is the generated
    Hessian (lower_hessian, n HVPs) to rounding, in n / 2 passes; from the HVP alone, in n."""
    from codegen.hypergrad.common import hvp_at
    from codegen.hypergrad.dense import hvp_columns

    prob = logistic_256
    n = prob.x_size
    rng = np.random.default_rng(10)
    x, theta = 0.1 * rng.standard_normal(n), np.array([-3.0])
    pair = prob.hvp_pair_at(x, theta)
    assert pair is not None
    by_pairs, passes, _ = hvp_columns(hvp_at(prob, x, theta), n, pair)
    by_columns, singles, _ = hvp_columns(hvp_at(prob, x, theta), n)
    want = prob.lower_hessian(x, theta)
    assert passes == n // 2 and singles == n
    scale = np.max(np.abs(want))
    for got in (by_pairs, by_columns):
        assert np.max(np.abs(got - want)) <= 1e-12 * scale


def test_wrong_deflation_gives_the_certified_hypergradient(logistic_256):
    """A hypergradient inside `holding` with garbage kept vectors (random, values 1e6 off): its
    bound still covers its distance to a tight hypergradient solved without any deflation."""
    prob = logistic_256
    theta = np.array([-7.0])
    rng = np.random.default_rng(5)
    with holding([prob]):
        factor = held_for(prob)
        assert isinstance(factor, HeldFactor) and factor.fallback is not None
        held = factor.fallback  # no factor assembled yet: the deflation acts
        held.V, _ = np.linalg.qr(rng.standard_normal((prob.x_size, 3)))
        held.AV, held.values, held.scale = held.V * 1e-9, np.full(3, 1e-9), 1e3
        held.theta = np.ones(1)
        hg = prob.hypergradient(theta, lower="newton", adjoint="cg", eps=1e-6, delta=1e-6)
    ref = prob.hypergradient(theta, rtol=1e-8, lower="direct", adjoint="direct")
    assert hg.status == "ok" and ref.status == "ok"
    assert abs(float(hg.grad[0] - ref.grad[0])) <= hg.bound + ref.bound
    assert hg.bound < 0.25 * abs(float(ref.grad[0]))


def test_learning_run_with_a_held_factor_keeps_its_certificate(build_dir, monkeypatch):
    """One weight per feature (logistic_weights) at 1100 x 200 (x below DEFLATION_MIN_SIZE,
    280,000 numbers of data): the default run holds a factor; it converges, its certified
    ||grad F|| bound holds against a tight hypergradient, it ends at the F the run without it
    ends at (within 10 ftol |F|) and takes fewer work units, the assemblies included."""
    from conftest import built_example
    _, module, ns = built_example("logistic_weights", build_dir)
    prob = module.bind(**ns["example_data"](0, m=1100, n=200, p=300))
    theta0 = np.zeros(200)
    res = prob.optimize(theta0, progress=False)
    _nothing_held(monkeypatch)
    plain = prob.optimize(theta0, progress=False)
    print(f"\nunits: with the factor {res.work}, plain {plain.work}")
    assert res.status == plain.status == "converged", res.message
    tight = prob.hypergradient(res.theta, rtol=1e-8)
    assert float(np.linalg.norm(tight.grad)) - tight.bound <= res.stationarity
    other = prob.hypergradient(plain.theta, rtol=1e-8)
    assert abs(tight.value - other.value) <= 1e-6 * abs(other.value)
    assert res.work < 0.8 * plain.work
