"""The examples' generated C, and one AddressSanitizer + UBSan object of each, per test session.

Two drivers link an example's sanitized kernels: tests/test_c_hygiene.py (every kernel at tiny
sizes) and tests/test_fused_loops.py (every solver loop). Both compile hg_<name>.c with the same
flags; compiling it once and linking each driver against that object saves the larger part of
the work (hypercleaning's source takes ~20 s of CPU under ASan), and each driver is still built
with exactly these flags. The objects compile in two background threads (each waiting on one
compiler process: CI's two cores) from the moment a test asks for them or starts them ahead.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from codegen.pipeline import generate_cached

from .examples import load_example

SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-g",
            "-fno-omit-frame-pointer"]
# The flags of every sanitized driver build (the kernels' object and the driver alike).
SANITIZED_FLAGS = ["-std=c99", "-O1", "-fopenmp-simd", *SANITIZE]

_TEXTS: dict[str, dict[str, Any]] = {}


def generated_texts(name: str) -> dict[str, Any]:
    """generate() of examples/<name>.py ({"source", "header", "meta", ...}), once per session:
    through the session's symbolic cache, which the example's build (support.built_example)
    filled or reads (the same texts, checked against their checksum on the way in)."""
    if name not in _TEXTS:
        _TEXTS[name] = generate_cached(load_example(name).problem)
    return _TEXTS[name]


class Build(NamedTuple):
    """A compiler run: its return code, its messages, and what it wrote (if it succeeded)."""

    returncode: int
    stderr: str
    output: Path


def write_sources(name: str, directory: Path) -> None:
    """hg_<name>.c and hg_<name>.h (the generated texts) into `directory`."""
    texts = generated_texts(name)
    (directory / f"hg_{name}.c").write_text(texts["source"])
    (directory / f"hg_{name}.h").write_text(texts["header"])


def _compile_object(cc: str, name: str, directory: Path) -> Build:
    obj = directory / f"hg_{name}.o"
    done = subprocess.run([cc, *SANITIZED_FLAGS, "-c", f"hg_{name}.c", "-o", obj.name],
                          cwd=directory, capture_output=True, text=True, timeout=600)
    return Build(done.returncode, done.stderr, obj)


_COMPILERS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sanitized-cc")
_OBJECTS: dict[tuple[str, str, Path], Future[Build]] = {}


def _start(cc: str, name: str, root: Path) -> Future[Build]:
    key = (cc, name, root)
    if key not in _OBJECTS:
        directory = root / name
        directory.mkdir(parents=True, exist_ok=True)
        write_sources(name, directory)  # here: the texts come from SymPy, under the GIL
        _OBJECTS[key] = _COMPILERS.submit(_compile_object, cc, name, directory)
    return _OBJECTS[key]


def start_sanitized_objects(cc: str, names: Iterable[str], root: Path) -> None:
    """Start compiling the objects of `names` (largest source first) without waiting for them:
    the drivers that link them later find them built or being built."""
    for name in sorted(set(names), key=lambda name: -len(generated_texts(name)["source"])):
        _start(cc, name, Path(root))


def sanitized_object(cc: str, name: str, root: Path) -> Build:
    """hg_<name>.o compiled with SANITIZED_FLAGS under root/<name>/, once per (cc, name, root)."""
    return _start(cc, name, Path(root)).result()


def link_sanitized_driver(cc: str, name: str, root: Path, directory: Path) -> Build:
    """directory/driver from directory/driver.c and the session's sanitized hg_<name>.o.

    hg_<name>.c and .h are written next to driver.c (the header for the driver, the source for
    whoever reads a failure report)."""
    write_sources(name, directory)
    kernels = sanitized_object(cc, name, root)
    if kernels.returncode != 0:
        return kernels
    done = subprocess.run([cc, *SANITIZED_FLAGS, "driver.c", str(kernels.output), "-o", "driver",
                           "-lm"], cwd=directory, capture_output=True, text=True, timeout=300)
    return Build(done.returncode, done.stderr, directory / "driver")


def run_sanitized_driver(name: str, root: Path, directory: Path) -> str:
    """The stdout of directory/driver.c linked against the session's sanitized hg_<name>.o and
    run with leak detection; skips where $CC (default cc) is missing or cannot sanitize, fails
    on a build error or a sanitizer report (a non-zero exit)."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler {cc!r}")
    build = link_sanitized_driver(cc, name, root, directory)
    if build.returncode != 0 and "sanitize" in build.stderr:
        pytest.skip(f"{cc} cannot build with sanitizers: {build.stderr[:200]}")
    assert build.returncode == 0, build.stderr
    res = subprocess.run(["./driver"], cwd=directory, capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, ASAN_OPTIONS="detect_leaks=1"))
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout
