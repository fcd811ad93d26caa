"""C hygiene of the generated sources (docs/compiler.md 12, items 4-5).

* every example's source compiles warning-free with -std=c99 -Wall -Wextra -Werror -pedantic, alone
  and in one translation unit with its header (so the header's prototypes match the definitions);
* AddressSanitizer + UBSan: a C driver built from meta["kernels"] mallocs every pointer argument at
  its exact size, fills inputs with pseudo-random values and outputs / work with NaN (so a kernel
  that reads its work buffer or output before writing it, or leaves an output entry unwritten,
  reports status 1), calls every kernel at several tiny size assignments (distinct sizes >= 2,
  sizes 9-11 for the jammed loops, and all sizes = 1) and expects status 0; with every size = 0
  and NULL pointers it expects status 2;
* determinism: two fresh interpreters with different PYTHONHASHSEEDs generate byte-identical files,
  which are also byte-identical to the committed generated/<name>/. A mismatch shows as a unified
  diff. After a deliberate change of the generated code, rewrite generated/ through
  `hypergen build` and review the diff before committing it:

      HYPERGEN_UPDATE_GOLDEN=1 python -m pytest -q tests/test_c_hygiene.py -k golden
      git diff generated/
"""
import difflib
import json
import os
import shutil
import subprocess
import sys

import pytest
import sympy as sp

from codegen.pipeline import generate

from support import GOLDEN_EXAMPLES, ROOT
from support.processes import run_together
from support.sanitized import (
    SANITIZE,
    generated_texts,
    link_sanitized_driver,
    start_sanitized_objects,
)

# The sanitizer driver's examples (dense data only); determinism and golden files cover all.
EXAMPLES = ("ridge", "logistic", "quadratic", "tv1d", "hypercleaning")
GOLDEN_FILES = ("hg_{name}.c", "hg_{name}.h", "meta.json", "__init__.py", "constants.json")
UPDATE_GOLDEN = os.environ.get("HYPERGEN_UPDATE_GOLDEN") == "1"
CC = os.environ.get("CC", "cc")
STRICT = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-fopenmp-simd"]


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


@pytest.fixture(scope="module")
def compiler():
    if shutil.which(CC) is None:
        pytest.skip(f"no C compiler {CC!r} on PATH")
    return CC


# -- 1. strict compilation ------------------------------------------------------------------
@pytest.mark.parametrize("opt", ["-O0", "-O2"])
@pytest.mark.parametrize("name", EXAMPLES)
def test_strict_compile(compiler, tmp_path, name, opt):
    t = generated_texts(name)
    (tmp_path / f"hg_{name}.c").write_text(t["source"])
    (tmp_path / f"hg_{name}.h").write_text(t["header"])
    # The header and the source in one translation unit: conflicting prototypes are errors.
    (tmp_path / "both.c").write_text(f'#include "hg_{name}.h"\n#include "hg_{name}.c"\n')
    sources = (f"hg_{name}.c", "both.c")
    compiles = run_together([[compiler, *STRICT, opt, "-c", src, "-o", os.devnull] for src in sources],
                            cwd=tmp_path, timeout=120)
    for src, res in zip(sources, compiles):
        assert res.returncode == 0, f"{name} ({src}, {opt}) does not compile cleanly:\n{res.stderr}"
        assert res.stderr.strip() == "", f"{name} ({src}, {opt}) compiler output:\n{res.stderr}"


@pytest.mark.parametrize("const", [sp.pi, sp.E, sp.sqrt(2), sp.log(2), 1 / sp.pi],
                         ids=["pi", "E", "sqrt2", "log2", "1_over_pi"])
def test_strict_compile_symbolic_constants(compiler, tmp_path, const):
    """A problem whose expression keeps a symbolic constant (pi, E, sqrt(2), log 2, 1/pi)."""
    from codegen import Problem

    n = sp.Symbol("n", integer=True, positive=True)
    j = sp.Idx("j", n)
    x, y = sp.IndexedBase("x", shape=(n,)), sp.IndexedBase("y", shape=(n,))
    th = sp.Symbol("theta")
    problem = Problem(name="consts", x=x, theta=th,
                      lower=sp.Sum((x[j] - y[j]) ** 2, (j, 0, n - 1)) / 2
                            + const * sp.exp(th) * sp.Sum(x[j] ** 2, (j, 0, n - 1)),
                      upper=sp.Sum(x[j] ** 2, (j, 0, n - 1)))
    (tmp_path / "hg_consts.c").write_text(generate(problem)["source"])
    res = run([compiler, *STRICT, "-c", "hg_consts.c", "-o", os.devnull], cwd=tmp_path)
    assert res.returncode == 0, f"{const}: does not compile cleanly:\n{res.stderr}"


# -- 2. sanitizers -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sanitizer(compiler, tmp_path_factory, request, sanitized_root):
    """Skip (with the reason) unless the compiler can build and run an ASan+UBSan program; then
    start compiling the kernels' objects of the selected test_sanitized_driver cases (in the
    background: each driver test links its object when it is ready)."""
    d = tmp_path_factory.mktemp("sanitizer_probe")
    (d / "probe.c").write_text("#include <stdlib.h>\n"
                               "int main(void) { double *p = malloc(2 * sizeof *p); p[1] = 1.0;\n"
                               "  int r = (int)p[1] - 1; free(p); return r; }\n")
    res = run([compiler, *SANITIZE, "probe.c", "-o", "probe"], cwd=d)
    if res.returncode != 0:
        pytest.skip(f"{compiler} cannot build with -fsanitize=address,undefined: {res.stderr.strip()[:300]}")
    res = run([str(d / "probe")], cwd=d)
    if res.returncode != 0:
        pytest.skip(f"sanitizer runtime does not work here: {res.stderr.strip()[:300]}")
    start_sanitized_objects(compiler, [item.callspec.params["name"] for item in request.session.items
                                       if getattr(item, "originalname", "") == "test_sanitized_driver"
                                       and item.module is request.module], sanitized_root)
    return compiler


def _counts(meta, sizes):
    """Number of doubles of every array of the problem at concrete sizes (and of each row
    kernel's output, under the kernel's name)."""
    env = {s: sp.Symbol(s, integer=True, positive=True) for s in meta["sizes"]}
    subs = {env[s]: sp.Integer(v) for s, v in sizes.items()}
    out = {}
    rows = [{"name": r["kernel"], "shape": r["shape"]} for r in meta.get("third_rows", [])]
    for a in meta["arrays"] + meta.get("hvp_cache", []) + rows:
        count = 1
        for e in a["shape"]:
            v = sp.sympify(e, locals=env).xreplace(subs)
            assert v.is_Integer, f"shape entry {e} of {a['name']} is {v} at sizes {sizes}"
            count *= int(v)
        out[a["name"]] = count
    return out


INPUT_LIKE = {"v": "x", "q": "x", "t": "theta", "hg_w": "x"}  # direction vectors: shaped like x or theta


def _pointer_count(meta, kernel, param, counts):
    """Doubles behind one pointer parameter (None for the work buffer)."""
    role, pname = param["role"], param["name"]
    x, theta = meta["x"], meta["theta"]
    if pname == "cache":  # the prepared HVP's buffer: written by prepare, read by apply
        return sum(counts[a["name"]] for a in meta["hvp_cache"])
    if role in ("theta", "data"):
        return counts[pname]
    if role == "input":
        if pname == x:
            return counts[x]
        assert pname in INPUT_LIKE, f"{kernel['name']}: unknown input parameter {pname!r}"
        return counts[{"x": x, "theta": theta}[INPUT_LIKE[pname]]]
    if role == "output":
        if pname == "value_out":
            return 1
        if pname == "hessian_out":  # lower_hessian: x_size columns of x_size
            return counts[x] * counts[x]
        if pname == "cross_out":  # cross_matrix: theta_size columns of x_size
            return counts[x] * counts[theta]
        if pname == "hg_products":  # lower_hvp_pair: two products, the rows of one output
            return 2 * counts[x]
        if pname in ("hg_weights", "hg_weights_dot"):  # lower_gram_weights (_jvp): one per row
            return counts[meta["gram"]["data"]] // counts[x]
        if pname == "hg_rows_bar":  # lower_third_rows_*: its shape in meta["third_rows"]
            return counts[kernel["name"]]
        for base in (x, theta):
            if pname in (f"{base}_bar", f"{base}_bar_dot", f"{base}_bar_dot_dw_dot"):
                return counts[base]
        raise AssertionError(f"{kernel['name']}: cannot size output parameter {pname!r}")
    if role == "work":
        return None
    raise AssertionError(f"{kernel['name']}: pointer parameter {pname!r} has role {role!r}")


def driver_source(name, meta, configs):
    """A C program calling every kernel at each size assignment in `configs` (list of dicts)."""
    prefix = f"hg_{name}"
    lines = [
        "#include <math.h>", "#include <stdint.h>", "#include <stdio.h>", "#include <stdlib.h>",
        f'#include "{prefix}.h"', "",
        "static uint64_t state = 0x9E3779B97F4A7C15ull;",
        "static double next_value(void) /* xorshift64*, uniform in [-1, 1) */",
        "{",
        "    state ^= state >> 12; state ^= state << 25; state ^= state >> 27;",
        "    return (double)((state * 0x2545F4914F6CDD1Dull) >> 11) / 4503599627370496.0 - 1.0;",
        "}",
        "static double *exact(int64_t count, int fill_nan) /* exactly count doubles */",
        "{",
        "    double *p = malloc(sizeof(double) * (size_t)count);",
        "    if (count > 0 && p == NULL) { fprintf(stderr, \"out of memory\\n\"); exit(3); }",
        "    for (int64_t k = 0; k < count; ++k) p[k] = fill_nan ? NAN : next_value();",
        "    return p;",
        "}",
        "static int failures = 0;",
        "static void check(int status, int want, const char *what)",
        "{",
        "    if (status != want) {",
        "        fprintf(stderr, \"FAIL %s: status %d, expected %d\\n\", what, status, want);",
        "        ++failures;",
        "    }",
        "}",
        "",
    ]
    calls = []
    for c, sizes in enumerate(configs):
        counts = _counts(meta, sizes)
        label = ", ".join(f"{k}={v}" for k, v in sizes.items())
        fn = f"config{c}"
        calls.append(f"    {fn}();")
        lines += [f"static void {fn}(void) /* {label} */", "{"]
        size_args = ", ".join(str(sizes[s]) for s in meta["sizes"])
        lines.append(f"    const int64_t work_count = {prefix}_work_size({size_args});")
        lines.append("    if (work_count < 0) { fprintf(stderr, \"FAIL negative work size\\n\"); ++failures; return; }")
        for kernel in meta["kernels"]:
            args, frees = [], []
            lines.append("    {")
            for p in kernel["params"]:
                role, pname = p["role"], p["name"]
                if role == "size":
                    args.append(f"(int64_t){sizes[pname]}")
                elif role == "scalar":
                    args.append("next_value()")
                else:
                    count = _pointer_count(meta, kernel, p, counts)
                    nan = int(role in ("output", "work"))
                    count_code = "work_count" if count is None else str(count)
                    lines.append(f"        double *a_{pname} = exact({count_code}, {nan});")
                    args.append(f"a_{pname}")
                    frees.append(f"a_{pname}")
            what = f"{prefix}_{kernel['name']} at {label}"
            lines.append(f"        check({prefix}_{kernel['name']}({', '.join(args)}), 0, \"{what}\");")
            lines += [f"        free({v});" for v in frees]
            lines.append("    }")
        lines += ["}", ""]
    # Every size 0: each kernel must refuse (status 2) before touching any pointer.
    lines += ["static void zero_sizes(void)", "{"]
    zeros = ", ".join("0" for _ in meta["sizes"])
    lines.append(f"    (void){prefix}_work_size({zeros});")
    for kernel in meta["kernels"]:
        if not any(p["role"] == "size" for p in kernel["params"]):
            continue
        args = ["(int64_t)0" if p["role"] == "size" else "0.5" if p["role"] == "scalar" else "NULL"
                for p in kernel["params"]]
        lines.append(f"    check({prefix}_{kernel['name']}({', '.join(args)}), "
                     f"{prefix.upper()}_BAD_SIZE, \"{prefix}_{kernel['name']} with sizes 0\");")
    lines += ["}", "", "int main(void)", "{", *calls, "    zero_sizes();",
              f"    if (failures == 0) printf(\"ok {name}\\n\");",
              "    return failures ? 1 : 0;", "}", ""]
    return "\n".join(lines)


def size_configs(meta):
    names = meta["sizes"]
    base = [3, 2, 4, 5, 6, 7]
    distinct = {s: base[k % len(base)] for k, s in enumerate(names)}
    reverse = {s: base[(len(names) - 1 - k) % len(base)] for k, s in enumerate(names)}
    twos = {s: 2 for s in names}
    ones = {s: 1 for s in names}
    # Above the generator's JAM (8): the unrolled-and-jammed loops and their remainder loops.
    jammed = {s: (9, 11, 10)[k % 3] for k, s in enumerate(names)}
    configs = [distinct]
    for extra in (reverse, twos, jammed):
        if extra not in configs:
            configs.append(extra)
    configs.append(ones)  # edge case: empty stencil ranges, single classes / samples
    return configs


@pytest.mark.parametrize("name", EXAMPLES)
def test_sanitized_driver(sanitizer, sanitized_root, tmp_path, name):
    """The kernels' object is the session's (support/sanitized.py: -std=c99 -O1 -fopenmp-simd and
    the sanitizers, shared with the fused loops' driver); this driver is linked against it."""
    meta = generated_texts(name)["meta"]
    (tmp_path / "driver.c").write_text(driver_source(name, meta, size_configs(meta)))
    res = link_sanitized_driver(sanitizer, name, sanitized_root, tmp_path)
    assert res.returncode == 0, f"the sanitizer driver of {name} does not build:\n{res.stderr}"
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0",
               UBSAN_OPTIONS="print_stacktrace=1")
    res = run([str(tmp_path / "driver")], cwd=tmp_path, env=env)
    report = f"driver of {name} (source in {tmp_path}):\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert "runtime error" not in res.stderr, report
    assert "ERROR: AddressSanitizer" not in res.stderr, report
    assert "ERROR: LeakSanitizer" not in res.stderr, report
    assert res.returncode == 0, report
    assert f"ok {name}" in res.stdout, report


def test_driver_catches_an_overflow(sanitizer, tmp_path):
    """The harness itself: a kernel writing one past its output is reported by ASan."""
    meta = {"sizes": ["n"], "x": "x", "theta": "theta",
            "arrays": [{"name": "theta", "role": "theta", "shape": ["1"]},
                       {"name": "x", "role": "x", "shape": ["n"]}],
            "kernels": [{"name": "lower_grad", "params": [
                {"name": "n", "role": "size"}, {"name": "theta", "role": "theta"},
                {"name": "x", "role": "input"}, {"name": "x_bar", "role": "output"}]}]}
    (tmp_path / "hg_bad.h").write_text(
        "#include <stdint.h>\n#define HG_BAD_BAD_SIZE 2\nint64_t hg_bad_work_size(int64_t n);\n"
        "int hg_bad_lower_grad(int64_t n, const double *theta, const double *x, double *x_bar);\n")
    (tmp_path / "hg_bad.c").write_text(
        '#include "hg_bad.h"\nint64_t hg_bad_work_size(int64_t n) { (void)n; return 0; }\n'
        "int hg_bad_lower_grad(int64_t n, const double *theta, const double *x, double *x_bar)\n"
        "{ if (n < 1) return 2; for (int64_t k = 0; k <= n; ++k) x_bar[k] = theta[0] * x[k % n];"
        " return 0; }\n")
    (tmp_path / "driver.c").write_text(driver_source("bad", meta, [{"n": 3}]))
    res = run([sanitizer, "-std=c99", *SANITIZE, "driver.c", "hg_bad.c", "-o", "driver", "-lm"],
              cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    res = run([str(tmp_path / "driver")], cwd=tmp_path)
    assert res.returncode != 0 and "ERROR: AddressSanitizer" in res.stderr, res.stderr


# -- 3. determinism and the committed golden files ----------------------------------------
CHILD = """
import json, sys, tempfile, pathlib
from codegen.pipeline import generate, load_problem_file, write_outputs
out = {}
with tempfile.TemporaryDirectory() as d:
    for name in sys.argv[1:]:
        (problem,) = load_problem_file(f"examples/{name}.py")
        target = write_outputs(problem, generate(problem), d, source_file=f"examples/{name}.py")
        out[name] = {f: (target / f).read_text() for f in (f"hg_{name}.c", f"hg_{name}.h",
                                                          "meta.json", "__init__.py",
                                                          "constants.json")}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def fresh_builds():
    """The generated files of every example from two fresh interpreters (hash seeds 1 and 987),
    run at the same time (two cores)."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    envs = [dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=path) for seed in ("1", "987")]
    children = run_together([[sys.executable, "-c", CHILD, *GOLDEN_EXAMPLES]] * 2, envs=envs,
                            cwd=ROOT, timeout=300)
    for res in children:
        assert res.returncode == 0, res.stderr
    return [json.loads(res.stdout.strip().splitlines()[-1]) for res in children]


@pytest.mark.parametrize("name", GOLDEN_EXAMPLES)
def test_fresh_processes_byte_identical(fresh_builds, name):
    a, b = fresh_builds
    for f in a[name]:
        assert a[name][f] == b[name][f], f"{name}/{f} differs between PYTHONHASHSEED=1 and 987"


def golden_diff(committed: str, fresh: str, path: str, limit: int = 120) -> str:
    """The unified diff from the committed file to the fresh one (at most `limit` lines)."""
    lines = list(difflib.unified_diff(committed.splitlines(keepends=True),
                                      fresh.splitlines(keepends=True),
                                      f"{path} (committed)", f"{path} (generated now)"))
    more = f"... {len(lines) - limit} more diff lines\n" if len(lines) > limit else ""
    return "".join(lines[:limit]) + more


def test_golden_diff_shows_the_changed_line():
    diff = golden_diff("a\nb\nc\n", "a\nB\nc\n", "hg_x.c")
    assert "-b\n" in diff and "+B\n" in diff and "hg_x.c (committed)" in diff
    assert golden_diff("same\n", "same\n", "f") == ""


def update_golden(name: str) -> None:
    """Rewrite generated/<name>/ the way a developer would: `hypergen build` from the root."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    res = run([sys.executable, "-m", "codegen", "build", f"examples/{name}.py", "--out",
               "generated"], cwd=ROOT, env=env)
    assert res.returncode == 0, f"hypergen build examples/{name}.py failed:\n{res.stderr}"


@pytest.mark.parametrize("name", GOLDEN_EXAMPLES)
def test_committed_golden_up_to_date(fresh_builds, name):
    if UPDATE_GOLDEN:
        update_golden(name)
    fresh = fresh_builds[0][name]
    hint = ("if the change is intended: HYPERGEN_UPDATE_GOLDEN=1 python -m pytest -q "
            "tests/test_c_hygiene.py -k golden, then review `git diff generated/`")
    for pattern in GOLDEN_FILES:
        f = pattern.format(name=name)
        path = ROOT / "generated" / name / f
        assert path.is_file(), f"generated/{name}/{f} is missing; {hint}"
        committed = path.read_text()
        assert committed == fresh[f], (f"generated/{name}/{f} differs from what the generator "
                                       f"writes now; {hint}\n"
                                       + golden_diff(committed, fresh[f], f"generated/{name}/{f}"))
