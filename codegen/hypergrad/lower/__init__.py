"""The lower-level solvers, one per module: gradient (gd, hb), fista, cg, newton, direct.

Each is a function LowerTask -> LowerResult, registered with its needs in
`codegen.hypergrad.registry`. Whatever the solver, the certificate is the same:
||x - x*|| <= ||grad g(x)|| / mu at the returned x, where the gradient was evaluated and is
returned with it (docs/solvers.md 1).
"""
