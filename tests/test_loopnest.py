"""codegen.compiler.emit.loopnest on its own: when a row loop may be unrolled and jammed, and how copies merge.

The numbers the jammed loops compute are checked against the oracle in test_kernels.py,
test_language.py and test_fuzz.py (sizes above JAM, so the remainder loops run too); here the
legality test and the merge are pinned down on hand-made IR.
"""
import re
from pathlib import Path

import sympy as sp

from codegen.compiler import ir
from codegen.compiler.emit.loopnest import JAM, Node, _iterations_independent, _paren, jam

m, n = sp.symbols("m n", integer=True, positive=True)
i, j = sp.symbols("i j", integer=True)
ARRAYS = {
    "A": ir.Array("A", (m, n), ir.DATA), "x": ir.Array("x", (n,), ir.X),
    "s": ir.Array("s", (m,), ir.TEMP), "out": ir.Array("out", (n,), ir.OUTPUT),
    "top": ir.Array("top", (), ir.TEMP),
}
ROWS = (ir.Loop(i, sp.Integer(0), m - 1), ir.Loop(j, sp.Integer(0), n - 1))
A, x, s, out = (sp.IndexedBase(name) for name in ("A", "x", "s", "out"))


def stmt(*updates):
    return ir.Statement(ROWS, tuple(ir.Update(*u) for u in updates))


DOT = stmt(("s", (i,), A[i, j] * x[j]))                 # s_i = a_i . x      (row-local)
SCATTER = stmt(("out", (j,), A[i, j] * s[i]))           # out += a_i s_i    (a sum reduction)


def test_row_local_temporaries_and_sum_reductions_are_independent():
    assert _iterations_independent([DOT, SCATTER], ARRAYS)


def test_dependences_between_rows_forbid_jamming():
    previous_row = stmt(("out", (j,), A[i, j] * s[i - 1]))
    reads_reduction = stmt(("s", (i,), A[i, j] * out[j]))
    shared_max = stmt(("top", (), A[i, j] * x[j], "max"))
    scatter_to_rows = stmt(("s", (i + 1,), A[i, j]))    # row i writes row i + 1's slot
    for group in ([DOT, previous_row], [SCATTER, reads_reduction], [shared_max],
                  [scatter_to_rows]):
        assert not _iterations_independent(group, ARRAYS), group


def test_jam_merges_equal_loops_and_keeps_different_ones_apart():
    def copy(u, stop):
        body = [Node(f"acc{u} += A[{u}];")]
        inner = Node(loop=("j", "0", "n", "#pragma omp simd"), simd=(f"acc{u}",), children=body)
        other = Node(loop=("p", "0", stop, ""), children=[Node(f"y{u};")])
        return [Node(f"double acc{u} = 0.0;"), inner, other, Node(f"s[{u}] += acc{u};")]

    merged = jam([copy(0, "A_indptr[i + 1]"), copy(1, "A_indptr[i + 2]")])
    texts = [node.text for node in merged if not node.loop]
    assert texts == ["double acc0 = 0.0;", "double acc1 = 0.0;", "s[0] += acc0;", "s[1] += acc1;"]
    loops = [node for node in merged if node.loop]
    assert loops[0].loop == ("j", "0", "n", "#pragma omp simd reduction(+:acc0, acc1)")
    assert [c.text for c in loops[0].children] == ["acc0 += A[0];", "acc1 += A[1];"]
    assert [lp.loop[2] for lp in loops[1:]] == ["A_indptr[i + 1]", "A_indptr[i + 2]"]  # CSR rows
    # copies of different shapes are never zipped: one after the other
    assert jam([[Node("a;")], [Node("b;"), Node("c;")]]) == [Node("a;"), Node("b;"), Node("c;")]


def test_paren():
    assert [_paren(c) for c in ("m", "12", "h - 1", "m*n")] == ["m", "12", "(h - 1)", "(m*n)"]


def test_generated_c_jams_dense_rows_not_csr_rows():
    root = Path(__file__).resolve().parent.parent / "generated"
    dense = (root / "logistic" / "hg_logistic.c").read_text()
    assert f"for (int64_t i = 0; i < m - m % {JAM}; i += {JAM})" in dense
    assert f"for (int64_t i = m - m % {JAM}; i < m; ++i)" in dense
    sparse = (root / "logistic_sparse" / "hg_logistic_sparse.c").read_text()
    hvp = re.search(r"int hg_logistic_sparse_lower_hvp\(.*?\n}\n", sparse + "\n", re.S).group(0)
    assert "A_indptr" in hvp and f"+= {JAM})" not in hvp
