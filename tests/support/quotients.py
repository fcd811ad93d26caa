"""Measured Lipschitz quotients of a bound problem's kernels, to check certified constants."""
from __future__ import annotations

import numpy as np


def largest_B_quotient(prob, th, seed: int, trials: int = 200) -> float:
    """max ||B(a) - B(e)|| / ||a - e|| (B = cross_matrix) over random pairs, far apart and close
    together (distances 1 to 1e-3), around where the atoms bend."""
    rng = np.random.default_rng(seed)
    worst = 0.0
    for trial in range(trials):
        a = 2 * rng.standard_normal(prob.x_size)
        e = a + 10.0 ** -(trial % 4) * rng.standard_normal(prob.x_size)
        diff = prob.cross_matrix(a, th) - prob.cross_matrix(e, th)
        worst = max(worst, np.linalg.norm(diff, 2) / np.linalg.norm(a - e))
    return worst
