"""The cheaper first-call data constants (docs/constants.md 4): ||K||^2 from a float32 Gram by
blocks of rows (`spectral.gram32`) and a Cholesky certificate instead of eigvalsh where
lambda_min is not read. Every bound is checked against the exact value (numpy's SVD) on random,
ill-conditioned, rank-deficient, clustered-top (poor Lanczos estimates) and badly scaled
matrices, tall and wide; and the logistic constants stay upper bounds within a few percent."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from codegen.constants import compute_data_quantities, derive, evaluate
from codegen.constants.evaluation import quantities, spectral

_SPEC = importlib.util.spec_from_file_location(
    "example_logistic", Path(__file__).resolve().parents[1] / "examples" / "logistic.py")
LOGISTIC = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(LOGISTIC)


def exact_normsq(K) -> float:
    return float(np.linalg.norm(K, 2) ** 2)


def _with_spectrum(rng, rows, cols, s):
    u, _ = np.linalg.qr(rng.standard_normal((rows, rows)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, cols)))
    return (u[:, :len(s)] * s) @ v[:, :len(s)].T


def matrices():
    """(name, K), side 40-60 so that several blocks of GRAM32_ROWS = 9 rows (a ragged last one)
    are summed."""
    rng = np.random.default_rng(11)
    top = np.ones(40)
    top[:4] = [7.0, 7.0 - 1e-9, 7.0 - 2e-9, 7.0 - 3e-9]  # clustered: Lanczos converges slowly
    return [("gaussian 300x40", rng.standard_normal((300, 40))),
            ("gaussian wide 45x260", rng.standard_normal((45, 260))),
            ("non-negative 200x50", rng.random((200, 50))),
            ("ill-conditioned", _with_spectrum(rng, 120, 40, np.logspace(0, -12, 40))),
            ("rank-deficient", _with_spectrum(rng, 150, 60, np.r_[np.ones(5), np.zeros(55)])),
            ("clustered top", _with_spectrum(rng, 100, 40, top)),
            ("rank one", np.outer(rng.standard_normal(90), rng.standard_normal(40))),
            ("tiny: float32 products underflow", 1e-19 * rng.standard_normal((200, 40))),
            ("huge: beyond float32", 1e17 * rng.standard_normal((200, 40))),
            ("huge dynamic range", rng.standard_normal((200, 40)) * np.logspace(-30, 12, 40))]


@pytest.fixture
def small_limits(monkeypatch):
    """The float32 Gram and the certificate at these small sides."""
    monkeypatch.setattr(spectral, "GRAM32_MIN_FLOPS", 0.0)
    monkeypatch.setattr(spectral, "GRAM32_ROWS", 9)
    monkeypatch.setattr(spectral, "CERTIFY_SIDE", 0)


@pytest.mark.parametrize("name, K", matrices(), ids=[n for n, _ in matrices()])
def test_float32_gram_and_certificate_bound_the_exact_norm(name, K, small_limits):
    exact = exact_normsq(K)
    q = quantities.operator_quantities(K, K[:, None, :], needed=("normsq",))["normsq"]
    assert q["certified"] and q["value"] >= exact, (name, q)
    if "float32" in q["method"]:  # the margin is at most GRAM32_LOOSENESS of ||K||_F^2 / side
        assert q["value"] <= exact * (1 + spectral.GRAM32_LOOSENESS + 0.011), (name, q)
    fast = spectral.gram32(K, float(np.sum(K * K)) * (1 + 1e-12))
    if name.startswith("huge:"):
        assert fast is None  # ||K||_F^2 > 1e30: float32 could overflow, the float64 Gram kept
    if fast is not None:  # any certified lam >= lambda_max(G) lifts to a bound on ||K||^2
        G, add, shift = fast
        lam = float(np.linalg.eigvalsh(G)[-1]) * (1 + 1e-12)
        assert spectral.lift(lam, add, shift) >= exact, name


def test_the_lift_is_not_a_bound_without_its_margin(small_limits):
    """The margin is needed: some matrix has lambda_max(G32) below ||K||^2 (float32 rounding
    loses), so a test that ignored it would pass for the wrong reason."""
    rng = np.random.default_rng(3)
    below = 0
    for _ in range(20):
        K = rng.standard_normal((400, 30))
        G, _, _ = spectral.gram32(K, float(np.sum(K * K)) * (1 + 1e-12))
        below += float(np.linalg.eigvalsh(G)[-1]) < exact_normsq(K)
    assert below > 0


def test_potrf_decides_like_numpy_cholesky():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((60, 30))
    G = X.T @ X
    lam = float(np.linalg.eigvalsh(G)[-1])
    for c, ok in ((lam * 1.001, True), (lam * 0.999, False), (0.0, False)):
        M = -G
        M[np.diag_indices(30)] += c
        assert spectral._factors(M.copy()) is ok


def test_lmin_still_takes_eigvalsh_in_float64():
    """Where lambda_min is read (ridge: mu = lmin + e^theta) the float64 Gram and eigvalsh stay:
    no cheaper certified lower bound than 0 exists."""
    rng = np.random.default_rng(5)
    K = rng.standard_normal((3000, 200))
    q = quantities.operator_quantities(K, K[:, None, :], needed=("normsq", "lmin"))
    ev = np.linalg.eigvalsh(K.T @ K)
    assert "eigvalsh" in q["normsq"]["method"]
    assert ev[0] * (1 - 1e-9) <= q["lmin"]["value"] <= ev[0] <= ev[-1] <= q["normsq"]["value"]


def test_logistic_constants_stay_upper_bounds_within_the_looseness(monkeypatch):
    """At the size of the benchmark's small case (2000 x 500 takes the float32 Gram by default;
    here 1500 x 160 with GRAM32_MIN_FLOPS lowered) every constant is >= the float64 eigvalsh one
    and within GRAM32_LOOSENESS + the certificate's first slack of it."""
    der = derive(LOGISTIC.logistic)
    data = LOGISTIC.example_data(0, m=1500, n=160, p=400)
    monkeypatch.setattr(spectral, "CERTIFY_SIDE", 10**6)
    sharp = evaluate(der, [-1.0], compute_data_quantities(der, data))
    monkeypatch.setattr(spectral, "CERTIFY_SIDE", 128)
    monkeypatch.setattr(spectral, "GRAM32_MIN_FLOPS", 0.0)
    q = compute_data_quantities(der, data)
    assert all("float32" in q[k]["method"] for k in ("normsq_K1", "normsq_K2"))
    fast = evaluate(der, [-1.0], q)
    for name in ("L", "L_A", "L_f"):
        assert sharp[name] <= fast[name] <= sharp[name] * (1 + spectral.GRAM32_LOOSENESS + 2e-3)
    assert fast["mu"] == sharp["mu"] and fast["certified"]


def test_default_thresholds():
    """Without monkeypatching: 2000 x 500 (as 10000 x 500) takes the float32 Gram, a Gram side
    of 1050 keeps the float64 one (its float32 margin would pass GRAM32_LOOSENESS: the Cholesky
    path's 1e-3 holds there), and a small K (below GRAM32_MIN_FLOPS) keeps it too."""
    rng = np.random.default_rng(6)
    for shape, takes in (((2000, 500), True), ((1300, 1050), False), ((300, 100), False)):
        K = rng.standard_normal(shape)
        assert (spectral.gram32(K, float(np.sum(K * K)) * (1 + 1e-12)) is not None) is takes
    q = quantities.operator_quantities(K, K[:, None, :], needed=("normsq",))["normsq"]
    assert "eigvalsh" in q["method"]  # side 100 <= CERTIFY_SIDE: exact, as before


def test_two_operators_of_one_data_matrix_share_its_gram():
    """y_i A x in the lower level and A x - b in the upper are two operators of the same bound
    array A: one Gram matrix serves both (the same certified record), each with its own scale."""
    import sympy as sp

    from codegen import Problem

    L = LOGISTIC
    fit = sp.Sum((sp.Sum(L.A[L.i, L.j] * L.x[L.j], (L.j, 0, L.n - 1)) - L.y[L.i]) ** 2,
                 (L.i, 0, L.m - 1)) / L.m
    prob = Problem(name="shared_gram", x=L.x, theta=L.theta, lower=L.logistic.lower, upper=fit)
    der = derive(prob)
    assert len(der.operators) == 2
    data = L.example_data(0, m=400, n=150, p=10)
    q = compute_data_quantities(der, {"A": data["A"], "y": data["y"]})
    one, two = q["normsq_K1"], q["normsq_K2"]
    assert one["method"] == two["method"] and one["seconds"] == two["seconds"]
    assert one["value"] == two["value"] >= exact_normsq(data["A"])


def test_constants_cost_counts_each_computation_once():
    """`runtime.constants_cost`: the flops of the two Grams, Lanczos and the factorisations at
    logistic 1500 x 160 (validation 400), each operator counted once."""
    from codegen.constants.evaluation import runtime
    from codegen.constants.evaluation.spectral import certificate_flops, gram_flops

    der = derive(LOGISTIC.logistic)
    q = compute_data_quantities(der, LOGISTIC.example_data(0, m=1500, n=160, p=400))
    cost = runtime.constants_cost({"quantities": q})
    tries = [int(q[k]["method"].split(" factorisation")[0].split(", ")[-1])
             for k in ("normsq_K1", "normsq_K2")]
    expect = (gram_flops(1500, 160) + gram_flops(400, 160) + certificate_flops(160, tries[0])
              + certificate_flops(160, tries[1]))
    assert cost["flops"] == expect
    assert 0 < cost["seconds"] <= q["normsq_K1"]["seconds"] + q["normsq_K2"]["seconds"] + 1e-12


def test_tightening_recomputes_only_the_loose_operators(monkeypatch):
    """`runtime.tighten_constants` (first-order step sizes) recomputes by the Gram matrix only the
    operators whose ||K||^2 block sums bounded: here K1 (400 x 30, above the lowered Gram limit),
    not K2 (100 x 30), whose record stays the same object's copy (its time unchanged)."""
    from codegen.constants.evaluation import runtime

    monkeypatch.setattr(spectral, "EIGH_SIDE_LIMIT", 0)
    monkeypatch.setattr(spectral, "GRAM_FLOP_LIMIT", 1e5)  # K1: 3.6e5 flops, K2: 9e4
    der = derive(LOGISTIC.logistic)
    data = LOGISTIC.example_data(0, m=400, n=30, p=100)
    q = compute_data_quantities(der, data)
    assert q["normsq_K1"].get("loose") and not q["normsq_K2"].get("loose")
    prepared = {"kind": "derived", "derivation": der, "data": data, "quantities": q}
    assert runtime.tighten_constants(prepared)
    after = prepared["quantities"]
    assert after["normsq_K2"] is q["normsq_K2"]
    assert "Cholesky" in after["normsq_K1"]["method"] and not after["normsq_K1"].get("loose")
    assert exact_normsq(data["A"]) <= after["normsq_K1"]["value"] < q["normsq_K1"]["value"]
    assert set(after) == set(q)


def test_the_call_that_computes_the_constants_reports_their_cost():
    """A bind's first hypergradient computes its data constants (lazily, at that call) and says
    what they cost in its work, apart from the kernel units; the next call at the same data
    computed none and reports none."""
    import codegen

    module = codegen.load(str(Path(__file__).resolve().parents[1] / "examples" / "logistic.py"))
    prob = module.bind(**LOGISTIC.example_data())
    assert prob.constants_cost() == {"flops": 0, "seconds": 0.0}
    first = prob.hypergradient(0.0, rtol=1e-6)
    spent = prob.constants_cost()
    assert spent["flops"] > 0 and spent["seconds"] > 0
    assert first.work["constants_flops"] == spent["flops"]
    assert first.work["units"] == first.work["lower_grads"] + first.work["hvps"]
    second = prob.hypergradient(0.0, rtol=1e-6)
    assert "constants_flops" not in second.work and second.work["units"] == first.work["units"]
