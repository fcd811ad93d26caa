"""Program optimisations: dead-code elimination and loop fusion over a shared outer loop.

Fusion is what makes a Hessian-vector product one pass over a dense data matrix: the row
contraction z_i = a_i . v, the pointwise derivative terms at i and the scatter of a_i times them
all run inside one loop over i, so row a_i is read from memory once and then from cache.
"""
from __future__ import annotations

import sympy as sp

from . import ir


def eliminate_dead_code(program: ir.Program) -> ir.Program:
    """Keep only the updates that contribute to the outputs; drop arrays nothing uses."""
    needed = set(program.outputs)
    kept = []
    for stmt in reversed(program.statements):
        updates = tuple(u for u in stmt.updates if u.target in needed)
        if not updates:
            continue
        for u in updates:
            needed.add(u.target)
            needed |= {ir.read_name(r) for r in ir.reads_of(u.expr, program.arrays)}
        kept.append(ir.Statement(stmt.loops, updates))
    kept.reverse()
    arrays = {n: a for n, a in program.arrays.items()
              if n in needed or a.role in (ir.X, ir.THETA, ir.INPUT, ir.CACHE)}
    return ir.Program(arrays, kept, program.outputs, dict(program.meta))


def one_update_each(program: ir.Program) -> list[ir.Statement]:
    """The statements with several updates split into one statement per update, where no update
    reads another's target (then their order inside the loop nest is free): the tangent
    transform puts z = A x and its tangent A v in one statement."""
    out: list[ir.Statement] = []
    for st in program.statements:
        targets = {u.target for u in st.updates}
        reads = {ir.read_name(r) for u in st.updates for r in ir.reads_of(u.expr, program.arrays)}
        if len(st.updates) > 1 and not targets & reads:
            out += [ir.Statement(st.loops, (u,)) for u in st.updates]
        else:
            out.append(st)
    return out


def depending_on(statements: list[ir.Statement], arrays: dict[str, ir.Array],
                 direction: str) -> set[str]:
    """The arrays whose values depend on the input `direction`: a statement depends on it if it
    reads it or a dependent array, or adds into one (a fixed point over the statements)."""
    varying, changed = {direction}, True
    while changed:
        changed = False
        for st in statements:
            targets = {u.target for u in st.updates}
            reads = {ir.read_name(r) for u in st.updates for r in ir.reads_of(u.expr, arrays)}
            if (reads | targets) & varying and not targets <= varying:
                varying |= targets
                changed = True
    return varying


def fuse_outer_loops(program: ir.Program) -> list[list[ir.Statement]]:
    """Group consecutive statements that can share their outermost loop.

    Returns a list of groups (lists of statements); a group of several statements shares its
    first loop (renamed to the first statement's variable). A statement joins the group when its
    outer loop has the same bounds and every array it reads that the group writes is written and
    read only at the current outer iteration (first index exactly `var - lo`).
    """
    groups: list[list[ir.Statement]] = []
    for stmt in program.statements:
        if groups and _can_join(groups[-1], stmt, program.arrays):
            groups[-1].append(_rename_outer(stmt, groups[-1][0].loops[0].var))
        else:
            groups.append([stmt])
    return groups


def _rename_outer(stmt: ir.Statement, var: sp.Symbol) -> ir.Statement:
    old = stmt.loops[0].var
    if old == var:
        return stmt
    if any(lp.var == var for lp in stmt.loops[1:]):
        return stmt  # cannot happen after _can_join; kept for safety of the rename
    sub = {old: var}
    loops = (ir.Loop(var, stmt.loops[0].lo, stmt.loops[0].hi),) + tuple(
        ir.Loop(lp.var, lp.lo.xreplace(sub), lp.hi.xreplace(sub)) for lp in stmt.loops[1:])
    updates = tuple(ir.Update(u.target, tuple(sp.sympify(i).xreplace(sub) for i in u.index),
                              ir.xreplace(u.expr, sub), u.op) for u in stmt.updates)
    return ir.Statement(loops, updates)


def _can_join(group: list[ir.Statement], stmt: ir.Statement,
              arrays: dict[str, ir.Array]) -> bool:
    head = group[0].loops
    if not head or not stmt.loops:
        return False
    outer, mine = head[0], stmt.loops[0]
    if (outer.lo, outer.hi) != (mine.lo, mine.hi):
        return False
    inner_vars = {lp.var for s in group for lp in s.loops[1:]} | {lp.var for lp in stmt.loops[1:]}
    if outer.var in {lp.var for lp in stmt.loops[1:]} or (mine.var != outer.var and mine.var in inner_vars):
        return False
    candidate = _rename_outer(stmt, outer.var)
    written: dict[str, list[tuple[sp.Expr, ...]]] = {}
    read_in_group: set[str] = set()
    for s in group:
        for u in s.updates:
            written.setdefault(u.target, []).append(u.index)
            read_in_group |= {ir.read_name(r) for r in ir.reads_of(u.expr, arrays)}
    for u in candidate.updates:
        if u.target in read_in_group:
            return False  # an earlier statement would see this statement's partial writes
        for r in ir.reads_of(u.expr, arrays):
            name = ir.read_name(r)
            if name in written and not (
                    same_iteration(ir.read_index(r), outer)
                    and all(same_iteration(idx, outer) for idx in written[name])):
                return False  # it needs values other iterations of the fused loop produce
    return True


def same_iteration(index: tuple[sp.Expr, ...], loop: ir.Loop) -> bool:
    """True if `index` addresses the slice of the current iteration of `loop` (first coordinate)."""
    return bool(index) and sp.expand(index[0] - (loop.var - loop.lo)) == 0


def schedule(program: ir.Program) -> ir.Program:
    """Reorder statements (respecting dependences) so fusable loop nests become adjacent.

    Greedy list scheduling: loop-free statements first whenever ready (they are O(1) and often
    unblock others), then a ready statement sharing the previous statement's outer loop range,
    else the earliest ready one. Two statements that only accumulate (+=) into the same array
    commute, so they do not constrain each other.
    """
    stmts = program.statements
    writes = [{u.target: u.op for u in s.updates} for s in stmts]
    reads = [{ir.read_name(r) for u in s.updates for r in ir.reads_of(u.expr, program.arrays)}
             for s in stmts]
    preds: list[set[int]] = [set() for _ in stmts]
    for b in range(len(stmts)):
        for a in range(b):
            if _depends(writes[a], reads[a], writes[b], reads[b]):
                preds[b].add(a)
    done: set[int] = set()
    order: list[int] = []
    last_outer: tuple[sp.Expr, sp.Expr] | None = None
    while len(order) < len(stmts):
        ready = [k for k in range(len(stmts)) if k not in done and preds[k] <= done]
        pick = next((k for k in ready if not stmts[k].loops), None)
        if pick is None and last_outer is not None:
            pick = next((k for k in ready if _outer(stmts[k]) == last_outer), None)
        if pick is None:
            pick = ready[0]
        done.add(pick)
        order.append(pick)
        if stmts[pick].loops:
            last_outer = _outer(stmts[pick])
    return program.with_statements([stmts[k] for k in order])


def _outer(stmt: ir.Statement) -> tuple[sp.Expr, sp.Expr]:
    return (stmt.loops[0].lo, stmt.loops[0].hi)


def _depends(writes_a: dict[str, str], reads_a: set[str], writes_b: dict[str, str],
             reads_b: set[str]) -> bool:
    if set(writes_a) & reads_b or set(writes_b) & reads_a:
        return True
    return any(writes_a[t] != "+" or writes_b[t] != "+" for t in set(writes_a) & set(writes_b))
