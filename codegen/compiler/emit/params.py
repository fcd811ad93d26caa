"""One parameter of a generated C function: what the kernel renderers and the solver loops share."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Param:
    ctype: str
    name: str
    role: str  # "size", "theta", "data", "scalar", "input", "output", "work" (loops: "vector", ...)
    length: str = ""  # C expression of the element count, for arrays
