"""Learning theta end to end: time to F(theta) <= F* + rel |F*| for hypergen and its peers.

    python benchmarks/bench_learning.py                       # every case, full sizes
    python benchmarks/bench_learning.py --quick               # small sizes, 4-6 min on 2 cores
    python benchmarks/bench_learning.py --cases scalar --repeat 3
    python benchmarks/bench_learning.py --recompute-reference # F* again, not from the cache

Cases, every contender from the same theta0, all in the same run:
  scalar    l2-logistic regression, theta = log alpha (examples/logistic.py), 10000 x 500,
            p = 2000 validation samples, theta0 = 0, rel = 1e-6;
  weights   one weight per feature, theta_j = log alpha_j, n = 200, 2000 x 200, p = 1000, a small
            ridge r(theta) = 1e-4/2 ||theta||^2 (examples/logistic_weights.py), theta0 = 0,
            rel = 1e-6;
  cleaning  data hypercleaning on scikit-learn's 8x8 digits (examples/hypercleaning.py,
            source="digits", m = mv = 500, lambda = 1e-3, one weight per training sample),
            theta0 = 0, rel = 1e-3: sigmoid weights saturate, F has no minimiser, only an
            infimum that every method approaches ever more slowly, so 1e-6 of it means nothing;
            and F is not convex in theta. F* is the level the reference run reaches from theta0
            (a local level: a contender may end below it; L-BFGS-B in the box [-10, 10]^m
            finds 0.2% lower at the quick size).

Contenders:
* hypergen: `module.bind(**data).optimize(theta0)` with its defaults, and with method="maid" and
  method="lbfgsb" (not run twice when one is the default method); timed from the bind (its data
  constants included) to its OWN stop, or to the benchmark's patience --cap (time_budget,
  status "time": the time is then a lower bound); the oracle then says whether the returned
  theta reached the target. "first at" is when its history first held a theta that reaches the
  target (the oracle checks, in order, every recorded theta whose certified lower end value -
  value_error is below the target).
* JAXopt implicit differentiation: inner jaxopt.LBFGS(implicit_diff=True, implicit_diff_solve =
  CG to the same tolerance), jit-compiled, float64, warm-started from the previous x; outer
  gradient descent with Armijo backtracking (scalar: value-only trials, the step doubles after
  an accepted one) or optax adam (weights, cleaning). JIT compilation is not in the time (it
  is printed).
* scikit-learn (scalar): scipy.optimize.minimize_scalar(method="bounded") over log alpha in
  [log 1e-6, log 1e2] with warm-started LogisticRegression(fit_intercept=False) fits,
  C = 1 / (m alpha) (the same objective up to the factor m).
Peers are tuned with the oracle, generously: settings from small ladders (JAXopt: the initial
step or learning rate at inner tolerance 1e-7, then the inner tolerance 1e-5 / 1e-9 at the best
of them; scikit-learn: fit tolerance x xatol, the loosest xatol that reaches per fit tolerance),
each loop stopped at the first step count at which the ORACLE says its theta reached the target
(binary search on the step count; no user has such a stopping rule), and the fastest setting
is timed. hypergen gets no tuning.

Oracle (benchmarks/learning_oracle.py): F(theta) = f(x*(theta)) + r(theta) with x* from damped
Newton + Cholesky in NumPy/SciPy until ||grad g|| / mu * (||grad f|| + ||grad g|| / mu) <= 1e-12,
or 1e-9 at round-off (its worst certified error near the target is printed next to the target's
slack); never hypergen's numbers. At theta0 its exact hypergradient is checked against
hypergen's certified one (they must agree within hypergen's bound). F*: scalar by bounded Brent on the oracle (xatol 1e-9),
the others by SciPy L-BFGS-B on the oracle's exact hypergradient (Newton x*, Cholesky adjoint);
cached in benchmarks/bench_learning_reference.npz keyed by case and sizes, recomputed when
missing or with --recompute-reference. A contender that ends below F* is reported.

Times are medians of --repeat runs (default 3, 1 with --quick) of each contender timed in turns (benchmarks/timing.py,
one whole run per turn, 0.25 s apart), so that the machine's load hits them alike; other
processes on a shared machine still make them noisy (the load average is printed).
"""
from __future__ import annotations

import argparse
import inspect
import math
import os
import runpy
import sys
import time
from functools import lru_cache, partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import fresh_memory, interleaved_times, machine, set_threads_from_argv  # noqa: E402

THREADS = set_threads_from_argv()

import numpy as np  # noqa: E402
import scipy.optimize  # noqa: E402
from learning_oracle import CleaningModel, LogisticModel, Oracle  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
REFERENCE_FILE = Path(__file__).resolve().parent / "bench_learning_reference.npz"

#: (example file, sizes, relative target) per case and size set.
FULL = {
    "scalar": ("logistic", dict(m=10000, n=500, p=2000), 1e-6),
    "weights": ("logistic_weights", dict(m=2000, n=200, p=1000), 1e-6),
    "cleaning": ("hypercleaning", dict(m=500, mv=500), 1e-3),
}
QUICK = {
    "scalar": ("logistic", dict(m=2000, n=100, p=500), 1e-6),
    "weights": ("logistic_weights", dict(m=500, n=50, p=300), 1e-6),
    "cleaning": ("hypercleaning", dict(m=200, mv=200), 1e-3),
}
#: L-BFGS-B runs of the reference, each from the last one's end, while they gain > 1e-9 |F|.
REFERENCE_RESTARTS = 6
SCALAR_BOUNDS = (math.log(1e-6), math.log(1e2))
INNER_TOLS = (1e-5, 1e-7, 1e-9)
STEPS0 = (1.0, 10.0, 100.0)
LEARNING_RATES = (0.01, 0.03, 0.1, 0.3, 1.0)
FIT_TOLS = (1e-4, 1e-6, 1e-8)
XATOLS = (1e-1, 1e-2, 1e-3, 1e-4)
MAX_STEPS = {"backtracking": 60, "adam": 400}


def reference(case: str, key: str, oracle: Oracle, theta0: np.ndarray, recompute: bool) -> tuple:
    """(F*, theta*, how): from the cache file, or a long accurate run on the oracle."""
    cache = dict(np.load(REFERENCE_FILE)) if REFERENCE_FILE.exists() else {}
    if not recompute and f"{key}/fstar" in cache:
        return float(cache[f"{key}/fstar"]), cache[f"{key}/theta"], f"cached in {REFERENCE_FILE.name}"
    start = time.perf_counter()
    if case == "scalar":
        res = scipy.optimize.minimize_scalar(lambda t: oracle.value([t]), bounds=SCALAR_BOUNDS,
                                             method="bounded", options=dict(xatol=1e-9))
        theta = np.array([res.x])
        how = "bounded Brent on the oracle, xatol 1e-9"
    else:
        theta, value, nit = theta0, math.inf, 0
        for restart in range(REFERENCE_RESTARTS):  # restarted while it still gains
            res = scipy.optimize.minimize(oracle.value_grad, theta, jac=True, method="L-BFGS-B",
                                          options=dict(gtol=1e-12, ftol=1e-16, maxiter=20000,
                                                       maxfun=40000, maxcor=20))
            gain, theta, value, nit = value - res.fun, res.x, res.fun, nit + res.nit
            if gain <= 1e-9 * abs(value):
                break
        how = (f"SciPy L-BFGS-B on the oracle's exact hypergradient, {nit} iterations in "
               f"{restart + 1} restart(s), last: {res.message}")
    fstar = oracle.value(theta)
    cache.update({f"{key}/fstar": np.float64(fstar), f"{key}/theta": theta})
    np.savez(REFERENCE_FILE, **cache)
    return fstar, theta, f"{how}; recomputed in {time.perf_counter() - start:.0f} s and cached"


# ----------------------------------------------------------------------------------------------
# contenders


def run_hypergen(module, data: dict, theta0: np.ndarray, options: dict, cap: float) -> dict:
    """One user's run: bind (data constants included) and optimize to hypergen's own stop, or to
    the benchmark's patience `cap` in seconds (time_budget; the status then says "time")."""
    start = time.perf_counter()
    prob = module.bind(**data)
    bind = time.perf_counter() - start
    res = prob.optimize(theta0, progress=False, time_budget=cap, **options)
    return dict(theta=np.asarray(res.theta, dtype=float), status=res.status, work=res.work,
                method=getattr(res, "method", "?"),
                hypergradients=sum(math.isfinite(e["grad_norm"]) for e in res.history),
                values=len(res.history), history=res.history, bind=bind)


def jax_functions(case: str):
    """g(x, theta, d), f(x, theta, d) + r(theta) in jax.numpy."""
    import jax.numpy as jnp
    from jax.nn import sigmoid
    from jax.scipy.special import logsumexp as jlse

    if case == "cleaning":
        def g(W, th, d):
            z = d["A"] @ W.T
            return (jnp.mean(sigmoid(th) * (jlse(z, axis=1) - jnp.sum(d["Y"] * z, axis=1)))
                    + d["lam"] * jnp.sum(W * W))

        def f(W, th, d):
            z = d["Av"] @ W.T
            return jnp.mean(jlse(z, axis=1) - jnp.sum(d["Yv"] * z, axis=1))
        return g, f

    def g(x, th, d):
        al = jnp.exp(th) if case == "weights" else jnp.exp(th[0])
        return jnp.mean(jnp.logaddexp(0.0, -d["y"] * (d["A"] @ x))) + 0.5 * jnp.sum(al * x * x)

    def f(x, th, d):
        return (jnp.mean(jnp.logaddexp(0.0, -d["yv"] * (d["Av"] @ x)))
                + 0.5 * d["rho"] * jnp.sum(th * th))
    return g, f


def jaxopt_functions(case: str, tol: float) -> tuple:
    """(value, value_and_grad) of theta, x0, data -> (F_tol(theta), x), both jit-compiled: the
    inner jaxopt.LBFGS to tol from x0, implicit differentiation with CG to tol."""
    import jax
    import jaxopt
    from jaxopt.linear_solve import solve_cg

    g, f = jax_functions(case)
    solver = jaxopt.LBFGS(fun=g, tol=tol, maxiter=100_000, implicit_diff=True,
                          implicit_diff_solve=partial(solve_cg, tol=0.0, atol=tol, maxiter=100_000))

    def outer(th, x0, d):
        x = solver.run(x0, th, d).params
        return f(x, th, d), x
    return jax.jit(outer), jax.jit(jax.value_and_grad(outer, has_aux=True))


def backtracking_loop(fns, d, theta0, x0, steps: int, s0: float) -> dict:
    """Gradient descent on theta with Armijo backtracking (c = 1e-4): trials are values only, the
    hypergradient is taken at the accepted point; the step halves on rejection, doubles after
    acceptance. Stops after `steps` accepted steps."""
    value, value_grad = fns
    start = time.perf_counter()
    (F, x), h = value_grad(theta0, x0, d)
    th, s, counts, trace = theta0, s0, dict(hypergradients=1, values=0), []
    for _ in range(steps):
        hh = float(h @ h)
        while True:
            trial = th - s * h
            F_new, x_new = value(trial, x, d)
            counts["values"] += 1
            if float(F_new) <= float(F) - 1e-4 * s * hh or s < 1e-12:
                break
            s *= 0.5
        (F, x), h = value_grad(trial, x_new, d)
        th, s = trial, 2 * s
        counts["hypergradients"] += 1
        trace.append((time.perf_counter() - start, np.asarray(th)))
    return dict(theta=np.asarray(th), trace=trace, **counts)


@lru_cache(maxsize=None)
def adam(lr: float) -> tuple:
    """(optax adam, its update jit-compiled), one per learning rate: compiled once, not in every
    timed run."""
    import jax
    import optax

    opt = optax.adam(lr)

    def step(h, state, th):
        upd, state = opt.update(h, state, th)
        return optax.apply_updates(th, upd), state
    return opt, jax.jit(step)


def adam_loop(fns, d, theta0, x0, steps: int, lr: float) -> dict:
    """optax adam on theta with the JAXopt hypergradient; `steps` hypergradients."""
    opt, update = adam(lr)
    start = time.perf_counter()
    th, x, state, trace = theta0, x0, opt.init(theta0), []
    for _ in range(steps):
        (_, x), h = fns[1](th, x, d)
        th, state = update(h, state, th)
        trace.append((time.perf_counter() - start, np.asarray(th)))
    return dict(theta=np.asarray(th), trace=trace, hypergradients=steps, values=steps)


def sklearn_search(data: dict, fit_tol: float, xatol: float) -> dict:
    """Bounded scalar search over log alpha with warm-started scikit-learn fits."""
    from sklearn.linear_model import LogisticRegression

    A, y, Av, yv = (data[k] for k in ("A", "y", "Av", "yv"))
    clf = LogisticRegression(C=1.0, fit_intercept=False, tol=fit_tol, max_iter=100_000,
                             warm_start=True)

    def F(t):
        clf.set_params(C=1.0 / (A.shape[0] * math.exp(t)))
        clf.fit(A, y)
        return float(np.logaddexp(0.0, -yv * (Av @ clf.coef_.ravel())).mean())

    res = scipy.optimize.minimize_scalar(F, bounds=SCALAR_BOUNDS, method="bounded",
                                         options=dict(xatol=xatol))
    return dict(theta=np.array([res.x]), hypergradients=0, values=int(res.nfev))


# ----------------------------------------------------------------------------------------------
# tuning the peers with the oracle


def first_reaching(trace: list, reached) -> int | None:
    """Index of the first trace entry whose theta reaches the target, by binary search on the
    step count (exact where the loop stays below the target once there); None when its last
    theta does not reach it."""
    if not trace or not reached(trace[-1][1]):
        return None
    lo, hi = -1, len(trace) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if reached(trace[mid][1]) else (mid, hi)
    return hi


def tune_loop(loop, fns_for, configs: list, reached, max_steps: int) -> tuple:
    """(seconds to the target, (tol, param), steps) of the fastest configuration, or the last
    one tried with max_steps when none reaches the target. Two stages: the parameter ladder at
    the middle tolerance, then the tolerance ladder at the best parameter."""
    best = None

    def attempt(tol, param):
        nonlocal best
        out = loop(fns_for(tol), param, max_steps)
        k = first_reaching(out["trace"], reached)
        seconds = out["trace"][k][0] if k is not None else math.inf
        print(f"    tuning tol={tol:g} param={param:g}: "
              + (f"target after {k + 1} steps, {seconds:.2f} s" if k is not None
                 else f"target not reached in {max_steps} steps"))
        if best is None or seconds < best[0]:
            best = (seconds, (tol, param), (k + 1) if k is not None else max_steps)

    mid = INNER_TOLS[len(INNER_TOLS) // 2]
    for param in configs:
        attempt(mid, param)
    for tol in INNER_TOLS:
        if tol != mid:
            attempt(tol, best[1][1])
    return best


def tune_sklearn(data: dict, reached) -> tuple:
    """(seconds, (fit_tol, xatol)) of the fastest reaching setting (the loosest xatol that
    reaches, per fit tolerance), or the tightest setting when none does."""
    best = (math.inf, (FIT_TOLS[-1], XATOLS[-1]))
    for fit_tol in FIT_TOLS:
        for xatol in XATOLS:
            start = time.perf_counter()
            out = sklearn_search(data, fit_tol, xatol)
            seconds = time.perf_counter() - start
            ok = reached(out["theta"])
            print(f"    tuning fit tol={fit_tol:g} xatol={xatol:g}: {seconds:.2f} s, "
                  f"{out['values']} fits, {'reached' if ok else 'not reached'}")
            if ok:
                best = min(best, (seconds, (fit_tol, xatol)))
                break
    return best


def first_hit_hypergen(out: dict, oracle: Oracle, target: float, max_checks: int = 40):
    """Seconds (bind included) at which hypergen's history first held a theta reaching the
    target; entries whose certified lower end value - value_error exceeds the target are
    skipped without the oracle. None when none of the (at most max_checks) checked does."""
    checks = 0
    for e in out["history"]:
        if e.get("theta") is None or not e["value"] - e["value_error"] <= target:
            continue
        checks += 1
        if oracle.value(e["theta"]) <= target:
            return out["bind"] + e["time"]
        if checks >= max_checks:
            break
    return None


# ----------------------------------------------------------------------------------------------


def load_case(case: str, spec: tuple):
    """(module, data, model, the example's namespace)."""
    import codegen

    name, sizes, _ = spec
    path = ROOT / "examples" / f"{name}.py"
    ns = runpy.run_path(str(path))
    if case == "cleaning":
        data = ns["example_data"](seed=0, source="digits", **sizes)
        model = CleaningModel(data)
    else:
        data = ns["example_data"](0, **sizes)
        model = LogisticModel(data, case == "weights", ns.get("RHO", 0.0))
    return codegen.load(path), data, model, ns


def peer_contenders(case: str, data: dict, model, theta0, reached) -> dict:
    """label -> (zero-argument call, config text, JIT seconds) of the tuned peers."""
    import jax
    import jax.numpy as jnp

    d = {k: jnp.asarray(v) for k, v in data.items()}
    d.setdefault("rho", jnp.asarray(getattr(model, "rho", 0.0)))
    jth = jnp.asarray(theta0)
    x0 = jnp.zeros((model.c, model.n) if case == "cleaning" else model.size)
    fns, jit = {}, {}

    def fns_for(tol):
        if tol not in fns:
            fns[tol] = jaxopt_functions(case, tol)
            start = time.perf_counter()
            jax.block_until_ready((fns[tol][0](jth, x0, d), fns[tol][1](jth, x0, d)))
            jit[tol] = time.perf_counter() - start
        return fns[tol]

    kind = "backtracking" if case == "scalar" else "adam"
    loop_fn = backtracking_loop if kind == "backtracking" else adam_loop
    ladder = STEPS0 if kind == "backtracking" else LEARNING_RATES
    loop = lambda f, param, steps: loop_fn(f, d, jth, x0, steps, param)  # noqa: E731
    print(f"  tuning JAXopt + {kind} with the oracle:")
    _, (tol, param), steps = tune_loop(loop, fns_for, list(ladder), reached, MAX_STEPS[kind])
    what = "initial step" if kind == "backtracking" else "lr"
    peers = {f"JAXopt LBFGS + {kind}": (partial(loop, fns_for(tol), param, steps),
                                        f"inner tol {tol:g}, {what} {param:g}, {steps} steps",
                                        jit[tol])}
    if case == "scalar":
        print("  tuning scikit-learn scalar search with the oracle:")
        _, (fit_tol, xatol) = tune_sklearn(data, reached)
        peers["scikit-learn + minimize_scalar"] = (
            partial(sklearn_search, data, fit_tol, xatol), f"fit tol {fit_tol:g}, xatol {xatol:g}", 0.0)
    return peers


def run_case(case: str, spec: tuple, args) -> list:
    """Tune the peers, time every contender in turns, check every final theta with the oracle."""
    module, data, model, _ = load_case(case, spec)
    _, sizes, rel = spec
    oracle = Oracle(model)
    size_txt = ", ".join(f"{k}={v}" for k, v in sizes.items())
    prob = module.bind(**data)
    theta0 = np.zeros(prob.theta_size)
    print(f"\n== {case} ({spec[0]}: {size_txt}; x has {model.size} entries, theta {theta0.size}; "
          f"target F <= F* + {rel:g} |F*|)")
    key = f"{case}-" + "-".join(f"{k}{v}" for k, v in sizes.items()) + "-seed0"
    fstar, theta_star, how = reference(case, key, oracle, theta0, args.recompute_reference)
    target = fstar + rel * abs(fstar)
    oracle.watch = target + 1e-3 * rel * abs(fstar)
    reached = lambda th: oracle.value(th) <= target  # noqa: E731
    print(f"  F* = {fstar:.12g} ({how}); target {target:.12g}"
          + (f"; theta* = {theta_star[0]:.6g}" if theta_star.size == 1 else
             f"; theta* in [{theta_star.min():.3g}, {theta_star.max():.3g}]"))
    cross_check(prob, oracle, theta0)
    default = inspect.signature(prob.optimize).parameters["method"].default
    calls = {"hypergen optimize() (defaults)": dict()}
    for method in args.methods:   # an explicit method that is the default: the same call
        if method != default:
            calls[f'hypergen method="{method}"'] = dict(method=method)
    calls = {label: ("hypergen", partial(run_hypergen, module, data, theta0, opts, args.cap),
                     f"method {opts.get('method', default)!r}", 0.0)
             for label, opts in calls.items()}
    if not args.no_jax:
        for label, (call, cfg, jit) in peer_contenders(case, data, model, theta0, reached).items():
            calls[label] = ("peer", call, cfg, jit)
    print(f"  timing {len(calls)} contenders in turns, {args.repeat} run(s) each ...")
    before = pass_seconds(prob, theta0)
    times = interleaved_times({label: c[1] for label, c in calls.items()}, args.repeat,
                              warm=0.0, warmup=False)
    after = pass_seconds(prob, theta0)
    unit = (min(before + after), max(before + after))
    print(f"  one work unit (a pass over the data at theta0, median of 20; before / after the "
          f"timed runs): lower gradient {before[0] * 1e3:.2f} / {after[0] * 1e3:.2f} ms, HVP "
          f"{before[1] * 1e3:.2f} / {after[1] * 1e3:.2f} ms")
    rows = [summarise(case, label, kind, cfg, jit, times[label], oracle, fstar, rel, unit)
            for label, (kind, _, cfg, jit) in calls.items()]
    peers = [r["t"] for r in rows if r["kind"] == "peer" and r["reached"]]
    for r in rows:
        r["ratio"] = r["t"] / min(peers) if peers else math.nan
    print(f"  oracle: {oracle.calls} solves; worst certified |F_oracle - F| near the target "
          f"{oracle.worst:.1e} (the target's slack: {rel * abs(fstar):.1e})")
    return rows


def cross_check(prob, oracle: Oracle, theta0: np.ndarray) -> None:
    """The oracle's exact hypergradient at theta0 against hypergen's certified one: they must
    agree within hypergen's bound (plus the oracle's round-off), else one of them is wrong."""
    hg = prob.hypergradient(theta0, rtol=1e-6)
    h = oracle.value_grad(theta0)[1]
    diff, norm = np.linalg.norm(hg.grad - h), np.linalg.norm(h)
    verdict = "agree" if diff <= hg.bound + 1e-9 * norm else "DISAGREE: a wrong hypergradient"
    print(f"  at theta0: ||h_hypergen - h_oracle|| / ||h|| = {diff / norm:.1e}, hypergen's "
          f"certified bound / ||h|| = {hg.bound / norm:.1e} ({hg.status}): {verdict}")


def pass_seconds(prob, theta0: np.ndarray, calls: int = 20) -> tuple[float, float]:
    """Median seconds of one lower gradient and of one HVP at x = 0, theta0: what a work unit
    (one pass of a kernel over the data) costs in this run, to split hypergen's time into units
    x this cost and the rest (bind, data constants, upper gradients, Python)."""
    x, v = np.zeros(prob.x_size), np.ones(prob.x_size)
    out = []
    for one in (lambda: prob.lower_grad(x, theta0), lambda: prob.lower_hvp(x, theta0, v)):
        seconds = []
        for _ in range(calls):
            start = time.perf_counter()
            one()
            seconds.append(time.perf_counter() - start)
        out.append(float(np.median(seconds)))
    return out[0], out[1]


def summarise(case, label, kind, cfg, jit, timed, oracle, fstar, rel, unit=(math.nan,) * 2
              ) -> dict:
    """One contender's row: its median time, counts, and the oracle's verdict on its theta;
    for hypergen also its work units x `unit` (the (least, most) seconds of one pass measured
    in this run) and the rest of its time."""
    t, _, out = timed
    F, target = oracle.value(out["theta"]), fstar + rel * abs(fstar)
    row = dict(case=case, label=label, kind=kind, cfg=cfg, t=t, gap=(F - fstar) / abs(fstar),
               reached=F <= target, hypergradients=out["hypergradients"], values=out["values"])
    line = (f"  {label}: {t:.2f} s, {row['hypergradients']} hypergradients, {row['values']} "
            f"{'fits' if 'scikit' in label else 'values'}, (F - F*)/|F*| = {row['gap']:.2g}, "
            f"{'reached' if row['reached'] else 'NOT reached'}")
    if kind == "hypergen":
        row.update(status=out["status"], work=out["work"], method=out["method"],
                   first=first_hit_hypergen(out, oracle, target))
        first = "never" if row["first"] is None else f"{row['first']:.2f} s"
        line += (f"; method {out['method']!r}, status {out['status']}, {out['work']} work units, bind {out['bind']:.2f} s, "
                 f"history first reached the target at {first}; units x one pass "
                 f"{out['work'] * unit[0]:.2f}-{out['work'] * unit[1]:.2f} s, the rest "
                 f"{t - out['work'] * unit[1]:.2f}-{t - out['work'] * unit[0]:.2f} s")
    else:
        line += f"; {cfg}" + (f", JIT compile {jit:.1f} s (not timed)" if jit else "")
    if row["gap"] < -1e-3 * rel:
        line += "  [below F*: the reference is not the minimum]"
    print(line)
    return row


def table(rows: list) -> None:
    print("\n| case | contender | seconds | hypergradients | values / fits | (F - F*)/abs(F*) "
          "| target | first at (s) | / best peer | settings or status |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        first = r.get("first")
        first = "-" if r["kind"] == "peer" else ("never" if first is None else f"{first:.2f}")
        extra = (f"{r['method']}: {r['status']}, {r['work']} units" if r["kind"] == "hypergen" else r["cfg"])
        print(f"| {r['case']} | {r['label']} | {r['t']:.2f} | {r['hypergradients']} | "
              f"{r['values']} | {r['gap']:.1e} | {'yes' if r['reached'] else 'no'} | {first} | "
              f"{r['ratio']:.2f} | {extra} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="*", default=list(FULL),
                        help=f"any of {', '.join(FULL)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes, a few minutes")
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed runs of each contender (default 3; 1 with --quick)")
    parser.add_argument("--threads", default="1",
                        help="BLAS/OpenMP/XLA threads for every library, hypergen's OpenMP "
                             "kernels included (default 1; 0 = library defaults)")
    parser.add_argument("--methods", nargs="*", default=["maid", "lbfgsb"],
                        help="hypergen methods run besides the defaults (default: maid lbfgsb)")
    parser.add_argument("--cap", type=float, default=None,
                        help="seconds after which a hypergen run is stopped (its time_budget; "
                             "default 30 with --quick, 600 otherwise)")
    parser.add_argument("--no-jax", action="store_true", help="hypergen only (no peers)")
    parser.add_argument("--recompute-reference", action="store_true",
                        help="recompute F* instead of reading " + REFERENCE_FILE.name)
    args = parser.parse_args()
    specs = QUICK if args.quick else FULL
    args.cap = args.cap if args.cap is not None else (30.0 if args.quick else 600.0)
    args.repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    unknown = [c for c in args.cases if c not in specs]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(specs)}")
    if not args.no_jax:
        import jax

        jax.config.update("jax_enable_x64", True)
    cpu, ncpu, t_av, bw = machine()
    print(f"machine: {cpu}, {ncpu} cores; NumPy A @ v at 20000 x 2000: {t_av * 1e3:.1f} ms = "
          f"{bw:.1f} GB/s; threads {THREADS if THREADS != '0' else 'library default'}; "
          f"load average at start {os.getloadavg()[0]:.2f}")
    rows = [r for c in args.cases for r in run_case(c, specs[c], args)]
    print(f"load average at end {os.getloadavg()[0]:.2f} (other processes on this machine make "
          f"times noisy); memory after the runs: {fresh_memory()}")
    table(rows)


if __name__ == "__main__":
    main()
