"""One compiled kernel as a Python callable: fixed arguments bound once, vectors per call."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import KernelError

if TYPE_CHECKING:  # annotations only
    from .module import GeneratedModule


class KernelCaller:
    """Calls one compiled kernel with the bound arrays; checks vector arguments per call."""

    def __init__(self, module: GeneratedModule, kernel: dict, arrays: dict, sizes: dict, work,
                 lock):
        self.name = kernel["name"]
        self.fn = getattr(module.lib, f"hg_{module.name}_{kernel['name']}")
        self.ffi = module.ffi
        self.from_buffer = module.ffi.from_buffer
        self.doubles = module.ffi.typeof("double[]")  # the parsed type: no lookup by its name
        self.params = kernel["params"]
        self.fixed = {}
        for p in self.params:
            if p["role"] == "size":
                self.fixed[p["name"]] = sizes[p["name"]]
            elif p["role"] == "data":
                self.fixed[p["name"]] = self.ffi.from_buffer("double[]", arrays[p["name"]])
            elif p["role"].startswith("csr_"):
                field = p["role"][len("csr_"):]  # data, indices or indptr
                csr = arrays[p["name"][: -len(field) - 1]]
                ctype = "double[]" if field == "data" else "int64_t[]"
                self.fixed[p["name"]] = self.ffi.from_buffer(ctype, getattr(csr, field))
            elif p["role"] == "scalar":
                self.fixed[p["name"]] = float(arrays[p["name"]])
            elif p["role"] == "work":
                self.fixed[p["name"]] = self.ffi.from_buffer("double[]", work)
        self.keep = (arrays, work)
        # cffi releases the GIL during the call and `work` is shared by the bound problem's
        # kernels: two threads must not use it at once (a race would be a silently wrong result).
        self.lock = lock

        # Per call, only the vector arguments change: (position, name) of each input and the
        # positions of the output(s), the rest fixed.
        self.template = [self.fixed.get(p["name"]) for p in self.params]
        self.inputs = tuple((k, p["name"]) for k, p in enumerate(self.params)
                            if p["name"] not in self.fixed and p["role"] != "output")
        self.outputs = tuple(k for k, p in enumerate(self.params)
                             if p["name"] not in self.fixed and p["role"] == "output")

    def __call__(self, vectors: dict, out: np.ndarray):
        args = self.template.copy()
        from_buffer, doubles = self.from_buffer, self.doubles
        for k, name in self.inputs:
            args[k] = from_buffer(doubles, vectors[name])
        for k in self.outputs:
            args[k] = from_buffer(doubles, out)
        lock = self.lock  # acquire / release: half the cost of a with block on a 5 us kernel
        lock.acquire()
        try:
            status = self.fn(*args)
        finally:
            lock.release()
        if status == 2:
            raise KernelError(f"{self.name}: invalid size (every size must be at least 1)")
        return status
