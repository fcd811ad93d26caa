"""Bind time: the numbers. Data quantities once per bind (certified norms of the operators,
docs/constants.md 4), the constants at a theta (section 5), local (ball) constants, the
structural ||B|| bound, and the per-bind glue the runtime calls (`runtime`).

Modules: interpreter (sizes, data, operators rebuilt from the data), quantities, numeric
(`evaluate`), local (`evaluate_local`), cross (`CrossNorm`), runtime.
"""
from .local import evaluate_local
from .numeric import evaluate, reads_theta
from .quantities import compute_data_quantities

__all__ = ["compute_data_quantities", "evaluate", "evaluate_local", "reads_theta"]
