"""The hypergradient layer's interface: options validated once, typed results, the solver
registry, the public CG, and lower="auto" / adjoint="auto" (docs/solvers.md 3 and 4).

"auto" is checked two ways on every example problem: it picks what the rule of docs/solvers.md 3
says (the expected pair is written out here, not recomputed by the rule's code), and its result
is certified to the requested accuracy and is the same number as the explicit call with the
chosen solvers.
"""
import dataclasses
import math

import numpy as np
import pytest

from codegen.hypergrad import (
    ADJOINT_SOLVERS,
    LOWER_CHOICES,
    LOWER_SOLVERS,
    AdjointResult,
    HypergradientOptions,
    HypergradientResult,
    LowerResult,
    Reason,
    ReasonKind,
    SolverError,
    Status,
    cg,
    choose_solvers,
    hypergradient,
    hypergradient_samples,
    solve_adjoint,
    solve_lower,
)
from codegen.hypergrad.registry import ADJOINT, LOWER

from conftest import built_example
from quadratic_kernels import Logistic, Ridge

# ----------------------------------------------------------------------------------------------
# options


def test_unknown_option_is_refused_by_name():
    k = Ridge.generate(seed=0)
    with pytest.raises(SolverError, match=r"unknown option 'rho' for the hypergradient"):
        hypergradient(k, np.array([0.0]), rho=0.5)
    with pytest.raises(SolverError, match=r"unknown options 'a', 'b'"):
        HypergradientOptions.make(a=1, b=2)


@pytest.mark.parametrize("keywords, message", [
    (dict(lower="bfgs"), r"unknown lower solver 'bfgs'; choose from \('gd', 'hb', 'fista', "
                         r"'cg', 'newton', 'direct', 'auto'\)"),
    (dict(adjoint="lsqr"), "unknown adjoint solver 'lsqr'"),
    (dict(eps=float("nan")), "eps must be a number"),
    (dict(max_iter=2.5), "max_iter must be a non-negative integer"),
    (dict(refine_iter=-1), "refine_iter must be a non-negative integer"),
    (dict(lower="fista", adjoint="backprop"), "adjoint='backprop' needs lower='gd' or 'hb'"),
    (dict(lower="gd", adjoint="backprop", rtol=1e-6), "adjoint='backprop' has none"),
])
def test_invalid_options_are_refused_before_any_work(keywords, message):
    with pytest.raises(SolverError, match=message):
        HypergradientOptions.make(**keywords)


@pytest.mark.parametrize("keywords", [
    dict(refine_iter=None), dict(max_iter=None), dict(max_iter=-3), dict(eps=-1.0),
    dict(delta=float("nan")), dict(refine_iter=1.5), dict(lower="bfgs"), dict(certificate="exact"),
    dict(lower="fista", adjoint="backprop"),
])
def test_derived_options_refuse_what_the_constructor_refuses(keywords):
    """evolve (the per-call derivation, which checks only the changed fields) raises the
    constructor's own error for every field it changes."""
    with pytest.raises(SolverError) as direct:
        HypergradientOptions(**keywords)
    with pytest.raises(SolverError) as derived:
        HypergradientOptions().evolve(**keywords)
    assert str(derived.value) == str(direct.value)


def test_options_object_and_overrides():
    k = Ridge.generate(seed=0)
    th = np.array([-0.5])
    opts = HypergradientOptions(lower="cg", adjoint="cg", eps=1e-9, delta=1e-9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.eps = 1.0
    a = hypergradient(k, th, opts)
    b = hypergradient(k, th, lower="cg", adjoint="cg", eps=1e-9, delta=1e-9)
    np.testing.assert_array_equal(a.grad, b.grad)
    c = hypergradient(k, th, opts, eps=1e-3)  # an override on top of an options object
    assert c.lower.tol == 1e-3 and c.adjoint.delta == 1e-9
    with pytest.raises(SolverError, match="pass solver names by keyword"):
        hypergradient(k, th, "cg")


# ----------------------------------------------------------------------------------------------
# results


def test_results_are_typed_and_frozen():
    k = Ridge.generate(seed=0)
    hg = hypergradient(k, np.array([-0.5]), lower="cg", adjoint="cg")
    assert hg.status == "ok" and hg.ok and hg.success and hg.reasons == ()
    assert hg.lower.status is Status.CONVERGED and hg.lower.status == "converged"
    assert f"{hg.lower.status}" == "converged" and hg.lower.success and hg.adjoint.success
    assert (hg.lower_solver, hg.adjoint_solver) == ("cg", "cg")
    for result in (hg, hg.lower, hg.adjoint):
        with pytest.raises(dataclasses.FrozenInstanceError):
            result.bound = 0.0


def test_reasons_say_why_and_status_shows_them():
    k = Logistic.generate(seed=0)
    hg = hypergradient(k, np.array([0.0]), lower="fista", adjoint="cg", eps=1e-10, max_iter=3)
    assert not hg.ok and not hg.success and hg.usable  # capped: inaccurate, not a failure
    kinds = [r.kind for r in hg.reasons]
    assert kinds[0] is ReasonKind.LOWER_SOLVE and hg.reasons[0].solver_status is Status.CAPPED
    assert hg.status == "; ".join(r.text for r in hg.reasons)
    assert hg.status.startswith("lower fista capped (G/mu = ")
    assert not any(r.hard for r in hg.reasons)
    assert Reason(ReasonKind.ADJOINT_SOLVE, "x", Status.NOT_SPD).hard


def test_sample_reasons_name_their_samples():
    ks = [Logistic.generate(seed=s) for s in (0, 1)]
    hg = hypergradient_samples(ks, np.array([0.0]), lower="fista", adjoint="cg", eps=1e-10,
                               max_iter=3)
    lower = [r for r in hg.reasons if r.kind is ReasonKind.LOWER_SOLVE]
    assert {r.samples for r in lower} <= {(0,), (1,), (0, 1)}
    assert sorted(s for r in lower for s in r.samples) == [0, 1]
    assert "[sample" in hg.status


# ----------------------------------------------------------------------------------------------
# registry and the public CG


def test_registry_is_the_list_of_solvers():
    assert LOWER_SOLVERS == tuple(LOWER) == ("gd", "hb", "fista", "cg", "newton", "direct")
    assert ADJOINT_SOLVERS == tuple(ADJOINT) == ("cg", "gd", "hb", "direct", "backprop")
    assert LOWER_CHOICES[-1] == "auto"
    assert [n for n, e in LOWER.items() if e.keeps_trajectory] == ["gd", "hb"]
    assert [n for n, e in LOWER.items() if e.needs_quadratic] == ["cg"]
    k = Ridge.generate(seed=0)
    for name in LOWER_SOLVERS:  # every registered solver runs and certifies its tolerance
        low = solve_lower(k, np.array([0.0]), solver=name, tol=1e-8)
        assert low.solver == name and low.success and low.bound <= 1e-8


def test_public_cg():
    rng = np.random.default_rng(0)
    M = rng.standard_normal((30, 30))
    A = M @ M.T + 30 * np.eye(30)
    b = rng.standard_normal(30)
    history = []
    out = cg(lambda v: A @ v, b, tol=1e-10, history=history)
    assert out.status is Status.CONVERGED and out.residual_norm <= 1e-10
    assert np.linalg.norm(A @ out.x - b) <= 1e-9  # recursive and true residual agree here
    assert len(history) == out.iterations == out.matvecs
    warm = cg(lambda v: A @ v, b, out.x, tol=1e-10)
    assert warm.iterations == 0 and warm.matvecs == 1  # one product for the residual of x0
    indefinite = cg(lambda v: -v, b)
    assert indefinite.status is Status.NOT_SPD and indefinite.iterations == 0
    capped = cg(lambda v: A @ v, b, tol=0.0, max_iter=3)
    assert capped.status is Status.CAPPED and capped.iterations == 3


# ----------------------------------------------------------------------------------------------
# "auto"


class _GradientOnly:
    """A kernel without an HVP: only a first-order lower solver can run on it."""

    x_size, is_quadratic = 1000, False

    def lower_grad(self, x, theta):
        return x


def test_auto_rule_on_structure_and_size():
    assert choose_solvers(_GradientOnly(), "auto", "auto") == ("fista", "cg")
    assert choose_solvers(Ridge.generate(seed=0), "auto", "auto") == ("direct", "direct")
    assert choose_solvers(Ridge.generate(seed=0, d=151), "auto", "auto") == ("cg", "cg")
    assert choose_solvers(Ridge.generate(seed=0, d=150), "auto", "auto") == ("direct", "direct")
    assert choose_solvers(Logistic.generate(seed=0, d=16), "auto", "auto") == ("direct",
                                                                                 "direct")
    assert choose_solvers(Logistic.generate(seed=0, d=17), "auto", "auto") == ("newton",
                                                                                 "direct")
    assert choose_solvers(Logistic.generate(seed=0, d=32), "auto", "auto") == ("newton",
                                                                                 "direct")
    assert choose_solvers(Logistic.generate(seed=0, d=33), "auto", "auto") == ("newton", "cg")
    # one side given: the other follows it
    assert choose_solvers(Ridge.generate(seed=0, d=100), "cg", "auto") == ("cg", "cg")
    assert choose_solvers(Ridge.generate(seed=0, d=30), "cg", "auto") == ("cg", "direct")
    assert choose_solvers(Ridge.generate(seed=0), "auto", "backprop") == ("gd", "backprop")


# (example, sizes, theta entries, expected lower, expected adjoint): the rule of
# docs/solvers.md 3, by hand. L/mu = 1 + 4 alpha/nu (tv1d), 1 + 8 alpha/nu (tv2d): 5 and 9 at
# theta = 0.1; tv2d at (log 1, log 0.1): 81. Logistic regression at theta = 0.1: L/mu = 1.6 (dense,
# 233 numbers of data per entry of x: not a cheap kernel) and 1.06 (CSR, 5.3 per entry: cheap).
# The cheap, well-conditioned rows took Newton-CG before L/mu entered the rule; FISTA is faster
# there (docs/solvers.md 3: 0.6-0.9 of Newton-CG's time at these sizes and conditions).
AUTO_CASES = [
    ("ridge", dict(m=40, n=10, p=20), 0.1, "direct", "direct"),     # quadratic, 10 <= 150
    ("ridge", dict(m=400, n=160, p=50), 0.1, "direct", "direct"),   # Gram form, 160 <= 1000
    ("ridge", dict(m=1100, n=1010, p=20), 0.1, "direct", "direct"),  # 1010 > 1000, A^T A kept
    ("ridge", dict(m=300, n=1010, p=20), 0.1, "cg", "cg"),          # wide A: no A^T A formed
    ("quadratic", dict(m1=30, m2=30, d=5, p=3), 0.1, "direct", "direct"),
    ("logistic", dict(m=60, n=12, p=30), 0.1, "direct", "direct"),  # not quadratic, 12 <= 16
    ("logistic", dict(m=120, n=24, p=30), 0.1, "newton", "direct"),  # 16 < 24 <= 32
    ("logistic", dict(m=200, n=80, p=30), 0.1, "newton", "cg"),     # costly kernel
    ("logistic_sparse", dict(m=80, n=300, p=20, density=0.05), 0.1, "fista", "cg"),
    ("tv1d", dict(n=12), 0.1, "direct", "direct"),
    ("tv1d", dict(n=120), 0.1, "fista", "cg"),                      # L/mu = 5
    ("tv1d", dict(n=2100), 0.1, "newton", "cg"),                    # 2100 > FISTA_MAX_SIZE
    ("tv2d", dict(h=6, w=5), 0.1, "fista", "direct"),               # x = 30 <= 32, L/mu = 9
    ("tv2d", dict(h=8, w=8), [0.0, math.log(0.1)], "newton", "cg"),  # L/mu = 81 > 10
    ("hypercleaning", dict(c=3, n=4, m=30, mv=20), -1.0, "direct", "direct"),  # x = 12
]


def _units(work: dict) -> dict:
    """work without the data constants' flops (computed by whichever call reads them first)."""
    return {key: value for key, value in work.items() if key != "constants_flops"}


@pytest.mark.parametrize("name, sizes, theta, lower, adjoint", AUTO_CASES,
                         ids=[f"{c[0]}-{c[3]}-{c[4]}" for c in AUTO_CASES])
def test_auto_picks_the_rule_and_is_certified(build_dir, name, sizes, theta, lower, adjoint):
    _, module, ns = built_example(name, build_dir)
    prob = module.bind(**ns["example_data"](seed=1, **sizes))
    theta = np.broadcast_to(np.asarray(theta, float), (prob.theta_size,)).copy()
    assert choose_solvers(prob, "auto", "auto", theta) == (lower, adjoint)
    hg = prob.hypergradient(theta, rtol=1e-6)  # the defaults: lower="auto", adjoint="auto"
    assert (hg.lower_solver, hg.adjoint_solver) == (lower, adjoint)
    assert (hg.lower.solver, hg.adjoint.solver) == (lower, adjoint)
    assert hg.ok and hg.certified and hg.bound <= 1e-6 * np.linalg.norm(hg.grad)
    # "auto" is the named call (on a fresh bind: a data-only Hessian's factor is kept per bind)
    fresh = module.bind(**ns["example_data"](seed=1, **sizes))
    explicit = fresh.hypergradient(theta, lower=lower, adjoint=adjoint, rtol=1e-6)
    np.testing.assert_array_equal(hg.grad, explicit.grad)
    # the same work, but for the data constants: the fresh bind computes them in its call,
    # `prob` already did in choose_solvers above
    assert hg.bound == explicit.bound and _units(hg.work) == _units(explicit.work)
    # and it agrees with an independent tight solve within the two certified bounds
    other = "cg" if prob.is_quadratic else ("newton" if lower == "fista" else "fista")
    ref = prob.hypergradient(theta, lower=other, adjoint="cg", eps=1e-11, delta=1e-11)
    assert np.linalg.norm(hg.grad - ref.grad) <= hg.bound + ref.bound
    assert math.isfinite(ref.bound)


def test_auto_without_theta_is_the_rule_of_structure_and_size(build_dir):
    """theta=None (solve_lower, solve_adjoint): L/mu is not read, Newton-CG for non-quadratic g."""
    _, module, ns = built_example("tv1d", build_dir)
    prob = module.bind(**ns["example_data"](seed=1, n=120))
    assert choose_solvers(prob, "auto", "auto") == ("newton", "cg")
    theta = np.array([0.1, 0.1])  # L/mu = 5
    assert choose_solvers(prob, "auto", "auto", theta) == ("fista", "cg")
    assert choose_solvers(prob, "auto", "auto", np.array([0.1, 0.1 + math.log(0.4)])) == (
        "newton", "cg")  # L/mu = 1 + 4 / 0.4 = 11 > 10
    assert choose_solvers(prob, "newton", "auto", theta) == ("newton", "cg")
    assert choose_solvers(prob, "auto", "backprop", theta) == ("gd", "backprop")
    assert choose_solvers(_GradientOnly(), "auto", "auto", theta) == ("fista", "cg")


def test_auto_in_solve_lower_and_samples(build_dir):
    _, module, ns = built_example("logistic", build_dir)
    probs = [module.bind(**ns["example_data"](seed=s, m=120, n=24, p=30)) for s in (1, 2)]
    low = solve_lower(probs[0], np.array([0.1]), solver="auto", tol=1e-9)
    assert low.solver == "newton" and low.success
    adj = solve_adjoint(probs[0], low.x, np.array([0.1]), solver="auto", delta=1e-9)
    assert adj.solver == "direct" and adj.success
    hg = hypergradient_samples(probs, np.array([0.1]), rtol=1e-6)
    assert (hg.lower_solver, hg.adjoint_solver) == ("newton", "direct")
    assert [r.solver for r in hg.lower] == ["newton", "newton"] and hg.ok and hg.certified


def test_backprop_with_auto_lower_differentiates_gd():
    k = Ridge.generate(seed=0)
    hg = hypergradient(k, np.array([-0.5]), adjoint="backprop", eps=1e-8)
    assert (hg.lower_solver, hg.adjoint_solver) == ("gd", "backprop")
    assert hg.lower.trajectory is not None and hg.bound == math.inf and not hg.certified
    exact = k.exact_hypergradient(np.array([-0.5]))
    assert np.linalg.norm(hg.grad - exact) <= 1e-6 * np.linalg.norm(exact)


def test_bound_problem_refuses_unknown_options(build_dir):
    _, module, ns = built_example("ridge", build_dir)
    prob = module.bind(**ns["example_data"](seed=1, m=40, n=10, p=20))
    with pytest.raises(SolverError, match="unknown option 'lower_solver'"):
        prob.hypergradient(0.0, lower_solver="cg")
    opts = HypergradientOptions(lower="cg", adjoint="cg", rtol=1e-8)
    hg = prob.hypergradient(0.0, opts)
    assert (hg.lower_solver, hg.adjoint_solver) == ("cg", "cg") and hg.ok


@pytest.mark.parametrize("cls", [LowerResult, AdjointResult, HypergradientResult])
def test_result_init_is_the_dataclass_init(cls):
    """The results' one-step __init__ (results._filled_at_once) takes the fields the dataclass
    declares, in order, with their defaults; a default factory gives each instance its own
    object; the instance stays frozen and pickles."""
    import inspect
    import pickle
    declared = dataclasses.fields(cls)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert [p.name for p in params] == [f.name for f in declared]
    required = {f.name: object() for f in declared
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    a, b = cls(**required), cls(**required)
    for f in declared:
        if f.default is not dataclasses.MISSING:
            assert getattr(a, f.name) is f.default
        elif f.default_factory is not dataclasses.MISSING:
            assert getattr(a, f.name) == f.default_factory()
            if isinstance(getattr(a, f.name), (list, dict, set)):
                assert getattr(a, f.name) is not getattr(b, f.name)
        else:
            assert getattr(a, f.name) is required[f.name]
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(a, declared[0].name, 1)
    with pytest.raises(TypeError):
        cls()
    x = cls(**{k: i for i, k in enumerate(required)})
    assert pickle.dumps(pickle.loads(pickle.dumps(x))) == pickle.dumps(x)  # nan defaults
