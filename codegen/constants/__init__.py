"""Derived constants with an audit trail (constants.md; issue 4).

    der = derive(problem)                          # structural rules; raises ProblemError if refuted
    q = compute_data_quantities(der, data)         # once per bind: certified norms of the operators
    c = evaluate(der, theta, q)                    # mu, L, L_A, L_B, L_f (+ L_ft), certified
    c = evaluate_local(der, theta, q, x, r, data)  # the same, L* valid on the ball B(x, r) only
    print(format_tree(der)); der.to_json(); Derivation.from_json(text)

Modules: records (Record, Derivation, JSON), atoms (the atom table), operators (selections,
stencils, data operators), terms (terms and their rules),
rules (derive), quantities (bind-time data quantities), numeric (evaluate), report.
"""
from .local import evaluate_local
from .numeric import evaluate, reads_theta
from .quantities import compute_data_quantities
from .records import Derivation, Operator, Record, ThetaMax, ThetaMin
from .report import format_tree
from .rules import derive

__all__ = ["derive", "compute_data_quantities", "evaluate", "evaluate_local", "reads_theta",
           "format_tree", "Derivation", "Record", "Operator", "ThetaMax", "ThetaMin"]
