"""`hypergen optimize FILE --data DATA.npz`: learn the hyperparameters of a problem file.

    hypergen optimize examples/ridge.py --data ridge.npz [--theta0 -0.5,1] [--method lbfgs]
                      [--budget 5000 | --budget 30s] [--out DIR] [--no-progress]
                      [--scheduler local | processes | tcp://HOST:8786]

The data file is a NumPy .npz archive (np.savez) whose array names are the problem's data names
(the IndexedBase/Symbol names of the problem file that are neither x nor theta):

* one sample:      A, b, Av, bv                    -> module.bind(...)
* several samples: A__0, b__0, A__1, b__1, ...     -> module.bind_samples([...]); the suffix
  "__<s>" numbers the samples 0, 1, ..., S-1 (no gaps). An array without a suffix is shared by
  every sample (e.g. validation data Av, bv used with each training set A__s, b__s).

--data may also be a directory of image files (png, jpg, tif, ...) for a denoising problem with a
noisy image in the lower level and a clean one in the upper level: one sample per image, the noisy
copy made with Gaussian noise of std 0.1 on [0, 1] grey values, seed 0 (codegen/cli/data.py).

--theta0 is a number (used for every entry of theta) or comma-separated numbers, one per entry
(default 0). --budget is a number of work units (lower gradients + Hessian-vector products) or
seconds with an "s" suffix. The run prints a summary (theta, value, bound, work, time, status)
and writes DIR/history.csv, DIR/history.json and, when matplotlib is installed, DIR/history.png;
DIR/history.jsonl gets each step as it is done (a killed run keeps its completed steps there).
--scheduler runs the samples' hypergradients in this process (local, the default), on worker
processes (processes) or on a Dask cluster (its scheduler's address; docs/distributed.md): the
same numbers either way.
Every input error is raised as one HypergenError with a message naming the culprit.
"""
from __future__ import annotations

import argparse
import math
import re
import zipfile
from collections.abc import Sequence
from typing import Any, Callable
from pathlib import Path

import numpy as np

from ..errors import HypergenError
from ..learn import DEFAULT_METHOD, METHODS, OptimizeError, optimize, parse_budget, parse_theta0
from ..learn.history import HistoryLog
from ..pipeline import load
from ..runtime.executors import ExecutorError, check_executor
from .data import check_image_pairs, load_image_directory

__all__ = ["run_optimize", "load_data", "add_optimize_parser", "join_negative_values"]

#: Options whose value may start with "-" (a negative theta0 such as -0.5,1).
NEGATIVE_VALUE_OPTIONS = ("--theta0",)

_SUFFIX = re.compile(r"^(?P<name>.+)__(?P<index>\d+)$")


def load_data(path: str | Path, names: Sequence[str]
              ) -> dict[str, np.ndarray] | list[dict[str, np.ndarray]]:
    """Read an .npz data file for a problem whose data names are `names`: a dict of arrays (one
    sample) or a list of dicts (names suffixed __0, __1, ...; unsuffixed arrays are shared)."""
    path = Path(path)
    if not path.exists():
        raise HypergenError(f"data file {path} not found")
    if path.is_dir():
        raise HypergenError(f"data file {path} is a directory, expected an .npz file")
    names = list(names)
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):  # an .npy file: one unnamed array
            if len(names) == 1:
                return {names[0]: loaded}
            raise HypergenError(f"{path} holds a single array, but the problem needs {len(names)} "
                                f"named arrays ({', '.join(names)}): write them into an .npz "
                                f"archive with np.savez(path, {', '.join(f'{n}=...' for n in names)})")
        with loaded as npz:
            arrays = {key: npz[key] for key in npz.files}
    except HypergenError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise HypergenError(f"cannot read data file {path} as .npz: {exc}") from None
    shared: dict[str, np.ndarray] = {}
    per: dict[int, dict[str, np.ndarray]] = {}
    unknown = []
    for key, arr in arrays.items():
        m = _SUFFIX.match(key)
        if key in names:
            shared[key] = arr
        elif m and m.group("name") in names:
            per.setdefault(int(m.group("index")), {})[m.group("name")] = arr
        else:
            unknown.append(key)
    if unknown:
        raise HypergenError(f"{path}: unknown array{'s' if len(unknown) > 1 else ''} "
                            f"{', '.join(sorted(unknown))}; the problem's data names are "
                            f"{', '.join(names)} (suffix __0, __1, ... for several samples)")
    if not per:
        missing = [n for n in names if n not in shared]
        if missing:
            raise HypergenError(f"{path}: missing array{'s' if len(missing) > 1 else ''} "
                                f"{', '.join(missing)} (the problem needs {', '.join(names)})")
        return shared
    indices = sorted(per)
    if indices != list(range(len(indices))):
        raise HypergenError(f"{path}: sample suffixes must be __0 ... __{len(indices) - 1} "
                            f"without gaps, got {', '.join('__' + str(i) for i in indices)}")
    both = sorted(f"{n} and {n}__{s}" for s in indices for n in per[s] if n in shared)
    if both:  # a shared array is every sample's: one of its own contradicts it (it was dropped)
        raise HypergenError(f"{path}: {', '.join(both)} are both given; an array without a "
                            f"suffix is shared by every sample, so give either it or one per "
                            f"sample")
    samples = []
    for s in indices:
        data = dict(shared)
        data.update(per[s])
        missing = [n for n in names if n not in data]
        if missing:
            raise HypergenError(f"{path}: sample {s} has no "
                                + ", ".join(f"{n}__{s} (or shared {n})" for n in missing))
        samples.append(data)
    return samples


def join_negative_values(argv: Sequence[str]) -> list[str]:
    """["--theta0", "-0.5,1"] -> ["--theta0=-0.5,1"]: argparse takes a value that starts with
    "-" and is not a plain number for an option, and refuses it."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in NEGATIVE_VALUE_OPTIONS and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            out.append(f"{arg}={argv[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def add_optimize_parser(sub: Any, run: Callable[[argparse.Namespace], int]) -> None:
    """The `optimize` subcommand's arguments, on the subparsers `sub` of the main parser."""
    o = sub.add_parser("optimize", help="learn the hyperparameters of FILE on DATA")
    o.add_argument("file")
    o.add_argument("--name", help="the problem to optimise when FILE defines several")
    o.add_argument("--data", required=True,
                   help="NPZ file whose names match the data symbols, or a directory of clean "
                        "images (denoising problems)")
    o.add_argument("--theta0", help="initial theta: a number (every entry) or comma-separated "
                                    "numbers, e.g. --theta0 -0.5,1")
    o.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHODS),
                   help=f"the upper-level method (default {DEFAULT_METHOD}: certified L-BFGS)")
    o.add_argument("--budget", help="work units (lower gradients + HVPs), or seconds as '30s'")
    o.add_argument("--out", default="hypergen-run", help="directory for history and plots")
    o.add_argument("--no-progress", action="store_true")
    o.add_argument("--scheduler", default="local",
                   help="where the samples run: local (here, one after another), processes "
                        "(a worker process per core) or a Dask scheduler address such as "
                        "tcp://10.0.0.5:8786")
    o.set_defaults(run=run)


def _fmt_theta(theta: np.ndarray) -> str:
    th = np.asarray(theta)
    if th.size <= 10:
        return ", ".join(f"{v:.8g}" for v in th)
    return (f"{th.size} entries (norm {np.linalg.norm(th):.6g}, min {th.min():.6g}, "
            f"max {th.max():.6g})")


def run_optimize(args: argparse.Namespace) -> int:
    """The `hypergen optimize` command (args: file, data, theta0, method, budget, out,
    no_progress). Returns the exit status: 0, 1 when the run failed, 130 when interrupted."""

    budget = getattr(args, "budget", None)
    parse_budget(budget)                                  # a bad budget fails before building
    theta0_text = getattr(args, "theta0", None)
    theta0 = 0.0 if theta0_text in (None, "") else theta0_text
    if isinstance(theta0, str):
        parse_theta0(theta0, len([s for s in theta0.split(",") if s.strip()]) or 1)
    problem_file = Path(args.file)
    if not problem_file.exists():
        raise HypergenError(f"problem file {problem_file} not found")
    data_path = Path(args.data)
    if not data_path.exists():
        raise HypergenError(f"data file {data_path} not found")

    scheduler = getattr(args, "scheduler", None) or "local"
    try:                                                  # a bad --scheduler fails before building
        check_executor(None if scheduler == "local" else scheduler, None)
    except ExecutorError as exc:
        raise HypergenError(f"--scheduler: {exc}") from None

    out = Path(args.out)
    try:                                                  # before any work: a bad --out
        out.mkdir(parents=True, exist_ok=True)            # must not cost the run
    except OSError as exc:
        raise HypergenError(f"cannot create output directory {out}: {exc}") from None

    module = load(str(problem_file), name=getattr(args, "name", None))
    names = [a["name"] for a in module.meta["arrays"] if a["role"] == "data"]
    if data_path.is_dir():
        data: dict[str, np.ndarray] | list[dict[str, np.ndarray]] = \
            load_image_directory(data_path, module.meta)
    else:
        data = load_data(data_path, names)
    check_image_pairs(data if isinstance(data, list) else [data], module.meta, data_path)
    if scheduler != "local" and not isinstance(data, list):
        data = [data]  # one sample on the scheduler asked for (it was ignored, and not checked)
    prob = (module.bind_samples(data, executor=None if scheduler == "local" else scheduler)
            if isinstance(data, list) else module.bind(data))
    executor = getattr(prob, "executor", None)
    try:
        theta0 = parse_theta0(theta0, prob.theta_size)
    except OptimizeError as exc:
        raise HypergenError(f"--theta0: {exc}") from None

    n = len(data) if isinstance(data, list) else 1
    print(f"{module.name}: {n} sample{'s' if n > 1 else ''}, theta has {prob.theta_size} "
          f"entr{'ies' if prob.theta_size != 1 else 'y'}; method {args.method}"
          + (f", budget {budget}" if budget else "")
          + (f"; samples on {executor.description}" if executor is not None else ""))
    try:  # every step is on disk as soon as it is done: a killed run keeps its history
        log = HistoryLog(out / "history.jsonl")
    except OSError as exc:
        raise HypergenError(f"cannot write {out / 'history.jsonl'}: {exc}") from None
    try:
        res = optimize(prob, theta0, method=getattr(args, "method", None), budget=budget,
                       progress=False if getattr(args, "no_progress", False) else None,
                       callback=log)
    finally:
        log.close()
        if hasattr(prob, "close"):  # the executor's worker processes or Dask client
            prob.close()
    err = f" +- {res.value_error:.3g} (certified)" if math.isfinite(res.value_error) else ""
    print(f"theta   {_fmt_theta(res.theta)}")
    print(f"value   {res.value:.10g}{err}")
    print(f"bound   {res.certificate()}")
    print(f"work    {res.work} units (lower gradients + HVPs)")
    print(f"time    {res.seconds:.3f} s")
    print(f"status  {res.status}" + (f": {res.message}" if res.message else ""))

    try:
        written = [log.finish(res.history), res.history_to_csv(out / "history.csv"),
                   res.history_to_json(out / "history.json")]
    except OSError as exc:  # a full disk at the end: say where, after the summary above
        raise HypergenError(f"cannot write the history into {out}: {exc.strerror or exc}") from None
    try:
        res.plot(out / "history.png")
        written.append(out / "history.png")
    except ImportError:
        print("(matplotlib not installed: no history.png; pip install hypergen[plot])")
    except OSError as exc:
        raise HypergenError(f"cannot write {out / 'history.png'}: {exc.strerror or exc}") from None
    print("wrote   " + ", ".join(str(p) for p in written))
    if res.status == "interrupted":
        return 130
    return 1 if res.status == "failed" else 0
