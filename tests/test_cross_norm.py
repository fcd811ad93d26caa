"""BoundProblem.cross_norm_bound: a certified one-pass bound on ||B||_2 for per-sample weights.

(a) hypercleaning (small): bound >= ||B||_2 exactly assembled from p cross JVPs, at random x and
    theta and at the lower solution; bound / ||B||_F is 1 up to the rounding margins;
(b) hypercleaning at m = 2000: the hypergradient needs one cross product (the VJP), no JVPs,
    gives the same gradient, and is faster than the JVP fallback;
(c) ridge (theta a global weight): no structural bound (inf), the hypergradient is unchanged.
"""
import math
import time

import numpy as np

from conftest import built_example

RATIOS = {}


def _exact_B(prob, x, theta):
    p = theta.size
    return np.column_stack([prob.cross_jvp(x, theta, np.eye(p)[i]) for i in range(p)])


def test_bound_holds_and_is_tight_hypercleaning(build_dir):
    _, module, ns = built_example("hypercleaning", build_dir)
    rng = np.random.default_rng(0)
    spec, frob = [], []
    for seed in range(3):
        data = ns["example_data"](seed=seed, c=3, n=5, m=80, mv=20)
        prob = module.bind(**data)
        for trial in range(4):
            theta = 3 * rng.standard_normal(80)
            if trial == 0:
                x = prob.solve_lower(theta, tol=1e-10).x  # well fitted: p_i close to y_i
            else:
                x = (trial * rng.standard_normal(prob.x_size))
            bound = prob.cross_norm_bound(x, theta)
            B = _exact_B(prob, x, theta)
            n2, nf = np.linalg.norm(B, 2), np.linalg.norm(B)
            assert math.isfinite(bound) and bound >= n2 and bound >= nf
            spec.append(bound / n2)
            frob.append(bound / nf)
    RATIOS["bound/||B||_2"] = (min(spec), max(spec))
    RATIOS["bound/||B||_F"] = (min(frob), max(frob))
    print(f"\nbound/||B||_2 in [{min(spec):.3f}, {max(spec):.3f}], "
          f"bound/||B||_F - 1 in [{min(frob) - 1:.2e}, {max(frob) - 1:.2e}]")
    assert max(frob) < 1 + 1e-8


class _NoStructure:
    """The same kernels without cross_norm_bound: the JVP fallback of hypergradient.cross_norm."""

    def __init__(self, prob):
        self._prob = prob

    def __getattr__(self, name):
        if name == "cross_norm_bound":
            raise AttributeError(name)
        return getattr(self._prob, name)


def test_hypergradient_uses_one_cross_product_at_m2000(build_dir):
    from codegen.hypergrad import hypergradient

    _, module, ns = built_example("hypercleaning", build_dir)
    data = ns["example_data"](seed=1, c=10, n=20, m=2000, mv=200)
    prob = module.bind(**data)
    theta = np.random.default_rng(1).standard_normal(2000)
    prob.cross_norm_bound(np.zeros(prob.x_size), theta)  # one-time preparation (per bind)
    t0 = time.perf_counter()
    new = hypergradient(prob, theta, eps=1e-6, delta=1e-6)
    t_new = time.perf_counter() - t0
    t0 = time.perf_counter()
    old = hypergradient(_NoStructure(prob), theta, eps=1e-6, delta=1e-6)
    t_old = time.perf_counter() - t0
    print(f"\nm = 2000: hypergradient {t_old:.3f} s with {old.work['cross']} cross products "
          f"(JVPs), {t_new:.3f} s with {new.work['cross']} (structural bound); "
          f"||B|| {old.norm_B:.6g} vs {new.norm_B:.6g}")
    assert new.work["cross"] == 1 and old.work["cross"] == 2001
    assert new.ok and old.ok
    np.testing.assert_allclose(new.grad, old.grad, rtol=1e-12, atol=0)
    assert old.norm_B <= new.norm_B <= old.norm_B * (1 + 1e-8)
    assert new.bound >= old.bound * (1 - 1e-12)
    assert t_new < t_old / 2


def test_ridge_has_no_structural_bound(build_dir):
    _, module, ns = built_example("ridge", build_dir)
    data = ns["example_data"](seed=0) if "example_data" in ns else None
    prob = module.bind(**data)
    theta = np.array([0.3])
    x = np.random.default_rng(0).standard_normal(prob.x_size)
    assert prob.cross_norm_bound(x, theta) == math.inf
    hg = prob.hypergradient(theta)
    assert hg.work["cross"] == 2  # the VJP and the one JVP (p = 1: exact ||B e_1||)
    assert math.isfinite(hg.norm_B) and hg.ok
