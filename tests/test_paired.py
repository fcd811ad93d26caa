"""Two CG solves on one pass over the data (docs/solvers.md 9): `lower_hvp_pair` gives a
companion CG its product in the same kernel call as the adjoint CG's, and with one
hyperparameter the companion (the correction's forward solve) also stops the adjoint once h's
adjoint error is within its share of the target. The kernel itself is checked against the
oracle in test_kernels.py."""
import math

import numpy as np
import pytest

import codegen.hypergrad.adjoint.krylov as adjoint_krylov
from codegen.hypergrad.krylov import Companion, cg

from support import built_example


def _system(n=40, cond=1e3, seed=0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = (Q * np.geomspace(1.0, cond, n)) @ Q.T
    A = (A + A.T) / 2
    return A, rng.standard_normal(n), rng.standard_normal(n), rng


def _bound(companion, A, pair):
    companion.bind(np.zeros(A.shape[0]), np.zeros(1), 1.0, pair)
    return companion


def test_a_companion_takes_plain_cg_steps_beside_an_unchanged_leading_solve():
    A, b, c, _ = _system()
    pair = lambda d, e: np.stack([A @ d, A @ e])  # noqa: E731
    companion = _bound(Companion(lambda x, th: (c, None)), A, pair)
    lead = cg(lambda d: A @ d, b, tol=1e-10, companion=companion)
    plain = cg(lambda d: A @ d, b, tol=1e-10)
    assert lead.iterations == plain.iterations and lead.matvecs == plain.matvecs
    np.testing.assert_allclose(lead.x, plain.x, rtol=1e-12, atol=1e-12 * np.abs(plain.x).max())
    assert companion.steps == lead.iterations
    alone = cg(lambda d: A @ d, c, tol=0.0, max_iter=companion.steps)
    np.testing.assert_allclose(companion.v, alone.x, rtol=1e-10, atol=1e-10 * np.abs(alone.x).max())


@pytest.mark.parametrize("goal", [1e-2, 1e-5, 1e-8])
def test_the_goal_stops_the_leading_solve_once_its_error_in_c_q_is_within_it(goal):
    """|c . (q_k - q*)| <= |v . s| + (R_v / mu) ||s|| <= goal when the goal stops CG (mu = the
    smallest eigenvalue, 1), and the goal stops it before a residual test would."""
    A, b, c, _ = _system(seed=1)
    pair = lambda d, e: np.stack([A @ d, A @ e])  # noqa: E731
    companion = _bound(Companion(lambda x, th: (c, lambda q: goal)), A, pair)
    lead = cg(lambda d: A @ d, b, tol=1e-14, companion=companion)
    assert companion.met
    q_star = np.linalg.solve(A, b)
    assert abs(c @ (lead.x - q_star)) <= goal * (1 + 1e-6)
    assert lead.iterations < cg(lambda d: A @ d, b, tol=1e-14).iterations


def test_a_started_companion_takes_its_residual_from_the_first_pair_call():
    A, b, c, rng = _system(seed=2)
    pair = lambda d, e: np.stack([A @ d, A @ e])  # noqa: E731
    start = np.linalg.solve(A, c) + 1e-3 * rng.standard_normal(c.size)
    companion = _bound(Companion(lambda x, th: (c, None), start), A, pair)
    cg(lambda d: A @ d, b, tol=0.0, max_iter=6, companion=companion)
    assert companion.steps == 5  # the first call gave the start's residual
    alone = cg(lambda d: A @ d, c, start.copy(), residual=c - A @ start, tol=0.0, max_iter=5)
    np.testing.assert_allclose(companion.v, alone.x, rtol=1e-10, atol=1e-12)


def test_a_companion_without_a_pair_kernel_or_a_finite_right_hand_side_does_not_run():
    A, b, c, _ = _system(seed=3)
    idle = [_bound(Companion(lambda x, th: (c, None)), A, None),
            _bound(Companion(lambda x, th: (np.full(c.size, np.nan), None)), A,
                   lambda d, e: np.stack([A @ d, A @ e])),
            _bound(Companion(lambda x, th: None), A, lambda d, e: np.stack([A @ d, A @ e]))]
    for companion in idle:
        assert not companion.active
        lead = cg(lambda d: A @ d, b, tol=1e-8, companion=companion)
        assert lead.status == "converged" and companion.steps == 0


@pytest.fixture(scope="module")
def logistic(build_dir):
    _, module, ns = built_example("logistic", build_dir)
    return module.bind(**ns["example_data"](0, m=300, n=60, p=100))


@pytest.mark.parametrize("rtol", [1e-3, 1e-6, 1e-8])
def test_paired_tight_rounds_are_certified_and_take_fewer_passes(rtol, logistic, monkeypatch):
    """The default certificate (tight, Newton, one hyperparameter) of the logistic example with
    the companion forced on (its data are below PAIR_MIN_DATA): every bound holds against a
    direct solve at 1e-13 and meets the target, the forward solve rode on the adjoint's
    passes, and the rounds took fewer passes than without (measured: 8-33% fewer)."""
    units = {}
    for pairing in (True, False):
        monkeypatch.setattr(adjoint_krylov, "PAIR_MIN_DATA", 0 if pairing else math.inf)
        units[pairing] = 0
        for theta in (-4.0, -2.0, 0.0):
            th = np.array([theta])
            exact = logistic.hypergradient(th, lower="direct", adjoint="direct", eps=1e-13,
                                           delta=1e-13)
            hg = logistic.hypergradient(th, rtol=rtol, lower="newton")
            err = np.linalg.norm(hg.grad - exact.grad)
            assert hg.status == "ok" and hg.certificate == "tight"
            assert err <= hg.bound + exact.bound <= 1.01 * rtol * np.linalg.norm(hg.grad)
            assert (hg.work.get("paired", 0) > 0) == pairing
            units[pairing] += hg.work["units"]
    assert units[True] < units[False], units
