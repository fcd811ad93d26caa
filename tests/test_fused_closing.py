"""The closing step fused in C (hg_<name>_closing: codegen/compiler/emit/closing.py,
templates/closing.c.j2; codegen/hypergrad/fused.py `closing_for`) against the separate kernels
it replaces (docs/solvers.md 5).

* every example: the fused call's B^T q, direct theta terms and value are bit-identical to
  cross_vjp, upper_theta_grad and upper_value called one by one, at finite and at overflowing
  points (non-finite outputs come back as the kernels return them);
* the hypergradient with the fused closing and with the closing taken out of the module's
  fused functions (the driver then calls the three kernels): grad, bounds, value, work, reasons
  and notes bit-identical over several solver pairs and options;
* AddressSanitizer + UBSan: a C driver calls the closing of three examples on exactly sized
  mallocs (status 0, every output written), and with every size 0 and NULL pointers (status 2).
"""

import numpy as np
import pytest
import sympy as sp

from codegen.hypergrad import hypergradient
from codegen.hypergrad.fused import closing_for

from support import EXAMPLES, TINY, built_example, load_example
from support.sanitized import generated_texts, run_sanitized_driver


def bound(name, build_dir, sizes=None):
    _, module, ns = built_example(name, build_dir)
    prob = module.bind(**ns["example_data"](**(TINY[name] if sizes is None else sizes)))
    theta = np.full(prob.theta_size, float(np.mean(ns["THETA0"])))
    return prob, theta


def separate(prob, theta, x, q):
    return prob.cross_vjp(x, theta, q), prob.upper_theta_grad(x, theta), prob.upper_value(x, theta)


@pytest.mark.parametrize("name", EXAMPLES)
def test_closing_is_the_separate_kernels_bit_for_bit(name, build_dir):
    prob, theta = bound(name, build_dir)
    fused = closing_for(prob)
    assert fused is not None and "closing" in fused.functions
    rng = np.random.default_rng(0)
    for scale in (1.0, 1e3):
        x, q = scale * rng.standard_normal(prob.x_size), rng.standard_normal(prob.x_size)
        btq, direct, value, finite = fused.close(theta, x, q)
        ref_btq, ref_direct, ref_value = separate(prob, theta, x, q)
        assert finite
        assert btq.tobytes() == ref_btq.tobytes()
        assert direct.tobytes() == ref_direct.tobytes()
        assert np.float64(value).tobytes() == np.float64(ref_value).tobytes()
        assert np.all(np.isfinite(btq)) and np.isfinite(value)


def test_closing_returns_non_finite_outputs_as_the_kernels_do(build_dir):
    prob, theta = bound("logistic", build_dir)
    x, q = np.full(prob.x_size, np.inf), np.ones(prob.x_size)
    btq, direct, value, finite = closing_for(prob).close(theta, x, q)
    ref = separate(prob, theta, x, q)
    assert not finite and not np.isfinite(value) and not np.all(np.isfinite(btq))
    assert btq.tobytes() == ref[0].tobytes() and direct.tobytes() == ref[1].tobytes()
    assert np.float64(value).tobytes() == np.float64(ref[2]).tobytes()


#: Solver pairs and options the driver is compared under, fused closing against separate calls.
CALLS = (dict(rtol=1e-6), dict(), dict(lower="fista", adjoint="cg", rtol=1e-6),
         dict(lower="direct", adjoint="direct"), dict(lower="newton", adjoint="cg", eps=1e-9,
                                                      delta=1e-9),
         dict(lower="gd", adjoint="backprop"), dict(certificate="tight", rtol=1e-6))


def fingerprint(hg):
    return (hg.grad.tobytes(), hg.bound, hg.apriori_bound, np.float64(hg.value).tobytes(),
            hg.x.tobytes(), hg.q.tobytes(), hg.e, hg.R, hg.norm_B, sorted(hg.work.items()),
            hg.status, hg.reasons, hg.notes, sorted(hg.bound_forms.items()), hg.certificate)


@pytest.mark.parametrize("name", ["ridge", "logistic", "quadratic", "tv1d"])
def test_hypergradient_bit_identical_without_the_fused_closing(name, build_dir, monkeypatch):
    prob, theta = bound(name, build_dir)
    # twice: what the first call derives once per bind (a Hessian factor, a fixed ||B||) is
    # counted in its work only
    fused = [[hypergradient(prob, theta, **kw) for kw in CALLS] for _ in range(2)][-1]
    monkeypatch.delitem(closing_for(prob).functions, "closing")  # the three kernel calls
    assert closing_for(prob) is None
    for kw, hg in zip(CALLS, fused):
        ref = hypergradient(prob, theta, **kw)
        assert fingerprint(hg) == fingerprint(ref), kw
        assert np.all(np.isfinite(hg.grad)) and np.isfinite(hg.value), (kw, hg.reasons)


# -- AddressSanitizer + UBSan on the closing ------------------------------------------------------
DRIVEN = {"ridge": dict(m=7, n=5, p=3), "logistic": dict(m=9, n=10, p=4),
          "hypercleaning": dict(c=3, n=4, m=12, mv=6)}


def _extent(shape, sizes):
    return int(np.prod([int(sp.sympify(e).xreplace({sp.Symbol(k): v for k, v in sizes.items()}))
                        for e in shape]))


def _driver(name, meta, sizes, data):
    """C source: the closing on exactly sized mallocs of the bound data, outputs NaN-filled,
    then with every size 0 and NULL pointers."""
    prefix = f"hg_{name}"
    extents = {a["name"]: _extent(a["shape"], sizes) for a in meta["arrays"] if a["shape"]}
    n, p = extents[meta["x"]], extents[meta["theta"]]
    lines = ["#include <math.h>", "#include <stdint.h>", "#include <stdio.h>",
             "#include <stdlib.h>", "#include <string.h>", f'#include "{prefix}.h"', "",
             "static double *exact(const double *values, int64_t count)", "{",
             "    double *p = malloc(sizeof(double) * (size_t)count);",
             "    if (p == NULL) exit(3);",
             "    memcpy(p, values, sizeof(double) * (size_t)count);",
             "    return p;", "}", "",
             "static double *nans(int64_t count)", "{",
             "    double *p = malloc(sizeof(double) * (size_t)count);",
             "    if (p == NULL) exit(3);",
             "    for (int64_t k = 0; k < count; ++k) p[k] = NAN;",
             "    return p;", "}", "", "int main(void)", "{"]
    args, nulls = [str(sizes[s]) for s in meta["sizes"]], ["0"] * len(meta["sizes"])
    arrays = [a for a in meta["arrays"] if a["role"] in ("theta", "data")]
    arrays.sort(key=lambda a: a["role"] != "theta")  # theta first, then the data in order
    for a in arrays:
        if not a["shape"]:
            args.append(repr(float(data[a["name"]])))
            nulls.append("0.0")
            continue
        values = data[a["name"]] if a["role"] == "data" else np.full(p, 0.5)
        flat = ", ".join(repr(float(v)) for v in np.ravel(values))
        lines += [f"    static const double v_{a['name']}[] = {{{flat}}};",
                  f"    double *a_{a['name']} = exact(v_{a['name']}, {np.size(values)});"]
        args.append(f"a_{a['name']}")
        nulls.append("NULL")
    size_args = ", ".join(args[:len(meta["sizes"])])
    lines += [f"    double *x = nans({n}), *q = nans({n});",
              f"    for (int k = 0; k < {n}; ++k) {{ x[k] = 0.1 * (k + 1); q[k] = 1.0 - 0.05 * k; }}",
              f"    double *btq = nans({p}), *direct = nans({p}), *value = nans(1);",
              f"    double *work = nans({prefix}_work_size({size_args}));",
              f"    int status = {prefix}_closing({', '.join(args)}, x, q, btq, direct, value, work);",
              "    int written = isfinite(value[0]);",
              f"    for (int k = 0; k < {p}; ++k) written &= isfinite(btq[k]) && isfinite(direct[k]);",
              f"    int bad = {prefix}_closing({', '.join(nulls)}, NULL, NULL, NULL, NULL, NULL, NULL);",
              '    printf("status %d written %d bad %d\\n", status, written, bad);',
              "    free(x); free(q); free(btq); free(direct); free(value); free(work);"]
    lines += [f"    free(a_{a['name']});" for a in arrays if a["shape"]]
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines)


@pytest.mark.parametrize("name", sorted(DRIVEN))
def test_closing_under_address_sanitizer(name, sanitized_root, tmp_path):
    """The driver linked against the session's ASan/UBSan object of the example's kernels (the
    same flags as every sanitized driver: support/sanitized.py)."""
    sizes = DRIVEN[name]
    data = load_example(name).namespace["example_data"](**sizes)
    (tmp_path / "driver.c").write_text(_driver(name, generated_texts(name)["meta"], sizes, data))
    stdout = run_sanitized_driver(name, sanitized_root, tmp_path)
    assert stdout.split() == ["status", "0", "written", "1", "bad", "2"]
