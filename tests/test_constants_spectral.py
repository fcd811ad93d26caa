"""Data quantities whose cost scales with the data (docs/constants.md 4):
every certified bound on ||K||^2 is >= the exact value (brute force: numpy's SVD at small sizes)
on random and adversarial matrices, the size thresholds switch the method, only the quantities
some constant reads are computed, and the logistic L_A has the data-local form (item 2)."""
from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sps

from codegen.constants import compute_data_quantities, derive, evaluate, format_tree
from codegen.constants.evaluation import quantities, spectral
from codegen.threads import in_threads

_SPEC = importlib.util.spec_from_file_location(
    "example_logistic", Path(__file__).resolve().parents[1] / "examples" / "logistic.py")
LOGISTIC = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(LOGISTIC)  # the example's problem and data generator, reused


def exact_normsq(K) -> float:
    K = K.toarray() if hasattr(K, "toarray") else K
    return float(np.linalg.norm(K, 2) ** 2)


def matrices():
    """(name, K): random, and the adversarial shapes for each method."""
    rng = np.random.default_rng(7)
    out = [("gaussian 60x25", rng.standard_normal((60, 25))),
           ("gaussian wide 12x40", rng.standard_normal((12, 40))),
           ("non-negative 50x30", rng.random((50, 30))),
           ("rank one", np.outer(rng.standard_normal(40), rng.standard_normal(20))),
           ("one entry", np.eye(30, 20) * 0.0 + np.pad([[3.5]], ((0, 29), (0, 19)))),
           ("zero columns", np.hstack([rng.standard_normal((30, 10)), np.zeros((30, 5))]))]
    u, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    v, _ = np.linalg.qr(rng.standard_normal((25, 25)))
    s = np.ones(25)
    s[:3] = [10.0, 10.0 - 1e-9, 10.0 - 2e-9]  # a cluster at the top: Lanczos converges slowly
    out.append(("clustered top", u[:, :25] * s @ v.T))
    s = np.logspace(0, -12, 25)
    out.append(("ill-conditioned", u[:, :25] * s @ v.T))
    out.append(("huge dynamic range", rng.standard_normal((30, 20)) * np.logspace(-150, 150, 20)))
    out.append(("alternating signs", np.array([[(-1.0) ** (i + j) for j in range(20)]
                                               for i in range(35)])))
    return out


@pytest.mark.parametrize("name, K", matrices(), ids=[n for n, _ in matrices()])
def test_every_method_bounds_the_exact_norm(name, K, monkeypatch):
    exact = exact_normsq(K)
    for method, limits in (("eigvalsh", (10**6, 10**6, 1e30)), ("cholesky", (0, 10**6, 1e30)),
                           ("blocks", (0, 0, 0.0))):  # sparse K: the O(nnz) bound instead
        monkeypatch.setattr(spectral, "EIGH_SIDE_LIMIT", limits[0])
        monkeypatch.setattr(spectral, "CHOLESKY_SIDE_LIMIT", limits[1])
        monkeypatch.setattr(spectral, "GRAM_FLOP_LIMIT", limits[2])
        monkeypatch.setattr(spectral, "BLOCK_ROWS", 7)  # several blocks, a ragged last one
        for form in (K, sps.csr_matrix(K)):
            q = quantities.operator_quantities(form, None if hasattr(form, "toarray")
                                               else form[:, None, :], needed=("normsq",))
            assert set(q) == {"normsq"} and q["normsq"]["certified"]
            assert q["normsq"]["value"] >= exact, (name, method, q["normsq"])
            if method == "cholesky" and exact > 0:
                assert "Cholesky" in q["normsq"]["method"] or "eigvalsh" in q["normsq"]["method"]
                assert q["normsq"]["value"] <= exact * 1.01 + 1e-300
            if method == "blocks" and exact > 0:
                sparse = hasattr(form, "toarray")
                assert ("O(nnz)" if sparse else "above the Gram limits") in q["normsq"]["method"]


def test_cholesky_certificate_survives_a_wrong_estimate():
    """The estimate only picks c: far too low (0, half) or exact, the certificate stays valid."""
    rng = np.random.default_rng(1)
    for n in (5, 40, 120):
        K = rng.standard_normal((2 * n, n))
        G = K.T @ K
        lam = float(np.linalg.eigvalsh(G)[-1])
        for estimate in (0.0, lam / 2, lam * (1 - 1e-8), lam, lam * 3):
            found = spectral.cholesky_certificate(G, estimate)
            if found is None:
                assert estimate < lam  # every slack below lambda_max: no certificate, no claim
                continue
            assert found[0] >= lam
        assert spectral.cholesky_certificate(G, 0.0) is None  # c <= 1e-12 scale < lam: refused


def exact_lmin(K) -> float:
    """lambda_min(K^T K) = sigma_min(K)^2 by the SVD of K itself (no Gram rounding)."""
    return float(np.linalg.svd(K, compute_uv=False)[-1] ** 2)


@pytest.mark.parametrize("kind", ["tall", "square", "graded", "rank_deficient"])
def test_cholesky_floor_is_below_lambda_min_whatever_the_estimate(kind):
    """The floor certificate (fl(G - s I) factors => lambda_min(G) >= s - its loss) against the
    SVD of K: never above, for estimates far too high (the Lanczos run on G^-1 then picks the
    shift), exact, or below; within 0.2% where it succeeds from a good estimate; None for a
    singular G. With the Gram margin it bounds lambda_min(K^T K) itself."""
    rng = np.random.default_rng(4)
    n = 150
    K = rng.standard_normal((n + (0 if kind == "square" else 3 * n), n))
    if kind == "graded":
        K *= np.logspace(0, -4, n)
    if kind == "rank_deficient":
        K[:, 1] = K[:, 0]
    G = K.T @ K
    lam = exact_lmin(K)
    margin = spectral.gram_margin(*K.shape, float(np.sum(K * K)))
    for estimate in (lam * 1e3, lam * 1.5, lam * (1 + 1e-6), lam, lam / 2):
        found = spectral.cholesky_floor(G, estimate)
        if kind == "rank_deficient":
            assert found is None  # G is singular: nothing to certify
            continue
        assert found is not None, (kind, estimate)
        floor, tries = found
        assert 0 < floor - margin <= lam and 1 <= tries <= 2 + len(spectral.FLOOR_SLACKS)
        if kind == "tall" and estimate == lam:
            assert floor >= lam * (1 - 2e-3)  # the first slack
    assert spectral.cholesky_floor(G, 0.0) is None


def test_ridge_sized_gram_takes_two_cholesky_certificates_not_eigvalsh():
    """A Gram side above EIGH_SIDE_LIMIT with lambda_min read (ridge's mu): normsq and lmin from
    the Cholesky certificates of c I - G and G - s I, each on its side of the SVD's values and
    within 0.2% of it, and the Gram matrix kept for the direct solvers."""
    rng = np.random.default_rng(5)
    rows, side = 1300, spectral.EIGH_SIDE_LIMIT + 50
    K = rng.standard_normal((rows, side)) * np.linspace(1.0, 2.0, side)
    keep: dict = {}
    out = quantities.operator_quantities(K, K[:, None, :], needed=("normsq", "lmin"), keep=keep)
    singular = np.linalg.svd(K, compute_uv=False)
    assert spectral.method_for(rows, side, want_lmin=True) == "cholesky"
    assert "Cholesky certificate of G - s I" in out["lmin"]["method"]
    assert singular[0] ** 2 <= out["normsq"]["value"] <= singular[0] ** 2 * 1.002
    assert singular[-1] ** 2 * 0.998 <= out["lmin"]["value"] <= singular[-1] ** 2
    assert keep["gram"].shape == (side, side)


def test_lanczos_is_an_estimate_from_below():
    """Why Lanczos / power values never certify: they are below lambda_max."""
    rng = np.random.default_rng(2)
    K = rng.standard_normal((300, 120))
    G = K.T @ K
    lam = float(np.linalg.eigvalsh(G)[-1])
    est = spectral.lanczos_max(G, steps=5)
    assert est <= lam * (1 + 1e-12) and est < lam


def test_collatz_wielandt_is_sharp_on_non_negative_data():
    """|K| = K: the bound tends to ||K||^2 from above (a few power steps)."""
    rng = np.random.default_rng(3)
    K = rng.random((400, 60))
    exact = exact_normsq(K)
    cw, passes = spectral.collatz_wielandt(K)
    assert 1 <= passes <= spectral.CW_STEPS + 1
    assert exact <= cw <= exact * 1.001
    assert cw <= float(np.abs(K).sum(axis=0).max() * np.abs(K).sum(axis=1).max())


def test_method_thresholds():
    assert spectral.method_for(2000, 500) == "eigvalsh"
    assert spectral.method_for(20000, 785) == "eigvalsh"  # hypercleaning: first-order step sizes
    assert spectral.method_for(10**6, 1000) == "blocks"  # 1e12 flops
    assert spectral.method_for(1500, 1200) == "cholesky"
    assert spectral.method_for(20000, 2000) == "blocks"  # a Gram of 8e10 flops: 1-2x the solve
    assert spectral.method_for(20000, 2000, sparse=True) == "nnz"
    assert spectral.method_for(20000, 20000) == "blocks"
    assert spectral.method_for(2000, 20000) == "blocks"  # wide: the Gram side is the row count
    # lambda_min has no cheaper certified lower bound than 0: the Gram is formed up to 1e11
    assert spectral.method_for(20000, 2000, want_lmin=True) == "cholesky"
    assert spectral.method_for(10**6, 1500, want_lmin=True) == "blocks"
    assert spectral.block_rows(20000, 2000) == spectral.block_rows(10**6, 2000) == 32
    assert spectral.block_rows(30, 20) == 20  # never more rows than the short side


def test_only_the_quantities_a_constant_reads_are_computed():
    der = derive(LOGISTIC.logistic)
    data = LOGISTIC.example_data()
    lazy = compute_data_quantities(der, data)
    full = compute_data_quantities(der, data, lazy=False)
    assert "lmin_K1" not in lazy and "lmin_K1" in full  # mu = exp(theta): no lambda_min needed
    for key in ("normsq_K1", "rowmax_K1", "normsq_K2"):
        assert lazy[key]["value"] == full[key]["value"]
    assert evaluate(der, [-1.0], lazy) == evaluate(der, [-1.0], full)
    text = format_tree(der, lazy)  # the audit trail names the method of every quantity
    assert "normsq_K1 = " in text and "eigvalsh of the 10x10 Gram matrix" in text
    assert "lmin_K1 = " not in text and "lmin_K1 = " in format_tree(der, full)


def logistic_hessian(K, x, m):
    z = K @ x
    s = 1 / (1 + np.exp(-z))
    return (K.T * (s * (1 - s))) @ K / m


def test_logistic_L_A_is_the_data_local_form_and_bounds_the_hessian_lipschitz_constant():
    """L_A = (sqrt3/18) ||K||^2 max_i ||k_i|| / m, never the max ||k_i||^3 form,
    and above ||H(x) - H(y)|| / ||x - y|| at sampled pairs (brute force; the regulariser is
    quadratic and adds nothing)."""
    der = derive(LOGISTIC.logistic)
    data = LOGISTIC.example_data()
    c = evaluate(der, [-1.0], compute_data_quantities(der, data))
    K = data["y"][:, None] * data["A"]
    m = K.shape[0]
    rows = np.linalg.norm(K, axis=1)
    local_form = math.sqrt(3) / 18 * exact_normsq(K) * rows.max() / m
    cube_form = math.sqrt(3) / 18 * rows.max() ** 3
    assert local_form <= c["L_A"] <= local_form * (1 + 1e-9)
    assert c["L_A"] < cube_form
    rng = np.random.default_rng(4)
    worst = 0.0
    for _ in range(300):
        x = rng.standard_normal(K.shape[1]) * rng.choice([0.1, 1.0, 3.0])
        h = rng.standard_normal(K.shape[1]) * 10.0 ** rng.uniform(-4, 0)
        diff = np.linalg.norm(logistic_hessian(K, x + h, m) - logistic_hessian(K, x, m), 2)
        worst = max(worst, diff / np.linalg.norm(h))
    assert 0 < worst <= c["L_A"]


def test_cholesky_path_at_its_own_size():
    """No monkeypatching: a Gram side above EIGH_SIDE_LIMIT takes the Cholesky certificate, and
    the certified value is within 1e-3 of the exact one (one or two factorisations)."""
    rng = np.random.default_rng(5)
    K = rng.standard_normal((spectral.EIGH_SIDE_LIMIT + 300, spectral.EIGH_SIDE_LIMIT + 50))
    q = quantities.operator_quantities(K, K[:, None, :], needed=("normsq", "rowmax"))
    exact = float(np.linalg.eigvalsh(K.T @ K)[-1])
    assert "Cholesky certificate" in q["normsq"]["method"]
    assert exact <= q["normsq"]["value"] <= exact * (1 + 1e-3)


@pytest.mark.parametrize("sparse", [False, True])
def test_the_threshold_switches_the_bind_and_every_constant_stays_an_upper_bound(monkeypatch,
                                                                                sparse):
    """The same bind above the Gram limit (GRAM_FLOP_LIMIT = 0): block sums for dense data, the
    O(nnz) bound for sparse; looser, never below."""
    der = derive(LOGISTIC.logistic)
    data = LOGISTIC.example_data()
    if sparse:
        data = {**data, "A": sps.csr_matrix(data["A"]), "Av": sps.csr_matrix(data["Av"])}
    sharp = evaluate(der, [-1.0], compute_data_quantities(der, data))
    monkeypatch.setattr(spectral, "EIGH_SIDE_LIMIT", 0)
    monkeypatch.setattr(spectral, "GRAM_FLOP_LIMIT", 0.0)
    monkeypatch.setattr(spectral, "BLOCK_ROWS", 4)
    q = compute_data_quantities(der, data)
    for key in ("normsq_K1", "normsq_K2"):
        assert ("O(nnz)" if sparse else "blocks of 4 rows") in q[key]["method"], q[key]["method"]
    loose = evaluate(der, [-1.0], q)
    for name in ("L", "L_A", "L_f"):
        assert sharp[name] <= loose[name] <= sharp[name] * (50 if sparse else 4)
    assert loose["mu"] == sharp["mu"] and loose["certified"]


def test_random_matrices_property():
    """Hypothesis-drawn shapes, sparsity, signs and scales: every method bounds ||K||^2."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=60, deadline=None)
    @hypothesis.given(st.integers(1, 30), st.integers(1, 30), st.floats(0.0, 0.9),
                      st.sampled_from([1e-200, 1e-8, 1.0, 1e8, 1e150]), st.booleans(),
                      st.integers(0, 2**32 - 1))
    def check(rows, cols, sparsity, scale, non_negative, seed):
        rng = np.random.default_rng(seed)
        K = rng.standard_normal((rows, cols)) * scale
        K[rng.random((rows, cols)) < sparsity] = 0.0
        if non_negative:
            K = np.abs(K)
        exact = exact_normsq(K)
        G = K.T @ K
        found = spectral.cholesky_certificate(G, spectral.lanczos_max(G))
        if found is not None:
            assert found[0] + spectral.gram_margin(rows, cols, float(np.sum(K * K))) >= exact
        cw, _ = spectral.collatz_wielandt(K)
        assert cw >= exact or not math.isfinite(exact) or exact < 1e-300  # underflow: see below
        fro2 = float(np.sum(K * K)) * (1 + 1e-12)
        block, _, _ = spectral.block_sum_bound(K, fro2, size=int(rng.integers(1, 8)))
        assert block >= exact or not math.isfinite(exact) or exact < 1e-300
        q = quantities.operator_quantities(K, K[:, None, :], needed=("normsq", "rowmax"))
        assert q["normsq"]["value"] >= exact and bool(np.any(K)) == (q["normsq"]["value"] > 0)

    check()


def test_underflowing_entries_never_give_a_zero_bound():
    """Entries ~1e-170: their squares underflow to 0 in float64, yet ||K|| > 0; the bounds stay
    above zero (the K = 0 shortcut tests the entries, not the squared norm)."""
    K = np.full((4, 3), 1e-170)
    q = quantities.operator_quantities(K, K[:, None, :])
    assert q["normsq"]["value"] > 0 and q["rowmax"]["value"] >= np.sqrt(3) * 1e-170
    assert q["lmin"]["value"] == 0.0


def test_blocked_abs_gram_product_equals_the_dense_one(monkeypatch):
    """|K|^T (|K| w) by blocks of rows (a ragged last block too) equals the product with |K|."""
    rng = np.random.default_rng(8)
    K = rng.standard_normal((23, 5))
    w = rng.random(5)
    monkeypatch.setattr(spectral, "CHUNK_ENTRIES", 20)  # 4 rows per block: 23 = 5 * 4 + 3
    got = spectral._abs_gram_product(K)(w)
    np.testing.assert_allclose(got, np.abs(K).T @ (np.abs(K) @ w), rtol=1e-14)
    np.testing.assert_allclose(spectral._abs_gram_product(sps.csr_matrix(K))(w), got, rtol=1e-14)
    assert spectral.collatz_wielandt(K)[0] >= exact_normsq(K)


@pytest.mark.parametrize("name, K", matrices(), ids=[n for n, _ in matrices()])
def test_block_sums_bound_the_exact_norm_at_every_block_size(name, K):
    """sum_b ||K_b||^2 + margin >= ||K||^2 for blocks of 1 row (Frobenius) up to the whole short
    side, tall and wide (blocks of columns), ragged last blocks included; blocks of one row give
    ||K||_F^2, and merging blocks never increases the bound (the triangle inequality)."""
    exact = exact_normsq(K)
    fro2 = float(np.sum(K * K)) * (1 + 1e-12)
    if not math.isfinite(fro2):
        return  # overflowing data: operator_quantities gives infinity before any block
    short = min(K.shape)
    values = []
    for size in (1, 2, 3, 7, short):
        bound, blocks, s = spectral.block_sum_bound(K, fro2, size=size)
        assert s == min(size, short) and blocks == -(-max(K.shape) // s)
        assert bound >= exact, (name, size, bound, exact)
        values.append(bound)
    if exact > 0:
        assert values[0] <= fro2 * (1 + 1e-9)
        assert values[1] <= values[0] * (1 + 1e-9)  # pairs of rows: merged single rows


def test_block_sums_give_the_row_norms_their_bound_and_rowmax_read():
    """On a tall dense K whose ||K||^2 takes block sums, the Grams' diagonals are the squared
    row norms (to a few ulps of exact sums), ||K||_F^2 and rowmax are taken from them and still
    bound the exact values; overflowing squares give no sums, and operator_quantities then
    reports the trivial bounds as before."""
    rng = np.random.default_rng(22)
    K = rng.standard_normal((2 * spectral.CHUNK_ENTRIES // 300 + 37, 300))
    sums = spectral.block_sums(K, size=16, workers=2)
    exact = np.sum(K.astype(np.longdouble) ** 2, axis=1)
    assert sums is not None and sums.diagonal.shape == (K.shape[0],)
    assert np.allclose(sums.diagonal, exact, rtol=300 * 2.0 ** -53, atol=0)
    K = rng.standard_normal((3000, 1200))  # above the Gram limit: block sums
    q = quantities.operator_quantities(K, K[:, None, :], needed=("normsq", "rowmax"), workers=2)
    assert "blocks of 32 rows" in q["normsq"]["method"]
    assert q["normsq"]["value"] >= float(np.linalg.eigvalsh(K.T @ K)[-1])
    top = float(np.sqrt(np.max(np.sum(K.astype(np.longdouble) ** 2, axis=1))))
    assert top <= q["rowmax"]["value"] <= top * (1 + 1e-11)
    huge = np.full((64, 8), 1e200)
    with np.errstate(all="raise"):  # no warning or error of its own: overflow is tested
        assert spectral.block_sums(huge, size=4) is None
    out = quantities.operator_quantities(huge, huge[:, None, :], needed=("normsq", "rowmax"))
    assert out["normsq"]["value"] == math.inf


def test_threads_split_the_gram_work_without_changing_a_bit():
    """Block sums, the float32 Gram and the float64 Gram on 2 or 3 threads (`threads.in_threads`)
    give the very bits of one thread (parts and groups are fixed, summed in order), and the
    float64 Gram by blocks agrees with NumPy's K^T K to rounding; with the data constants of a
    logistic bind whose K1 takes each of the three methods."""
    rng = np.random.default_rng(21)
    K = rng.standard_normal((3 * spectral.GRAM64_ROWS * spectral.GRAM_GROUP_BLOCKS + 77, 40))
    fro2 = float(np.sum(K * K)) * (1 + 1e-12)
    wide = rng.standard_normal((240, 2 * spectral.GRAM32_ROWS * spectral.GRAM_GROUP_BLOCKS + 99))
    fro2_wide = float(np.sum(wide * wide)) * (1 + 1e-12)  # large enough for the float32 Gram
    one = (spectral.block_sum_bound(K, fro2, size=8), spectral.gram32(wide, fro2_wide),
           quantities._gram64(K))
    for workers in (2, 3):
        assert spectral.block_sum_bound(K, fro2, size=8, workers=workers) == one[0]
        G32, add, shift = spectral.gram32(wide, fro2_wide, workers)
        assert np.array_equal(G32, one[1][0]) and (add, shift) == one[1][1:]
        assert np.array_equal(quantities._gram64(K, workers), one[2])
    assert np.allclose(one[2], K.T @ K, rtol=0, atol=1e-12 * fro2)
    der = derive(LOGISTIC.logistic)
    for (m, n), method in zip(((600, 40), (3000, 300), (9000, 1300)),
                              ("eigvalsh", "Cholesky certificate", "blocks of 32 rows")):
        data = LOGISTIC.example_data(0, m=m, n=n, p=50)
        serial = compute_data_quantities(der, data)
        assert method in serial["normsq_K1"]["method"]
        threaded = compute_data_quantities(der, data, workers=2)
        assert {k: q["value"] for k, q in serial.items()} == \
            {k: q["value"] for k, q in threaded.items()}


def test_in_threads_keeps_the_order_and_a_bounded_window():
    """`threads.in_threads` yields fn(item) in the items' order, re-raises an item's error, and
    submits at most workers + 1 items ahead of a slow consumer (pool.map would run them all
    and hold every result: 40 Grams of 32 MB at side 2000)."""
    started: list[int] = []

    def square(item: int) -> int:
        started.append(item)  # list.append is atomic under the GIL
        if item == 7:
            raise ValueError("item 7")
        return item * item

    for workers in (2, 3):
        started.clear()
        out = []
        for consumed, value in enumerate(in_threads(square, range(7), workers), start=1):
            time.sleep(0.002)  # a slow consumer: the threads would run ahead of it
            assert len(started) <= consumed + workers
            out.append(value)
        assert out == [i * i for i in range(7)]
    with pytest.raises(ValueError, match="item 7"):
        list(in_threads(square, range(40), 2))


def test_block_sums_are_exact_for_a_shared_top_direction_and_scale_with_block_size():
    """Rank one, and non-negative data (a dominant mean direction): every block shares K's top
    right singular vector and the sum is within 1.2x of ||K||^2. Isotropic Gaussian data: about
    min(R, D)/s, far below ||K||_F^2 = about min(R, D) ||K||^2 / 1.7."""
    rng = np.random.default_rng(11)
    u, v = rng.standard_normal(900), rng.standard_normal(60)
    for K, most in ((np.outer(u, v), 1 + 1e-9), (rng.random((900, 60)), 1.2)):
        fro2 = float(np.sum(K * K)) * (1 + 1e-12)
        bound, _, _ = spectral.block_sum_bound(K, fro2, size=10)
        assert exact_normsq(K) <= bound <= most * exact_normsq(K)
    K = rng.standard_normal((3000, 200))
    fro2 = float(np.sum(K * K)) * (1 + 1e-12)
    exact = exact_normsq(K)
    for size in (10, 25, 50):
        bound, _, _ = spectral.block_sum_bound(K, fro2, size=size)
        assert exact <= bound <= 1.5 * exact * 200 / size and bound < fro2 / 4


def test_a_row_scale_of_constant_modulus_is_applied_exactly_without_a_copy():
    """lin = y_i Sum(A[i, j] x[j]): labels +-c give K = c diag(+-1) A, whose normsq, lmin and
    rowmax are c^2, c^2 and c times A's (the data are not copied); labels of varying modulus
    are applied to a copy. Both against brute force."""
    der = derive(LOGISTIC.logistic)
    base = LOGISTIC.example_data()
    rng = np.random.default_rng(12)
    for labels in (base["y"] * 3.7, base["y"] * 1e-3, base["y"] * rng.uniform(0.5, 2.0, 200)):
        data = {**base, "y": labels}
        q = compute_data_quantities(der, data, lazy=False)
        K = labels[:, None] * data["A"]
        ev = np.linalg.eigvalsh(K.T @ K)
        assert ev[-1] <= q["normsq_K1"]["value"] <= ev[-1] * (1 + 1e-9)
        assert ev[0] * (1 - 1e-9) <= q["lmin_K1"]["value"] <= ev[0]
        rows = float(np.linalg.norm(K, axis=1).max())
        assert rows <= q["rowmax_K1"]["value"] <= rows * (1 + 1e-9)
        constant = np.all(np.abs(labels) == abs(labels[0]))
        assert ("times the row scale" in q["normsq_K1"]["method"]) == bool(constant)


def test_first_order_solvers_tighten_block_sums_and_newton_does_not(monkeypatch):
    """Block sums shrink a step size 1/L (FISTA: 8x the iterations at 20000 x 2000): a first-order
    lower or adjoint solver asks the bind to recompute ||K||^2 by the Gram matrix once; Newton-CG
    keeps the block sums. Every certified bound holds against a tight solve."""
    import codegen

    monkeypatch.setattr(spectral, "EIGH_SIDE_LIMIT", 0)
    monkeypatch.setattr(spectral, "GRAM_FLOP_LIMIT", 0.0)
    module = codegen.load(str(Path(__file__).resolve().parents[1] / "examples" / "logistic.py"))
    data = LOGISTIC.example_data()
    theta = LOGISTIC.THETA0
    prob = module.bind(**data)
    reference = prob.hypergradient(theta, lower="newton", adjoint="cg", eps=1e-12, delta=1e-12)
    exact = exact_normsq(data["y"][:, None] * data["A"])
    for lower, adjoint, tightened in (("newton", "cg", False), ("fista", "cg", True),
                                      ("newton", "gd", True)):
        prob = module.bind(**data)
        loose = prob.constants(theta)
        hg = prob.hypergradient(theta, lower=lower, adjoint=adjoint, rtol=1e-6)
        after = prob.constants(theta)
        q = prob._prepared_constants()["quantities"]["normsq_K1"]
        assert ("Cholesky certificate" in q["method"]) == tightened, q["method"]
        assert exact <= q["value"] <= (exact * (1 + 1e-3) if tightened else exact * 8)
        assert (after["L"] < loose["L"]) == tightened and after["L"] >= after["mu"]
        assert np.linalg.norm(hg.grad - reference.grad) <= hg.bound + reference.bound
        assert prob.tighten_constants() is not tightened  # once per bind
        assert prob.tighten_constants() is False
