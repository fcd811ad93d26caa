"""The solver loops fused in C (codegen/hypergrad/fused.py, templates/solver_loops.c.j2) against
the Python loops they replace (docs/solvers.md 5).

record=True keeps the Python loop (it needs per-iteration data), record=False takes the fused one
on these small problems, so the two paths run on one bound problem:
* fused_cg against krylov.cg: converged, capped, min_iter and diverged alike;
* lower cg / fista / gd / hb and adjoint cg: the same status and iteration count (within 1), points
  within the sum of their certified bounds, and each bound >= the true error against a solve to
  rounding; capped, diverged and non-finite runs stop alike;
* Newton-CG's directions through the fused CG against FUSED_MAX_SIZE = 0: the same steps;
* the whole Newton-CG solve in one call (loop_newton) against the Python loop: the same status,
  message and work when converged, capped, at the rounding floor and from a non-finite start;
* the hypergradient with rtol: the same solvers and rounds, certified bounds that hold against a
  reference at eps = delta = 1e-13;
* AddressSanitizer + UBSan: a C driver runs every loop of three examples (one with a prepared HVP,
  one with scalar data) on exactly sized buffers (data, vectors, control, info and work_size).
"""

import numpy as np
import pytest
import sympy as sp

from codegen import Problem
from codegen.hypergrad import fused as fused_module
from codegen.hypergrad import solve_adjoint, solve_lower
from codegen.hypergrad.common import LowerTask, checked_constants, hvp_at
from codegen.hypergrad.fused import FUSED_MAX_SIZE, fused_cg, loops_for
from codegen.hypergrad.krylov import cg
from codegen.hypergrad.lower import gradient
from codegen.pipeline import build_problem

from support import built_example, load_example
from support.sanitized import generated_texts, run_sanitized_driver

SMALL = {"ridge": dict(m=60, n=20, p=15), "logistic": dict(m=80, n=20, p=30)}


def bound_problem(name, build_dir):
    _, module, ns = built_example(name, build_dir)
    prob = module.bind(**ns["example_data"](**SMALL[name]))
    return prob, np.atleast_1d(np.float64(ns["THETA0"]))


def exact_solution(prob, th):
    """x* to rounding: Newton with the dense Hessian, polished until the gradient stalls."""
    x = solve_lower(prob, th, solver="direct", tol=1e-14).x
    for _ in range(3):
        x = x - np.linalg.solve(prob.lower_hessian(x, th), prob.lower_grad(x, th))
    return x


@pytest.mark.parametrize("name", sorted(SMALL))
def test_the_small_examples_have_fused_loops(name, build_dir):
    prob, _ = bound_problem(name, build_dir)
    assert prob.x_size <= FUSED_MAX_SIZE
    assert loops_for(prob) is not None


@pytest.mark.parametrize("name,solver", [("ridge", "cg"), ("ridge", "fista"), ("ridge", "gd"),
                                         ("ridge", "hb"), ("logistic", "fista"),
                                         ("logistic", "gd")])
def test_fused_lower_solvers_match_the_python_loops(name, solver, build_dir):
    prob, th = bound_problem(name, build_dir)
    x_star = exact_solution(prob, th)
    tol = 1e-9
    fused = solve_lower(prob, th, solver=solver, tol=tol)
    python = solve_lower(prob, th, solver=solver, tol=tol, record=True)
    assert fused.status == python.status == "converged"
    assert abs(fused.iterations - python.iterations) <= 1
    assert (fused.n_grad, fused.n_hvp) == (python.n_grad, python.n_hvp) or \
        abs(fused.iterations - python.iterations) == 1
    assert np.linalg.norm(fused.x - python.x) <= fused.bound + python.bound
    for res in (fused, python):
        assert res.bound <= tol
        assert np.linalg.norm(res.x - x_star) <= res.bound * (1 + 1e-6) + 1e-13
        np.testing.assert_allclose(res.grad, prob.lower_grad(res.x, th), rtol=0, atol=1e-14)
    assert fused.apriori == pytest.approx(python.apriori, rel=1e-6)
    assert fused.history is None and python.history is not None


@pytest.mark.parametrize("name", sorted(SMALL))
def test_fused_adjoint_cg_matches_the_python_loop(name, build_dir):
    prob, th = bound_problem(name, build_dir)
    x = exact_solution(prob, th)
    b = prob.upper_grad(x, th)
    q_star = np.linalg.solve(prob.lower_hessian(x, th), b)
    for q0 in (None, 0.5 * q_star):
        fused = solve_adjoint(prob, x, th, solver="cg", delta=1e-10, q0=q0)
        python = solve_adjoint(prob, x, th, solver="cg", delta=1e-10, q0=q0, record=True)
        assert fused.status == python.status == "converged"
        assert abs(fused.iterations - python.iterations) <= 1
        assert fused.segments == python.segments
        for res in (fused, python):
            assert res.residual <= 1e-10
            true = np.linalg.norm(prob.lower_hvp(x, th, res.q) - b)
            assert true == pytest.approx(res.residual, rel=1e-6, abs=1e-15)
            assert np.linalg.norm(res.q - q_star) <= res.bound * (1 + 1e-6) + 1e-13
        assert np.linalg.norm(fused.q - python.q) <= fused.bound + python.bound


def test_newton_directions_through_the_fused_cg(build_dir, monkeypatch):
    """Newton-CG's inner CG (fused.cg_at) takes the fused loop; FUSED_MAX_SIZE = 0 gives the
    Python loop: the same Newton steps and work, points within their bounds."""
    prob, th = bound_problem("logistic", build_dir)
    x_star = exact_solution(prob, th)
    fused = solve_lower(prob, th, solver="newton", tol=1e-10)
    monkeypatch.setattr(fused_module, "FUSED_MAX_SIZE", 0)
    assert loops_for(prob) is None
    python = solve_lower(prob, th, solver="newton", tol=1e-10)
    assert fused.status == python.status == "converged"
    assert fused.iterations == python.iterations
    assert abs(fused.n_hvp - python.n_hvp) <= 1
    for res in (fused, python):
        assert np.linalg.norm(res.x - x_star) <= res.bound * (1 + 1e-6) + 1e-13
    assert np.linalg.norm(fused.x - python.x) <= fused.bound + python.bound


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("case", ["converged", "capped", "capped later", "rounding floor",
                                  "non-finite"])
def test_fused_newton_stops_as_the_python_loop(name, case, build_dir):
    """loop_newton (record=False) against newton_descent with the fused CG's directions
    (record=True): the same status and message, the same steps and work (within one step at a
    rounding tie), points within their certified bounds of each other and of x*."""
    prob, th = bound_problem(name, build_dir)
    assert "loop_newton" in loops_for(prob).functions
    kw = {"converged": dict(tol=1e-10), "capped": dict(tol=1e-14, max_iter=12),
          "capped later": dict(tol=0.0, max_iter=30), "rounding floor": dict(tol=0.0),
          "non-finite": dict(x0=np.full(prob.x_size, 1e308))}[case]
    fused = solve_lower(prob, th, solver="newton", **kw)
    python = solve_lower(prob, th, solver="newton", record=True, **kw)
    assert fused.status == python.status
    assert fused.status == {"converged": "converged", "capped": "capped",
                            "capped later": "capped", "rounding floor": "rounding floor",
                            "non-finite": "non-finite"}[case]
    if case == "non-finite":
        assert fused.grad is None and python.grad is None and fused.message == python.message
        assert (fused.iterations, fused.n_grad) == (python.iterations, python.n_grad) == (0, 1)
        return
    assert fused.history is None and python.history is not None
    assert abs(fused.iterations - python.iterations) <= 1
    if fused.iterations == python.iterations:
        assert (fused.n_grad, fused.n_hvp) == (python.n_grad, python.n_hvp)
        assert fused.message.split(" = ")[0] == python.message.split(" = ")[0]
    np.testing.assert_allclose(fused.grad, prob.lower_grad(fused.x, th), rtol=0, atol=1e-14)
    assert np.linalg.norm(fused.x - python.x) <= fused.bound + python.bound + 1e-14
    x_star = exact_solution(prob, th)
    assert np.linalg.norm(fused.x - x_star) <= fused.bound * (1 + 1e-6) + 1e-13
    assert fused.apriori == fused.initial_bound == pytest.approx(python.apriori, rel=1e-12)


def test_loops_of_a_problem_without_sizes(build_dir):
    """x and theta as plain Symbols and scalar data: the loops take no size and one double
    (stated constants: the Hessian [[2, 1/2], [1/2, 2 e^t]] has eigenvalues
    1 + e^t -+ sqrt((1 - e^t)^2 + 1/4), within [2 min(1, e^t) - 1/2, 2 max(1, e^t) + 1/2]; the
    stated mu = min(1, e^t) / 2 holds for e^t >= 1/3, as at t = 0.2 here)."""
    a, c, t, lam = sp.symbols("a c t lam")
    problem = Problem(name="fused_scalars", x=[a, c], theta=[t],
                      lower=(a - lam) ** 2 + sp.exp(t) * c ** 2 + a * c / 2,
                      upper=(a + c - 1) ** 2,
                      constants={"mu": sp.Min(1, sp.exp(t)) / 2, "L": 3 + 2 * sp.exp(t)})
    prob = build_problem(problem, build_dir, allow_uncertified=True).bind(lam=0.3)
    th = np.array([0.2])
    assert loops_for(prob) is not None
    for solver in ("fista", "gd"):
        fused = solve_lower(prob, th, solver=solver, tol=1e-12)
        python = solve_lower(prob, th, solver=solver, tol=1e-12, record=True)
        assert fused.status == python.status == "converged"
        assert fused.iterations == python.iterations
        np.testing.assert_allclose(fused.x, python.x, rtol=0, atol=fused.bound + python.bound)
    hg = prob.hypergradient(th, lower="fista", adjoint="cg", eps=1e-12, delta=1e-12)
    ref = prob.hypergradient(th, lower="direct", adjoint="direct", eps=1e-13, delta=1e-13)
    assert np.linalg.norm(hg.grad - ref.grad) <= hg.bound + ref.bound


def test_fused_cg_stops_as_krylov_cg(build_dir):
    """fused_cg against krylov.cg on one system: converged, capped, min_iter, diverged."""
    prob, th = bound_problem("logistic", build_dir)
    x = exact_solution(prob, th)
    b = prob.upper_grad(x, th)
    loops = loops_for(prob)
    hvp = hvp_at(prob, x, th)
    cases = [dict(tol=1e-9), dict(tol=1e-14, max_iter=5), dict(tol=1e3, min_iter=3),
             dict(tol=1e-9, diverge_from=1e-30)]
    for kw in cases:
        fused, python = fused_cg(loops, x, th, b, **kw), cg(hvp, b, **kw)
        assert fused.status == python.status, kw
        assert abs(fused.iterations - python.iterations) <= 1, kw
        assert fused.matvecs - fused.iterations == python.matvecs - python.iterations, kw
        assert fused.message == python.message, kw
        if fused.iterations == python.iterations:
            assert np.linalg.norm(fused.x - python.x) <= 1e-10 * (1 + np.linalg.norm(python.x))
    assert [fused_cg(loops, x, th, b, **kw).status for kw in cases] == [
        "converged", "capped", "converged", "diverged"]
    assert fused_cg(loops, x, th, b, tol=1e3, min_iter=3).iterations == 3


def test_fused_cg_near_overflow_takes_the_entrywise_finiteness_test(build_dir):
    """loop_cg skips its entrywise finiteness test while max |u| + |alpha| max |d| (and the same
    for s and A d) stays below 1e300; from u near 1e301 it runs the test at every step, and
    still takes krylov.cg's steps (the offset u0 changes no residual: the residual is given)."""
    prob, th = bound_problem("logistic", build_dir)
    x = exact_solution(prob, th)
    b = prob.upper_grad(x, th)
    loops, hvp = loops_for(prob), hvp_at(prob, x, th)
    u0 = np.full(prob.x_size, 1e301)
    fused = fused_cg(loops, x, th, b, u0, residual=b, tol=1e-9)
    python = cg(hvp, b, u0.copy(), residual=b.copy(), tol=1e-9)
    assert fused.status == python.status == "converged"
    assert abs(fused.iterations - python.iterations) <= 1
    plain = fused_cg(loops, x, th, b, tol=1e-9)
    assert fused.iterations == plain.iterations
    np.testing.assert_allclose(fused.x - u0, plain.x, rtol=0, atol=1e286)
    np.testing.assert_allclose(fused.residual, plain.residual, rtol=1e-12,
                               atol=1e-12 * np.linalg.norm(b))


def _spd(n, cond, seed):
    """A symmetric positive definite n x n matrix with eigenvalues geomspace(1, cond, n)."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = (Q * np.geomspace(1.0, cond, n)) @ Q.T
    return (A + A.T) / 2, rng.standard_normal(n)


@pytest.mark.parametrize("n,cond", [(12, 10.0), (40, 1e3), (60, 1e5)])
def test_gauss_radau_estimate_bounds_the_energy_error_of_cg(n, cond):
    """krylov.cg's Gauss-Radau estimate at every iterate against the true ||x_k - x*||_A (x* by
    a dense solve): above it (mu <= lambda_min: an upper bound in exact arithmetic), within a
    factor that shrinks as mu approaches lambda_min, and nan without a mu."""
    A, b = _spd(n, cond, n)
    x_star = np.linalg.solve(A, b)
    for mu, worst in ((0.999, 4.0), (0.5, 6.0)):
        for k in range(0, n, 3):
            run = cg(lambda v: A @ v, b, max_iter=k, mu=mu)
            e = run.x - x_star
            true = float(np.sqrt(e @ A @ e))
            if true < 1e-9 * np.linalg.norm(x_star):  # converged to rounding: nothing to estimate
                continue
            assert true * (1 - 1e-8) <= run.energy_error <= worst * true, (mu, k)
    assert np.isnan(cg(lambda v: A @ v, b, max_iter=3).energy_error)


def test_fused_cg_tracks_the_same_energy_estimate(build_dir):
    """The fused CG's Gauss-Radau recurrence against krylov.cg's on the logistic Hessian, and
    both against the true energy-norm error (A = the dense Hessian, mu the certified constant);
    the solvers report it on their results, next to (not instead of) the certificate."""
    prob, th = bound_problem("logistic", build_dir)
    x = exact_solution(prob, th)
    b = prob.upper_grad(x, th)
    A = prob.lower_hessian(x, th)
    q_star = np.linalg.solve(A, b)
    mu = checked_constants(prob, th)["mu"]
    for k in (1, 3, 6):
        fused = fused_cg(loops_for(prob), x, th, b, tol=0.0, max_iter=k, mu=mu)
        python = cg(hvp_at(prob, x, th), b, tol=0.0, max_iter=k, mu=mu)
        assert fused.energy_error == pytest.approx(python.energy_error, rel=1e-8)
        e = fused.x - q_star
        assert np.sqrt(e @ A @ e) <= fused.energy_error * (1 + 1e-8)
    adj = solve_adjoint(prob, x, th, solver="cg", delta=1e-4)
    e = adj.q - q_star
    assert np.sqrt(e @ A @ e) <= adj.energy_error_estimate <= adj.residual / np.sqrt(mu) * 1.01
    low = solve_lower(bound_problem("ridge", build_dir)[0], th, solver="cg", tol=1e-6)
    assert low.energy_error_estimate > 0 and np.isfinite(low.energy_error_estimate)


@pytest.mark.parametrize("solver", ["cg", "fista", "gd"])
def test_capped_runs_stop_alike(solver, build_dir):
    prob, th = bound_problem("ridge", build_dir)
    fused = solve_lower(prob, th, solver=solver, tol=1e-14, max_iter=7)
    python = solve_lower(prob, th, solver=solver, tol=1e-14, max_iter=7, record=True)
    assert fused.status == python.status == "capped"
    assert fused.iterations == python.iterations == 7
    assert np.linalg.norm(fused.x - python.x) <= 1e-10 * np.linalg.norm(python.x)
    assert fused.bound == pytest.approx(python.bound, rel=1e-8)


def test_diverged_and_non_finite_runs_stop_alike(build_dir):
    """A step 50 times too long (L taken far below the true one) diverges, with the same
    message; a start where the gradient overflows is non-finite with no gradient."""
    prob, th = bound_problem("ridge", build_dir)
    c = checked_constants(prob, th)
    wrong = dict(c, L=c["mu"])  # step 2 / (2 mu): far beyond 2 / L
    runs = [gradient.solve_gd(LowerTask(prob, th, wrong, 1e-9, np.zeros(prob.x_size), 10_000,
                                        record=record)) for record in (False, True)]
    assert runs[0].status == runs[1].status == "diverged"
    assert runs[0].iterations == runs[1].iterations
    assert runs[0].message == runs[1].message and "grew" in runs[0].message
    huge = np.full(prob.x_size, 1e308)  # A x overflows
    for solver in ("gd", "fista"):
        fused = solve_lower(prob, th, solver=solver, x0=huge)
        python = solve_lower(prob, th, solver=solver, x0=huge, record=True)
        assert fused.status == python.status == "non-finite"
        assert fused.grad is None and python.grad is None
        assert fused.iterations == python.iterations == 0
        assert fused.message == python.message


@pytest.mark.parametrize("name,lower", [("ridge", "cg"), ("logistic", "fista")])
def test_fused_hypergradients_are_certified(name, lower, build_dir):
    prob, th = bound_problem(name, build_dir)
    ref = prob.hypergradient(th, lower="direct", adjoint="direct", eps=1e-13, delta=1e-13)
    fused = prob.hypergradient(th, lower=lower, adjoint="cg", rtol=1e-6)
    python = prob.hypergradient(th, lower=lower, adjoint="cg", rtol=1e-6, record=True)
    assert fused.status == python.status == "ok"
    for hg in (fused, python):
        err = np.linalg.norm(hg.grad - ref.grad)
        assert err <= hg.bound + ref.bound
        assert hg.bound <= 1e-6 * np.linalg.norm(hg.grad)
    assert np.linalg.norm(fused.grad - python.grad) <= fused.bound + python.bound


def test_stencil_problems_take_the_fused_loops_above_fused_max_size(build_dir, monkeypatch):
    """2-D TV on a 72 x 72 image (5184 entries > FUSED_MAX_SIZE; data: the image and its target,
    2 numbers per entry) takes the fused loops (fused_size_limit), a dense ridge problem of that
    x would not; the fused hypergradient takes the same solver steps as the Python loops and
    both bounds hold against a reference."""
    _, module, ns = built_example("tv2d", build_dir)
    prob = module.bind(**ns["example_data"](h=72, w=72))
    th = np.atleast_1d(np.asarray(ns["THETA0"], dtype=np.float64))
    assert prob.x_size > FUSED_MAX_SIZE
    assert fused_module.fused_size_limit(prob) == FUSED_MAX_SIZE * fused_module.CHEAP_KERNEL_FACTOR
    assert loops_for(prob) is not None
    ridge, _ = bound_problem("ridge", build_dir)
    assert fused_module.fused_size_limit(ridge) == FUSED_MAX_SIZE  # a 60 x 20 matrix and more
    ref = prob.hypergradient(th, lower="newton", adjoint="cg", eps=1e-12, delta=1e-12)
    fused = prob.hypergradient(th, lower="newton", adjoint="cg", rtol=1e-6)
    monkeypatch.setattr(fused_module, "FUSED_MAX_SIZE", 0)  # every loop in Python
    assert loops_for(prob) is None
    python = prob.hypergradient(th, lower="newton", adjoint="cg", rtol=1e-6)
    assert fused.status == python.status == ref.status == "ok"
    assert abs(fused.work["units"] - python.work["units"]) <= 2
    for hg in (fused, python):
        assert np.linalg.norm(hg.grad - ref.grad) <= hg.bound + ref.bound
        assert hg.bound <= 1e-6 * np.linalg.norm(hg.grad)


# -- AddressSanitizer + UBSan on the loops -------------------------------------------------------
DRIVEN = {"ridge": dict(m=7, n=5, p=3), "logistic": dict(m=9, n=10, p=4),
          "hypercleaning": dict(c=3, n=4, m=12, mv=6)}


def _driver(name, meta, sizes, data):
    """C source: every loop on exactly sized mallocs of the bound data, from x0 = 0.1."""
    prefix = f"hg_{name}"
    lines = ["#include <stdint.h>", "#include <stdio.h>", "#include <stdlib.h>",
             "#include <string.h>", f'#include "{prefix}.h"', "",
             "static double *exact(const double *values, int64_t count)",
             "{",
             "    double *p = malloc(sizeof(double) * (size_t)count);",
             "    if (p == NULL) exit(3);",
             "    memcpy(p, values, sizeof(double) * (size_t)count);",
             "    return p;",
             "}", "", "int main(void)", "{"]
    args = [str(sizes[s]) for s in meta["sizes"]]
    n_x = None
    for a in meta["arrays"]:
        if a["role"] == "data" and not a["shape"]:
            args.append(repr(float(data[a["name"]])))
            continue
        if a["role"] == "x":
            n_x = int(np.prod([_extent(e, sizes) for e in a["shape"]]))
            continue
        if a["role"] not in ("data", "theta"):
            continue
        values = (data[a["name"]] if a["role"] == "data"
                  else np.zeros(int(np.prod([_extent(e, sizes) for e in a["shape"]]))))
        flat = ", ".join(repr(float(v)) for v in np.ravel(values))
        lines.append(f"    static const double v_{a['name']}[] = {{{flat}}};")
        lines.append(f"    double *a_{a['name']} = exact(v_{a['name']}, {np.size(values)});")
    theta = meta["theta"]
    fixed = [*args[:len(meta["sizes"])], f"a_{theta}",
             *[f"a_{a['name']}" if a["shape"] else repr(float(data[a["name"]]))
               for a in meta["arrays"] if a["role"] == "data"]]
    size_args = ", ".join(args[:len(meta["sizes"])])
    lines += [f"    const int64_t work_count = {prefix}_work_size({size_args});",
              f"    double start[{n_x}];",
              f"    for (int k = 0; k < {n_x}; ++k) start[k] = 0.1;",
              "    int failures = 0;"]
    # loop_cg keeps the d and A d of its first 3 steps in a basis buffer of exactly that size
    controls = {"loop_cg": ("1e-300, 1.0, 40.0, 0.0, 1.0, 1e-3, 3.0", 7, 7, 6 * n_x),
                "loop_fista": ("1e-300, 1e-3, 1e-2, 1e-1, 40.0", 5, 8, 0),
                "loop_descent": ("1e-300, 1e-3, 1e-2, 0.5, 40.0", 5, 7, 0),
                "loop_newton": ("1e-300, 1e-3, 1e300, 40.0, 10.0, 0.25", 6, 10, 0)}
    for loop, (ctl, n_ctl, info, n_basis) in controls.items():
        basis = ", basis" if n_basis else ""
        lines += ["    {",
                  f"        double *v0 = exact(start, {n_x}), *v1 = exact(start, {n_x}),"
                  f" *v2 = exact(start, {n_x});",
                  f"        double *basis = {f'malloc(sizeof(double) * {n_basis})' if n_basis else 'NULL'};",
                  f"        static const double c[] = {{{ctl}}};",
                  f"        double *ctl = exact(c, {n_ctl});",
                  f"        double *info = malloc(sizeof(double) * {info});",
                  "        double *work = malloc(sizeof(double) * (size_t)work_count);",
                  f"        int status = {prefix}_{loop}({', '.join(fixed)}, v0, v1, v2{basis}, ctl, info, work);",
                  f"        if (status != 0) {{ fprintf(stderr, \"FAIL {loop}: %d\\n\", status); ++failures; }}",
                  f"        else printf(\"{loop} status %g iterations %g\\n\", info[0], info[1]);",
                  "        free(v0); free(v1); free(v2); free(basis); free(ctl); free(info); free(work);",
                  "    }"]
    lines += [f"    free(a_{a['name']});" for a in meta["arrays"]
              if a["role"] in ("data", "theta") and a["shape"]]
    lines += ["    return failures;", "}", ""]
    return "\n".join(lines)


def _extent(expr, sizes):
    return int(sp.sympify(expr).xreplace({sp.Symbol(k): v for k, v in sizes.items()}))


@pytest.mark.parametrize("name", sorted(DRIVEN))
def test_loops_under_address_sanitizer(name, sanitized_root, tmp_path):
    """The kernels' object is the session's (support/sanitized.py, shared with the C hygiene
    driver: the same -std=c99 -O1 -fopenmp-simd and sanitizer flags); the driver links it."""
    sizes = DRIVEN[name]
    data = load_example(name).namespace["example_data"](**sizes)
    (tmp_path / "driver.c").write_text(_driver(name, generated_texts(name)["meta"], sizes, data))
    lines = run_sanitized_driver(name, sanitized_root, tmp_path).splitlines()
    assert [line.split()[0] for line in lines] == ["loop_cg", "loop_fista", "loop_descent",
                                                   "loop_newton"]
    # 40 steps each unless a test stopped them earlier: the loops ran, not just returned
    assert all(float(line.split()[-1]) >= 1 for line in lines), lines


@pytest.mark.parametrize("tol", [0.0, 1e-300])
def test_lower_cg_at_its_rounding_floor_stops_there(tol, build_dir, monkeypatch):
    """A lower CG asked for more than floating point allows (tol 0 or 1e-300 on ridge): once a
    segment ends at the rounding floor of ||grad g|| without reducing it, the solve stops with
    status "rounding floor" and a true gradient, through the fused loop and the Python one, in
    a few segments instead of running to max_iter; x stays within its certified bound of x*."""
    prob, th = bound_problem("ridge", build_dir)
    x_star = exact_solution(prob, th)
    fused = solve_lower(prob, th, solver="cg", tol=tol)
    monkeypatch.setattr(fused_module, "FUSED_MAX_SIZE", 0)
    python = solve_lower(prob, th, solver="cg", tol=tol)
    for res in (fused, python):
        assert res.status == "rounding floor" and "stagnates" in res.message, res.message
        assert res.iterations < 500, res.iterations
        np.testing.assert_allclose(res.grad, prob.lower_grad(res.x, th), rtol=0, atol=1e-14)
        assert np.linalg.norm(res.x - x_star) <= res.bound * (1 + 1e-6) + 1e-13
