"""Norms that neither underflow nor overflow: the certificates' norms at every scale.

sqrt(v . v) is the 2-norm to rounding while v . v stays within SAFE_SQUARES; below, the squares
of the entries underflow (a vector of 1e-160s has v . v = 0, and a bound made of such norms
fell below the true error), above they overflow. Outside, the norm is taken of v scaled by
max |v_i| (docs/bounds.md 6, "Extreme scales").
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["SAFE_SQUARES", "scaled_norm", "from_squares", "norm2"]

SAFE_SQUARES = (1e-250, 1e250)


def scaled_norm(v: np.ndarray) -> float:
    """max|v_i| ||v / max|v_i|||: 0 for a zero vector, inf or nan where an entry is."""
    top = float(np.max(np.abs(v))) if v.size else 0.0
    if top == 0.0 or not math.isfinite(top):
        return top
    w = v / top
    return top * math.sqrt(w.dot(w))


_SAFE_LOW, _SAFE_HIGH = SAFE_SQUARES  # as plain floats: the norms' one test, thousands of times


def from_squares(s: float, v: np.ndarray) -> float:
    """||v|| from s = v . v: sqrt(s) inside SAFE_SQUARES and for a zero vector, else
    `scaled_norm` (v . v underflowed, overflowed or is nan)."""
    if _SAFE_LOW <= s <= _SAFE_HIGH or (s == 0.0 and not np.count_nonzero(v)):
        return math.sqrt(s)
    return scaled_norm(v)


def norm2(v: object) -> float:
    """The 2-norm of v flattened, at every scale."""
    a = np.asarray(v, dtype=np.float64).ravel()
    return from_squares(float(a.dot(a)), a)
