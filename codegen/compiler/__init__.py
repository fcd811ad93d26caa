"""The generator: a SymPy problem -> loop-nest IR -> derivative programs -> passes -> C.

Each stage is a module taking and returning plain data: `problem` (normalise, validate),
`lowering` (Sum -> loop nests), `autodiff` (reverse and forward program transforms), `kernels`
(which derivative programs a problem needs), `passes` (dead code, scheduling, fusion) and
`emit` (loop trees, the C printer, Jinja templates).
"""
