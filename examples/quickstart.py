"""The main job on the ridge example: build, bind, one certified hypergradient, learn theta.

    python examples/quickstart.py

theta is the log of the ridge weight; the learned value is compared with the exact optimum
(closed-form hypergradient, root-found with SciPy) so you can see the answer is right.
"""
import runpy
from pathlib import Path

import numpy as np
from scipy.optimize import brentq

import codegen

HERE = Path(__file__).resolve().parent
example = runpy.run_path(str(HERE / "ridge.py"))

ridge = codegen.load(HERE / "ridge.py")            # generate + compile (cached after the first run)
data = example["example_data"](seed=0)             # A (50 x 10), b, Av (30 x 10), bv
prob = ridge.bind(**data)
print(prob)
print("constants at theta = 0:", {k: round(v, 4) if isinstance(v, float) else v
                                  for k, v in prob.constants(0.0).items() if k != "certified_flags"})

hg = prob.hypergradient(0.0, lower="fista", adjoint="cg", eps=1e-8, delta=1e-8)
print(hg)

res = prob.optimize(0.0, progress=False)           # the default: certified L-BFGS, its own stop
print(f"learned theta = {res.theta[0]:.6f} (alpha = {np.exp(res.theta[0]):.4f}), "
      f"upper objective {res.value:.6f} +- {res.value_error:.1e}, {res.work} work units, "
      f"status {res.status}")
print(res.certificate())                          # how close to optimal, certified


def exact_hypergradient(theta):
    A, b, Av, bv = data["A"], data["b"], data["Av"], data["bv"]
    H = A.T @ A + np.exp(theta) * np.eye(A.shape[1])
    xs = np.linalg.solve(H, A.T @ b)
    return -(np.exp(theta) * xs) @ np.linalg.solve(H, Av.T @ (Av @ xs - bv) / Av.shape[0])


best = brentq(exact_hypergradient, -10.0, 10.0, xtol=1e-12)
print(f"exact optimum theta* = {best:.6f}; |learned - exact| = {abs(res.theta[0] - best):.2e}")
