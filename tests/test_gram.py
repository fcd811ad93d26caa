"""The lower Hessian as a weighted Gram matrix A^T diag(w) A + R (codegen/compiler/gram.py,
codegen/hypergrad/gram.py): which problems have the form, the assembly against the unrolled
SymPy Hessian, the weights and their tangent against closed forms, the meta flag on R, and
the held factor that uses the form."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import sympy as sp

from codegen import Problem
from codegen.compiler.gram import gram_weights
from codegen.compiler.kernels import split_hessian
from codegen.hypergrad.dense import theta_part
from codegen.hypergrad.gram import gram_at, gram_price, weighted_gram
from codegen.hypergrad.held_factor import HeldFactor
from codegen.hypergrad.krylov import cg
from codegen.hypergrad.results import Status
from codegen.pipeline import generate

from oracle import Oracle
from support import EXAMPLES, TINY, built_example

# The examples whose g is a loss through one dense data matrix plus terms with theta that read
# none: CSR data, stencils (TV) and the multi-class loss (a block of c weights per row) have no
# Gram form.
GRAM = {"ridge", "logistic", "quadratic"}


@pytest.mark.parametrize("name", EXAMPLES)
def test_gram_assembly_is_the_hessian(name, build_dir):
    """gram_at's A^T diag(w) A + R is the unrolled SymPy Hessian (rtol 1e-12) and the module's
    own lower_hessian, for 1 and 2 workers, by the product and again from the Gram matrix the
    data constants kept (a least-squares g: ridge, quadratic); None where the module has no Gram
    form."""
    problem, module, ns = built_example(name, build_dir)
    data = ns["example_data"](seed=4, **TINY[name])
    prob = module.bind(**data)
    hessian = gram_at(prob, theta_part(prob))
    assert (hessian is not None) == (name in GRAM), name
    if hessian is None:
        return
    rng = np.random.default_rng(4)
    x, theta = rng.standard_normal(prob.x_size), 0.5 * rng.standard_normal(prob.theta_size)
    want = Oracle(problem, data).hessian(x, theta)
    scale = np.max(np.abs(want))
    matrix = prob.module.meta["gram"]["data"]
    for kept in (False, True):
        # kept for a least-squares g only: logistic's weights vary with x
        assert (prob.data_gram(matrix) is not None) == (kept and name != "logistic"), name
        for workers in (1, 2):
            got, spent = hessian(x, theta, workers)
            # the product's price, or the weights' one pass where the kept A^T A was scaled
            assert spent == (1 if prob.data_gram(matrix) is not None else gram_price(prob.x_size))
            assert got is not None and np.array_equal(got, got.T)
            assert np.max(np.abs(got - want)) <= 1e-12 * scale, name
            assert np.max(np.abs(got - prob.lower_hessian(x, theta))) <= 1e-12 * scale
        prob.constants(theta)  # forms the Gram matrix for lambda_min where mu reads it
    G = prob.data_gram(matrix)
    if G is not None:
        M = data[matrix]
        assert not G.flags.writeable and not np.shares_memory(G, prob.data[matrix])
        assert np.max(np.abs(G - M.T @ M)) <= 1e-13 * np.max(np.abs(M.T @ M))
    # a worker binds unpickled arrays, whose float64 dtype is an equal but distinct object: it
    # keeps the same Gram matrix (the bind's copies carry NumPy's own dtype)
    worker = module.bind(pickle.loads(pickle.dumps(data)))
    worker.constants(theta)
    assert worker.data[matrix].dtype is np.dtype(np.float64)
    assert (worker.data_gram(matrix) is None) == (G is None)
    if G is not None:
        np.testing.assert_array_equal(worker.data_gram(matrix), G)


@pytest.mark.parametrize("name", sorted(GRAM))
def test_weights_tangent_is_their_derivative(name, build_dir):
    """lower_gram_weights_jvp is the derivative of lower_gram_weights along v (central
    differences; 0 for a least-squares g, whose weights do not depend on x)."""
    _, module, ns = built_example(name, build_dir)
    prob = module.bind(**ns["example_data"](seed=5, **TINY[name]))
    rng = np.random.default_rng(5)
    x, v = rng.standard_normal(prob.x_size), rng.standard_normal(prob.x_size)
    theta = rng.standard_normal(prob.theta_size)
    rows = prob.data[module.meta["gram"]["data"]].shape[0]

    def weights(at):
        out = np.empty(rows)
        prob.kernels["lower_gram_weights"]({"x": at, "theta": theta}, out)
        return out
    tangent = np.empty(rows)
    prob.kernels["lower_gram_weights_jvp"]({"x": x, "theta": theta, "v": v}, tangent)
    h = 1e-5
    diff = (weights(x + h * v) - weights(x - h * v)) / (2 * h)
    scale = np.abs(weights(x)).max()
    np.testing.assert_allclose(tangent, diff, rtol=1e-6, atol=1e-9 * scale)
    if module.meta["is_quadratic"]:
        assert not tangent.any()


@pytest.mark.parametrize("name", EXAMPLES)
def test_weights_tangent_exists_where_the_weights_do(name, build_dir):
    _, module, _ = built_example(name, build_dir)
    kernels = {k["name"] for k in module.meta["kernels"]}
    assert ("lower_gram_weights_jvp" in kernels) == ("lower_gram_weights" in kernels)
    assert ("lower_gram_weights" in kernels) == (name in GRAM)


def test_logistic_weights_are_the_closed_form(build_dir):
    """The logistic example's w_i = sigma(y_i a_i . x) sigma(-y_i a_i . x) y_i^2 / m."""
    _, module, ns = built_example("logistic", build_dir)
    data = ns["example_data"](seed=2, m=37, n=5, p=9)
    prob = module.bind(**data)
    x = np.random.default_rng(2).standard_normal(5)
    w = np.empty(37)
    prob.kernels["lower_gram_weights"]({"x": x, "theta": np.zeros(1)}, w)
    t = data["y"] * (data["A"] @ x)
    want = data["y"] ** 2 / (1 + np.exp(-t)) / (1 + np.exp(t)) / 37
    np.testing.assert_allclose(w, want, rtol=1e-13)
    # their tangent along u: d/ds of sigma(t) sigma(-t) is sigma(t) sigma(-t) (1 - 2 sigma(t)) t'
    u = np.random.default_rng(3).standard_normal(5)
    tangent = np.empty(37)
    prob.kernels["lower_gram_weights_jvp"]({"x": x, "theta": np.zeros(1), "v": u}, tangent)
    sig = 1 / (1 + np.exp(-t))
    np.testing.assert_allclose(tangent, want * (1 - 2 * sig) * data["y"] * (data["A"] @ u),
                               rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_weighted_gram_with_signed_weights(workers):
    """A^T diag(w) A for weights of both signs, in three blocks of rows split over workers: to
    rounding, symmetric, and the same bits for every number of workers (the blocks are fixed)."""
    rng = np.random.default_rng(11)
    A, w = rng.standard_normal((150001, 17)), rng.standard_normal(150001)
    want = A.T @ (w[:, None] * A)
    got = weighted_gram(A, w, workers)
    assert np.max(np.abs(got - want)) <= 1e-12 * np.max(np.abs(A.T @ (np.abs(w)[:, None] * A)))
    assert np.array_equal(got, got.T) and np.array_equal(got, weighted_gram(A, w, 1))


m, n = sp.symbols("m n", integer=True, positive=True)
i, j = sp.Idx("i", m), sp.Idx("j", n)
A, B = sp.IndexedBase("A", shape=(m, n)), sp.IndexedBase("B", shape=(m, n))
x, theta = sp.IndexedBase("x", shape=(n,)), sp.IndexedBase("theta", shape=(n,))


def _loss(M):
    return sp.Sum(sp.log(1 + sp.exp(sp.Sum(M[i, j] * x[j], (j, 0, n - 1)))), (i, 0, m - 1))


RIDGE = sp.Sum(sp.exp(theta[j]) * x[j] ** 2, (j, 0, n - 1)) / 2


@pytest.mark.parametrize("g, form", [
    (_loss(A) + RIDGE, True),
    (_loss(A) + _loss(B) + RIDGE, False),  # two data matrices: two gathers
    (_loss(A) + RIDGE + sp.Sum(x[j] ** 2, (j, 0, n - 1)), False),  # R not the theta terms alone
    (sp.Sum(sp.exp(theta[0]) * sp.log(1 + sp.exp(sp.Sum(A[i, j] * x[j], (j, 0, n - 1)))),
            (i, 0, m - 1)) + sp.Sum(x[j] ** 2, (j, 0, n - 1)), False),  # theta in the loss
    (sp.Sum(sp.Sum(A[i, j] * x[j] ** 2, (j, 0, n - 1)) ** 2, (i, 0, m - 1)) + RIDGE, False),
])
def test_which_lower_levels_have_the_gram_form(g, form):
    """One generalised linear loss through one data matrix plus theta terms reading no data
    has the form; a second matrix, a theta-free term outside the loss, theta inside it, or rows
    that are not linear forms of x have not (their held factor assembles from HVPs)."""
    problem = Problem(name="gramform", x=x, theta=theta, lower=g,
                      upper=sp.Sum(x[j] ** 2, (j, 0, n - 1)))
    varying = any(name == "lower_hvp_varying" for name, *_ in split_hessian(problem))
    assert (gram_weights(problem, varying) is not None) == form


@pytest.mark.parametrize("rest, reads_x", [(RIDGE, False), (RIDGE + sp.Sum(
    sp.exp(theta[j]) * x[j] ** 4, (j, 0, n - 1)), True)])
def test_generated_meta_says_whether_the_rest_reads_x(rest, reads_x):
    """The module's meta "gram" says whether R (the theta terms' Hessian) reads x: the
    energy-norm terms (docs/bounds.md 15.9) need it constant in x."""
    problem = Problem(name="gramrest", x=x, theta=theta, lower=_loss(A) + rest,
                      upper=sp.Sum(x[j] ** 2, (j, 0, n - 1)))
    gram = generate(problem, allow_uncertified=True)["meta"]["gram"]
    assert gram["data"] == "A" and gram["rest_reads_x"] is reads_x


def test_held_factor_with_the_gram_product_is_due_at_its_price():
    """With a Gram assembly the held factor is due once the stale steps reach gram_price(n),
    not n; the assembly counts gram_price(n) products and the next solve takes at most 2 steps."""
    n = 120
    rng = np.random.default_rng(12)
    G = rng.standard_normal((400, n))
    H = G.T @ G / 400 + 1e-3 * np.eye(n)
    calls = []

    def gram(x, theta, workers):
        calls.append(workers)
        return H.copy(), gram_price(n)

    factor = HeldFactor(gram=gram)
    assert factor.price(n) == gram_price(n) == 16
    b = rng.standard_normal(n)
    first = factor.solve(lambda v: H @ v, np.zeros(n), np.zeros(1), b, tol=1e-9, max_iter=500)
    assert factor.assemblies == 0 and first.iterations - 1 >= gram_price(n) and factor.due(n)
    out = factor.solve(lambda v: H @ v, np.zeros(n), np.zeros(1), b, tol=1e-9, max_iter=500)
    assert factor.assemblies == 1 and len(calls) == 1 and out.iterations <= 2
    assert out.matvecs == out.iterations + gram_price(n)
    assert out.status is Status.CONVERGED and np.linalg.norm(b - H @ out.x) <= 1e-8
    assert cg(lambda v: H @ v, b, tol=1e-9, max_iter=500).iterations > 10
