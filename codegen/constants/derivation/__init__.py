"""Build time: the structural rules that derive mu, L, L_A, L_B, L_f (+ L_ft) of a Problem as
SymPy expressions in theta, sizes and data quantities, with an audit trail (docs/constants.md 3).

Modules: atoms (the atom table), operators (selections, stencils, data operators), terms (terms
and their rules), ball (what local constants record), rules (`derive`), cross_structure (the
theta-structure the structural ||B|| bound reads back), report (`format_tree`).
"""
from .report import format_tree
from .rules import derive

__all__ = ["derive", "format_tree"]
