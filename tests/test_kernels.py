"""Every generated kernel of every example against independent references.

- the unrolled SymPy oracle (tests/oracle.py) at tiny sizes, rtol 1e-12;
- Taylor remainders: first order shrinks like h^2, second order like h^3 (in x and in theta);
- symmetry of the HVP and transposition of the cross products.
"""
import numpy as np
import pytest

from oracle import Oracle
from support import EXAMPLES, TINY, built_example

KERNELS = ["lower_value", "lower_grad", "lower_hvp", "cross_vjp", "cross_jvp", "upper_value",
           "upper_grad", "upper_theta_grad"]


def _setup(name, build_dir, seed=0):
    problem, module, ns = built_example(name, build_dir)
    data = ns["example_data"](seed=seed, **TINY[name])
    prob = module.bind(**data)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(prob.x_size)
    theta = 0.5 * rng.standard_normal(prob.theta_size)
    return problem, prob, data, rng, x, theta


def _args(kernel, prob, rng, x, theta):
    extra = {"lower_hvp": prob.x_size, "cross_vjp": prob.x_size, "cross_jvp": prob.theta_size}
    if kernel in extra:
        return (x, theta, rng.standard_normal(extra[kernel]))
    return (x, theta)


@pytest.mark.parametrize("name", EXAMPLES)
def test_kernels_match_unrolled_sympy(name, build_dir):
    problem, prob, data, rng, x, theta = _setup(name, build_dir)
    oracle = Oracle(problem, {k: v.toarray() if hasattr(v, "toarray") else v for k, v in data.items()})
    for kernel in KERNELS:
        args = _args(kernel, prob, rng, x, theta)
        got = np.atleast_1d(getattr(prob, kernel)(*args))
        want = np.atleast_1d(np.asarray(getattr(oracle, kernel)(*args), dtype=float))
        scale = max(np.max(np.abs(want)), 1e-300)
        err = np.max(np.abs(got - want)) / scale
        assert err <= 1e-12, f"{name}.{kernel}: relative error {err:.2e}"
    # the prepared HVP (lower_hvp_prepare once, lower_hvp_apply per v), for several v at one x
    hvp = prob.hvp_at(x, theta)
    for _ in range(2):
        v = rng.standard_normal(prob.x_size)
        want = np.asarray(oracle.lower_hvp(x, theta, v), dtype=float)
        err = np.max(np.abs(hvp(v) - want)) / max(np.max(np.abs(want)), 1e-300)
        assert err <= 1e-12, f"{name}.hvp_at: relative error {err:.2e}"


# The examples whose HVP makes a pass over a dense data matrix: they have lower_hvp_pair (two
# products in one pass); stencils (two calls cost what one does) and prepared HVPs have none.
PAIRED = {"ridge", "logistic", "quadratic"}


@pytest.mark.parametrize("name", EXAMPLES)
def test_lower_hvp_pair_matches_two_hvps_and_the_oracle(name, build_dir):
    """lower_hvp_pair's rows are (d2g/dx2) v and (d2g/dx2) w: against the unrolled SymPy HVP
    (rtol 1e-12) and the module's own lower_hvp; `hvp_pair_at` is None where there is none."""
    problem, prob, data, rng, x, theta = _setup(name, build_dir, seed=7)
    pair = prob.hvp_pair_at(x, theta)
    assert (pair is not None) == (name in PAIRED), name
    if pair is None:
        return
    oracle = Oracle(problem, data)
    v, w = rng.standard_normal(prob.x_size), rng.standard_normal(prob.x_size)
    got = pair(v, w)
    assert got.shape == (2, prob.x_size)
    for row, direction in zip(got, (v, w)):
        want = np.asarray(oracle.lower_hvp(x, theta, direction), dtype=float)
        scale = max(np.max(np.abs(want)), 1e-300)
        assert np.max(np.abs(row - want)) / scale <= 1e-12, name
        np.testing.assert_allclose(row, prob.lower_hvp(x, theta, direction), rtol=0,
                                   atol=1e-13 * scale)


# The examples whose HVP has heavy x-only temporaries (z = A x through CSR; the logits of a
# multi-class loss, a matrix product), so a prepared HVP; dense logistic's z = A x rides along
# with A v in one row sweep, and quadratic or stencil lower levels have none.
PREPARED = {"logistic_sparse", "hypercleaning"}


@pytest.mark.parametrize("name", EXAMPLES)
def test_prepared_hvp_kernels_exist_where_they_save_work(name, build_dir):
    _, module, _ = built_example(name, build_dir)
    kernels = {k["name"] for k in module.meta["kernels"]}
    prepared = {"lower_hvp_prepare", "lower_hvp_apply"} <= kernels
    assert prepared == (name in PREPARED), kernels
    assert bool(module.meta["hvp_cache"]) == prepared


def _slopes(remainder, hs):
    r = np.array([remainder(h) for h in hs])
    return np.diff(np.log(r)) / np.diff(np.log(hs)), r


@pytest.mark.parametrize("name", EXAMPLES)
def test_taylor_in_x(name, build_dir):
    """|g(x+hd) - g(x) - h<grad,d>| ~ h^2; minus h^2/2 <d, A d> it is ~ h^3."""
    _, prob, _, rng, x, theta = _setup(name, build_dir, seed=1)
    d = rng.standard_normal(prob.x_size)
    g0, grad, Ad = prob.lower_value(x, theta), prob.lower_grad(x, theta), prob.lower_hvp(x, theta, d)
    hs = np.array([1e-1, 5e-2, 2.5e-2, 1.25e-2])
    first, _ = _slopes(lambda h: abs(prob.lower_value(x + h * d, theta) - g0 - h * grad @ d), hs)
    second, r2 = _slopes(lambda h: abs(prob.lower_value(x + h * d, theta) - g0 - h * grad @ d
                                       - h * h / 2 * d @ Ad), hs)
    assert np.all(np.abs(first - 2) < 0.1), f"{name}: first-order slopes {first}"
    if np.max(r2) > 1e-11:  # quadratic objectives have a zero (round-off) second remainder
        assert np.all(second > 2.8), f"{name}: second-order slopes {second}"


@pytest.mark.parametrize("name", EXAMPLES)
def test_cross_terms_taylor_in_theta(name, build_dir):
    """grad_x g(x, theta + h t) - grad_x g(x, theta) - h B t shrinks like h^2."""
    _, prob, _, rng, x, theta = _setup(name, build_dir, seed=2)
    t = rng.standard_normal(prob.theta_size)
    g0, Bt = prob.lower_grad(x, theta), prob.cross_jvp(x, theta, t)
    hs = np.array([2e-2, 1e-2, 5e-3, 2.5e-3])
    rem = lambda h: np.linalg.norm(prob.lower_grad(x, theta + h * t) - g0 - h * Bt)  # noqa: E731
    slopes, r = _slopes(rem, hs)
    if np.max(r) > 1e-12:  # zero for problems whose gradient is linear in theta
        assert np.all(np.abs(slopes - 2) < 0.15), f"{name}: slopes {slopes}"


@pytest.mark.parametrize("name", EXAMPLES)
def test_hvp_symmetric_and_cross_products_transpose(name, build_dir):
    _, prob, _, rng, x, theta = _setup(name, build_dir, seed=3)
    u, v, q = (rng.standard_normal(prob.x_size) for _ in range(3))
    t = rng.standard_normal(prob.theta_size)
    assert np.isclose(u @ prob.lower_hvp(x, theta, v), v @ prob.lower_hvp(x, theta, u),
                      rtol=1e-12, atol=1e-14)
    assert np.isclose(q @ prob.cross_jvp(x, theta, t), t @ prob.cross_vjp(x, theta, q),
                      rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", EXAMPLES)
def test_cross_vjp_matches_finite_differences_in_theta(name, build_dir):
    """B^T q = d/dtheta <grad_x g(x, theta), q>, by central differences per theta entry."""
    _, prob, _, rng, x, theta = _setup(name, build_dir, seed=4)
    q = rng.standard_normal(prob.x_size)
    h = 1e-6
    fd = np.array([(prob.lower_grad(x, theta + h * e) - prob.lower_grad(x, theta - h * e)) @ q / (2 * h)
                   for e in np.eye(prob.theta_size)])
    np.testing.assert_allclose(prob.cross_vjp(x, theta, q), fd, rtol=1e-6, atol=1e-8)


def test_upper_grad_matches_finite_differences(build_dir):
    _, prob, _, rng, x, theta = _setup("tv1d", build_dir, seed=5)
    d = rng.standard_normal(prob.x_size)
    h = 1e-6
    fd = (prob.upper_value(x + h * d, theta) - prob.upper_value(x - h * d, theta)) / (2 * h)
    assert np.isclose(prob.upper_grad(x, theta) @ d, fd, rtol=1e-7)


def test_logistic_is_stable_at_extreme_margins(build_dir):
    """softplus/sigmoid never overflow: margins of +-800 give finite values and derivatives."""
    problem, module, ns = built_example("logistic", build_dir)
    data = ns["example_data"](seed=0, **TINY["logistic"])
    prob = module.bind(**data)
    x = np.full(prob.x_size, 400.0)
    for kernel in ("lower_value", "lower_grad"):
        assert np.all(np.isfinite(getattr(prob, kernel)(x, np.array([0.0]))))
    assert np.all(np.isfinite(prob.lower_hvp(x, np.array([0.0]), np.ones(prob.x_size))))


def test_scalar_symbol_problem_matches_oracle(build_dir):
    """x and theta as lists of plain Symbols, scalar data, no sums at all."""
    import sympy as sp

    from codegen import Problem
    from codegen.pipeline import build_problem

    a, c, t1, t2, lam = sp.symbols("a c t1 t2 lam")
    problem = Problem(name="scalars", x=[a, c], theta=[t1, t2],
                      lower=(a - lam) ** 2 + sp.exp(t1) * c ** 2 + sp.cosh(a * c) + t2 * a * c / 4,
                      upper=(a + c - 1) ** 2 + sp.sin(t2) * a, regulariser=t1 ** 2)
    prob = build_problem(problem, build_dir, allow_uncertified=True).bind(lam=0.3)
    oracle = Oracle(problem, {"lam": 0.3})
    rng = np.random.default_rng(7)
    x, theta = rng.standard_normal(2), rng.standard_normal(2)
    for kernel in KERNELS:
        args = _args(kernel, prob, rng, x, theta)
        np.testing.assert_allclose(np.atleast_1d(getattr(prob, kernel)(*args)),
                                   np.atleast_1d(np.asarray(getattr(oracle, kernel)(*args), float)),
                                   rtol=1e-12, atol=1e-14, err_msg=kernel)


def test_vectorised_paths_match_numpy_at_medium_size(build_dir):
    """Sizes large enough for the simd main loops (tiny oracle sizes mostly run remainders)."""
    _, module, ns = built_example("logistic", build_dir)
    data = ns["example_data"](seed=3, m=203, n=37, p=11)
    prob = module.bind(**data)
    A, y = data["A"], data["y"]
    rng = np.random.default_rng(0)
    x, v, theta = rng.standard_normal(37) * 0.1, rng.standard_normal(37), np.array([-1.3])
    z = y * (A @ x)
    s = 1 / (1 + np.exp(z))  # sigmoid(-z)
    m = A.shape[0]
    grad = -A.T @ (y * s) / m + np.exp(theta[0]) * x
    hvp = A.T @ (s * (1 - s) * (A @ v)) / m + np.exp(theta[0]) * v
    np.testing.assert_allclose(prob.lower_grad(x, theta), grad, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(prob.lower_hvp(x, theta, v), hvp, rtol=1e-12, atol=1e-14)


def test_sparse_csr_kernels_match_oracle(build_dir):
    """Contractions over a CSR matrix visit its non-zeros and agree with the dense oracle."""
    import scipy.sparse as sps

    problem, module, ns = built_example("logistic_sparse", build_dir)
    data = ns["example_data"](seed=2, m=6, n=5, p=3, density=0.4)
    dense = {k: (v.toarray() if hasattr(v, "toarray") else v) for k, v in data.items()}
    prob = module.bind(**data)
    assert module.bind(**dense).lower_value(np.ones(5), 0.1) == prob.lower_value(np.ones(5), 0.1)
    oracle = Oracle(problem, dense)
    rng = np.random.default_rng(0)
    x, theta = rng.standard_normal(5), np.array([0.2])
    for kernel in KERNELS:
        args = _args(kernel, prob, rng, x, theta)
        np.testing.assert_allclose(np.atleast_1d(getattr(prob, kernel)(*args)),
                                   np.atleast_1d(np.asarray(getattr(oracle, kernel)(*args), float)),
                                   rtol=1e-12, atol=1e-14, err_msg=kernel)
    bad = sps.csr_array((np.ones(2), np.array([0, 9]), np.array([0, 1, 2, 2, 2, 2, 2])), shape=(6, 5))
    with pytest.raises(Exception, match="A"):
        module.bind(**dict(data, A=bad))


def test_sparse_use_that_needs_zeros_is_refused():
    import sympy as sp

    from codegen import Problem, ProblemError
    from codegen.compiler.emit.render import render_module
    from codegen.compiler.kernels import kernel_specs

    m, n = sp.symbols("m n", integer=True, positive=True)
    i, j = sp.Idx("i", m), sp.Idx("j", n)
    A, x = sp.IndexedBase("A", shape=(m, n)), sp.IndexedBase("x", shape=(n,))
    th = sp.Symbol("th")
    problem = Problem(name="dense_use", x=x, theta=th, sparse=("A",),
                      lower=sp.Sum((A[i, j] - x[j]) ** 2, (i, 0, m - 1), (j, 0, n - 1)),
                      upper=sp.Sum(x[j], (j, 0, n - 1)))
    with pytest.raises(ProblemError, match="does not vanish where A"):
        render_module(problem, kernel_specs(problem))


def test_parallel_outer_loops_match_numpy(build_dir):
    """Above the OpenMP threshold the row loop runs on all cores, reducing into x_bar."""
    _, module, ns = built_example("logistic", build_dir)
    data = ns["example_data"](seed=4, m=3001, n=97, p=11)
    assert data["A"].size > 200000  # the generated `if` clause sends this size parallel
    prob = module.bind(**data)
    A, y = data["A"], data["y"]
    rng = np.random.default_rng(1)
    x, v, theta = rng.standard_normal(97) * 0.1, rng.standard_normal(97), np.array([-0.7])
    s = 1 / (1 + np.exp(y * (A @ x)))
    m = A.shape[0]
    grad = -A.T @ (y * s) / m + np.exp(theta[0]) * x
    hvp = A.T @ (s * (1 - s) * (A @ v)) / m + np.exp(theta[0]) * v
    np.testing.assert_allclose(prob.lower_grad(x, theta), grad, rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(prob.lower_hvp(x, theta, v), hvp, rtol=1e-11, atol=1e-14)


# The unrolled third derivative has x_size^3 entries: tv2d (30 entries) and hypercleaning's
# softmax are checked by finite differences of lower_hvp and by symmetry only.
THIRD_SLOW = {"tv2d", "hypercleaning"}


@pytest.mark.parametrize("name", EXAMPLES)
def test_lower_tvp_matches_oracle_finite_differences_and_symmetry(name, build_dir):
    """lower_tvp(x, theta, v, w) = grad_x (v^T A(x) w): against the unrolled SymPy third
    derivative (rtol 1e-12), central differences of lower_hvp along each direction, and the
    symmetry of the third derivative (swapping v, w; pairing with a third vector)."""
    problem, prob, data, rng, x, theta = _setup(name, build_dir, seed=6)
    v, w, z = (rng.standard_normal(prob.x_size) for _ in range(3))
    got = prob.lower_tvp(x, theta, v, w)
    if name not in THIRD_SLOW:
        oracle = Oracle(problem, {k: a.toarray() if hasattr(a, "toarray") else a
                                  for k, a in data.items()})
        want = oracle.lower_tvp(x, theta, v, w)
        scale = max(np.max(np.abs(want)), 1e-300)
        if np.max(np.abs(want)) == 0:  # quadratic lower level: the third derivative is 0
            assert np.all(got == 0), f"{name}: {got}"
        else:
            err = np.max(np.abs(got - want)) / scale
            assert err <= 1e-12, f"{name}.lower_tvp: relative error {err:.2e}"
    scale = max(np.max(np.abs(got)), 1.0)
    np.testing.assert_allclose(prob.lower_tvp(x, theta, w, v), got, rtol=1e-12, atol=1e-14 * scale)
    # z . T[v, w] = v . T[z, w] = d/ds v^T A(x + s z) w
    h = 1e-5
    fd = v @ (prob.lower_hvp(x + h * z, theta, w) - prob.lower_hvp(x - h * z, theta, w)) / (2 * h)
    assert np.isclose(z @ got, fd, rtol=1e-6, atol=1e-7 * scale), (z @ got, fd)
    assert np.isclose(z @ got, v @ prob.lower_tvp(x, theta, z, w), rtol=1e-11,
                      atol=1e-13 * scale)


def _cross_hvp(prob, x, theta, t, w):
    """cross_hvp through the bound problem's method, or its kernel directly while the runtime
    has no method for it (same vector names as lower_tvp: t like theta, hg_w like x)."""
    if hasattr(prob, "cross_hvp"):
        return prob.cross_hvp(x, theta, t, w)
    out = np.empty(prob.x_size)
    prob.kernels["cross_hvp"]({prob.x_name: np.asarray(x, dtype=np.float64),
                               prob.theta_name: np.asarray(theta, dtype=np.float64),
                               "t": np.atleast_1d(np.asarray(t, dtype=np.float64)),
                               "hg_w": np.asarray(w, dtype=np.float64)}, out)
    return out


@pytest.mark.parametrize("name", EXAMPLES)
def test_cross_hvp_and_cross_tvp_match_oracle_and_finite_differences(name, build_dir):
    """The cross derivative once more in x, two ways (one unrolled oracle for both):
    cross_hvp(x, theta, t, w) = grad_x (w^T B(x) t) = d/ds B(x + s w) t against the unrolled SymPy
    B differentiated once more in x (rtol 1e-12), central differences of cross_jvp along w, and
    the symmetry of D_t(x) = d(B t)/dx (z . D_t w = w . D_t z); cross_tvp(x, theta, q, w) =
    d/ds B(x + s w)^T q against the same oracle, central differences of cross_vjp, and
    u . cross_tvp(q, w) = q . cross_hvp(u, w)."""
    problem, prob, data, rng, x, theta = _setup(name, build_dir, seed=7)
    t = rng.standard_normal(prob.theta_size)
    w, z, q = (rng.standard_normal(prob.x_size) for _ in range(3))
    got = _cross_hvp(prob, x, theta, t, w)
    got_t = prob.cross_tvp(x, theta, q, w)
    assert got_t.shape == (prob.theta_size,)
    if name != "tv2d":  # 30 x 30 x theta entries unrolled: differences and symmetry only
        oracle = Oracle(problem, {k: a.toarray() if hasattr(a, "toarray") else a
                                  for k, a in data.items()})
        for kernel, value, want in (("cross_hvp", got, oracle.cross_hvp(x, theta, t, w)),
                                    ("cross_tvp", got_t, oracle.cross_tvp(x, theta, q, w))):
            if np.max(np.abs(want)) == 0:  # B does not read x (theta only in x-free terms)
                assert np.all(value == 0), f"{name}.{kernel}: {value}"
            else:
                err = np.max(np.abs(value - want)) / np.max(np.abs(want))
                assert err <= 1e-12, f"{name}.{kernel}: relative error {err:.2e}"
    scale = max(np.max(np.abs(got)), 1.0)
    h = 1e-5
    fd = (prob.cross_jvp(x + h * w, theta, t) - prob.cross_jvp(x - h * w, theta, t)) / (2 * h)
    np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-7 * scale)
    assert np.isclose(z @ got, w @ _cross_hvp(prob, x, theta, t, z), rtol=1e-11,
                      atol=1e-13 * scale)
    # linear in t: the cross product with t and with -2 t
    np.testing.assert_allclose(_cross_hvp(prob, x, theta, -2 * t, w), -2 * got, rtol=1e-12,
                               atol=1e-14 * scale)
    scale_t = max(np.max(np.abs(got_t)), 1.0)
    fd_t = (prob.cross_vjp(x + h * w, theta, q) - prob.cross_vjp(x - h * w, theta, q)) / (2 * h)
    np.testing.assert_allclose(got_t, fd_t, rtol=1e-6, atol=1e-7 * scale_t)
    assert np.isclose(t @ got_t, q @ _cross_hvp(prob, x, theta, t, w), rtol=1e-11,
                      atol=1e-13 * scale_t * np.linalg.norm(t) * np.linalg.norm(q))


# The examples whose g splits into theta-free terms with a Hessian fixed by the data and terms
# with theta (codegen/compiler/kernels.py split_hessian): ridge's ||A x - b||^2 / 2, TV's and
# the filters' fidelity ||x - y||^2 / 2, hypercleaning's ridge on the weights. Logistic losses
# (an x-dependent Hessian) have only the theta terms' part, e^theta ||x||^2 / 2, which reads no
# data matrix; the paper quadratic (theta in its only term) has none.
SPLIT = {"ridge", "tv1d", "tv2d", "hypercleaning"}
THETA_TERMS_ONLY = {"logistic", "logistic_sparse"}


class _Terms:
    """`problem` with g replaced by some of its terms, for the oracle."""

    def __init__(self, problem, g):
        self._problem, self.g = problem, g

    def __getattr__(self, name):
        return getattr(self._problem, name)


def _dense(prob, kernel, x, theta):
    out = np.empty(prob.x_size * prob.x_size)
    prob.kernels[kernel]({prob.x_name: x, prob.theta_name: theta}, out)
    return out.reshape(prob.x_size, prob.x_size).T  # column c is the kernel on e_c


@pytest.mark.parametrize("name", EXAMPLES)
def test_split_hessian_matches_unrolled_sympy(name, build_dir):
    """lower_hessian_fixed / _varying are the Hessians of g's terms without / with theta (the
    unrolled SymPy oracle of each part, rtol 1e-12), the fixed one the same at any x and theta,
    and both only where the theta-free terms' Hessian reads neither x nor theta; where it reads
    x, the varying one alone when it reads no data matrix."""
    import sympy as sp

    problem, prob, data, rng, x, theta = _setup(name, build_dir, seed=6)
    assert ("lower_hessian_fixed" in prob.kernels) == (name in SPLIT)
    assert ("lower_hessian_varying" in prob.kernels) == (name in SPLIT | THETA_TERMS_ONLY)
    if name not in SPLIT | THETA_TERMS_ONLY:
        return
    data = {k: v.toarray() if hasattr(v, "toarray") else v for k, v in data.items()}
    th = problem.theta_spec.name
    terms = sp.Add.make_args(problem.g)
    with_theta = [t for t in terms if any(str(a.base.label) == th for a in t.atoms(sp.Indexed))]
    fixed = Oracle(_Terms(problem, sp.Add(*[t for t in terms if t not in with_theta])), data)
    varying = Oracle(_Terms(problem, sp.Add(*with_theta)), data)
    parts = (("fixed", fixed), ("varying", varying)) if name in SPLIT else (("varying", varying),)
    for part, oracle in parts:
        got, want = _dense(prob, f"lower_hessian_{part}", x, theta), oracle.hessian(x, theta)
        err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-300)
        assert err <= 1e-12, f"{name}.lower_hessian_{part}: relative error {err:.2e}"
    if name not in SPLIT:
        return
    x2, theta2 = rng.standard_normal(prob.x_size), theta + 1.0
    np.testing.assert_array_equal(_dense(prob, "lower_hessian_fixed", x2, theta2),
                                  _dense(prob, "lower_hessian_fixed", x, theta))
