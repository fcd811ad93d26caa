"""A certified run-time bound on ||B(x, theta)||_2 in one pass over the data (docs/framework.md section 8.8).

For problems whose theta enters g only as per-sample weights,

    g(x, theta) = sum_T c_T Sum_I v_T(theta_I) core_{T,I}(x) + (terms without theta),

column I of B = d/dtheta grad_x g is  sum_T c_T v_T'(theta_I) grad_x core_{T,I}(x), and
||B||_2 <= ||B||_F = sqrt(sum_I ||column I||^2) (docs/constants.md 2, "Hypercleaning"). Each core is
linear in x, a table atom psi(u) of an affine u, or a log-sum-exp log Sum_k exp(u_k); with J_I the
Jacobian rows of the affine arguments of every term of sample I (stacked) and w_I the matching
weights (c_T v_T'(theta_I) psi'(z), softmax(z) for log-sum-exp, 1 for linear cores), column I is
J_I^T w_I, and ||J_I^T w_I||^2 = w_I^T (J_I J_I^T) w_I. The small per-sample Gram matrices
J_I J_I^T do not depend on x or theta: they are formed once per bind; each call then costs one
evaluation of z = K x + b (one pass over the data) plus O(m R^2) (R rows per sample).
Summing the terms of a sample BEFORE taking the norm keeps the bound tight (hypercleaning:
||(p_i - y_i) (x) a_i||, not ||p_i|| ||a_i|| + ||y_i|| ||a_i||).

Outward margins: z is computed with an error <= gamma (||J_r|| ||x|| + |b_r|); psi' moves by at most
sup|psi''| (over [z - e, z + e]) times that, softmax by 1/2 ||dz||; the Gram matrix and the
quadratic form add gamma (sum_r |w_r| ||J_r||)^2 to the squared norm.

The structure is read from the derivation (constants.json) alone: the term sources recorded in
the L record are parsed back and re-flattened. On first use a bound is cross-checked against two
exact columns (two cross JVPs, `BoundProblem.cross_norm_bound`); any mismatch, any term that is
not of this form, or theta anywhere else (a global weight exp(theta_0), theta inside an atom) makes
the bound unavailable (math.inf): the caller then falls back to cross JVPs.
"""
from __future__ import annotations

import math
from collections import ChainMap

import numpy as np
import sympy as sp

from ...floats import norm2
from ..derivation.atoms import analyse_atom
from ..derivation.ball import ball_components
from ..derivation.cross_structure import NotAvailable, structure
from ..derivation.terms import VarReads, split_affine
from ..records import T
from .interpreter import Env, as_int, expand_axes, interpret
from .local import bind_context, interval_sups

U = 2.0 ** -53
REL = 1e-12
CHUNK_ENTRIES = 4e6  # Jacobian entries per chunk while forming the Gram matrices
GRAM_LIMIT = 5e7  # largest m R^2 kept in memory


# -- numbers -----------------------------------------------------------------------------------
def _lambdify(expr):
    return sp.lambdify([T], expr, modules=[{"sigmoid": lambda z: 0.5 * (1 + np.tanh(z / 2)),
                                            "softplus": lambda z: np.logaddexp(0.0, z),
                                            "logcosh": lambda z: np.logaddexp(z, -z) - np.log(2.0)}, "numpy"])


def _peak_fn(psi):
    """A function (lo, hi) -> sup |psi''| over [lo_i, hi_i] (arrays), or None."""
    facts = analyse_atom(psi)
    if facts is not None and facts.certified:
        try:
            peak = float(facts.peak)
        except (TypeError, ValueError):
            peak = math.inf
        if math.isfinite(peak):
            return lambda lo, hi: np.full(lo.shape, peak * (1 + REL))
    comps = ball_components(psi)
    if comps is None:
        return None

    def local(lo, hi):
        out = np.empty(lo.shape)
        for r in range(lo.size):  # one interval per row (rare path: exp / polynomial atoms)
            out.flat[r] = interval_sups(comps, lo.flat[r:r + 1], hi.flat[r:r + 1])["peak"]
        return out

    return local


class CrossNorm:
    """The prepared bound for one bind: term specs, per-sample Gram matrices (lazy)."""

    def __init__(self, der, data):
        self.der = der
        self.specs = structure(der)
        self.sizes, self.scalars, self.arrays, self.xshape = bind_context(der, data)
        self.D = int(np.prod(self.xshape))
        E = Env(self.sizes, self.scalars, self.arrays, "__none__", (1,))
        ranges = {(as_int(sp.sympify(sp_[1]), E), as_int(sp.sympify(sp_[2]), E))
                  for sp_ in (s["sample"] for s in self.specs)}
        if len(ranges) != 1:
            raise NotAvailable("theta terms run over different sample ranges")
        self.lo, self.hi = ranges.pop()
        self.m = self.hi - self.lo + 1
        for s in self.specs:
            s["c"] = float(sp.sympify(s["coef"]).subs(
                {sym: self.sizes.get(sym.name, self.scalars.get(sym.name))
                 for sym in sp.sympify(s["coef"]).free_symbols}))
            s["dv"] = _lambdify(sp.diff(s["v"], T))
            s["nrows"] = int(np.prod([as_int(hi, E) - as_int(lo, E) + 1
                                      for _, lo, hi in s["rows"]])) if s["rows"] else 1
            if s["kind"] == "atom":
                s["dpsi"] = _lambdify(sp.diff(s["psi"], T))
                s["peak"] = _peak_fn(s["psi"])
                if s["peak"] is None:
                    raise NotAvailable(f"no bound on psi'' for the atom {s['psi']}")
        self.R = sum(s["nrows"] for s in self.specs)
        if self.m * self.R * self.R > GRAM_LIMIT:
            raise NotAvailable(f"per-sample Gram matrices too large ({self.m} x {self.R}^2)")
        self.gram = None
        self.checked = False

    # the interpreter over a chunk of samples
    def _eval(self, spec, expr, chunk, jac, x=None):
        """expr over (sample in chunk, rows...) as an array (chunk, nrows[, D])."""
        arrays = self.arrays
        if x is not None:
            arrays = ChainMap({self.der.x_name: x.reshape(self.xshape)}, self.arrays)
        E = Env(self.sizes, self.scalars, arrays,
                      self.der.x_name if jac else "__none__", self.xshape)
        s = spec["sample"][0]
        env = {s: chunk}
        shape = [chunk.size]
        rows = (s,) + tuple(r[0] for r in spec["rows"])
        for sym, lo, hi in spec["rows"]:
            env[sym] = np.arange(as_int(lo, E), as_int(hi, E) + 1)
            shape.append(env[sym].size)
        axes, arr, isjac = interpret(expr, env, E)
        extra = [a for a in axes if a not in rows]
        if extra:
            raise NotAvailable(f"free index {extra[0]} in {expr}")
        if jac and not isjac:
            return np.zeros((chunk.size, int(np.prod(shape[1:])), self.D))
        arr = expand_axes(np.asarray(arr, dtype=float), axes, rows, jac)
        arr = np.broadcast_to(arr, tuple(shape) + ((self.D,) if jac else ()))
        return arr.reshape((chunk.size, -1) + ((self.D,) if jac else ()))

    def _lin(self, spec):
        if spec["kind"] == "linear":
            return spec["lin"], sp.S.Zero
        return split_affine(spec["u"], VarReads(self.der.x_name, self.der.theta_name))

    def _grams(self):
        """Per-sample Gram matrices J_I J_I^T (m, R, R), row norms, offsets |b|. Built into
        locals and published together, gram last (it is what says they are built): a
        KeyboardInterrupt in the offsets loop had left gram set and offsets half built, and
        every later bound of that bind was inf."""
        step = max(1, int(CHUNK_ENTRIES // max(1, self.R * self.D)))
        gram = np.empty((self.m, self.R, self.R))
        for start in range(0, self.m, step):
            chunk = np.arange(self.lo + start, min(self.lo + start + step, self.hi + 1))
            J = np.concatenate([self._eval(s, self._lin(s)[0], chunk, True) for s in self.specs],
                               axis=1)
            gram[start:start + chunk.size] = J @ J.transpose(0, 2, 1)  # batched BLAS, not einsum
        rownorm = np.sqrt(np.maximum(np.einsum("irr->ir", gram), 0.0)) * (1 + 4 * (self.D + 4) * U)
        offsets = []
        allrows = np.arange(self.lo, self.hi + 1)
        for s in self.specs:
            if s["kind"] == "linear":
                offsets.append(None)
                continue
            off = self._lin(s)[1]
            offsets.append(np.abs(self._eval(s, off, allrows, False)) if off != 0
                           else np.zeros((self.m, s["nrows"])))
        self.rownorm, self.offsets, self.gram = rownorm, offsets, gram

    def column_norms(self, x, theta, margins=True) -> np.ndarray:
        """Upper bounds on ||B e_I|| for the samples I = lo..hi (computed values if not margins)."""
        if self.gram is None:
            self._grams()
        x = np.asarray(x, dtype=float).reshape(-1)
        theta = np.asarray(theta, dtype=float).reshape(-1)
        if self.lo < 0 or self.hi >= theta.size:
            raise NotAvailable("sample range outside theta")
        th = theta[self.lo:self.hi + 1]
        xnorm = norm2(x)
        gamma = 4 * (self.D + 10) * U
        allrows = np.arange(self.lo, self.hi + 1)
        W, E, col = [], np.zeros(self.m), 0
        for s, off in zip(self.specs, self.offsets):
            cv = s["c"] * np.asarray(s["dv"](th), dtype=float) * np.ones(self.m)
            acv = np.abs(cv)[:, None]
            jn = self.rownorm[:, col:col + s["nrows"]]
            if s["kind"] == "linear":
                w = np.ones((self.m, 1))
                E += np.sum(8 * U * acv * jn, axis=1)  # rounding of c v'
            else:
                z = self._eval(s, s["u"], allrows, False, x)
                zerr = 2 * gamma * (jn * xnorm + off + np.abs(z))
                if s["kind"] == "atom":
                    w = np.asarray(s["dpsi"](z), dtype=float) * np.ones_like(z)
                    dw = acv * (s["peak"](z - zerr, z + zerr) * zerr + 8 * U * np.abs(w)) \
                        + 8 * U * acv * np.abs(w)
                    E += np.sum(dw * jn, axis=1)
                else:  # softmax over the log-sum-exp index (last row index)
                    nk = self._lse_size(s)
                    zz = z.reshape(self.m, -1, nk)
                    e = np.exp(zz - zz.max(axis=2, keepdims=True))
                    w = (e / e.sum(axis=2, keepdims=True)).reshape(self.m, -1)
                    # ||softmax(z~) - softmax(z)||_2 <= ||z~ - z||_2 / 2 (Jacobian <= I/2), plus
                    # the evaluation error; the block contributes ||dp||_2 ||J_block||_F
                    dpn = 0.5 * np.sqrt(np.sum(zerr.reshape(self.m, -1, nk) ** 2, axis=2)) \
                        + 8 * (nk + 4) * U
                    jf = np.sqrt(np.sum(jn.reshape(self.m, -1, nk) ** 2, axis=2))
                    E += np.sum(acv * dpn * jf, axis=1) * (1 + 8 * U) \
                        + np.sum(8 * U * acv * np.abs(w) * jn, axis=1)
            W.append(cv[:, None] * w)
            col += s["nrows"]
        W = np.concatenate(W, axis=1)
        q = np.einsum("ir,irs,is->i", W, self.gram, W)
        if not margins:
            return np.sqrt(np.maximum(q, 0.0))
        # Gram formation and quadratic form: error <= gamma2 (sum_r |w_r| ||J_r||)^2
        A = np.sum(np.abs(W) * self.rownorm, axis=1)
        gamma2 = 4 * (self.D + self.R * self.R + 10) * U
        return (np.sqrt(np.maximum(q, 0.0) + gamma2 * A * A) + E) * (1 + REL)

    def _lse_size(self, s):
        E = Env(self.sizes, self.scalars, self.arrays, "__none__", (1,))
        _, lo, hi = s["rows"][-1]
        return as_int(hi, E) - as_int(lo, E) + 1

    def bound(self, x, theta) -> float:
        cols = self.column_norms(x, theta)
        if not np.all(np.isfinite(cols)):
            return math.inf
        return float(math.sqrt(float(np.sum(cols * cols)))) * (1 + REL) + np.finfo(float).tiny


def prepare_cross(der, data):
    """A CrossNorm for this bind, or the reason (str) why no structural bound is available."""
    try:
        return CrossNorm(der, data)
    except NotAvailable as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - anything unexpected: no bound, JVPs instead
        return f"{type(exc).__name__}: {exc}"
