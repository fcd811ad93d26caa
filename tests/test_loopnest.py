"""codegen.compiler.emit.loopnest on its own: when a row loop may be unrolled and jammed, and how copies merge.

The numbers the jammed loops compute are checked against the oracle in test_kernels.py,
test_language.py and test_fuzz.py (sizes above JAM, so the remainder loops run too); here the
legality test and the merge are pinned down on hand-made IR, and the loops of the examples'
kernels on the emitter's loop tree (tests/support/loops.py), not on the C text.
"""
import sympy as sp

from codegen.compiler import ir
from codegen.compiler.emit.loopnest import JAM, Node, as_operand, iterations_independent, jam

from support import kernel_body, kernel_names, load_example, loops_of

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
    assert iterations_independent([DOT, SCATTER], ARRAYS)


def test_dependences_between_rows_forbid_jamming():
    previous_row = stmt(("out", (j,), A[i, j] * s[i - 1]))
    reads_reduction = stmt(("s", (i,), A[i, j] * out[j]))
    shared_max = stmt(("top", (), A[i, j] * x[j], "max"))
    scatter_to_rows = stmt(("s", (i + 1,), A[i, j]))    # row i writes row i + 1's slot
    for group in ([DOT, previous_row], [SCATTER, reads_reduction], [shared_max],
                  [scatter_to_rows]):
        assert not iterations_independent(group, ARRAYS), group


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


def test_as_operand():
    assert [as_operand(c) for c in ("m", "12", "h - 1", "m*n")] == ["m", "12", "(h - 1)", "(m*n)"]


def test_dense_row_loop_is_jammed_with_a_remainder():
    """Logistic HVP: rows i..i+JAM-1 share one sweep over j (2 dot products per row: a_i . x and
    a_i . v, so 2 JAM accumulators), then a serial remainder loop runs the last m % JAM rows."""
    loops = loops_of(kernel_body(load_example("logistic").problem, "lower_hvp"))
    main, rest = [lp for lp in loops if lp.depth == 0 and lp.var == "i"]
    assert (main.start, main.stop, main.step) == ("0", f"m - m % {JAM}", JAM)
    assert (rest.start, rest.stop, rest.step) == (f"m - m % {JAM}", "m", 1)
    assert main.parallel and not rest.parallel
    row_sweeps = [loops_of([child])[0] for child in main.node.children if child.loop]
    assert row_sweeps[0].var == "j" and row_sweeps[0].simd
    assert len(row_sweeps[0].node.simd) == 2 * JAM
    remainder_sweeps = [loops_of([child])[0] for child in rest.node.children if child.loop]
    assert len(remainder_sweeps[0].node.simd) == 2


def test_csr_rows_are_never_jammed():
    """Sparse logistic: every kernel walks the stored entries of a row (A_indptr[i] to
    A_indptr[i + 1]) inside a row loop of step 1."""
    problem = load_example("logistic_sparse").problem
    for kernel in kernel_names(problem):
        loops = loops_of(kernel_body(problem, kernel))
        assert all(lp.step == 1 for lp in loops), kernel
    loops = loops_of(kernel_body(problem, "lower_hvp"))
    rows = [lp for lp in loops if lp.depth == 0 and lp.var == "i"]
    assert len(rows) == 1 and rows[0].parallel
    walks = [lp for lp in loops if lp.depth == 1]
    assert walks and all(lp.walks_csr_row and lp.start == "A_indptr[i]"
                         and lp.stop == "A_indptr[i + 1]" for lp in walks)


def test_memoised_walks_match_sympy_on_shared_subtrees():
    """ir.reads_of and ir.xreplace walk each distinct subexpression once (derivative bodies share
    theirs); they must return what SymPy's tree walks return, in the same order."""
    top = sp.Symbol("top", real=True)
    inner = sp.exp(A[i, j] * x[j] + top) * s[i]
    body = sp.diff(sp.log(1 + inner ** 2) * out[j], x[j], 2) + inner * sp.sin(inner)
    walked = {e for e in sp.preorder_traversal(body)
              if isinstance(e, sp.Indexed) or e == top}
    assert ir.reads_of(body, ARRAYS) == sorted(walked, key=sp.default_sort_key)
    assert [ir.read_name(r) for r in ir.reads_of(body, {"x": ARRAYS["x"]})] == ["x"]
    for rule in ({x[j]: sp.Symbol("h")}, {inner: top}, {i: i + 1, top: 2 * top}, {}):
        assert sp.srepr(ir.xreplace(body, rule)) == sp.srepr(body.xreplace(rule))
