"""The per-call paths a small problem's hypergradient spends its time in: the short-vector
finiteness test, options shared between calls, the constants' checks and the kernel calls'
inline argument tests give what the general code gives (docs/solvers.md 4)."""
import math

import numpy as np
import pytest

from codegen.hypergrad import HypergradientOptions, SolverError
from codegen.hypergrad.common import call_kernel, checked_constants, finite

from conftest import built_example


def _vectors():
    rng = np.random.default_rng(0)
    for size in (0, 1, 10, 32, 33, 1000):
        v = rng.standard_normal(size)
        yield v
        for bad in (math.nan, math.inf, -math.inf, 1e300):
            if size:
                w = v.copy()
                w[size // 2] = bad
                yield w
    yield np.full(4, 1e200)           # a sum of squares would overflow: every entry is finite
    yield np.array([[1.0, math.nan], [2.0, 3.0]])
    yield np.ones((3, 3))
    yield np.ones(20)[::2]            # strided
    yield np.ones(5, dtype=np.float32)
    yield np.float64(math.nan)
    yield np.array(math.inf)


@pytest.mark.parametrize("v", list(_vectors()), ids=lambda v: f"{np.shape(v)}")
def test_finite_is_numpys_test_and_raises_no_flag(v):
    with np.errstate(all="raise"):
        assert finite(v) == bool(np.isfinite(v).all())


def test_call_kernel_converts_and_refuses_as_before():
    out, msg = call_kernel(lambda: [1, 2, 3])
    assert out.dtype == np.float64 and np.array_equal(out, [1.0, 2.0, 3.0]) and msg == ""
    out, msg = call_kernel(lambda: np.array([1.0, math.nan]))
    assert out is None and msg == "non-finite kernel output"


def test_made_options_are_shared_but_keep_the_keywords_types():
    a = HypergradientOptions.make(rtol=1e-6)
    assert HypergradientOptions.make(rtol=1e-6) is a and a.rtol == 1e-6
    assert HypergradientOptions.make(rtol=1e-7).rtol == 1e-7
    # 1, 1.0 and True are equal dict keys; the options made from them are not the same
    for value in (1, 1.0, True):
        assert type(HypergradientOptions.make(max_iter=value).max_iter) is type(value)
    for _ in range(2):  # a refused value is refused every time (nan is never a cache hit)
        with pytest.raises(SolverError, match="eps must be a number"):
            HypergradientOptions.make(eps=math.nan)
        with pytest.raises(SolverError, match="eps must be a number"):
            HypergradientOptions.make(eps=[1e-6])  # unhashable: made afresh, then refused


def test_evolved_options_are_shared_per_source_and_keep_the_keywords_types():
    base = HypergradientOptions.make(rtol=1e-6)
    a = base.evolve(eps=1e-9, delta=1e-8, rtol=None, atol=0.0)
    assert base.evolve(eps=1e-9, delta=1e-8, rtol=None, atol=0.0) is a
    assert (a.eps, a.delta, a.rtol, a.atol, a.lower) == (1e-9, 1e-8, None, 0.0, "auto")
    other = HypergradientOptions.make(rtol=1e-5)  # another source: its own derived options
    assert other.evolve(eps=1e-9, delta=1e-8, rtol=None, atol=0.0).rtol is None
    assert other.evolve(eps=1e-9).rtol == 1e-5 and base.evolve(eps=1e-9).rtol == 1e-6
    for value in (1, 1.0, True):
        assert type(base.evolve(refine_iter=value).refine_iter) is type(value)
    for zero in (0.0, -0.0, 0.0):  # equal keys, not equal options: -0.0 prints as "-0"
        assert math.copysign(1.0, base.evolve(eps=zero).eps) == math.copysign(1.0, zero)
        assert math.copysign(1.0, HypergradientOptions.make(atol=zero).atol) == math.copysign(1.0, zero)
    for _ in range(2):  # refused every time: a refused value is never kept
        with pytest.raises(SolverError, match="delta must be a number"):
            base.evolve(delta=-1.0)
        with pytest.raises(SolverError, match="unknown options"):
            base.evolve(tolerance=1e-6)
        with pytest.raises(SolverError, match="needs lower='gd' or 'hb'"):
            base.evolve(rtol=None, lower="direct", adjoint="backprop")
    with pytest.raises(SolverError, match="eps must be a number"):
        base.evolve(eps=[1e-6])  # unhashable: made afresh, then refused


def test_the_first_invalid_field_reported_does_not_depend_on_keyword_order():
    for keywords in (dict(eps=-1.0, lower="bfgs"), dict(lower="bfgs", eps=-1.0)):
        with pytest.raises(SolverError, match="unknown lower solver 'bfgs'"):
            HypergradientOptions.make(**keywords)
        with pytest.raises(SolverError, match="unknown lower solver 'bfgs'"):
            HypergradientOptions().evolve(**keywords)


class _Stated:
    """A kernel whose constants are what the test says."""

    is_quadratic = False

    def __init__(self, raw, upper_depends_on_theta=False):
        self.raw, self.upper_depends_on_theta = raw, upper_depends_on_theta

    def constants(self, theta):
        return self.raw


def test_checked_constants_notes_defaults_and_refusals():
    c = checked_constants(_Stated({"mu": 2.0, "L_B": 1.0}, True), np.zeros(1))
    assert (c["mu"], c["L"], c["L_A"], c["L_B"], c["L_f"], c["L_ft"]) == (
        2.0, math.inf, math.inf, 1.0, math.inf, math.inf)
    assert c["notes"] == ["L missing, taken as inf", "L_A missing, taken as inf",
                          "L_f missing, taken as inf", "L_ft missing, taken as inf"]
    assert not c["certified"] and c["source"] == "unknown"
    with pytest.raises(SolverError, match="negative Lipschitz constant"):
        checked_constants(_Stated({"mu": 1.0, "L": 2.0, "L_ft": -1.0}, True), np.zeros(1))
    with pytest.raises(SolverError, match="constant L_B is NaN"):
        checked_constants(_Stated({"mu": 1.0, "L_B": math.nan}), np.zeros(1))
    with pytest.raises(SolverError, match="inconsistent constants"):
        checked_constants(_Stated({"mu": 2.0, "L": 1.0}), np.zeros(1))


def test_kernel_arguments_other_than_the_solvers_vectors_are_converted(build_dir):
    _, module, ns = built_example("quadratic", build_dir)
    prob = module.bind(**ns["example_data"](0, m1=50, m2=40, d=4, p=3))
    x = np.arange(prob.x_size) / 4.0 - 0.5  # float32 holds these exactly
    th = np.full(prob.theta_size, 0.5)
    g = prob.lower_grad(x, th)
    strided = np.repeat(x, 2)[::2]
    assert not strided.flags.c_contiguous
    for xs, ths in ((strided, th), (x.astype(np.float32), th),
                    (x.tolist(), th.tolist()), (x, np.repeat(th, 2)[::2])):
        np.testing.assert_array_equal(prob.lower_grad(xs, ths), g)
    with pytest.raises(Exception, match="x must have"):
        prob.lower_grad(x[:-1], th)
    with pytest.raises(Exception, match="theta must be"):
        prob.lower_grad(x, th[:-1])
    v = np.ones(prob.x_size)
    np.testing.assert_array_equal(prob.hvp_at(x, th)(v), prob.lower_hvp(x, th, v))
