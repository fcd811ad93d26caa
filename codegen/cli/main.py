"""The `hypergen` command line: build, show, audit, optimize (docs/interface.md section 2).

Errors in a problem file or its data come back as one line naming the file (and line), with exit
status 2; a traceback from inside SymPy is never the answer to a user's typo.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence
from typing import TextIO

from .. import jit
from ..compiler.problem import Problem
from ..constants import derive, format_tree
from ..errors import HypergenError
from ..pipeline import build_problem, choose_problem, generate, load_problem_file
from ..version import __version__
from .optimize import add_optimize_parser, join_negative_values, run_optimize


def _problems(args: argparse.Namespace) -> list[Problem]:
    """The problems of FILE, or only the one --name chooses (an unknown name lists the names)."""
    problems = load_problem_file(args.file)
    return problems if args.name is None else [choose_problem(problems, args.name, args.file)]


def _build(args: argparse.Namespace) -> int:
    for problem in _problems(args):
        start = time.perf_counter()
        compiled = jit.stats["compiled"]
        module = build_problem(problem, args.out, source_file=args.file,
                               allow_uncertified=args.allow_uncertified)
        seconds = time.perf_counter() - start
        how = "compiled" if jit.stats["compiled"] > compiled else "cache hit"
        print(f"{problem.name}: {module.directory} ({how}, {seconds:.2f} s)")
    return 0


def _show(args: argparse.Namespace) -> int:
    for problem in _problems(args):
        sys.stdout.write(generate(problem, allow_uncertified=True)["source"])
    return 0


def _audit(args: argparse.Namespace) -> int:
    for problem in _problems(args):
        derivation = derive(problem, allow_uncertified=args.allow_uncertified)
        if args.json:
            print(derivation.to_json())
        else:
            print(format_tree(derivation))
    return 0


def _optimize(args: argparse.Namespace) -> int:
    return run_optimize(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hypergen", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"hypergen {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="generate and compile the problems of FILE")
    b.add_argument("file")
    b.add_argument("--name", help="only the problem of this name (FILE may define several)")
    b.add_argument("--out", default="generated", help="output directory (default: ./generated)")
    b.add_argument("--allow-uncertified", action="store_true",
                   help="build even if the lower level cannot be proved strongly convex")
    b.set_defaults(run=_build)
    s = sub.add_parser("show", help="print the generated C of FILE")
    s.add_argument("file")
    s.add_argument("--name", help="only the problem of this name (FILE may define several)")
    s.set_defaults(run=_show)
    a = sub.add_parser("audit", help="the derived constants of FILE and how each was derived")
    a.add_argument("file")
    a.add_argument("--name", help="only the problem of this name (FILE may define several)")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a.add_argument("--allow-uncertified", action="store_true",
                   help="accept a lower level whose strong convexity cannot be proved")
    a.set_defaults(run=_audit)
    add_optimize_parser(sub, _optimize)
    return p


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    """A warning as one line, like the errors: what happened and the file it names, no source."""
    text = str(message).removeprefix("hypergen: ")
    print(f"hypergen: warning: {text}", file=sys.stderr if file is None else file)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(join_negative_values(sys.argv[1:] if argv is None else argv))
    try:
        with warnings.catch_warnings():  # restores the caller's warning display afterwards
            warnings.showwarning = _show_warning
            status: int = args.run(args)
        return status
    except HypergenError as exc:
        print(f"hypergen: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hypergen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
