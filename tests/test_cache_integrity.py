"""Cache and file-system faults, environment variables, locks, concurrency and signals (issue 13).

Every case ends in the right answer or in one clear error that names the culprit (the file, the
variable, the lock holder), on real files and in real processes. A damaged binary must never be
handed to the loader: a truncated shared object kills the process that maps it with SIGBUS, so
those cases run in child processes (a regression kills a child, not the test session).
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import codegen
from codegen import jit
from codegen.errors import BuildError, ConfigError, HypergenError
from codegen.learn.history import read_history
from codegen.pipeline import generate_cached, write_outputs
from codegen.runtime import load_directory

from conftest import built_example
from support import ROOT, example_data, load_example

REPO = pathlib.Path(codegen.__file__).resolve().parent.parent
CDEF = "double twice(double a);"
FLAGS = ("-O0",)


def twice_source(tag: str) -> str:
    """A tiny extension; the tag (a C comment) gives each case its own key, so neither this
    process's memo nor another case's cache entry can answer for it."""
    return f"/* case {tag} */\ndouble twice(double a) {{ return 2 * a; }}\n"


def child_env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, **extra}


LOAD_CHILD = """
import json, sys, warnings
from codegen import jit
job = json.loads(sys.argv[1])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    if job["published"]:
        m = jit.load_published("twice", job["source"], job["cdef"], job["published"],
                               flags=tuple(job["flags"]), cache_dir=job["cache"])
    else:
        m = jit.compile_extension("twice", job["source"], job["cdef"], flags=tuple(job["flags"]),
                                  cache_dir=job["cache"])
print(json.dumps({"compiled": jit.stats["compiled"], "value": m.lib.twice(21.0),
                  "file": m.__file__, "warnings": [str(w.message) for w in caught]}))
"""


def entry_of(module) -> pathlib.Path:
    return pathlib.Path(module.__file__)


# -- 1. damaged extensions: never loaded, rebuilt or recopied with a warning naming them --------

BATCH_CHILD = """
import json, sys, warnings
from codegen import jit
results = {}
for job in json.loads(sys.stdin.read()):
    before = jit.stats["compiled"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if job["published"]:
            m = jit.load_published("twice", job["source"], job["cdef"], job["published"],
                                   flags=tuple(job["flags"]), cache_dir=job["cache"])
        else:
            m = jit.compile_extension("twice", job["source"], job["cdef"],
                                      flags=tuple(job["flags"]), cache_dir=job["cache"])
    results[job["case"]] = {"compiled": jit.stats["compiled"] - before, "value": m.lib.twice(21.0),
                            "warnings": [str(w.message) for w in caught]}
print(json.dumps(results))
"""


def detach(binary: pathlib.Path) -> None:
    """Give `binary` a new inode holding the same bytes. This process has the built extension
    dlopen'ed: damaging its mapped file in place would kill this process (SIGBUS) the next time
    it touches an unmapped page, long after the test; the damage must reach only the loader
    child, which opens the path afresh."""
    fresh = binary.with_name(binary.name + ".fresh")
    shutil.copy2(binary, fresh)
    os.replace(fresh, binary)


def _truncate(fraction: float):
    return lambda binary, record: os.truncate(binary, max(1024, int(binary.stat().st_size * fraction))
                                              if fraction < 1 else binary.stat().st_size - 1)


def _flip(binary: pathlib.Path, record: pathlib.Path) -> None:
    data = bytearray(binary.read_bytes())
    data[len(data) // 2] ^= 0xFF
    binary.write_bytes(bytes(data))


def _other_sha(binary: pathlib.Path, record: pathlib.Path) -> None:
    entry = json.loads(record.read_text())
    entry["extension"]["sha256"] = "0" * 64
    record.write_text(json.dumps(entry))


#: damage to a cache entry -> (what is damaged, the file its warning names)
CACHE_DAMAGE = {
    "binary cut to 1 kB": (_truncate(0.0), "binary"),
    "binary cut in half": (_truncate(0.5), "binary"),
    "binary one byte short": (_truncate(1.0), "binary"),
    "binary byte flipped": (_flip, "binary"),
    "binary zeroed": (lambda b, r: b.write_bytes(bytes(b.stat().st_size)), "binary"),
    "build.json {}": (lambda b, r: r.write_text("{}"), "build.json"),
    "build.json []": (lambda b, r: r.write_text("[]"), "build.json"),
    "build.json truncated": (lambda b, r: r.write_text(r.read_text()[:40]), "build.json"),
    "build.json missing": (lambda b, r: r.unlink(), "build.json"),
    "build.json other sha256": (_other_sha, "build.json"),
}
#: damage to a published copy (generated/<name>/): the cache's good copy replaces it
PUBLISHED_DAMAGE = {
    "published cut to 1 kB": _truncate(0.0),
    "published cut in half": _truncate(0.5),
    "published one byte short": _truncate(1.0),
    "published byte flipped": _flip,
}


@pytest.fixture(scope="module")
def damaged_loads(tmp_path_factory):
    """Every damage above applied to its own freshly built entry (its own key), then all loaded
    by one fresh interpreter: {case: (compiled, value, warnings, damaged path, good bytes)}."""
    root = tmp_path_factory.mktemp("damaged")
    jobs, damaged = [], {}
    # The entries first, two compiles at a time (each its own key and child compiler process).
    cases = [*CACHE_DAMAGE, *PUBLISHED_DAMAGE]
    with ThreadPoolExecutor(max_workers=2) as pool:
        built = dict(zip(cases, pool.map(lambda case: jit.compile_extension(
            "twice", twice_source(case), CDEF, flags=FLAGS, cache_dir=root), cases)))
    for case, (damage, culprit) in CACHE_DAMAGE.items():
        source = twice_source(case)
        binary = entry_of(built[case])
        record = binary.parent / "build.json"
        damaged[case] = (binary if culprit == "binary" else record, None)
        detach(binary)
        damage(binary, record)
        jobs.append({"case": case, "cache": str(root), "source": source, "cdef": CDEF,
                     "flags": list(FLAGS), "published": None})
    for case, damage in PUBLISHED_DAMAGE.items():
        source = twice_source(case)
        published = root / "generated" / case.replace(" ", "_")
        binary = jit.publish(built[case], published)
        damaged[case] = (binary, binary.read_bytes())
        detach(binary)
        damage(binary, None)
        jobs.append({"case": case, "cache": str(root), "source": source, "cdef": CDEF,
                     "flags": list(FLAGS), "published": str(published)})
    done = subprocess.run([sys.executable, "-c", BATCH_CHILD], input=json.dumps(jobs),
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"the loading child died ({done.returncode}):\n{done.stderr[-3000:]}"
    results = json.loads(done.stdout.strip().splitlines()[-1])
    return {case: (results[case], *damaged[case]) for case in results}


@pytest.mark.parametrize("case", list(CACHE_DAMAGE))
def test_damaged_cache_entry_is_rebuilt_not_loaded(damaged_loads, case):
    """A binary cut short (1-40 kB left) once killed every later build with SIGBUS; build.json
    records the binary's size and sha256, so without a good record there is no trust either."""
    result, culprit, _ = damaged_loads[case]
    assert result["value"] == 42.0 and result["compiled"] == 1
    assert any(str(culprit) in w and "failed its check" in w for w in result["warnings"])
    binary = next(culprit.parent.glob("_hg_twice_*"))  # rebuilt: the record vouches for it again
    assert json.loads((culprit.parent / "build.json").read_text())["extension"]["sha256"] == \
        jit.file_sha256(binary)


@pytest.mark.parametrize("case", list(PUBLISHED_DAMAGE))
def test_damaged_published_binary_is_replaced_from_the_cache(damaged_loads, case):
    result, binary, good = damaged_loads[case]
    assert result["value"] == 42.0 and result["compiled"] == 0  # the cache's copy, no compile
    assert any(str(binary) in w and "failed its check" in w for w in result["warnings"])
    assert binary.read_bytes() == good  # and the directory holds a good copy again


# -- 2. the symbolic cache: an edited or damaged entry is regenerated, never trusted ----------

def small_problem():
    import sympy as sp

    from codegen import Problem

    n = sp.Symbol("n", integer=True, positive=True)
    i = sp.Idx("i", n)
    x, y = sp.IndexedBase("x", shape=(n,)), sp.IndexedBase("y", shape=(n,))
    theta = sp.Symbol("theta")
    return Problem(name="small", x=x, theta=theta,
                   lower=sp.Sum((x[i] - y[i]) ** 2 + sp.exp(theta) * x[i] ** 2, (i, 0, n - 1)),
                   upper=sp.Sum((x[i] - 2 * y[i]) ** 2, (i, 0, n - 1)))


def edit_source(path: pathlib.Path) -> None:
    entry = json.loads(path.read_text())
    entry["texts"]["source"] = entry["texts"]["source"].replace("2*", "3*", 1)
    path.write_text(json.dumps(entry))


SYMBOLIC_DAMAGE = {
    "edited source": edit_source,
    "{}": lambda p: p.write_text("{}"),
    "[]": lambda p: p.write_text("[]"),
    "truncated": lambda p: p.write_text(p.read_text()[: len(p.read_text()) // 2]),
    "no checksum": lambda p: p.write_text(json.dumps(json.loads(p.read_text())["texts"])),
    "texts a list": lambda p: p.write_text(json.dumps({"sha256": "0", "texts": []})),
}


@pytest.fixture(scope="module")
def symbolic(tmp_path_factory):
    """A private cache with the small problem's entry, and its fresh texts."""
    cache = tmp_path_factory.mktemp("symbolic-cache")
    previous = os.environ["HYPERGEN_CACHE_DIR"]
    os.environ["HYPERGEN_CACHE_DIR"] = str(cache)
    try:
        fresh = generate_cached(small_problem())
    finally:
        os.environ["HYPERGEN_CACHE_DIR"] = previous
    (entry,) = (cache / "symbolic").rglob("*.json")
    return cache, entry, fresh


@pytest.mark.parametrize("damage", list(SYMBOLIC_DAMAGE))
def test_damaged_symbolic_entry_is_regenerated(symbolic, damage, monkeypatch):
    """An edited entry was compiled and trusted (a wrong gradient marked ok); {} and [] raised
    KeyError / TypeError."""
    cache, entry, fresh = symbolic
    monkeypatch.setenv("HYPERGEN_CACHE_DIR", str(cache))
    good = entry.read_text()
    SYMBOLIC_DAMAGE[damage](entry)
    try:
        with pytest.warns(RuntimeWarning, match="symbolic cache entry .* failed its check") as info:
            texts = generate_cached(small_problem())
        assert str(entry) in str(info[0].message)
        assert texts == fresh
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert generate_cached(small_problem()) == fresh  # rewritten: trusted again
    finally:
        entry.write_text(good)


# -- 3. a module directory is checked against checksums.sha256 before it is loaded ------------

@pytest.fixture
def module_copy(build_dir, tmp_path):
    _, module, _ = built_example("ridge", build_dir)
    target = tmp_path / "ridge"
    shutil.copytree(module.directory, target, ignore=shutil.ignore_patterns("*.so"))
    return target


def test_edited_constants_json_is_refused(module_copy):
    """Edited constants give wrong certified bounds: the file is named, nothing is loaded."""
    path = module_copy / "constants.json"
    tree = json.loads(path.read_text())
    path.write_text(json.dumps(tree, indent=2))  # still valid JSON, other bytes
    with pytest.raises(HypergenError, match="constants.json does not match its checksum"):
        load_directory(module_copy)


@pytest.mark.parametrize("name", ["hg_ridge.c", "meta.json"])
def test_edited_source_or_meta_is_refused(module_copy, name):
    path = module_copy / name
    if name.endswith(".c"):
        path.write_text(path.read_text().replace("return 0;", "return 0; /* edited */", 1))
    else:
        path.write_text(json.dumps(json.loads(path.read_text()), indent=3))
    with pytest.raises(HypergenError, match=f"{name} does not match its checksum") as info:
        load_directory(module_copy)
    assert "checksums.sha256" in str(info.value) and "hypergen build" in str(info.value)


@pytest.mark.parametrize("keep", [0, 3])
def test_a_manifest_that_stops_listing_a_file_is_refused(module_copy, keep):
    """An emptied checksums.sha256 (or one with lines removed) verified nothing, silently: an
    edited constants.json (mu 1000 times larger) then gave a certified bound that was wrong."""
    manifest = module_copy / "checksums.sha256"
    lines = [ln for ln in manifest.read_text().splitlines() if "constants.json" not in ln]
    manifest.write_text("".join(f"{ln}\n" for ln in lines[:keep]))
    path = module_copy / "constants.json"
    path.write_text(path.read_text().replace('"mu"', '"mu" ', 1))
    with pytest.raises(HypergenError, match=r"checksums.sha256 does not list .*constants.json "
                                            r"\(truncated or edited\)"):
        load_directory(module_copy)


@pytest.mark.parametrize("damage", ["missing", "garbage"])
def test_directory_without_a_readable_manifest_loads_with_a_warning(module_copy, damage):
    manifest = module_copy / "checksums.sha256"
    if damage == "missing":
        manifest.unlink()
    else:
        manifest.write_bytes(b"\xff\xfe not a manifest")
    with pytest.warns(RuntimeWarning, match="checksums.sha256 is missing or unreadable"):
        module = load_directory(module_copy)
    assert module.name == "ridge"


def test_build_rewrites_an_edited_file_and_says_so(build_dir, module_copy):
    problem = load_example("ridge").problem
    (module_copy / "constants.json").write_text("{}\n")
    with pytest.warns(RuntimeWarning, match="constants.json was changed since hypergen wrote it"):
        write_outputs(problem, generate_cached(problem), module_copy.parent)
    assert load_directory(module_copy).constants_json == json.loads(
        (build_dir / "ridge" / "constants.json").read_text())


# -- 4. locks time out naming their holder -------------------------------------------------------

HOLDER = """
import fcntl, json, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "now"}).encode())
print("held", flush=True)
time.sleep(120)
"""


def hold_lock(cache: pathlib.Path, source: str) -> subprocess.Popen:
    key = jit.cache_key("twice", source, CDEF, FLAGS)
    lock = cache / jit.LAYOUT / key[:2] / f"{key}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_held_lock_times_out_naming_the_holder(tmp_path, monkeypatch):
    """A lock held by another process made a build wait forever without a word."""
    source = twice_source("held lock")
    holder = hold_lock(tmp_path, source)
    monkeypatch.setenv("HYPERGEN_LOCK_TIMEOUT", "1")
    try:
        with pytest.raises(BuildError, match=f"held by pid {holder.pid} on host "
                                             f"{socket.gethostname()}") as info:
            jit.compile_extension("twice", source, CDEF, flags=FLAGS, cache_dir=tmp_path)
        assert "HYPERGEN_LOCK_TIMEOUT" in str(info.value) and "timed out after 1 s" in str(info.value)
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_holder_is_released(tmp_path, monkeypatch):
    source = twice_source("killed holder")
    holder = hold_lock(tmp_path, source)
    monkeypatch.setenv("HYPERGEN_LOCK_TIMEOUT", "60")
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(jit.compile_extension, "twice", source, CDEF, flags=FLAGS,
                              cache_dir=tmp_path)
        time.sleep(0.5)
        assert not waiting.done()
        holder.kill()
        holder.wait()
        assert waiting.result(timeout=60).lib.twice(4.0) == 8.0


@pytest.mark.parametrize("value", ["abc", "-1", "0", "nan"])
def test_lock_timeout_variable_is_validated(tmp_path, monkeypatch, value):
    monkeypatch.setenv("HYPERGEN_LOCK_TIMEOUT", value)
    with pytest.raises(ConfigError, match=f"HYPERGEN_LOCK_TIMEOUT = {value!r}"):
        jit.compile_extension("twice", twice_source(f"timeout {value}"), CDEF, flags=FLAGS,
                              cache_dir=tmp_path)


# -- 5. environment variables --------------------------------------------------------------------

@pytest.mark.parametrize("value, says", [("", "set but empty"), ("   ", "set but empty"),
                                         ("relative/cache", "is a relative path")])
def test_cache_dir_variable_is_validated(monkeypatch, value, says):
    """HYPERGEN_CACHE_DIR= once put the cache (and the binaries loaded from it) in the cwd."""
    monkeypatch.setenv("HYPERGEN_CACHE_DIR", value)
    with pytest.raises(ConfigError, match=f"HYPERGEN_CACHE_DIR.*{says}"):
        jit.compile_extension("twice", twice_source(f"cache dir {value!r}"), CDEF, flags=FLAGS)


def test_cache_dir_variable_through_a_file_falls_back_naming_it(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("HYPERGEN_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with pytest.warns(RuntimeWarning, match=r"\(\$HYPERGEN_CACHE_DIR\) is not writable"):
        module = jit.compile_extension("twice", twice_source("through a file"), CDEF, flags=FLAGS)
    assert module.lib.twice(1.5) == 3.0


def test_empty_cache_dir_on_the_command_line_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "codegen", "build",
                           str(REPO / "examples" / "ridge.py"), "--out", str(tmp_path)],
                          env=child_env(HYPERGEN_CACHE_DIR=""), capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("hypergen: error: $HYPERGEN_CACHE_DIR is set but empty")
    assert "Traceback" not in done.stderr and not (tmp_path / "v1").exists()


@pytest.mark.parametrize("variable, value", [("HYPERGEN_CFLAGS", '-O2 "-DX=1'),
                                             ("HYPERGEN_CFLAGS", "-DNAME='a"),
                                             ("CC", 'gcc "-m64')])
def test_unbalanced_quote_names_the_variable(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=rf"\${variable} = .* cannot be split .*No closing quotation"):
        jit.default_flags()


def test_missing_compiler_is_said_on_the_first_line(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(BuildError) as info:
        jit.compile_extension("twice", twice_source("no compiler"), CDEF, flags=FLAGS,
                              cache_dir=tmp_path)
    first = str(info.value).splitlines()[0]
    assert first.startswith("no C compiler") and "no-such-cc" in first and "$CC" in first


def test_missing_compiler_on_the_command_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "codegen", "build", str(REPO / "examples" / "ridge.py"),
                           "--out", str(tmp_path / "out")],
                          env=child_env(CC="no-such-cc"),  # another compiler: another key, a miss
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.splitlines()[0].startswith("hypergen: error: no C compiler: 'no-such-cc'")


# -- 6. a full disk ------------------------------------------------------------------------------

LIMITED = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv[0] = "hypergen"
sys.exit(runpy.run_module("codegen", run_name="__main__"))
"""


def test_file_size_limit_while_writing_outputs_is_one_line(tmp_path):
    """A write that fails (here: past RLIMIT_FSIZE, as on a full disk) names the file."""
    done = subprocess.run([sys.executable, "-c", LIMITED, "4096", "build",
                           str(REPO / "examples" / "ridge.py"), "--out", str(tmp_path / "out")],
                          env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith(f"hypergen: error: cannot write {tmp_path / 'out' / 'ridge'}")
    assert "File too large" in done.stderr and "Traceback" not in done.stderr


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 192 kB tmpfs (needs root and mount; skipped elsewhere)."""
    mount_point = tmp_path / "full"
    mount_point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mount_point)],
            capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_full_disk_as_cache_names_the_path(small_tmpfs):
    filler = small_tmpfs / "filler"
    with open(filler, "wb") as out:  # fill it up: 200 kB do not fit in 192 kB
        try:
            out.write(b"\0" * (200 * 1024))
        except OSError:
            pass
    with pytest.raises(BuildError) as info:
        jit.compile_extension("twice", twice_source("full disk"), CDEF, flags=FLAGS,
                              cache_dir=small_tmpfs / "cache")
    first = str(info.value).splitlines()[0]
    assert str(small_tmpfs) in str(info.value) and ("No space left" in first or "cannot write" in first)


def test_full_disk_as_output_directory_is_one_line(small_tmpfs, build_dir):
    built_example("ridge", build_dir)  # the session cache holds the build: only the copy fails
    done = subprocess.run([sys.executable, "-m", "codegen", "build", str(REPO / "examples" / "ridge.py"),
                           "--out", str(small_tmpfs / "out")],
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]  # the sources fit in 192 kB, the binary not
    assert done.stderr.startswith(f"hypergen: error: cannot write {small_tmpfs / 'out' / 'ridge'}")
    assert "No space left on device" in done.stderr and "Traceback" not in done.stderr


# -- 7. concurrency ------------------------------------------------------------------------------

def test_two_processes_build_one_problem_into_one_directory(tmp_path, monkeypatch):
    """Two processes building the same problem into a shared cache once raised FileNotFoundError
    from the atomic copy; now both succeed, exactly one compiles, the directory verifies."""
    monkeypatch.setenv("HYPERGEN_CACHE_DIR", str(tmp_path / "cache"))
    generate_cached(load_example("ridge").problem)  # the symbolic stage warm: the race is the build
    command = [sys.executable, "-m", "codegen", "build", str(REPO / "examples" / "ridge.py"),
               "--out", str(tmp_path / "out")]
    builds = [subprocess.Popen(command, env=child_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [b.communicate(timeout=300) for b in builds]
    assert [b.returncode for b in builds] == [0, 0], [err for _, err in outputs]
    assert sum("(compiled," in out for out, _ in outputs) == 1
    assert load_directory(tmp_path / "out" / "ridge").name == "ridge"


def test_four_processes_compile_and_publish_one_extension_once(tmp_path):
    source = twice_source("four processes")
    job = {"cache": str(tmp_path), "source": source, "cdef": CDEF, "flags": list(FLAGS),
           "published": str(tmp_path / "published")}
    children = [subprocess.Popen([sys.executable, "-c", LOAD_CHILD, json.dumps(job)],
                                 env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for _ in range(4)]
    results = []
    for c in children:
        out, err = c.communicate(timeout=300)
        assert c.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r["value"] == 42.0 for r in results)
    assert sum(r["compiled"] for r in results) == 1


def test_four_threads_on_one_bound_problem_agree(build_dir):
    _, module, ns = built_example("ridge", build_dir)
    prob = module.bind(**ns["example_data"](seed=3, m=30, n=8))
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: prob.hypergradient(0.25), range(8)))
    assert all(np.array_equal(r.grad, results[0].grad) and r.bound == results[0].bound
               for r in results)
    assert results[0].status == "ok"


# -- 8. signals: a killed build leaves nothing half-done, a killed run keeps its history ---------

def test_build_killed_while_compiling_leaves_a_usable_cache(tmp_path):
    source = twice_source("killed build") + "".join(
        f"double f{i}(double a) {{ return a * {i}.5 + a * a; }}\n" for i in range(400))
    job = {"cache": str(tmp_path), "source": source, "cdef": CDEF, "flags": ["-O2"],
           "published": None}
    victim = subprocess.Popen([sys.executable, "-c", LOAD_CHILD, json.dumps(job)], env=child_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(f"{jit.LAYOUT}/*/.*/module.c")) and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(victim.pid, signal.SIGKILL)  # the child Python and its compiler
    victim.wait()
    module = jit.compile_extension("twice", source, CDEF, flags=("-O2",), cache_dir=tmp_path)
    assert module.lib.twice(5.0) == 10.0
    assert list(tmp_path.glob(f"{jit.LAYOUT}/*/.*")) == []  # the dead build's temporary is gone


def ridge_run(tmp_path: pathlib.Path, signum: int) -> tuple[int, pathlib.Path]:
    """`hypergen optimize` on the ridge example, stopped by `signum` after three steps."""
    # large enough that the run is still stepping when the signal comes (1000 steps take seconds)
    np.savez(tmp_path / "ridge.npz", **example_data("ridge", seed=0, m=1000, n=50))
    out = tmp_path / "run"
    run = subprocess.Popen([sys.executable, "-m", "codegen", "optimize", str(REPO / "examples" / "ridge.py"),
                            "--data", str(tmp_path / "ridge.npz"), "--method", "gd", "--no-progress",
                            "--budget", "100000000", "--out", str(out)],
                           env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = out / "history.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and run.poll() is None and (
            not log.exists() or log.read_text().count("\n") < 3):
        time.sleep(0.01)
    assert run.poll() is None, run.communicate()[1][-2000:]
    run.send_signal(signum)
    run.communicate(timeout=120)
    return run.returncode, log


def test_sigkill_during_optimize_keeps_every_completed_step(tmp_path):
    returncode, log = ridge_run(tmp_path, signal.SIGKILL)
    assert returncode == -signal.SIGKILL
    history = read_history(log)
    assert len(history) >= 3 and [e["step"] for e in history] == list(range(len(history)))
    assert all(math.isfinite(e["value"]) for e in history)


def test_sigterm_during_optimize_writes_the_whole_history(tmp_path):
    returncode, log = ridge_run(tmp_path, signal.SIGTERM)
    assert returncode == 130
    history = read_history(log)
    assert len(history) >= 3 and read_history(log.with_suffix(".json")) == history


def test_history_log_skips_a_line_cut_by_a_kill(tmp_path):
    from codegen.learn.history import HistoryLog

    log = HistoryLog(tmp_path / "h.jsonl")
    for step in range(3):
        log({"step": step, "theta": [0.5], "value": 1.0 / (step + 1), "value_error": math.inf,
             "grad_norm": 1.0, "bound": 0.1, "eps": 1e-3, "delta": 1e-3, "step_size": 1.0,
             "work": step, "time": 0.0})
    log.close()
    with open(tmp_path / "h.jsonl", "a") as out:
        out.write('{"step": 3, "val')  # what a SIGKILL in the middle of a write leaves
    history = read_history(tmp_path / "h.jsonl")
    assert [e["step"] for e in history] == [0, 1, 2] and history[2]["value"] == pytest.approx(1 / 3)
    assert history[0]["value_error"] == math.inf



def test_full_disk_during_optimize_keeps_running_and_says_where(tmp_path, build_dir):
    """The step-by-step log meets a full disk (RLIMIT_FSIZE): the run goes on with a warning,
    and the final history that cannot be written is one error naming the directory."""
    codegen.load(str(REPO / "examples" / "ridge.py"))  # warm: the child writes no build files
    np.savez(tmp_path / "ridge.npz", **example_data("ridge", seed=0, m=200, n=20))
    done = subprocess.run([sys.executable, "-c", LIMITED, "20000", "optimize",
                           str(REPO / "examples" / "ridge.py"), "--data", str(tmp_path / "ridge.npz"),
                           "--method", "gd", "--no-progress", "--out", str(tmp_path / "run")],
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    assert lines[0].startswith(f"hypergen: warning: cannot append to {tmp_path / 'run' / 'history.jsonl'}"
                               " (File too large): the run goes on")
    assert lines[-1].startswith(f"hypergen: error: cannot write the history into {tmp_path / 'run'}")
    assert "Traceback" not in done.stderr and "status " in done.stdout  # the summary was printed


def test_load_with_an_unwritable_cache_falls_back_with_a_warning(tmp_path, monkeypatch):
    """$HYPERGEN_CACHE_DIR through a file (unwritable, as a read-only mount is): codegen.load
    raised on <cache>/modules, where the interface promises a private temporary directory and
    a warning."""
    import codegen

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("HYPERGEN_CACHE_DIR", str(blocker / "cache"))
    with pytest.warns(RuntimeWarning, match="is not writable"):
        module = codegen.load(ROOT / "examples" / "ridge.py")
    assert module.name == "ridge" and blocker not in module.directory.parents
