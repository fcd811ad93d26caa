"""Time to a hypergradient accurate to 1e-6 relative: hypergen against JAXopt and NumPy/SciPy.

    python benchmarks/bench_hypergradient.py                      # every case, full sizes
    python benchmarks/bench_hypergradient.py --quick              # small sizes, a smoke run
    python benchmarks/bench_hypergradient.py --cases ridge-small quadratic --repeat 5
    python benchmarks/bench_hypergradient.py --profile logistic-large   # + cProfile of hypergen
    python benchmarks/bench_hypergradient.py --quick --cases quadratic --stages quadratic --no-jax
                                                                 # + time per stage of the default

Cases: ridge and l2-logistic regression, dense, (m, n) = (2000, 500) ("-small") and (20000, 2000)
("-large"); 2-D smoothed-TV denoising of a 256 x 256 image (examples/tv2d.py); the paper's
quadratic problem (d = p = 10, m1 = m2 = 1000, examples/quadratic.py); l2-logistic regression
on CSR data, m = 20000, n = 100000 features, density 0.1% (examples/logistic_sparse.py; JAXopt
gets the same matrix as a BCOO, NumPy as scipy.sparse).

Target: ||grad - grad F|| <= 1e-6 ||grad F||.
* hypergen must reach it with its OWN certified bound, untuned: prob.hypergradient(theta,
  rtol=1e-6) runs warm-started rounds until hg.bound <= 1e-6 ||hg.grad|| (codegen.hypergrad.accuracy), timed
  whole and cold (x0 = None), each solver pair and the default on a bind of its own (what one
  pair's calls leave on a bind, data constants tightened for a step size, helps no other).
  Solvers: "cg" + "cg" when the lower level is quadratic (ridge, quadratic), the faster of
  "fista" + "cg" and "newton" + "cg" otherwise, and "direct" + "direct" too when x has at most
  DIRECT_MAX entries, QUADRATIC_DIRECT_MAX for a quadratic lower level (the quadratic problem,
  ridge-small); the fastest counts.
* JAXopt and NumPy/SciPy have no certificate: their tolerance (one tol for the lower solve and the
  adjoint CG) runs down the same ladder until their TRUE error against a reference hypergradient
  is <= 1e-6 relative (an oracle tuning that favours them), and that configuration is timed.
  - JAXopt: implicit differentiation, jit-compiled, float64. Quadratic lower levels: jax CG under
    jaxopt.implicit_diff.custom_root; otherwise jaxopt.LBFGS(implicit_diff=True). Adjoint:
    jaxopt.linear_solve.solve_cg with an absolute tolerance. Compile time is reported separately.
  - NumPy/SciPy: hand-written gradients and Hessian-vector products; lower solve scipy CG
    (quadratic) or L-BFGS-B (otherwise), adjoint scipy CG (rtol = 0, atol = tol).
  - Quadratic lower levels with x of at most QUADRATIC_DIRECT_MAX entries (the quadratic
    problem, ridge-small): both
    also solve with the materialised Hessian (JAXopt: jax.hessian, jax.scipy.linalg.solve and
    implicit_diff with solve_cholesky; NumPy: the HVP of the identity matrix, scipy Cholesky), exact
    to rounding with no tolerance to tune; the faster variant of each library counts.
* Diagnostic column "tuned like them": hypergen's fastest pair given the baselines' oracle
  tuning instead (eps = delta = tol down the ladder until the TRUE error is <= 1e-6, no
  certificate asked). Not the headline: it shows what the certificate costs, apart from the
  kernels and solvers. Column "work / oracle's, same pair": the certified call's work units
  over that oracle-stopped call's, for the fastest certified pair (issue goal: at most 1.1).
* Reference: closed form (ridge, quadratic: dense solves) or hypergen at eps = delta = 1e-12, whose
  own certified bound is printed next to it.
Times are medians of --repeat samples after one warm-up run, every contender of a case timed in
turns (`interleaved_times`: 0.25 s apart; 20 ms of untimed calls, then a sample of at least one
call and 20 ms) so that the machine's load hits them alike, no one's idle threads spin during
another's turn, and each sample is as warm as in a loop of its own.
"""
import argparse
import cProfile
import io
import math
import os
import pstats
import runpy
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved_times, machine, median_time, set_threads_from_argv  # noqa: E402

THREADS = set_threads_from_argv()

import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402
import scipy.optimize  # noqa: E402
import scipy.sparse.linalg as spla  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET = 1e-6
#: x sizes up to which hypergen also runs the direct solvers (dense Hessian, Cholesky), and the
#: peers their dense solves: 100, and for quadratic lower levels the size up to which "auto"
#: takes them where the Hessian has the Gram form (ridge-small, 500 entries; ridge-large, 2000,
#: where the bind keeps the A^T A its data constants formed).
DIRECT_MAX = 100
QUADRATIC_DIRECT_MAX = 2000


def direct_size(n: int, quadratic: bool) -> bool:
    """Whether the direct solvers (and the peers' dense solves) run at x of n entries."""
    return n <= (QUADRATIC_DIRECT_MAX if quadratic else DIRECT_MAX)
LADDER = [10.0 ** -k for k in range(4, 14)]

FULL = {
    "ridge-small": ("ridge", dict(m=2000, n=500, p=200)),
    "ridge-large": ("ridge", dict(m=20000, n=2000, p=2000)),
    "logistic-small": ("logistic", dict(m=2000, n=500, p=200)),
    "logistic-large": ("logistic", dict(m=20000, n=2000, p=2000)),
    "tv2d": ("tv2d", dict(h=256, w=256)),
    "quadratic": ("quadratic", dict(m1=1000, m2=1000, d=10, p=10)),
    "logistic-csr": ("logistic_sparse", dict(m=20000, n=100000, p=2000, density=0.001)),
}
QUICK = {
    "ridge-small": ("ridge", dict(m=200, n=50, p=40)),
    "ridge-large": ("ridge", dict(m=1000, n=200, p=100)),
    "logistic-small": ("logistic", dict(m=200, n=50, p=40)),
    "logistic-large": ("logistic", dict(m=1000, n=200, p=100)),
    "tv2d": ("tv2d", dict(h=32, w=32)),
    "quadratic": ("quadratic", dict(m1=200, m2=200, d=10, p=10)),
    "logistic-csr": ("logistic_sparse", dict(m=1000, n=5000, p=200, density=0.01)),
}


def rel_err(g, ref):
    return float(np.linalg.norm(np.asarray(g, dtype=float) - ref) / np.linalg.norm(ref))


def theta0(ns, size):
    t = ns["THETA0"]
    return np.full(size, float(t)) if np.ndim(t) == 0 else np.asarray(t, dtype=float)


# ----------------------------------------------------------------------------------------------
# NumPy / SciPy hand-written implementations: (grad_g, hvp, grad_f, Bt_q, quadratic?, g_value)


def _sigmoid(t):
    return 0.5 * (1.0 + np.tanh(0.5 * t))


def numpy_model(name, d, th):
    name = "logistic" if name == "logistic_sparse" else name  # scipy.sparse has the same @
    if name == "ridge":
        A, b, Av, bv = d["A"], d["b"], d["Av"], d["bv"]
        al, p = math.exp(th[0]), Av.shape[0]
        return dict(
            quadratic=True,
            rhs=A.T @ b,  # H x* = A^T b
            grad_g=lambda x: A.T @ (A @ x - b) + al * x,
            hvp=lambda x, v: A.T @ (A @ v) + al * v,
            grad_f=lambda x: Av.T @ (Av @ x - bv) / p,
            Btq=lambda x, q: np.array([al * (x @ q)]),
        )
    if name == "logistic":
        A, y, Av, yv = d["A"], d["y"], d["Av"], d["yv"]
        al, m, p = math.exp(th[0]), A.shape[0], Av.shape[0]

        def value_grad(x):
            z = y * (A @ x)
            val = np.logaddexp(0.0, -z).sum() / m + 0.5 * al * (x @ x)
            return val, -(A.T @ (y * _sigmoid(-z))) / m + al * x

        def hvp(x, v):
            s = _sigmoid(A @ x)
            return A.T @ (s * (1 - s) * (A @ v)) / m + al * v

        return dict(
            quadratic=False, value_grad=value_grad, grad_g=lambda x: value_grad(x)[1], hvp=hvp,
            grad_f=lambda x: -(Av.T @ (yv * _sigmoid(-yv * (Av @ x)))) / p,
            Btq=lambda x, q: np.array([al * (x @ q)]),
        )
    if name == "tv2d":
        Y, Xt = d["Y"], d["Xt"]
        h, w = Y.shape
        al, nu = math.exp(th[0]), math.exp(th[1])

        def parts(x):
            X = x.reshape(h, w)
            dx = X[1:, :-1] - X[:-1, :-1]   # X[i+1, j] - X[i, j], i < h-1, j < w-1
            dy = X[:-1, 1:] - X[:-1, :-1]   # X[i, j+1] - X[i, j]
            return X, dx, dy, np.sqrt(dx * dx + dy * dy + nu * nu)

        def Dt(ux, uy):                      # adjoint of the stencil pair
            out = np.zeros((h, w))
            out[1:, :-1] += ux
            out[:-1, 1:] += uy
            out[:-1, :-1] -= ux + uy
            return out.ravel()

        def value_grad(x):
            X, dx, dy, s = parts(x)
            val = 0.5 * np.sum((X - Y) ** 2) + al * s.sum()
            return val, (X - Y).ravel() + al * Dt(dx / s, dy / s)

        def hvp(x, v):
            _, dx, dy, s = parts(x)
            _, vx, vy, _ = parts(v)
            vx, vy = vx, vy
            dot = (dx * vx + dy * vy) / s ** 3
            return v + al * Dt(vx / s - dx * dot, vy / s - dy * dot)

        def Btq(x, q):
            _, dx, dy, s = parts(x)
            _, qx, qy, _ = parts(q)
            g_la = al * np.sum((dx * qx + dy * qy) / s)
            g_lnu = -al * nu * nu * np.sum((dx * qx + dy * qy) / s ** 3)
            return np.array([g_la, g_lnu])

        return dict(quadratic=False, value_grad=value_grad, grad_g=lambda x: value_grad(x)[1],
                    hvp=hvp, grad_f=lambda x: x - Xt.ravel(), Btq=Btq)
    if name == "quadratic":
        M, b, C, D, e = d["M"], d["b"], d["C"], d["D"], d["e"]
        r0 = C @ th - e
        return dict(
            quadratic=True, rhs=-2 * D.T @ r0,
            grad_g=lambda x: 2 * D.T @ (r0 + D @ x),
            hvp=lambda x, v: 2 * D.T @ (D @ v),
            grad_f=lambda x: 2 * M.T @ (M @ x - b),
            Btq=lambda x, q: 2 * C.T @ (D @ q),
        )
    raise ValueError(name)


def numpy_fista(grad_g, n, mu, L, tol, max_iter=1_000_000):
    """Strongly convex FISTA (docs/framework.md 4) from 0 until ||grad g(z)|| <= tol; returns z."""
    y = y_prev = np.zeros(n)
    t, qr, it = 0.0, mu / L, 0
    while True:
        a = 1.0 - qr * t * t
        t_next = (a + math.sqrt(a * a + 4.0 * t * t)) / 2.0
        beta = (t - 1.0) * (1.0 - qr * t_next) / (t_next * (1.0 - qr)) if it else 0.0
        z = y + beta * (y - y_prev)
        g = grad_g(z)
        if np.linalg.norm(g) <= tol or it >= max_iter:
            return z
        y_prev, y = y, z - g / L
        t, it = t_next, it + 1


def numpy_hypergradient_dense(model, n):
    """Quadratic lower levels, small x: the Hessian as the HVP of the identity (one matrix
    product: A^T (A I) + alpha I for ridge), both solves by Cholesky."""
    H = model["hvp"](None, np.eye(n))
    cho = scipy.linalg.cho_factor(H)
    x = scipy.linalg.cho_solve(cho, model["rhs"])
    return -model["Btq"](x, scipy.linalg.cho_solve(cho, model["grad_f"](x)))


def numpy_hypergradient(model, n, tol, lower="lbfgs"):
    """Lower solve to ||grad g|| <= tol, adjoint CG to ||A q - grad f|| <= tol; h = -B^T q.
    Non-quadratic lower levels: lower = "lbfgs" (SciPy L-BFGS-B) or "fista" (hand-written, with
    the same mu and L as hypergen, model["mu"], model["L"])."""
    if model["quadratic"]:
        op = spla.LinearOperator((n, n), matvec=lambda v: model["hvp"](None, v), dtype=float)
        x, _ = spla.cg(op, model["rhs"], rtol=0.0, atol=tol, maxiter=100_000)
    elif lower == "fista":
        x = numpy_fista(model["grad_g"], n, model["mu"], model["L"], tol)
    else:
        res = scipy.optimize.minimize(model["value_grad"], np.zeros(n), jac=True,
                                      method="L-BFGS-B",
                                      options=dict(gtol=tol / math.sqrt(n), ftol=0.0,
                                                   maxiter=100_000, maxfun=200_000))
        x = res.x
    op = spla.LinearOperator((n, n), matvec=lambda v: model["hvp"](x, v), dtype=float)
    q, _ = spla.cg(op, model["grad_f"](x), rtol=0.0, atol=tol, maxiter=100_000)
    return -model["Btq"](x, q)


# ----------------------------------------------------------------------------------------------
# JAX / JAXopt


def jax_available():
    try:
        import jax
        import jaxopt  # noqa: F401
    except ImportError as exc:
        return False, str(exc)
    from importlib.metadata import version

    jax.config.update("jax_enable_x64", True)
    return True, (f"jax {jax.__version__}, jaxopt {version('jaxopt')}, "
                  f"backend {jax.default_backend()}")


def jax_functions(name):
    """g(x, theta, data), f(x, theta, data) in jax.numpy and whether g is quadratic in x."""
    import jax.numpy as jnp

    name = "logistic" if name == "logistic_sparse" else name  # BCOO has the same @
    if name == "ridge":
        def g(x, th, d):
            r = d["A"] @ x - d["b"]
            return 0.5 * r @ r + 0.5 * jnp.exp(th[0]) * x @ x

        def f(x, th, d):
            r = d["Av"] @ x - d["bv"]
            return 0.5 * r @ r / d["Av"].shape[0]
        return g, f, True
    if name == "logistic":
        def g(x, th, d):
            return (jnp.mean(jnp.logaddexp(0.0, -d["y"] * (d["A"] @ x)))
                    + 0.5 * jnp.exp(th[0]) * x @ x)

        def f(x, th, d):
            return jnp.mean(jnp.logaddexp(0.0, -d["yv"] * (d["Av"] @ x)))
        return g, f, False
    if name == "tv2d":
        def g(x, th, d):
            Y = d["Y"]
            X = x.reshape(Y.shape)
            dx = X[1:, :-1] - X[:-1, :-1]
            dy = X[:-1, 1:] - X[:-1, :-1]
            return (0.5 * jnp.sum((X - Y) ** 2)
                    + jnp.exp(th[0]) * jnp.sum(jnp.sqrt(dx * dx + dy * dy + jnp.exp(2 * th[1]))))

        def f(x, th, d):
            return 0.5 * jnp.sum((x - d["Xt"].ravel()) ** 2)
        return g, f, False
    if name == "quadratic":
        def g(x, th, d):
            r = d["C"] @ th + d["D"] @ x - d["e"]
            return r @ r

        def f(x, th, d):
            r = d["M"] @ x - d["b"]
            return r @ r
        return g, f, True
    raise ValueError(name)


def jaxopt_hypergradient_fn(name, n, tol, dense=False):
    """A jit-compiled theta, data -> hypergradient with one tolerance for lower solve and adjoint;
    dense=True (quadratic lower levels): both solves with the materialised Hessian instead."""
    import jax
    import jax.numpy as jnp
    import jaxopt
    from jaxopt.implicit_diff import custom_root
    from jaxopt.linear_solve import solve_cg, solve_cholesky

    g, f, quadratic = jax_functions(name)
    grad_g = jax.grad(g)
    adjoint_solve = partial(solve_cg, tol=0.0, atol=tol, maxiter=100_000)
    if dense:
        @custom_root(grad_g, solve=solve_cholesky)
        def inner(x0, th, d):
            H = jax.hessian(g)(x0, th, d)
            return jax.scipy.linalg.solve(H, -grad_g(jnp.zeros_like(x0), th, d), assume_a="pos")
    elif quadratic:
        @custom_root(grad_g, solve=adjoint_solve)
        def inner(x0, th, d):
            rhs = -grad_g(jnp.zeros_like(x0), th, d)          # H x* = -grad g(0)
            matvec = lambda v: jax.jvp(lambda z: grad_g(z, th, d), (x0,), (v,))[1]
            return jax.scipy.sparse.linalg.cg(matvec, rhs, x0=x0, tol=0.0, atol=tol,
                                              maxiter=100_000)[0]
    else:
        solver = jaxopt.LBFGS(fun=g, tol=tol, maxiter=100_000, implicit_diff=True,
                              implicit_diff_solve=adjoint_solve)

        def inner(x0, th, d):
            return solver.run(x0, th, d).params

    def outer(th, d):
        return f(inner(jnp.zeros(n), th, d), th, d)
    return jax.jit(jax.grad(outer))


# ----------------------------------------------------------------------------------------------
# references


def reference(name, data, th, prob):
    """(grad F, how, its certified bound or 0 for a closed form)."""
    if name == "ridge":
        A, b, Av, bv = data["A"], data["b"], data["Av"], data["bv"]
        al = math.exp(th[0])
        H = A.T @ A + al * np.eye(A.shape[1])
        x = np.linalg.solve(H, A.T @ b)
        q = np.linalg.solve(H, Av.T @ (Av @ x - bv) / Av.shape[0])
        return np.array([-al * (x @ q)]), "closed form (dense solve)", 0.0
    if name == "quadratic":
        M, b, C, D, e = data["M"], data["b"], data["C"], data["D"], data["e"]
        x = np.linalg.lstsq(D, e - C @ th, rcond=None)[0]
        Dp_C = np.linalg.lstsq(D, C, rcond=None)[0]
        return 2 * (M @ Dp_C).T @ (b - M @ x), "closed form (D^+)", 0.0
    hg = prob.hypergradient(th, lower="fista", adjoint="cg", eps=1e-12, delta=1e-12,
                            max_iter=200_000)
    if hg.status != "ok":
        print(f"  warning: reference status {hg.status}")
    return hg.grad, "hypergen eps = delta = 1e-12", hg.bound / np.linalg.norm(hg.grad)


# ----------------------------------------------------------------------------------------------


def run_case(key, spec, args, have_jax):
    """Tune every contender (the baselines' tolerances by the oracle), then time them all in
    turns (`interleaved_times`) and keep each library's fastest."""
    import codegen

    name, sizes = spec
    row = {"case": key}
    ns = runpy.run_path(str(ROOT / "examples" / f"{name}.py"))
    data = ns["example_data"](0, **sizes)
    prob = codegen.load(ROOT / "examples" / f"{name}.py").bind(**data)
    th = theta0(ns, prob.theta_size)
    n = prob.x_size
    size_txt = ", ".join(f"{k}={v}" for k, v in sizes.items())
    print(f"\n== {key} ({name}: {size_txt}; x has {n} entries, theta {th.size})")
    ref, how, ref_bound = reference(name, data, th, prob)
    ref_norm = np.linalg.norm(ref)
    print(f"  reference: {how}, ||grad F|| = {ref_norm:.4g}"
          + (f", its certified bound / ||grad|| = {ref_bound:.2g}" if ref_bound else ""))
    row.update(name=name, sizes=size_txt)
    contenders = {}  # label -> (row key, zero-argument call, details for the row)

    # hypergen: its own certified bound decides (rtol mode); every applicable pair of solvers.
    # Diagnostic, not the headline ("tuned"): the same pairs given the baselines' oracle tuning
    # (eps = delta = tol down the ladder until the TRUE error is <= TARGET, no certificate
    # asked); the gap to the certified time is what the certificate costs.
    # Each pair and the default run on a bind of their own: a first-order solver's step size
    # tightens the bind's data constants (docs/constants.md 4), and on a shared bind that would
    # speed up the Newton pair and the default too (logistic 20000 x 2000: 53 units instead of
    # the 65 of a user's default call).
    module = codegen.load(ROOT / "examples" / f"{name}.py")
    pairs = [("cg", "cg")] if prob.is_quadratic else [("fista", "cg"), ("newton", "cg")]
    if direct_size(n, prob.is_quadratic):
        pairs.append(("direct", "direct"))
    for lower, adjoint in pairs:
        solver = f"{lower}+{adjoint}"
        own = module.bind(**data)
        contenders[f"hypergen {solver} rtol={TARGET:g}"] = ("hg", partial(
            own.hypergradient, th, lower=lower, adjoint=adjoint, rtol=TARGET),
            dict(solver=solver))
        tuned = partial(own.hypergradient, th, lower=lower, adjoint=adjoint, refine_iter=0)
        for tol in LADDER:
            if rel_err(tuned(eps=tol, delta=tol).grad, ref) <= TARGET:
                break
        contenders[f"hypergen {solver} tuned like the baselines (eps = delta = {tol:g}, "
                   "uncertified)"] = ("tuned", partial(tuned, eps=tol, delta=tol),
                                      dict(solver=solver, tol=tol))

    # the default call (lower = adjoint = "auto") against the best explicit pair (within
    # 1.1x is the goal): warm, and the first call of a fresh bind (bind included, as for each pair)
    own = module.bind(**data)
    contenders[f"hypergen auto (default) rtol={TARGET:g}"] = (
        "auto", partial(own.hypergradient, th, rtol=TARGET), dict(solver="auto"))
    # Diagnostic: the default's last round alone, cold, at the tolerances its rounds ended with
    # (known only afterwards; no refinement of ||x - x*||, as in a first round): what the
    # measuring rounds cost on top of the final solves.
    final_eps, final_delta = final_tolerances(own.hypergradient(th, rtol=TARGET))
    contenders["hypergen auto, one round at its final tolerances (diagnostic)"] = (
        "oneround", partial(own.hypergradient, th, eps=final_eps, delta=final_delta,
                            refine_iter=0),
        dict(solver="auto", eps=final_eps, delta=final_delta))
    for lower, adjoint in [*pairs, ("auto", "auto")]:
        contenders[f"hypergen {lower}+{adjoint} first call of a fresh bind"] = (
            "first", lambda lower=lower, adjoint=adjoint: module.bind(**data).hypergradient(
                th, lower=lower, adjoint=adjoint, rtol=TARGET),
            dict(solver=f"{lower}+{adjoint}"))

    # NumPy / SciPy: every applicable lower solver
    model = numpy_model(name, data, th)
    c = prob.constants(th)
    model.update(mu=c["mu"], L=c["L"])
    row["kappa"] = c["L"] / c["mu"]  # L/mu at theta: "auto" reads it (docs/solvers.md 3)
    for lower_np in (["cg"] if model["quadratic"] else ["lbfgs", "fista"]):
        for tol in LADDER:
            if rel_err(numpy_hypergradient(model, n, tol, lower_np), ref) <= TARGET:
                break
        label = {"cg": "cg", "lbfgs": "L-BFGS-B", "fista": "FISTA"}[lower_np] + "+cg"
        contenders[f"NumPy/SciPy {label} tol={tol:g}"] = (
            "np", partial(numpy_hypergradient, model, n, tol, lower_np), dict(tol=tol, solver=label))
    if model["quadratic"] and direct_size(n, True):  # what a user would do at this size
        contenders["NumPy/SciPy dense Cholesky"] = (
            "np", partial(numpy_hypergradient_dense, model, n), dict(tol=0.0, solver="Cholesky"))

    # JAXopt (compile time: the first call, the warm-up, minus the median)
    if have_jax:
        import jax
        import jax.numpy as jnp

        from jax.experimental import sparse as jsparse

        jdata = {k: jsparse.BCOO.from_scipy_sparse(v) if hasattr(v, "tocsr") else jnp.asarray(v)
                 for k, v in data.items()}
        jth = jnp.asarray(th)
        for tol in LADDER:
            fn = jaxopt_hypergradient_fn(name, n, tol)
            if rel_err(np.asarray(jax.block_until_ready(fn(jth, jdata))), ref) <= TARGET:
                break
        solver = ("jax cg" if jax_functions(name)[2] else "LBFGS") + "+solve_cg"
        fn = jaxopt_hypergradient_fn(name, n, tol)  # fresh: its first call compiles
        contenders[f"JAXopt {solver} tol={tol:g}"] = (
            "jax", lambda fn=fn: jax.block_until_ready(fn(jth, jdata)), dict(tol=tol, solver=solver))
        if jax_functions(name)[2] and direct_size(n, True):  # the materialised Hessian, both direct
            fn = jaxopt_hypergradient_fn(name, n, 0.0, dense=True)
            contenders["JAXopt dense (jax.hessian, Cholesky)"] = (
                "jax", lambda fn=fn: jax.block_until_ready(fn(jth, jdata)),
                dict(tol=0.0, solver="dense+solve_cholesky"))

    times = interleaved_times({label: call for label, (_, call, _) in contenders.items()},
                              args.repeat)
    for label, (kind, call, info) in contenders.items():
        t, first, out = times[label]
        grad = (out.grad if kind in ("hg", "tuned", "auto", "first", "oneround")
                else np.asarray(out))
        entry = dict(info, t=t, err=rel_err(grad, ref))
        line = f"  {label}: {t * 1e3:.2f} ms, true err {entry['err']:.2g}"
        if kind == "first":
            row.setdefault("first", {})[info["solver"]] = t
            print(f"  {label}: {t * 1e3:.2f} ms")
            continue
        if kind in ("hg", "tuned", "auto", "oneround"):
            entry.update(bound=out.bound / np.linalg.norm(out.grad), units=out.work["units"],
                         cross=out.work["cross"], status=out.status, call=call)
            line += f", work {out.work}"
        if kind in ("hg", "auto"):
            entry["c_calls"] = c_calls(call)
            line += f", {entry['c_calls']} Python-to-C calls"
            if kind == "auto":
                entry["rounds"] = out.notes[-1].count("eps=")
                entry["chose"] = f"{out.lower_solver}+{out.adjoint_solver}"
                line += f", chose {out.lower_solver}+{out.adjoint_solver}"
        if kind == "hg":
            line += (f", {out.notes[-1].count('eps=')} round(s), certified bound/||h|| "
                     f"{entry['bound']:.2g}, status {out.status}")
            if out.status != "ok":
                line += f" (certified {TARGET:g} not reached)"
        if kind == "jax":
            entry["compile"] = first - t
            line += f", first call (compile + run) - median = {first - t:.2f} s"
        print(line)
        if kind in ("hg", "tuned"):  # the work of each pair, certified and oracle-stopped
            row.setdefault(f"{kind}_units", {})[info["solver"]] = entry["units"]
        # the fastest of each library; for hypergen a certified result ("ok") before any other
        rank = (entry.get("status", "ok") != "ok" and kind == "hg", t)
        if kind not in row or rank < row[kind]["rank"]:
            row[kind] = dict(entry, rank=rank)
    if args.profile and key in args.profile:
        profile(row["hg"]["call"], key)
        call_overhead(module.bind(**data), th, row["hg"]["call"]())
    if args.stages and key in args.stages:
        stages(module.bind(**data), th, key)
    return row


def final_tolerances(hg):
    """(eps, delta) of the last accuracy round of a result with rtol (from its rounds note: E&R's
    rounds, or the per-direction or block correction's where the default certificate took it)."""
    note = next(n for n in hg.notes
                if n.startswith(("accuracy rounds", "DWR certificate", "block DWR certificate")))
    eps, delta = note.rsplit("eps=", 1)[1].split(":")[0].split(", delta=")
    return float(eps), float(delta)


def profile(call, key):
    """cProfile of one hypergen call: time inside the compiled kernels vs Python around them."""
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(3):
        call()
    pr.disable()
    st = pstats.Stats(pr)
    total = st.total_tt
    kernel_t, kernel_n = 0.0, 0
    for (file, line, fn), (cc, nc, tt, ct, callers) in st.stats.items():
        if fn.startswith("hg_") or "hg_" in fn and file == "~":
            kernel_t += tt
            kernel_n += nc
    print(f"  cProfile {key} (3 calls): total {total:.3f} s, in C kernels {kernel_t:.3f} s "
          f"({kernel_n} kernel calls, {100 * kernel_t / total:.0f}%), Python/NumPy around them "
          f"{total - kernel_t:.3f} s = {1e6 * (total - kernel_t) / max(kernel_n, 1):.1f} us per "
          "kernel call")
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(12)
    print("\n".join("    " + line for line in buf.getvalue().splitlines()[6:26]))


#: (module, function, label) of the stages `stages` times; "  " marks a part of the stage above.
STAGES = [
    ("codegen.runtime.bound_problem", "hypergradient", "the whole call (BoundProblem.hypergradient)"),
    ("codegen.hypergrad.hypergradient", "_resolved", "  options: \"auto\" resolved"),
    ("codegen.hypergrad.hypergradient", "to_accuracy", "  the accuracy rounds (to_accuracy)"),
    ("codegen.hypergrad.hypergradient", "checked_theta", "    theta checked"),
    ("codegen.hypergrad.hypergradient", "checked_constants", "    constants at theta"),
    ("codegen.hypergrad.hypergradient", "_step_size_constants", "    step-size constants"),
    ("codegen.hypergrad.hypergradient", "run_lower", "    lower solve"),
    ("codegen.hypergrad.lower.direct", "dense_factor", "      of which the Hessian and its factor"),
    ("codegen.hypergrad.hypergradient", "_localised", "    localised constants, refined e"),
    ("codegen.hypergrad.hypergradient", "_adjoint", "    adjoint solve"),
    ("codegen.hypergrad.hypergradient", "_assemble", "    h = -B^T q + grad_theta f"),
    ("codegen.hypergrad.hypergradient", "_bounded", "    bounds, value and the result"),
    ("codegen.hypergrad.hypergradient", "cross_norm", "      of which ||B||"),
    ("codegen.hypergrad.hypergradient", "aposteriori_bound", "      of which the a posteriori bound"),
    ("codegen.hypergrad.hypergradient", "_value", "      of which the upper value"),
]


def stages(prob, th, key, calls=2000):
    """Wall time per stage of the default call prob.hypergradient(th, rtol=TARGET), warm: each
    function of STAGES wrapped (in this process only) with a perf_counter accumulator. What the
    stages leave of their parent is the Python between them (argument checks, results)."""
    import importlib
    import time

    spent, originals = {}, []

    def timed(module, name, label):
        fn = getattr(module, name)

        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - start
        originals.append((module, name, fn))
        setattr(module, name, wrapper)

    call = partial(prob.hypergradient, th, rtol=TARGET)
    bare, _, _ = median_time(lambda: [call() for _ in range(200)], 5)
    for module_name, name, label in STAGES:
        module = sys.modules.get(module_name) or importlib.import_module(module_name)
        if hasattr(module, name):
            timed(module, name, label)
    try:
        for _ in range(calls):
            call()
    finally:
        for module, name, fn in reversed(originals):
            setattr(module, name, fn)
    hg = call()
    print(f"  stages of one default call ({hg.lower_solver}+{hg.adjoint_solver}, work "
          f"{hg.work}): {bare / 200 * 1e6:.1f} us unwrapped, per call (wrapped):")
    for _, _, label in STAGES:
        if label in spent:
            print(f"    {label:48s} {spent[label] / calls * 1e6:8.1f} us")


def c_calls(call):
    """Python-to-C calls of one call: kernel calls (KernelCaller.__call__) plus fused solver
    loops (FusedLoops.run) and the fused closing step (FusedLoops.close), counted by cProfile."""
    pr = cProfile.Profile()
    pr.enable()
    call()
    pr.disable()
    count = 0
    for (file, _, fn), (_, nc, _, _, _) in pstats.Stats(pr).stats.items():
        if (fn == "__call__" and file.endswith("kernel_caller.py")) or \
                (fn in ("run", "close") and file.endswith("fused.py")):
            count += nc
    return count


def call_overhead(prob, th, hg):
    """Wall time of one kernel call through the Python layer (BoundProblem -> cffi -> C) next to
    the hypergradient's kernel-call count: the floor of hypergen's time on tiny problems."""
    from codegen.hypergrad import call_kernel as _call

    x, v = np.asarray(hg.x, dtype=float).ravel(), np.ones(prob.x_size)
    t_bound, _, _ = median_time(lambda: [prob.lower_hvp(x, th, v) for _ in range(200)], 5)
    t_solver, _, _ = median_time(lambda: [_call(prob.lower_hvp, x, th, v) for _ in range(200)], 5)
    n_calls = hg.work["lower_grads"] + hg.work["hvps"] + hg.work["cross"] + 3
    print(f"  one lower_hvp call: {t_bound / 200 * 1e6:.1f} us via prob.lower_hvp, "
          f"{t_solver / 200 * 1e6:.1f} us via solvers._call; about {n_calls} kernel calls per "
          "hypergradient")


def fmt_ms(t):
    return f"{t * 1e3:.3g}" if t < 10 else f"{t * 1e3:.0f}"


def table(rows, have_jax):
    print("\n| case | hypergen ms (solver, rtol 1e-6) | cert. bound | true err | NumPy ms (solver, tol) | true err "
          "| JAXopt ms (solver, tol) | true err | JIT s | hypergen/JAXopt | hypergen/NumPy "
          "| hypergen tuned like them, ms (tol) | tuned/JAXopt | work / oracle's, same pair |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "hg" not in r:
            print(f"| {r['case']} | {r.get('note', '')} | | | | | | | | | | | | |")
            continue
        h, n, u = r["hg"], r["np"], r["tuned"]
        j = r.get("jax")
        jcols = (f"{fmt_ms(j['t'])} ({j['solver']}, {j['tol']:.0e}) | {j['err']:.1e} | "
                 f"{j['compile']:.1f} | {h['t'] / j['t']:.2f}" if j else "n/a | | | n/a")
        tuned_ratio = f"{u['t'] / j['t']:.2f}" if j else "n/a"
        print(f"| {r['case']} | {fmt_ms(h['t'])} ({h['solver']}) | "
              f"{h['bound']:.1e} | {h['err']:.1e} | {fmt_ms(n['t'])} ({n['solver']}, {n['tol']:.0e}) | "
              f"{n['err']:.1e} | {jcols} | {h['t'] / n['t']:.2f} | {fmt_ms(u['t'])} ({u['tol']:.0e}) "
              f"| {tuned_ratio} | {work_ratio(r, h['solver'])} |")


def work_ratio(row, solver):
    """Certified work over the work of the same solvers stopped by the oracle (the tolerance
    ladder's first rung whose TRUE error meets the target): what the certificate costs in
    passes over the data, "certified units / oracle units"."""
    certified, oracle = row["hg_units"][solver], row["tuned_units"][solver]
    return f"{certified / oracle:.2f} ({certified} / {oracle})"


def auto_table(rows):
    """The default call against the best explicit pair, warm and on a fresh bind's first call,
    and the Python-to-C calls of each."""
    print("\n| case | L/mu | auto chose | auto ms | best pair ms (pair) | auto/best | first call: "
          "auto ms | best first ms (pair) | auto/best | C calls: auto, best pair |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "auto" not in r:
            continue
        a, h, first = r["auto"], r["hg"], r["first"]
        best = min((p for p in first if p != "auto+auto"), key=first.get)
        print(f"| {r['case']} | {r['kappa']:.3g} | {a['chose']} | {fmt_ms(a['t'])} | "
              f"{fmt_ms(h['t'])} ({h['solver']}) | "
              f"{a['t'] / h['t']:.2f} | {fmt_ms(first['auto+auto'])} | {fmt_ms(first[best])} "
              f"({best}) | {first['auto+auto'] / first[best]:.2f} | {a['c_calls']}, "
              f"{h['c_calls']} |")


def rounds_table(rows):
    """What the certificate's rounds cost: the default call against its own last round run
    alone and cold (the tolerances a perfect first guess would have asked), in work units and
    time, with that round's certified bound."""
    print("\n| case | default: rounds, units, ms | its last round alone: units, ms (eps, delta) "
          "| its bound / ||h|| | last round / default, time |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "auto" not in r or "oneround" not in r:
            continue
        a, o = r["auto"], r["oneround"]
        print(f"| {r['case']} | {a['rounds']}, {a['units']}, {fmt_ms(a['t'])} | {o['units']}, "
              f"{fmt_ms(o['t'])} ({o['eps']:.1e}, {o['delta']:.1e}) | {o['bound']:.1e} | "
              f"{o['t'] / a['t']:.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="*", default=list(FULL),
                        help=f"any of {', '.join(FULL)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs after one warm-up")
    parser.add_argument("--profile", nargs="*", default=[],
                        help="cases whose hypergen call is profiled with cProfile")
    parser.add_argument("--stages", nargs="*", default=[],
                        help="cases whose default call is timed stage by stage (perf_counter)")
    parser.add_argument("--threads", default="1",
                        help="BLAS/OpenMP/XLA threads for every library, hypergen's OpenMP "
                             "kernels included (default 1; 0 = library defaults)")
    parser.add_argument("--no-jax", action="store_true", help="skip JAXopt")
    parser.add_argument("--no-fused", action="store_true",
                        help="hypergen without its solver loops fused in C (Python loops only)")
    args = parser.parse_args()
    if args.no_fused:
        from codegen.hypergrad import fused
        fused.FUSED_MAX_SIZE = 0
    specs = QUICK if args.quick else FULL
    unknown = [c for c in args.cases if c not in specs]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(specs)}")
    have_jax, jax_msg = (False, "--no-jax") if args.no_jax else jax_available()
    model, ncpu, t_av, bw = machine()
    print(f"machine: {model}, {ncpu} cores; NumPy {np.__version__}; "
          f"NumPy A @ v at 20000 x 2000: {t_av * 1e3:.1f} ms = {bw:.1f} GB/s")
    print(f"threads for NumPy/SciPy/JAX: {THREADS if THREADS != '0' else 'library default'} "
          f"(hypergen's kernels: OpenMP, same count); load average at start "
          f"{os.getloadavg()[0]:.2f}")
    print(f"JAXopt: {jax_msg}" if have_jax else f"JAXopt not available ({jax_msg}): its columns are skipped")
    rows = [run_case(c, specs[c], args, have_jax) for c in args.cases]
    print(f"load average at end {os.getloadavg()[0]:.2f} (other processes on this machine make "
          "times noisy)")
    table(rows, have_jax)
    auto_table(rows)
    rounds_table(rows)
