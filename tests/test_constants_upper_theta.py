"""L_ft when theta enters f only through terms without x (found by the docs writer): `flatten`
drops x-free terms, so no term of f carries theta; the consumers then read L_ft = inf. The
correct value is 0: grad_theta f does not depend on x."""
from __future__ import annotations

import numpy as np
import sympy as sp

from codegen import Problem
from codegen.constants import compute_data_quantities, derive, evaluate

n = sp.Symbol("n", integer=True, positive=True)
j = sp.Idx("j", n)
x, y = sp.IndexedBase("x", shape=(n,)), sp.IndexedBase("y", shape=(n,))
theta = sp.Symbol("theta")
LOWER = (sp.Sum((x[j] - y[j]) ** 2, (j, 0, n - 1)) / 2
         + sp.exp(theta) / 2 * sp.Sum(x[j] ** 2, (j, 0, n - 1)))


def _constants(upper):
    der = derive(Problem(name="upper_theta", x=x, theta=theta, lower=LOWER, upper=upper))
    data = {"y": np.linspace(-1.0, 1.0, 5)}
    return der, evaluate(der, [0.3], compute_data_quantities(der, data))


def test_theta_only_in_x_free_terms_of_f_gives_L_ft_zero():
    der, c = _constants(sp.Sum((x[j] - y[j]) ** 2, (j, 0, n - 1)) / 2 + theta ** 2)
    rec = der.constants["L_ft"]
    assert rec.expr == 0 and rec.kind == "exact" and rec.certified
    assert c["L_ft"] == 0.0 and c["certified_flags"]["L_ft"]
    # brute force: grad_theta f = 2 theta at every x, so its Lipschitz constant in x is 0
    f = sp.Sum((x[j] - y[j]) ** 2, (j, 0, 2)) / 2 + theta ** 2
    assert not sp.diff(f, theta).has(x)


def test_f_without_theta_has_no_L_ft_and_x_theta_terms_keep_their_rule():
    der, _ = _constants(sp.Sum((x[j] - y[j]) ** 2, (j, 0, n - 1)) / 2)
    assert "L_ft" not in der.constants
    # theta next to x in f: the old rule (here theta times a linear term: no rule, oo) is kept
    f = sp.Sum((x[j] - y[j]) ** 2, (j, 0, n - 1)) / 2 + theta * sp.Sum(x[j], (j, 0, n - 1))
    der, c = _constants(f)
    assert der.constants["L_ft"].expr == sp.oo and c["L_ft"] == float("inf")
