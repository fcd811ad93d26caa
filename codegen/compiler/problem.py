"""The problem statement: a bilevel problem written in SymPy (docs/interface.md section 1).

`Problem` normalises what the user wrote into one canonical form the later stages can rely on:

* the lower variable and the hyperparameters are always `IndexedBase` arrays (scalar `Symbol`s
  and lists of them become entries of a fixed-size array), so every stage sees one kind of read;
* every other `IndexedBase` or non-integer `Symbol` is data, with a shape of size symbols;
* sizes are the integer symbols in shapes, bound from the data at run time, never at build.

Validation happens here, at construction, so a problem file fails on the line that defines the
problem and not later inside the generator. Index validation (free indices, shifted indices that
can leave their array) needs the loop structure, so it is delegated to `codegen.compiler.lowering`.
"""
from __future__ import annotations

import keyword
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy as sp

from ..errors import ProblemError
from ..primitives import ALLOWED_FUNCTIONS
from .facts import declared_facts, refuse_variable_facts
from .lowering import check_indices

C_KEYWORDS = frozenset(
    "auto break case char const continue default do double else enum extern float for goto if "
    "inline int long register restrict return short signed sizeof static struct switch typedef "
    "union unsigned void volatile while int64_t size_t".split()
)
# Names the generator makes for itself; user symbols may not take them.
_RESERVED = re.compile(r"^(s\d+|c\d+|acc\d+|hg_.*|HG_.*|.*_bar|.*_dot|value|value_out|work|q|v|t"
                       r"|need|hessian_out|cross_out)$")
# Names the C file takes from <math.h>, <stdint.h>, <string.h> and the compiler: a user symbol
# with one of them would be shadowed by (or shadow) the library inside the kernels.
C_LIBRARY = frozenset(
    "exp log log1p expm1 sqrt cbrt fabs pow fmax fmin fma sin cos tan tanh sinh cosh asin acos "
    "atan atan2 asinh acosh atanh erf erfc floor ceil round trunc hypot isfinite isnan isinf "
    "signbit copysign INFINITY NAN HUGE_VAL memset memcpy int8_t int16_t int32_t uint8_t "
    "uint16_t uint32_t uint64_t NULL main bool true false inline".split()
)


#: Names the headers a module is compiled with may define as macros (M_PI, EOF, INT64_MAX,
#: CHAR_BIT, EDOM, Py_None...): such a data name passed every check and ended in a compiler dump.
C_MACROS = re.compile(
    r"Py_\w*|Py[A-Z]\w*|M_[A-Z0-9_]+|(U?INT(8|16|32|64|MAX|PTR)?|SIZE|PTRDIFF|SIG|WCHAR|WINT"
    r"|S?CHAR|UCHAR|U?SHRT|U?L?LONG|FLT|DBL|LDBL|RAND|EXIT|FP|MATH|SEEK|FOPEN|FILENAME|TMP)_\w*"
    r"|E[A-Z0-9]{2,}|EOF|BUFSIZ"
    r"|stdin|stdout|stderr|errno|assert|offsetof|NDEBUG", flags=re.ASCII)


@dataclass(frozen=True)
class ArraySpec:
    """One named array of the problem: data, the lower variable or the hyperparameters."""

    name: str
    shape: tuple[sp.Expr, ...]  # of SymPy integer expressions in the size symbols; () for a scalar
    role: str  # "data", "x" or "theta"
    sparse: bool = False  # a 2-D data matrix bound as CSR: contractions loop over its non-zeros
    facts: tuple[str, ...] = ()  # what a data symbol declares of its values, checked at bind (facts.py)

    @property
    def base(self) -> sp.IndexedBase:
        return sp.IndexedBase(self.name, shape=self.shape if self.shape else None)


@dataclass
class Problem:
    """A bilevel problem: min_theta f(x*(theta), theta) + r(theta), x*(theta) = argmin_x g(x, theta).

    Parameters follow docs/interface.md section 1. `constants` optionally states mu, L, L_A, L_B, L_f
    as SymPy expressions in theta (and scalar data): results computed with them say so.
    """

    name: str
    x: object
    theta: object
    lower: object
    upper: object
    regulariser: object = 0
    constants: dict[str, Any] | None = None
    sparse: str | Sequence[str] = ()  # names of 2-D data matrices bound in CSR form (scipy.sparse)
    # Canonical form, filled in by __post_init__.
    arrays: dict[str, ArraySpec] = field(init=False, repr=False)
    sizes: tuple[sp.Symbol, ...] = field(init=False, repr=False)
    g: sp.Expr = field(init=False, repr=False)
    f: sp.Expr = field(init=False, repr=False)
    r: sp.Expr = field(init=False, repr=False)
    shown: dict[sp.Basic, sp.Basic] = field(init=False, repr=False)  # internal x[k] -> user symbol

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.name):
            raise ProblemError(f"problem name {self.name!r} must be a valid identifier")
        if keyword.iskeyword(self.name) or self.name in C_KEYWORDS:
            raise ProblemError(f"problem name {self.name!r} is a Python or C keyword")
        x_spec, x_subs = _variable_spec(self.x, "x", "lower variable x")
        th_spec, th_subs = _variable_spec(self.theta, "theta", "hyperparameter theta")
        if x_spec.name == th_spec.name:
            raise ProblemError(f"x and theta are both named {x_spec.name!r}")
        subs = {**x_subs, **th_subs}
        self.shown = {v: k for k, v in subs.items()}
        self.g = _objective(self.lower, "lower", subs)
        self.f = _objective(self.upper, "upper", subs)
        self.r = _objective(self.regulariser, "regulariser", subs)
        arrays = {x_spec.name: x_spec, th_spec.name: th_spec}
        for label, expr in (("lower", self.g), ("upper", self.f), ("regulariser", self.r)):
            _collect_data(expr, label, arrays)
        for label, expr in (("lower", self.g), ("upper", self.f), ("regulariser", self.r)):
            _check_real_constants(expr, label, self.shown)
        _check_functions(self.g, "lower")
        _check_functions(self.f, "upper")
        _check_functions(self.r, "regulariser")
        for label, expr in (("lower", self.g), ("upper", self.f), ("regulariser", self.r)):
            _check_differentiable(expr, label, {x_spec.name, th_spec.name}, self.shown)
        if self.r != 0 and any(a.role != "theta" for a in _bases_in(self.r, arrays)):
            raise ProblemError("the regulariser r(theta) may depend on theta and scalar data only")
        if not any(a.role == "x" for a in _bases_in(self.g, arrays)):
            raise ProblemError(f"the lower objective does not depend on x ({x_spec.name})")
        self.arrays = dict(sorted(_mark_sparse(arrays, self.sparse).items()))
        self.sizes = tuple(sorted(_size_symbols(self.arrays.values()), key=lambda s: s.name))
        _check_names(self)
        _check_sizes_bindable(self)
        self.constants = _stated_constants(self.constants, subs, x_spec.name)
        for label, expr in (("lower", self.g), ("upper", self.f), ("regulariser", self.r)):
            check_indices(expr, self.arrays, label)

    # -- convenient views -------------------------------------------------------------------
    def show(self, expr: object) -> str:
        """expr as the user wrote it: internal x[k], theta[k] back to the user's Symbols."""
        return str(sp.sstr(sp.sympify(expr).xreplace(self.shown)))

    @property
    def x_spec(self) -> ArraySpec:
        return next(a for a in self.arrays.values() if a.role == "x")

    @property
    def theta_spec(self) -> ArraySpec:
        return next(a for a in self.arrays.values() if a.role == "theta")

    @property
    def data_specs(self) -> list[ArraySpec]:
        return [a for a in self.arrays.values() if a.role == "data"]

    @property
    def theta_names(self) -> list[str] | None:
        """Display names of the theta entries (the user's symbols, or name[k])."""
        if isinstance(self.theta, sp.Symbol):
            return [self.theta.name]
        if isinstance(self.theta, (list, tuple)):
            return [s.name for s in self.theta]
        return None


def _variable_spec(var: object, default_name: str,
                   what: str) -> tuple[ArraySpec, dict[sp.Symbol, sp.Expr]]:
    """Canonical array for x or theta, and the substitution of user symbols into it."""
    role = "x" if default_name == "x" else "theta"
    if isinstance(var, (sp.IndexedBase, sp.Symbol)):
        refuse_variable_facts(var, f"{what} {var.name}")
    elif isinstance(var, (list, tuple)):
        for s in var:
            if isinstance(s, sp.Symbol):
                refuse_variable_facts(s, f"{what} {s.name}")
    if isinstance(var, sp.IndexedBase):
        shape = var.shape
        if shape is None or len(shape) not in (1, 2):
            raise ProblemError(f"{what} {var.name}: IndexedBase needs a 1-D or 2-D shape, got {shape}")
        if role == "theta" and len(shape) == 2 and not all(sp.sympify(s).is_Integer for s in shape):
            # a 2-D theta (learned filters theta[f, k]) is flattened in C order everywhere; its
            # entries are read by number, so its shape must be numbers
            raise ProblemError(f"{what} {var.name}: a 2-D theta needs a numeric shape, got {shape}")
        return ArraySpec(str(var.label), tuple(sp.sympify(s) for s in shape), role), {}
    if isinstance(var, sp.Symbol):
        var = [var]
    if isinstance(var, (list, tuple)) and var and all(isinstance(s, sp.Symbol) for s in var):
        if len(set(var)) != len(var):
            raise ProblemError(f"{what}: the symbols {var} repeat")
        base = sp.IndexedBase(default_name, shape=(len(var),))
        return ArraySpec(default_name, (sp.Integer(len(var)),), role), {
            s: base[k] for k, s in enumerate(var)
        }
    raise ProblemError(
        f"{what} must be an IndexedBase with a symbolic shape, a Symbol or a list of Symbols; "
        f"got {var!r} ({type(var).__name__})"
    )


def _objective(expr: object, label: str, subs: dict[sp.Symbol, sp.Expr]) -> sp.Expr:
    if expr is None:
        raise ProblemError(f"the {label} objective is missing")
    try:
        expr = sp.sympify(expr)
    except (sp.SympifyError, TypeError) as exc:
        raise ProblemError(f"the {label} objective is not a SymPy expression: {exc}") from None
    if isinstance(expr, (sp.MatrixBase, sp.MatrixExpr)) or not isinstance(expr, sp.Expr):
        raise ProblemError(f"the {label} objective must be a scalar expression, got {type(expr).__name__}")
    if any(isinstance(a, (sp.Eq, sp.Rel)) for a in sp.preorder_traversal(expr)):
        raise ProblemError(f"the {label} objective contains a relation; it must be a scalar expression")
    # x and theta Symbols become entries of their arrays; the substitution would also rename
    # an array whose label is the same Symbol (t[i] became theta[0][i])
    taken = {s.name: str(entry.base.label) for s, entry in subs.items()}  # name -> x, theta
    for base in sorted(expr.atoms(sp.IndexedBase), key=str):
        if str(base.label) in taken:
            raise ProblemError(f"the {label} objective: the name {str(base.label)!r} is used for "
                               f"{taken[str(base.label)]} and for the data array {base}; rename one")
    return expr.xreplace(subs) if subs else expr


def _collect_data(expr: sp.Expr, label: str, arrays: dict[str, ArraySpec]) -> None:
    """Register every IndexedBase and real Symbol that is neither x nor theta as data."""
    for node in _walk(expr):
        if isinstance(node, sp.Indexed):
            name, shape = str(node.base.label), node.base.shape
            if name in arrays:
                if arrays[name].role == "data" and len(arrays[name].shape) != len(node.indices):
                    raise ProblemError(f"{label}: {name} is used with {len(node.indices)} indices "
                                       f"but has shape {arrays[name].shape}")
                if arrays[name].role == "data":
                    _same_declaration(arrays[name], node.base, f"data array {name}", label)
                _same_shape(arrays[name], shape, label)
                continue
            if shape is None:
                raise ProblemError(f"{label}: data array {name} has no shape; declare it as "
                                   f"IndexedBase('{name}', shape=(...))")
            if len(shape) != len(node.indices):
                raise ProblemError(f"{label}: {name} has shape {tuple(shape)} but is used as {node}")
            arrays[name] = ArraySpec(name, tuple(sp.sympify(s) for s in shape), "data",
                                     facts=declared_facts(node.base, f"data array {name}"))
        elif isinstance(node, sp.Symbol) and not isinstance(node, sp.Idx) and not _is_integer(node):
            if node.name in arrays:
                if arrays[node.name].shape != ():
                    raise ProblemError(f"{label}: {node.name} is used both as a scalar and an array")
                if arrays[node.name].role == "data":
                    _same_declaration(arrays[node.name], node, f"data symbol {node.name}", label)
                continue
            arrays[node.name] = ArraySpec(node.name, (), "data",
                                          facts=declared_facts(node, f"data symbol {node.name}"))


def _same_shape(spec: ArraySpec, shape: Any, label: str) -> None:
    """ProblemError when a second IndexedBase of the same name (data, x or theta) has another
    shape: they would be one array, and an index check against the first shape named the
    wrong array."""
    if shape is not None and tuple(sp.sympify(s) for s in shape) != spec.shape:
        what = "" if spec.role == "data" else f" (one of them {spec.role})"
        raise ProblemError(f"{label}: two different IndexedBases are named {spec.name!r}{what}, "
                           f"with shapes {spec.shape} and {tuple(shape)}; hypergen would bind "
                           f"one array: declare {spec.name} once")


def _same_declaration(spec: ArraySpec, node: sp.Basic, what: str, label: str) -> None:
    """ProblemError when a second SymPy object of the same name declares other facts: SymPy
    keeps them apart (and has already simplified with each one's assumptions: sqrt(c**2) is c
    for c positive), while the data bind as one array. Merged, the declared fact was dropped,
    bind accepted c = -0.5, and the certified hypergradient was that of another g."""
    facts = declared_facts(node, what)
    if facts != spec.facts:
        shown = ", ".join(f"{f}=True" for f in facts) or "no assumptions"
        before = ", ".join(f"{f}=True" for f in spec.facts) or "no assumptions"
        raise ProblemError(f"{label}: two different SymPy symbols are named {spec.name!r}, one "
                           f"declared with {before} and one with {shown}; SymPy treats them as "
                           f"different symbols, hypergen would bind one array: declare "
                           f"{spec.name} once")


#: Constants with no real C value: sp.I ended in a C compiler error ('I' undeclared) or a SymPy
#: traceback ("not comparable"), zoo in a printer traceback.
NON_REAL = (sp.I, sp.zoo, sp.oo, sp.S.NegativeInfinity, sp.nan)


def _check_real_constants(expr: sp.Expr, label: str, shown: dict[sp.Basic, sp.Basic]) -> None:
    """ProblemError naming a complex, infinite or undefined constant and a term it is in (in
    the user's names: `shown` maps x and theta back)."""
    for term in sp.Add.make_args(expr):
        for node in _walk(term):
            if any(node is c for c in NON_REAL):
                raise ProblemError(f"{label}: the term {term.xreplace(shown)} holds {node}, which "
                                   f"has no real value; the objectives must be real-valued")


def _walk(expr: sp.Basic) -> Iterator[sp.Basic]:
    """Pre-order traversal that skips the labels of IndexedBases (they are names, not symbols)."""
    stack = [expr]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, sp.Indexed):
            stack.extend(reversed(node.indices))
        elif isinstance(node, (sp.IndexedBase, sp.Idx)):
            continue
        else:
            stack.extend(reversed(node.args))


def _mark_sparse(arrays: dict[str, ArraySpec],
                 sparse: str | Sequence[str]) -> dict[str, ArraySpec]:
    if isinstance(sparse, str):
        sparse = (sparse,)
    for name in sparse:
        spec = arrays.get(str(name))
        if spec is None or spec.role != "data" or len(spec.shape) != 2:
            raise ProblemError(f"sparse={tuple(sparse)}: {name} is not a 2-D data array of the problem")
        arrays[spec.name] = ArraySpec(spec.name, spec.shape, "data", sparse=True, facts=spec.facts)
    return arrays


def _is_integer(sym: sp.Symbol) -> bool:
    return bool(sym.is_integer)


def _bases_in(expr: sp.Expr, arrays: dict[str, ArraySpec]) -> list[ArraySpec]:
    names = {str(n.base.label) for n in expr.atoms(sp.Indexed)}
    names |= {s.name for s in _walk(expr) if isinstance(s, sp.Symbol) and s.name in arrays
              and arrays[s.name].shape == ()}
    return [arrays[n] for n in sorted(names) if n in arrays]


def _check_functions(expr: sp.Expr, label: str) -> None:
    for node in sp.preorder_traversal(expr):
        if isinstance(node, (sp.Max, sp.Min)):
            raise ProblemError(f"{label}: {node} is not twice differentiable; use a smooth "
                               f"alternative such as softplus(u) for max(u, 0)")
        if isinstance(node, sp.core.function.Application) and not isinstance(node, sp.Indexed):
            if type(node) not in ALLOWED_FUNCTIONS:
                allowed = ", ".join(sorted(f.__name__ for f in ALLOWED_FUNCTIONS))
                raise ProblemError(f"{label}: function {type(node).__name__} in {node} is not "
                                   f"supported; use one of {allowed}")
        elif isinstance(node, (sp.Integral, sp.Derivative, sp.Product, sp.Piecewise)):
            raise ProblemError(f"{label}: {type(node).__name__} is not supported ({node})")


def _check_differentiable(expr: sp.Expr, label: str, variables: set[str],
                          shown: dict[sp.Basic, sp.Basic]) -> None:
    """Refuse, naming the term, what the derivatives cannot handle: Abs of an expression in x or
    theta (its derivative sign(u) jumps at 0 and its second derivative is not a function), and
    an array indexed by an array (x[idx[j]]: indices must be loop indices plus constants).
    `shown` maps internal variables back to the user's symbols (theta[0] -> theta) for messages."""
    for node in _walk(expr):
        if isinstance(node, sp.Indexed):
            inner = [i for index in node.indices for i in sp.preorder_traversal(index)
                     if isinstance(i, sp.Indexed)]
            if inner:
                raise ProblemError(
                    f"{label}: {node} indexes {node.base.label} with the array {inner[0].base.label}"
                    f" (indirect indexing is not supported): index with sp.Idx loop indices plus "
                    f"integer offsets, e.g. gather the data beforehand into an array of its own")
        elif isinstance(node, sp.Abs):
            reads = {str(i.base.label) for i in node.atoms(sp.Indexed)} | {
                s.name for s in node.free_symbols if isinstance(s, sp.Symbol)}
            if reads & variables:
                node, u = node.xreplace(shown), node.args[0].xreplace(shown)
                raise ProblemError(
                    f"{label}: {node} is not differentiable where {u} = 0, and certified bounds "
                    f"need g twice and f once differentiable in x and theta: use a smooth absolute "
                    f"value such as sqrt(({u})**2 + delta**2) with a small delta > 0")


def _size_symbols(specs: Iterable[ArraySpec]) -> set[sp.Symbol]:
    sizes: set[sp.Symbol] = set()
    for spec in specs:
        for s in spec.shape:
            bad = [a for a in s.free_symbols if not _is_integer(a)]
            if bad:
                raise ProblemError(f"array {spec.name}: shape entry {s} uses {bad[0]}, which is not "
                                   f"an integer symbol; declare sizes with integer=True, positive=True")
            sizes |= s.free_symbols
    return sizes


def _index_names(problem: Problem) -> set[str]:
    """The summation indices' names: they become C loop variables, like array names."""
    names: set[str] = set()
    for expr in (problem.g, problem.f, problem.r):
        for node in sp.preorder_traversal(expr):
            if isinstance(node, sp.Idx):
                names.add(str(node.label))
            elif isinstance(node, sp.Sum):
                names.update(str(limit[0]) for limit in node.limits)
    return names


def _check_identifier(name: str, what: str) -> None:
    """Every name that reaches the C source is a plain ASCII identifier that is neither a C
    keyword, nor a library name, nor one of the generator's own: anything else could change
    what the kernels compute without a compiler error (a label holding a #define)."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name, flags=re.ASCII):
        raise ProblemError(f"{what} name {name!r} is not a valid C identifier (letters, digits "
                           "and underscores, starting with a letter)")
    if name in C_KEYWORDS or name in C_LIBRARY:
        raise ProblemError(f"{what} name {name!r} is a C keyword or C library name; rename it")
    if C_MACROS.fullmatch(name):
        raise ProblemError(f"{what} name {name!r} may be a macro of the headers the module is "
                           f"compiled with (<math.h>, <stdint.h>, <stdio.h>, <limits.h>, "
                           f"<errno.h>, Python.h); rename it")
    if _RESERVED.match(name):
        raise ProblemError(f"{what} name {name!r} is reserved for the generator's own "
                           f"variables; rename it")


def _check_names(problem: Problem) -> None:
    names = list(problem.arrays) + [s.name for s in problem.sizes]
    for name in names:
        _check_identifier(name, "symbol")
    for name in sorted(_index_names(problem)):
        _check_identifier(name, "index")
    csr_parts = {f"{a.name}_{part}" for a in problem.arrays.values() if a.sparse
                 for part in ("data", "indices", "indptr")}
    clash = sorted(csr_parts & (set(names) | _index_names(problem)))
    if clash:
        raise ProblemError(f"the name {clash[0]!r} is taken by the CSR arrays of a sparse matrix; "
                           "rename it")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ProblemError(f"the name(s) {dup} are used for more than one symbol")


def _check_sizes_bindable(problem: Problem) -> None:
    """Every size must be readable from a data array's shape, else it can never be bound."""
    from_data = set()
    for spec in problem.data_specs:
        for s in spec.shape:
            if isinstance(s, sp.Symbol):
                from_data.add(s)
    for spec in (problem.x_spec, problem.theta_spec):
        for s in spec.shape:
            missing = sorted(a.name for a in s.free_symbols - from_data)
            if missing:
                raise ProblemError(
                    f"size {missing[0]} (in the shape of {spec.name}) appears in no data array's "
                    f"shape as a plain symbol, so it can never be bound at run time")
    for spec in problem.data_specs:
        for s in spec.shape:
            missing = sorted(a.name for a in s.free_symbols - from_data)
            if missing:
                raise ProblemError(f"size {missing[0]} in the shape {spec.shape} of {spec.name} "
                                   f"appears in no shape as a plain symbol; it can never be bound")


_CONSTANT_NAMES = ("mu", "L", "L_A", "L_B", "L_f")


def _stated_constants(constants: object, subs: dict[sp.Symbol, sp.Expr],
                      x_name: str) -> dict[str, sp.Expr] | None:
    if constants is None:
        return None
    if not isinstance(constants, dict):
        raise ProblemError("constants must be a dict such as {'mu': sp.exp(theta), 'L': ...}")
    out: dict[str, sp.Expr] = {}
    for key, value in constants.items():
        if key not in _CONSTANT_NAMES:
            raise ProblemError(f"unknown constant {key!r}; the constants are {_CONSTANT_NAMES}")
        expr = sp.sympify(value).xreplace(subs)
        if expr.atoms(sp.Sum):
            raise ProblemError(f"constant {key} = {value}: stated constants may not contain sums")
        if any(str(r.base.label) == x_name for r in expr.atoms(sp.Indexed)):
            # a constant is one number for every x (it bounds over all of them): one that read
            # x built, and every hypergradient then failed at run time
            raise ProblemError(f"constant {key} = {value} reads the lower variable {x_name}; "
                               f"stated constants are expressions in theta and scalar data")
        out[key] = expr
    if "mu" not in out:
        raise ProblemError("stated constants must include mu (the certificate ||grad g||/mu needs it)")
    return out
