"""One parameter of a generated C function: what the kernel renderers and the solver loops share."""
from __future__ import annotations

import re
from dataclasses import dataclass

_IDENTIFIER = re.compile(r"[A-Za-z_]")


def wide(extent: str) -> str:
    """`extent` as a C expression that composes in int64_t. An extent that names a size is
    int64_t already; a literal one (`2147483647`) is an int, and `2*(2147483647)` would overflow
    in int arithmetic, so only literals get the cast: the usual case reads as written."""
    return extent if _IDENTIFIER.search(extent) else f"(int64_t)({extent})"


@dataclass
class Param:
    ctype: str
    name: str
    role: str  # "size", "theta", "data", "scalar", "input", "output", "work" (loops: "vector", ...)
    length: str = ""  # C expression of the element count, for arrays
