"""codegen.jit: compile, cache, lock, recover, publish. Each compile of the tiny C below takes ~0.6 s."""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import codegen
from codegen import jit
from codegen.errors import BuildError

REPO = pathlib.Path(codegen.__file__).resolve().parent.parent
EXT_SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")
CDEF = "int add(int64_t n, const double *x, double *out);"
X = np.arange(1.0, 6.0)  # sums to 15


def add_source(offset: float = 0.0) -> str:
    """Sum of x plus `offset`: different offsets give different sources, hence different keys."""
    return f"""#include <stdint.h>
int add(int64_t n, const double *x, double *out) {{
    double s = {offset!r};
    for (int64_t i = 0; i < n; ++i) s += x[i];
    *out = s;
    return 0;
}}
"""


def call_add(module) -> float:
    ffi = module.ffi
    out = np.zeros(1)
    x = ffi.cast("const double *", ffi.from_buffer(X))
    assert module.lib.add(X.size, x, ffi.from_buffer("double[]", out)) == 0
    return float(out[0])


# A fresh interpreter: the in-process memo cannot answer, so disk, locks and compiles are really exercised.
CHILD = """
import json, sys
import numpy as np
from codegen import jit
job = json.loads(sys.argv[1])
flags = None if job["flags"] is None else tuple(job["flags"])
if job.get("published"):
    m = jit.load_published("add", job["source"], job["cdef"], job["published"], flags=flags,
                             cache_dir=job["cache"])
else:
    m = jit.compile_extension("add", job["source"], job["cdef"], flags=flags, cache_dir=job["cache"])
out = np.zeros(1)
x = np.arange(1.0, 6.0)
m.lib.add(x.size, m.ffi.from_buffer("double[]", x), m.ffi.from_buffer("double[]", out))
print(json.dumps({"compiled": jit.stats["compiled"], "result": float(out[0]), "file": m.__file__}))
"""


def child(cache, source, *, flags=None, published=None):
    """Start a fresh interpreter that builds or loads `add`; returns the Popen (stdout: one JSON line)."""
    job = {"cache": str(cache), "source": source, "cdef": CDEF, "flags": flags,
           "published": None if published is None else str(published)}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(job)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def report(process) -> dict:
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def entry_of(module) -> pathlib.Path:
    return pathlib.Path(module.__file__).parent


def test_compile_and_call_with_default_flags(tmp_path, monkeypatch):
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    before = jit.stats["compiled"]
    module = jit.compile_extension("add", add_source(), CDEF, cache_dir=tmp_path / "cache")
    assert call_add(module) == 15.0
    assert jit.stats["compiled"] == before + 1
    key = jit.cache_key("add", add_source(), CDEF, None)
    entry = entry_of(module)
    assert entry == tmp_path / "cache" / "v1" / key[:2] / key
    assert sorted(p.name for p in entry.iterdir()) == sorted(
        ["build.json", "build.log", "module.c", "module.h", f"_hg_add_{key[:16]}{EXT_SUFFIX}"])
    assert module.ffi.string(module.lib.hg_build_key()).decode() == key
    record = json.loads((entry / "build.json").read_text())
    assert record["key"] == key and record["inputs"]["flags"] == list(jit.default_flags())
    assert "-O3" in (entry / "build.log").read_text()  # the command line is logged, not printed
    assert list(workdir.iterdir()) == []  # cffi's intermediate files stayed in the temp dir
    assert [p.name for p in entry.parent.iterdir() if p.name.startswith(".")] == []
    # same process, same key: the same module object, nothing touched
    assert jit.compile_extension("add", add_source(), CDEF, cache_dir=tmp_path / "cache") is module
    assert jit.stats["compiled"] == before + 1


def test_cache_hit_in_fresh_process_compiles_nothing(tmp_path):
    module = jit.compile_extension("add", add_source(1.0), CDEF, flags=("-O1",), cache_dir=tmp_path)
    artifact = pathlib.Path(module.__file__)
    stamp = artifact.stat().st_mtime_ns
    result = report(child(tmp_path, add_source(1.0), flags=["-O1"]))
    assert result == {"compiled": 0, "result": 16.0, "file": str(artifact)}
    assert artifact.stat().st_mtime_ns == stamp


def test_flags_change_the_key_and_the_directory(tmp_path, monkeypatch):
    source = add_source(2.0)
    keys = {jit.cache_key("add", source, CDEF, flags) for flags in [("-O1",), ("-O2",), ("-O2", "-g")]}
    assert len(keys) == 3
    monkeypatch.setenv("HYPERGEN_PORTABLE", "1")
    monkeypatch.setenv("HYPERGEN_CFLAGS", "-DEXTRA=1  -funroll-loops")
    assert jit.default_flags() == jit.BASE_FLAGS + ("-fopenmp", "-DEXTRA=1", "-funroll-loops")
    monkeypatch.setenv("HYPERGEN_OPENMP", "0")  # serial kernels, no OpenMP runtime linked
    assert "-fopenmp-simd" in jit.default_flags() and "-fopenmp" not in jit.default_flags()
    monkeypatch.delenv("HYPERGEN_OPENMP")
    defaults = jit.default_flags()
    assert jit.cache_key("add", source, CDEF, None) == jit.cache_key("add", source, CDEF, defaults)
    monkeypatch.delenv("HYPERGEN_CFLAGS")
    assert "-march=native" not in jit.default_flags()
    monkeypatch.delenv("HYPERGEN_PORTABLE")
    assert jit.default_flags()[-1] == "-march=native"

    first = jit.compile_extension("add", source, CDEF, flags=("-O1",), cache_dir=tmp_path)
    second = jit.compile_extension("add", source, CDEF, flags=("-O2",), cache_dir=tmp_path)
    assert first is not second and entry_of(first) != entry_of(second)  # both loaded in one process
    assert call_add(first) == call_add(second) == 17.0


def test_concurrent_builds_compile_once(tmp_path):
    processes = [child(tmp_path, add_source(3.0), flags=["-O1"]) for _ in range(4)]
    results = [report(p) for p in processes]
    assert sum(r["compiled"] for r in results) == 1
    assert {r["result"] for r in results} == {18.0}
    assert len({r["file"] for r in results}) == 1
    shard = pathlib.Path(results[0]["file"]).parent.parent
    assert sorted(p.suffix for p in shard.iterdir()) == ["", ".lock"]  # no temporary or failed builds left


def test_threads_share_one_build_and_one_module(tmp_path):
    before = jit.stats["compiled"]
    with ThreadPoolExecutor(4) as pool:
        modules = list(pool.map(lambda _: jit.compile_extension(
            "add", add_source(3.5), CDEF, flags=("-O1",), cache_dir=tmp_path), range(4)))
    assert jit.stats["compiled"] == before + 1
    assert all(m is modules[0] for m in modules) and call_add(modules[0]) == 18.5


def test_truncated_artifact_is_rebuilt(tmp_path):
    # Built by another process: truncating a binary mapped into this one would crash it (SIGBUS).
    artifact = pathlib.Path(report(child(tmp_path, add_source(4.0), flags=["-O1"]))["file"])
    os.truncate(artifact, 100)
    before = jit.stats["compiled"]
    module = jit.compile_extension("add", add_source(4.0), CDEF, flags=("-O1",), cache_dir=tmp_path)
    assert jit.stats["compiled"] == before + 1
    assert call_add(module) == 19.0
    assert pathlib.Path(module.__file__) == artifact and artifact.stat().st_size > 100


def test_syntax_error_raises_build_error_with_compiler_message_and_source(tmp_path):
    broken = add_source(5.0).replace("*out = s;", "*out = s")
    with pytest.raises(BuildError) as caught:
        jit.compile_extension("add", broken, CDEF, flags=("-O0",), cache_dir=tmp_path)
    message = str(caught.value)
    assert re.search(r"error: expected .;. before .return.", message) and "gcc" in message  # any locale
    kept = next(tmp_path.glob("v1/*/*.failed/module.c"))
    assert str(kept) in message
    assert "*out = s\n" in kept.read_text()


def test_unwritable_cache_falls_back_to_temp(tmp_path, monkeypatch):
    # Root ignores permission bits, so make the cache path impossible instead: it runs through a file.
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with pytest.warns(RuntimeWarning, match="not writable"):
        module = jit.compile_extension("add", add_source(6.0), CDEF, flags=("-O1",),
                                         cache_dir=blocker / "cache")
    assert call_add(module) == 21.0
    assert pathlib.Path(module.__file__).is_relative_to(tmp_path / "tmp" / f"hypergen-{os.getuid()}" / "v1")


def test_publish_and_load_published_never_loads_a_stale_binary(tmp_path):
    cache, published = tmp_path / "cache", tmp_path / "generated" / "add"
    old = jit.compile_extension("add", add_source(7.0), CDEF, flags=("-O1",), cache_dir=cache)
    old_file = jit.publish(old, published)
    assert old_file.parent == published and old_file.read_bytes() == pathlib.Path(old.__file__).read_bytes()

    fresh = report(child(cache, add_source(7.0), flags=["-O1"], published=published))
    assert fresh == {"compiled": 0, "result": 22.0, "file": str(old_file)}

    # The source changed. Plant the old binary under the name the new key implies: it must be refused.
    new_source = add_source(8.0)
    new_key = jit.cache_key("add", new_source, CDEF, ("-O1",))
    planted = published / f"_hg_add_{new_key[:16]}{EXT_SUFFIX}"
    planted.write_bytes(old_file.read_bytes())
    new = jit.load_published("add", new_source, CDEF, published, flags=("-O1",), cache_dir=cache)
    assert call_add(new) == 23.0
    assert entry_of(new).is_relative_to(cache)

    assert jit.publish(new, published) == planted
    assert [p.name for p in published.iterdir()] == [planted.name]  # the old build was dropped

