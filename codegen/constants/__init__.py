"""Derived constants with an audit trail (docs/constants.md).

    der = derive(problem)                          # structural rules; raises ProblemError if refuted
    q = compute_data_quantities(der, data)         # once per bind: certified norms of the operators
    c = evaluate(der, theta, q)                    # mu, L, L_A, L_B, L_f (+ L_ft), certified
    c = evaluate_local(der, theta, q, x, r, data)  # the same, L* valid on the ball B(x, r) only
    print(format_tree(der)); der.to_json(); Derivation.from_json(text)

Layout: `records` (Record, Derivation, JSON: what both halves share), `derivation/` (build time: the
rules, from a Problem to a Derivation), `evaluation/` (bind time: the numbers, from a Derivation
and the data). evaluation reads derivation's atom table and term parser, never the reverse.
"""
from .derivation import derive, format_tree
from .evaluation import compute_data_quantities, evaluate, evaluate_local, reads_theta
from .records import Derivation, Operator, Record, ThetaMax, ThetaMin

__all__ = ["derive", "compute_data_quantities", "evaluate", "evaluate_local", "reads_theta",
           "format_tree", "Derivation", "Record", "Operator", "ThetaMax", "ThetaMin"]
