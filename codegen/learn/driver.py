"""`optimize`: learn theta by minimising F(theta) = f(x*(theta), theta) + r(theta) with
certified inexact hypergradients (docs/interface.md 3.4, docs/framework.md 9).

    res = optimize(prob, theta0)                       # the default method, "lbfgs"
    res = optimize(prob, theta0, method="maid", budget=5000)
    res.theta, res.value, res.status, res.message, res.certificate(), res.history

The steps: validate the options of the method (codegen.learn.options), set up the run's
bookkeeping (codegen.learn.runner), run the method's loop, and turn whatever ended it (its own
rule, a budget, the callback, Ctrl-C or SIGTERM, a failed solve) into an OptimizeResult.
Runs are deterministic: the same inputs give the same history (apart from the "time" column).
"""
from __future__ import annotations

import math
import signal
import threading
from typing import Any, Callable

import numpy as np

from ..hypergrad.preconditioners import holding
from .gd import run_gd
from .lbfgs import run_lbfgs
from .lbfgsb import run_lbfgsb
from .maid import run_maid
from .options import OptimizeError, make_options, parse_bounds, parse_theta0
from .result import OptimizeResult, OptimizeStatus
from .runner import Runner, StopRun

__all__ = ["optimize"]

#: method -> (its loop, which point the run returns, whether the adjoint is warm-started).
LOOPS: dict[str, tuple[Callable[..., tuple[OptimizeStatus, str]], str, bool]] = {
    "lbfgs": (run_lbfgs, "accepted", True),
    "maid": (run_maid, "certified", False),
    "gd": (run_gd, "accepted", False),
    "lbfgsb": (run_lbfgsb, "certified", False),
}


class _Terminated(KeyboardInterrupt):
    """SIGTERM during a run: ends it like Ctrl-C, with the best point so far."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def optimize(problem: Any, theta0: Any, method: str | None = None,
             **options: Any) -> OptimizeResult:
    """Minimise the upper objective over theta from theta0.

    problem   a bound problem (module.bind(...)), a samples object (module.bind_samples(...),
              anything with `.samples`: the objective and the hypergradient are averaged), or
              any object with the kernel interface;
    theta0    a float (every entry) or a list of theta_size floats;
    method    "lbfgs" (the default: certified inexact L-BFGS), "maid", "gd" or "lbfgsb";
    options   the method's options (codegen.learn.options: CommonOptions and the method's own
              type). An unknown option, or one of another method, raises OptimizeError.
    """
    opts = make_options(method, options)
    size = getattr(problem, "theta_size", None)
    if size is None:
        raise OptimizeError("the problem object has no theta_size")
    theta = parse_theta0(theta0, int(size))
    lo, hi = parse_bounds(opts.bounds, theta.size)
    theta = np.clip(theta, lo, hi)
    loop, select, warm_adjoint = LOOPS[opts.method]
    run = Runner(problem, theta.size, opts, lo, hi, select=select, warm_adjoint=warm_adjoint)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with holding(run.kernels):
            status, message = loop(run, theta, opts)
    except StopRun as stop:
        status, message = stop.status, stop.message
    except _Terminated:
        status, message = OptimizeStatus.INTERRUPTED, "SIGTERM: the best point so far is returned"
    except KeyboardInterrupt:
        status, message = (OptimizeStatus.INTERRUPTED,
                           "KeyboardInterrupt: the best point so far is returned")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        run.close()
    run.flush_pending()
    return _result(run, theta, status, message)


def _result(run: Runner, theta0: np.ndarray, status: OptimizeStatus,
            message: str) -> OptimizeResult:
    if run.best is None:  # no point certified: whatever stopped the run, it is no success
        theta, entry = theta0, {"value": math.nan, "value_error": math.nan,
                                "grad_norm": math.nan, "bound": math.nan}
        if OptimizeStatus(status).success:
            status, message = OptimizeStatus.FAILED, f"no point was certified: {message}"
    else:
        theta, entry = run.best
    if run.last_hg is not None and not getattr(run.last_hg, "certified", True):
        message = message.replace("(certified)", "(not certified: the constants are uncertified)")
    return OptimizeResult(
        theta=theta, value=entry["value"], history=run.history, status=OptimizeStatus(status),
        work=run.work, seconds=run.elapsed(), method=run.options.method, message=message,
        nit=run.iterations, value_error=entry["value_error"], grad_norm=entry["grad_norm"],
        bound=entry["bound"], hypergradient=run.last_hg, notes=run.notes)
