"""Bad input gets a clear error naming the culprit: problem statements, data at bind, vectors."""
import numpy as np
import pytest
import sympy as sp

from codegen import BindError, Problem, ProblemError, sigmoid
from conftest import TINY, built_example

m, n = sp.symbols("m n", integer=True, positive=True)
i, j = sp.Idx("i", m), sp.Idx("j", n)
A, b = sp.IndexedBase("A", shape=(m, n)), sp.IndexedBase("b", shape=(m,))
x = sp.IndexedBase("x", shape=(n,))
th = sp.Symbol("th")
K = sp.Symbol("K", integer=True, positive=True)
Z, ell = sp.IndexedBase("z", shape=(K,)), sp.Idx("l", K)
FIT = sp.Sum((sp.Sum(A[i, j] * x[j], (j, 0, n - 1)) - b[i]) ** 2, (i, 0, m - 1))


def make(**kw):
    args = dict(name="p", x=x, theta=th, lower=FIT + sp.exp(th) * sp.Sum(x[j] ** 2, (j, 0, n - 1)),
                upper=sp.Sum(x[j] ** 2, (j, 0, n - 1)))
    args.update(kw)
    return Problem(**args)


@pytest.mark.parametrize("kw, message", [
    (dict(upper=None), "upper objective is missing"),
    (dict(upper=sp.Matrix([1, 2])), "must be a scalar"),
    (dict(lower=sp.Sum(A[i, j] ** 2, (i, 0, m - 1), (j, 0, n - 1))), "does not depend on x"),
    (dict(lower=FIT + x[j] ** 2), "index j is used outside any sum"),
    (dict(constants={"mu": x[0], "L": 10}), r"constant mu = x\[0\] reads the lower variable x"),
    (dict(upper=sp.Sum(x[j] ** 2, (j, 0, n - 1)) + sp.I * th), r"the term I\*th holds I, which has no "
     "real value"),
    (dict(lower=FIT + sp.exp(th) * sp.Sum(x[j] ** 2, (j, 0, n - 1)) + sp.zoo * th),
     r"the term zoo\*th holds zoo"),
    (dict(lower=FIT + sp.Symbol("c") * sp.Sum(x[j], (j, 0, n - 1))
          + sp.sqrt(sp.Symbol("c", positive=True) ** 2) * sp.Sum(x[j] ** 2, (j, 0, n - 1))),
     "two different SymPy symbols are named 'c', one declared with no assumptions and one with "
     "positive=True"),
    # a data array named like theta (its label was renamed with theta: 'theta[0]' is not a C
    # identifier) or like another array of another shape (an index error about the wrong one)
    (dict(lower=FIT + sp.exp(th) * sp.Sum(sp.IndexedBase("th", shape=(n,))[j] * x[j] ** 2,
                                          (j, 0, n - 1))),
     "the lower objective: the name 'th' is used for theta and for the data array th; rename one"),
    (dict(upper=sp.Sum(sp.IndexedBase("b", shape=(n,))[j] * x[j], (j, 0, n - 1))),
     r"two different IndexedBases are named 'b', with shapes \(m,\) and \(n,\)"),
    (dict(upper=sp.Sum(sp.IndexedBase("x", shape=(m,))[i] ** 2, (i, 0, m - 1))),
     r"two different IndexedBases are named 'x' \(one of them x\), with shapes \(n,\) and \(m,\)"),
    (dict(lower=FIT + sp.exp(th) * sp.Sum(x[j] ** 2, (j, 0, n - 1)) + th * sp.Sum(x[2 * j], (j, 0, (n - 1) / 2))),
     "the sum over j has the upper limit n/2 - 1/2, which is not an integer for every size"),
    (dict(lower=FIT + sp.Sum((x[j + 1] - x[j]) ** 2, (j, 0, n - 1))), "can leave x"),
    (dict(lower=FIT + sp.Sum(x[j - 1] ** 2, (j, 0, n - 1))), "can be negative"),
    (dict(lower=FIT + sp.Sum(x[j * j] ** 2, (j, 0, n - 1))), "not affine"),
    (dict(lower=FIT + sp.besselj(0, x[0])), "besselj"),
    (dict(lower=FIT + sp.Sum(b[j] * x[j], (j, 0, n - 1))), "can leave b"),
    (dict(name="for"), "keyword"),
    (dict(lower=FIT + sp.Sum(sp.IndexedBase("s0", shape=(n,))[j] * x[j], (j, 0, n - 1))),
     "'s0' is reserved"),
    (dict(lower=FIT + sp.Sum(x[sp.Idx("b", n)] ** 2, (sp.Idx("b", n), 0, n - 1))),
     "index b has the name of an array"),
    (dict(theta=sp.Integer(3)), "hyperparameter theta must be"),
    (dict(x=Z, lower=FIT + sp.Sum(Z[ell] ** 2, (ell, 0, K - 1))), "size K .* can never be bound"),
    # SymPy simplifies with a declared fact (sqrt(u**2) is u for a positive u): x and theta range
    # over all reals, and a data fact bind cannot check on floats is refused
    (dict(x=sp.IndexedBase("x", shape=(n,), positive=True)),
     "lower variable x x declares nonnegative=True, nonzero=True, positive=True"),
    (dict(theta=sp.Symbol("th", nonnegative=True)),
     "hyperparameter theta th declares nonnegative=True"),
    (dict(lower=FIT + sp.Symbol("p", irrational=True) * sp.Sum(x[j] ** 2, (j, 0, n - 1))),
     "data symbol p declares irrational=True.*: bind can check only positive, negative"),
])
def test_problem_errors_name_the_culprit(kw, message):
    with pytest.raises(ProblemError, match=message):
        make(**kw)


def test_valid_variants_construct():
    """Vector theta, 2-D x, shifted stencils, scalar-symbol x: the language is general."""
    w = sp.IndexedBase("w", shape=(m,))
    make(theta=w, lower=sp.Sum(sigmoid(w[i]) * (sp.Sum(A[i, j] * x[j], (j, 0, n - 1)) - b[i]) ** 2,
                               (i, 0, m - 1)) + sp.Sum(x[j] ** 2, (j, 0, n - 1)))
    make(lower=FIT + sp.Sum(sp.sqrt((x[j + 1] - x[j]) ** 2 + 1), (j, 0, n - 2)))
    a, c = sp.symbols("a c")
    lam = sp.Symbol("lam")
    Problem(name="tiny", x=[a, c], theta=th, lower=(a - lam) ** 2 + sp.exp(th) * c ** 2,
            upper=(a + c) ** 2)


def test_bind_errors(build_dir):
    _, module, ns = built_example("ridge", build_dir)
    good = ns["example_data"](seed=0, m=4, n=3, p=2)  # the messages below quote these sizes
    cases = [
        ({k: v for k, v in good.items() if k != "b"}, "missing data for ridge: b"),
        (dict(good, extra=np.ones(3)), "unknown data extra"),
        (dict(good, b=np.ones(7)), "inconsistent size m: A \\(axis 0\\) gives 4 but b \\(axis 0\\) gives 7"),
        (dict(good, A=np.ones((4, 5))), "inconsistent size n"),
        (dict(good, A=np.ones(12)), "A must have 2 dimension"),
        (dict(good, b=np.array([1.0, np.nan, 0, 0])), r"b contains a non-finite value \(nan\) at index \(1,\)"),
        (dict(good, b=np.ones(4, dtype=complex)), "expected real numbers"),
        (dict(good, b=np.array(["a"] * 4)), "expected real numbers"),
    ]
    for data, message in cases:
        with pytest.raises(BindError, match=message):
            module.bind(**data)
    # finite entries whose sum overflows (bind's quick test) are accepted, the inf among them named
    huge = dict(good, b=np.full(4, 1e308))
    assert module.bind(**huge).data["b"][0] == 1e308
    with pytest.raises(BindError, match=r"b contains a non-finite value \(-inf\) at index \(2,\)"):
        module.bind(**dict(good, b=np.array([1e308, 1e308, -np.inf, 0.0])))
    # float32 and integer data widen exactly instead of being reinterpreted
    p32 = module.bind(**dict(good, A=good["A"].astype(np.float32)))
    p64 = module.bind(**dict(good, A=good["A"].astype(np.float32).astype(np.float64)))
    x = np.ones(3)
    assert p32.lower_value(x, 0.1) == p64.lower_value(x, 0.1)
    # a non-contiguous view is copied, not misread
    wide = np.asfortranarray(good["A"])
    assert module.bind(**dict(good, A=wide)).lower_value(x, 0.1) == module.bind(**good).lower_value(x, 0.1)


def test_declared_facts_are_checked_at_bind(build_dir):
    """nu declared positive: SymPy folds sqrt(nu**2) to nu, so for nu < 0 (the same problem
    without the declaration) L came out -39 and L_3 -2.4e4, both certified. bind refuses a
    value against a declared fact, naming it; nonnegative data may hold zeros, a sparse
    positive matrix may not (its implicit zeros are values)."""
    import scipy.sparse as sps

    from codegen.pipeline import build_problem

    nu = sp.Symbol("nu", positive=True)
    w = sp.IndexedBase("w", shape=(n,), nonnegative=True)
    P = sp.IndexedBase("P", shape=(m, n), positive=True)
    lower = (sp.Sum(sp.exp(th) * sp.sqrt(x[j] ** 2 + nu ** 2), (j, 0, n - 1))
             + sp.Sum(sp.Sum(P[i, j] * x[j], (j, 0, n - 1)) ** 2, (i, 0, m - 1)) + sp.sqrt(nu ** 2)
             * sp.Sum(x[j] ** 2, (j, 0, n - 1)))
    problem = Problem(name="facts", x=x, theta=th, lower=lower, sparse="P",
                      upper=sp.Sum(w[j] * (x[j] - 1) ** 2, (j, 0, n - 1)))
    assert [(a.name, a.facts) for a in problem.data_specs] == [
        ("P", ("positive",)), ("nu", ("positive",)), ("w", ("nonnegative",))]
    module = build_problem(problem, build_dir)
    good = dict(nu=0.1, w=np.array([0.0, 1.0, 2.0]), P=sps.csr_array(np.full((2, 3), 0.5)))
    prob = module.bind(**good)
    assert prob.constants(0.0)["L"] > 0
    cases = [
        (dict(good, nu=-0.1), r"nu is declared positive=True in the problem, so every value must "
                              r"be > 0, but nu = -0.1"),
        (dict(good, w=np.array([0.0, -2.0, 1.0])), r"w is declared nonnegative=True .* but w\[1\] = -2.0"),
        (dict(good, P=sps.csr_array(np.array([[0.5, 0.0, 1.0], [1.0, 1.0, 1.0]]))),
         "P is declared positive=True .* but its implicit zeros are not"),
        (dict(good, P=sps.csr_array(np.array([[0.5, 2.0, 1.0], [1.0, 1.0, -1.0]]))),
         r"P is declared positive=True .* but P\[1, 2\] = -1.0"),
    ]
    for data, message in cases:
        with pytest.raises(BindError, match=message):
            module.bind(**data)


def test_argument_checks_of_the_constants(build_dir):
    """A non-finite theta, a radius that is negative or NaN, and options of the wrong type are
    refused by name (they were accepted: constants certified at theta = nan, a local bound on a
    ball of radius -1, a raw TypeError for rtol="1e-6")."""
    from codegen.hypergrad import SolverError

    _, module, ns = built_example("ridge", build_dir)
    prob = module.bind(**ns["example_data"](seed=0, **TINY["ridge"]))
    with pytest.raises(BindError, match=r"theta\[0\] = nan: theta must be finite"):
        prob.constants(np.nan)
    for radius in (-1.0, np.nan):
        with pytest.raises(BindError, match="the ball's radius must be a number >= 0"):
            prob.local_constants(np.zeros(3), 0.0, radius)
    with pytest.raises(SolverError, match="rtol must be a number or None, got '1e-6'"):
        prob.hypergradient(0.0, rtol="1e-6")
    with pytest.raises(SolverError, match="components must be True, False or None, got 'yes'"):
        prob.hypergradient(0.0, rtol=1e-6, components="yes")


def test_vector_argument_errors(build_dir):
    _, module, ns = built_example("ridge", build_dir)
    prob = module.bind(**ns["example_data"](seed=0, **TINY["ridge"]))
    with pytest.raises(BindError, match="x must have 3 entries"):
        prob.lower_grad(np.ones(4), 0.0)
    with pytest.raises(BindError, match="theta must be a float or a 1-D array of 1"):
        prob.lower_grad(np.ones(3), [0.0, 1.0])
    with pytest.raises(BindError, match="v must have 3 entries"):
        prob.lower_hvp(np.ones(3), 0.0, np.ones(2))
    with pytest.raises(BindError, match="x: expected real numbers"):
        prob.lower_grad(np.ones(3, dtype=complex), 0.0)
    assert np.all(np.isnan(prob.lower_grad(np.full(3, np.nan), 0.0)))  # no crash, NaN out


def test_bind_samples(build_dir):
    _, module, ns = built_example("ridge", build_dir)
    samples = [ns["example_data"](seed=s, **TINY["ridge"]) for s in range(3)]
    bound = module.bind_samples(samples)
    assert len(bound) == 3
    # the kernels, sample by sample: x (and v, q) one vector per sample, theta shared
    one = [module.bind(**d) for d in samples]
    rng = np.random.default_rng(1)
    xs, vs = rng.standard_normal((3, 3)), [rng.standard_normal(3) for _ in range(3)]
    t = np.ones(1)
    for name, args in (("lower_value", ()), ("lower_grad", ()), ("upper_value", ()),
                       ("upper_grad", ()), ("lower_hessian", ()), ("lower_hvp", (vs,)),
                       ("cross_vjp", (vs,)), ("cross_jvp", (t,))):
        got = getattr(bound, name)(xs, 0.3, *args)
        want = [getattr(p, name)(xs[s], 0.3, *[a if a is t else a[s] for a in args])
                for s, p in enumerate(one)]
        assert len(got) == 3 and all(np.array_equal(g, w) for g, w in zip(got, want)), name
    with pytest.raises(BindError, match=r"lower_grad over 3 samples takes x as one vector per "
                                        r"sample \(a list of 3\), got ndarray of length 3"):
        bound.lower_grad(np.ones(3), 0.3)
    with pytest.raises(BindError, match=r"lower_hvp over 3 samples takes v as one vector per"):
        bound.lower_hvp(xs, 0.3, vs[:2])
    bad = samples[:2] + [dict(samples[2], b=np.ones(9))]
    with pytest.raises(BindError, match="sample 2: inconsistent size m"):
        module.bind_samples(bad)


def test_bind_samples_refuses_theta_sizes_that_differ(build_dir):
    """Hypercleaning's theta has one weight per training row (shape (m,)): samples with 12 and
    10 rows were bound, and every call then failed with contradictory sizes."""
    _, module, ns = built_example("hypercleaning", build_dir)
    samples = [ns["example_data"](seed=s, c=3, n=4, m=rows, mv=10) for s, rows in ((0, 12), (1, 10))]
    with pytest.raises(BindError, match=r"sample 1: theta has 10 entries, sample 0's has 12; the "
                                        r"samples share one theta, so the sizes in its shape \(m\) "
                                        r"must agree: m = 10 \(sample 0: 12\)"):
        module.bind_samples(samples)


def test_threads_sharing_a_bound_problem_get_right_answers(build_dir):
    """Kernels release the GIL and share the work buffer: calls must not interleave."""
    from concurrent.futures import ThreadPoolExecutor

    _, module, ns = built_example("logistic", build_dir)
    prob = module.bind(**ns["example_data"](seed=0, m=3000, n=50, p=10))
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(50) for _ in range(8)]
    expected = [prob.lower_grad(x, 0.1) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            got = list(pool.map(lambda x: prob.lower_grad(x, 0.1), xs))
            for g, e in zip(got, expected):
                np.testing.assert_array_equal(g, e)


def test_bind_keeps_a_private_copy(build_dir):
    """Changing the caller's arrays after bind changes nothing: kernels and the constants derived
    at bind time keep describing the same data."""
    _, module, ns = built_example("ridge", build_dir)
    data = ns["example_data"](seed=0, **TINY["ridge"])
    prob = module.bind(**data)
    x = np.ones(3)
    before = prob.lower_grad(x, 0.0)
    data["A"] *= 100.0
    np.testing.assert_array_equal(prob.lower_grad(x, 0.0), before)


def test_a_sparse_matrix_for_dense_data_names_the_cause(build_dir):
    """ridge declares A dense: a CSR A said only "expected real numbers (float64), got dtype
    object"."""
    import scipy.sparse as sparse

    _, module, ns = built_example("ridge", build_dir)
    data = ns["example_data"](seed=0, **TINY["ridge"])
    with pytest.raises(BindError, match=r"A: a scipy.sparse matrix where the problem expects a "
                                        r"dense array; declare it sparse in the Problem "
                                        r"\(sparse=\(\"A\",\)\) or pass A.toarray\(\)"):
        module.bind(**dict(data, A=sparse.csr_matrix(data["A"])))


@pytest.mark.parametrize("name", ["hypercleaning", "logistic"])
def test_hvp_at_keeps_its_point_when_the_caller_reuses_buffers(name, build_dir):
    """hvp_at(x, theta) kept references to the caller's arrays while hypercleaning's prepared
    HVP cached temporaries at their values: after the caller overwrote x in place, products
    were the Hessian at neither point (0.17 off). Both pathways now hold copies."""
    _, module, ns = built_example(name, build_dir)
    prob = module.bind(**ns["example_data"](seed=0, **TINY[name]))
    rng = np.random.default_rng(3)
    x, theta, v = (rng.standard_normal(prob.x_size), np.full(prob.theta_size, 0.2),
                   rng.standard_normal(prob.x_size))
    want = prob.lower_hvp(x.copy(), theta.copy(), v)
    hvp = prob.hvp_at(x, theta)
    pair = prob.hvp_pair_at(x, theta)
    x += 1.0
    theta -= 1.0
    np.testing.assert_allclose(hvp(v), want, rtol=1e-12, atol=1e-14)
    if pair is not None:
        np.testing.assert_allclose(pair(v, v)[0], want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("certificate", ["er", "tight"])
def test_a_result_keeps_the_theta_it_was_computed_at(certificate, build_dir):
    """A result's theta was the caller's own float64 array: reused, the result reported a theta
    it was never computed at."""
    _, module, ns = built_example("ridge", build_dir)
    prob = module.bind(**ns["example_data"](seed=0, **TINY["ridge"]))
    theta = np.array([0.3])
    hg = prob.hypergradient(theta, rtol=1e-6, certificate=certificate)
    theta[0] = 5.0
    assert hg.theta is not None and hg.theta[0] == 0.3


def test_a_masked_array_with_masked_entries_is_refused(build_dir):
    """np.asarray drops a mask: a masked-out outlier was computed with, silently."""
    _, module, ns = built_example("ridge", build_dir)
    data = ns["example_data"](seed=0, **TINY["ridge"])
    b = np.ma.masked_array(data["b"].copy(), mask=np.zeros(data["b"].size, bool))
    prob = module.bind(**dict(data, b=b))  # nothing masked: the values themselves
    assert np.array_equal(prob.data["b"], data["b"])
    b.mask[0] = True
    with pytest.raises(BindError, match=r"b is a masked array with 1 masked entries; the kernels "
                                        r"read every entry"):
        module.bind(**dict(data, b=b))


@pytest.mark.parametrize("name", ["M_PI", "EOF", "INT64_MAX", "CHAR_BIT", "EDOM", "Py_None"])
def test_names_the_c_headers_may_define_are_refused(name):
    """A data symbol named like a macro of the headers the module is compiled with passed every
    name check and ended in a C compiler dump."""
    c = sp.Symbol(name)
    with pytest.raises(ProblemError, match=f"symbol name '{name}' may be a macro of the headers"):
        make(lower=FIT + sp.exp(th) * sp.Sum(x[j] ** 2, (j, 0, n - 1)) + c * th * sp.Sum(x[j], (j, 0, n - 1)))


def test_data_named_data_or_self_bind_as_keywords(tmp_path):
    """bind(self, data=None, **arrays): arrays named data or self could not be passed."""
    from codegen.pipeline import build_problem

    data, me = sp.IndexedBase("data", shape=(n,)), sp.IndexedBase("self", shape=(n,))
    problem = make(name="named_data",
                   lower=sp.Sum((x[j] - data[j]) ** 2 + sp.exp(th) * x[j] ** 2, (j, 0, n - 1)),
                   upper=sp.Sum((x[j] - me[j]) ** 2, (j, 0, n - 1)))
    module = build_problem(problem, tmp_path)
    prob = module.bind(data=np.ones(4), self=np.zeros(4))
    assert prob.lower_value(np.ones(4), 0.0) == pytest.approx(4.0)
    assert module.bind({"data": np.ones(4), "self": np.zeros(4)}).x_size == 4


def test_unreadable_data_and_samples_are_named(build_dir):
    """A ragged list, a list of lists and an array of dicts ended in raw NumPy and Python errors."""
    _, module, ns = built_example("ridge", build_dir)
    data = ns["example_data"](seed=0, **TINY["ridge"])
    ragged = [list(row) for row in data["A"]]
    ragged[0] = ragged[0][:-1]
    with pytest.raises(BindError, match=r"A: cannot be read as an array of numbers"):
        module.bind(**dict(data, A=ragged))
    with pytest.raises(BindError, match=r"sample 0 is a list"):
        module.bind_samples([list(data.values())])
    with pytest.raises(BindError, match=r"a non-empty list of dicts of arrays, got ndarray"):
        module.bind_samples(np.array([data, data]))
