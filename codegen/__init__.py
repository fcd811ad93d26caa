"""hypergen: SymPy bilevel problems -> C kernels -> hypergradients with certified error bounds.

The pipeline, one module per stage, each taking and returning plain data:

    compiler.problem (Problem) -> compiler.lowering (loop-nest IR) -> compiler.autodiff
    (derivative programs) -> compiler.passes (dead code, fusion) -> compiler.emit (C via Jinja
    templates) -> jit (cffi, content-addressed cache) -> runtime (bind, kernels) -> hypergrad
    (solvers, certified bounds) -> learn (theta by gradient methods)

`constants` derives mu, L, L_A, L_B, L_f at build time and evaluates them at bind time;
`pipeline` drives the stages and `cli` is the `hypergen` command.
"""
from .errors import BindError, BuildError, ConfigError, HypergenError, KernelError, ProblemError
from .primitives import sigmoid, softplus
from . import pipeline
from .compiler.problem import Problem
from .version import __version__

__all__ = [
    "Problem", "softplus", "sigmoid", "load", "HypergenError", "ProblemError", "BindError",
    "BuildError", "KernelError", "ConfigError", "__version__",
]


def load(path, name=None, out=None, allow_uncertified=False):
    """Build (or load from the cache) the problems of a problem file; return one generated module.

    `name` picks a problem when the file defines several; `out` is the output directory
    (default: a per-user cache directory, so loading never writes into the caller's tree).
    `allow_uncertified` accepts a lower level whose strong convexity cannot be proved.
    """
    return pipeline.load(path, name=name, out=out, allow_uncertified=allow_uncertified)
