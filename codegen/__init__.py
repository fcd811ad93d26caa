"""hypergen: SymPy bilevel problems -> C kernels -> hypergradients with certified error bounds.

The pipeline, one module per stage, each taking and returning plain data:

    problem (Problem) -> lower (loop-nest IR) -> autodiff (derivative programs) -> optimize
    (dead code, fusion) -> render (C via Jinja templates) -> build (cffi, content-addressed cache)
    -> runtime (bind, kernels) -> solvers / hypergradient (certified bounds) -> upper (optimize)
"""
from .errors import BindError, BuildError, HypergenError, KernelError, ProblemError
from .primitives import sigmoid, softplus
from .problem import Problem

__version__ = "0.1.0"

__all__ = [
    "Problem", "softplus", "sigmoid", "load", "HypergenError", "ProblemError", "BindError",
    "BuildError", "KernelError", "__version__",
]


def load(path, name=None, out=None, allow_uncertified=False):
    """Build (or load from the cache) the problems of a problem file; return one generated module.

    `name` picks a problem when the file defines several; `out` is the output directory
    (default: a per-user cache directory, so loading never writes into the caller's tree).
    `allow_uncertified` accepts a lower level whose strong convexity cannot be proved.
    """
    from .pipeline import load as _load

    return _load(path, name=name, out=out, allow_uncertified=allow_uncertified)
