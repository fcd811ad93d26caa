"""The adjoint solvers, one per module: krylov (cg, gd, hb), direct, backprop.

The iterative and direct ones are functions AdjointTask -> AdjointResult registered in
`codegen.hypergrad.registry`; they stop on the TRUE residual ||A q - grad f|| <= delta, which
the certificate uses (docs/solvers.md 2). backprop differentiates a stored lower trajectory
instead and has no bound.
"""
