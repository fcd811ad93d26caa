"""The loop structure of a generated kernel, read from the emitter's loop tree (not the C text).

`kernel_body(problem, "lower_hvp")` is the list of `Node`s the templates render into that C
function's body; `loops_of(nodes)` lists every loop in it, outermost first, as `LoopInfo`.
A test states what it expects of the loops (which are jammed, which walk CSR rows, which carry
an OpenMP pragma) without depending on the C formatting.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from codegen import Problem
from codegen.compiler.emit.loopnest import Node
from codegen.compiler.emit.render import kernel_renderers
from codegen.compiler.kernels import kernel_specs


@dataclass(frozen=True)
class LoopInfo:
    """One loop: `for (int64_t var = start; var < stop; var += step)`, under `pragma`."""

    var: str
    start: str
    stop: str
    step: int
    pragma: str
    depth: int  # 0 for a loop at the top of the kernel body
    node: Node

    @property
    def walks_csr_row(self) -> bool:
        """A loop over the stored entries of one CSR row (start A_indptr[row])."""
        return "_indptr[" in self.start

    @property
    def parallel(self) -> bool:
        return self.pragma.startswith("#pragma omp parallel for")

    @property
    def simd(self) -> bool:
        return self.pragma.startswith("#pragma omp simd")

    @property
    def lines(self) -> list[str]:
        """The C lines directly in this loop's body (not in nested loops)."""
        return [child.text for child in self.node.children if not child.loop]


_RENDERERS: dict[int, tuple[Problem, dict[str, Any]]] = {}


def _renderers(problem: Problem) -> dict[str, Any]:
    """The renderer of every C function of `problem`'s module, by name (built once)."""
    if id(problem) not in _RENDERERS:
        renderers = kernel_renderers(problem, kernel_specs(problem))
        _RENDERERS[id(problem)] = (problem, {r.name: r for r in renderers})
    return _RENDERERS[id(problem)][1]


def kernel_names(problem: Problem) -> list[str]:
    """The C functions of `problem`'s module (without the hg_<name>_ prefix), in file order."""
    return list(_renderers(problem))


def kernel_body(problem: Problem, kernel: str) -> list[Node]:
    """The body tree of one C function of `problem`'s module."""
    renderers = _renderers(problem)
    assert kernel in renderers, f"{problem.name} has no kernel {kernel!r}: {sorted(renderers)}"
    body: list[Node] = renderers[kernel].context()["body"]
    return body


def loops_of(nodes: Iterable[Node], depth: int = 0) -> list[LoopInfo]:
    """Every loop in the tree, in the order the C text has them (outer before inner)."""
    found = []
    for node in nodes:
        if node.loop:
            var, start, stop, pragma = node.loop
            found.append(LoopInfo(var, start, stop, node.step, pragma, depth, node))
            found += loops_of(node.children, depth + 1)
    return found
