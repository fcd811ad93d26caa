"""Stage: a rendered C translation unit -> a loaded cffi extension module, behind a content-addressed cache.

Why it is built this way (docs/compiler.md section 10):

- Staleness is decided by content only. The key hashes everything that can change the binary (source,
  cdef, flags, compiler identity, Python ABI, cffi and hypergen versions, templates), never mtimes.
- The binary proves what it is. Its module name embeds the key prefix, so a binary built from other
  inputs cannot even be initialised under the expected name, and it exports `hg_build_key()`, which is
  compared with the full key after loading. Anything that fails to load is rebuilt, never trusted.
- Builds publish atomically. A per-key `flock` serialises processes (it times out naming its holder);
  the compile happens in a sibling temporary directory and files move into place with `os.replace`, the
  extension last, so a reader never sees a half-written entry. Files are replaced, never rewritten in
  place, so a process that already mapped an old binary keeps a valid mapping.
- Nothing is loaded on trust. The entry's build.json (moved in before the extension) records the
  extension's size and sha256; a cached or published file that does not match it is never dlopen'ed
  (a truncated one would SIGBUS) but rebuilt, or recopied, with a warning naming it.
- The compile runs in a child Python. cffi `chdir`s and edits `os.environ` while compiling, and the
  compiler writes to file descriptors 1 and 2; a child keeps that off the caller's threads and lets all
  of the output land in build.log (and in `BuildError` when it fails).
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import functools
import hashlib
import importlib.util
import json
import os
import pathlib
import re
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import types
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, NoReturn, Union

import cffi

from .errors import BuildError, ConfigError
from .version import __version__

PathLike = Union[str, "os.PathLike[str]"]
Flags = Union[Iterable[str], None]  # compiler flags; None: default_flags()

EXT_SUFFIX: str = sysconfig.get_config_var("EXT_SUFFIX")
LAYOUT = "v1"  # entries from before checksums in build.json fail the check once and are rebuilt
KEY_FUNCTION = "hg_build_key"
BASE_FLAGS = ("-O3", "-std=c99", "-fno-math-errno", "-Wall", "-Wextra")
#: seconds a build waits for another process's lock on the same key; $HYPERGEN_LOCK_TIMEOUT
DEFAULT_LOCK_TIMEOUT = 600.0
# Environment variables setuptools folds into the compile and link commands.
COMPILER_ENV = ("CC", "CFLAGS", "CPPFLAGS", "LDFLAGS", "LDSHARED")

# Per-process build statistics: `hypergen build` reports cache hits from these, tests count compiles.
stats = {"compiled": 0, "loaded": 0, "reused": 0}

_LOADED: dict[str, types.ModuleType] = {}
_KEY_LOCKS: dict[str, threading.RLock] = {}
_REGISTRY_LOCK = threading.Lock()

_COMPILE_SCRIPT = """\
import json, sys
from cffi import FFI
job = json.load(sys.stdin)
ffi = FFI()
ffi.cdef(job["cdef"])
# -fopenmp also links the OpenMP runtime; every other flag only compiles.
link = [f for f in job["flags"] if f == "-fopenmp"]
ffi.set_source(job["module"], job["source"], extra_compile_args=job["flags"], extra_link_args=link)
try:
    ffi.compile(tmpdir=job["tmpdir"], verbose=True)
except Exception as exc:  # the compiler's own messages are already on stderr; no traceback needed
    sys.exit(f"{type(exc).__name__}: {exc}")
"""


# ---------------------------------------------------------------- public API


def default_flags() -> tuple[str, ...]:
    """Optimising C99 flags; `-march=native` unless HYPERGEN_PORTABLE=1; then $HYPERGEN_CFLAGS.

    `-fopenmp` runs the kernels' heavy outer loops on all cores (`omp parallel for`) and makes
    `omp simd` effective; HYPERGEN_OPENMP=0 gives `-fopenmp-simd` instead (serial, no OpenMP
    runtime linked). `-fno-math-errno` lets sqrt/exp vectorise. The flags are part of the key.
    """
    native = () if os.environ.get("HYPERGEN_PORTABLE") == "1" else ("-march=native",)
    wanted = os.environ.get("HYPERGEN_OPENMP") != "0"
    openmp = ("-fopenmp",) if wanted and _links_openmp(tuple(_compiler_command())) else (
        "-fopenmp-simd",)
    return BASE_FLAGS + openmp + native + tuple(_split_variable("HYPERGEN_CFLAGS", ""))


def _split_variable(name: str, default: str) -> list[str]:
    """$name split like a shell would; an unbalanced quote is refused naming the variable."""
    text = os.environ.get(name) or default
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise ConfigError(f"${name} = {text!r} cannot be split into arguments ({exc}): "
                          "balance its quotes or unset it") from None


def cache_key(module_name: str, source: str, cdef: str, flags: Flags = None) -> str:
    """The sha256 hex digest identifying the binary these inputs produce (flags None = defaults)."""
    inputs = _key_inputs(module_name, source, cdef, _resolve_flags(flags))
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def compile_extension(module_name: str, source: str, cdef: str, *, flags: Flags = None,
                      cache_dir: PathLike | None = None) -> types.ModuleType:
    """Return the loaded cffi module (has .ffi and .lib) for this C source; compile only on a cache miss."""
    flags = _resolve_flags(flags)
    key = cache_key(module_name, source, cdef, flags)
    return _cached(module_name, source, cdef, flags, key, cache_dir)


def publish(module: types.ModuleType, directory: PathLike) -> pathlib.Path:
    """Copy the module's extension file into `directory` (atomically) and return its path.

    Older builds of the same problem in `directory` are removed, so e.g. generated/<name>/ holds only the
    binary its current sources describe (unlinking is safe for processes that have one loaded).
    """
    built = pathlib.Path(module.__file__ or "")
    match = re.fullmatch(r"(_hg_\w+_)[0-9a-f]{16}" + re.escape(EXT_SUFFIX), built.name)
    if module.__file__ is None or match is None:
        raise ValueError(f"{built} is not an extension built by codegen.jit")
    directory = pathlib.Path(directory)
    target = directory / built.name
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not _same_file(built, target):
            _copy_atomically(built, target)
    except OSError as exc:  # a full disk, a read-only directory: one line naming the path
        raise BuildError(f"cannot write {target}: {exc.strerror or exc}") from None
    for old in directory.glob(match.group(1) + "?" * 16 + EXT_SUFFIX):
        if old != target:
            old.unlink(missing_ok=True)
    return target


def _same_file(built: pathlib.Path, target: pathlib.Path) -> bool:
    """Whether target is built itself (either may vanish meanwhile: another process publishing into
    the same directory replaces or removes files)."""
    try:
        return os.path.samefile(built, target)
    except FileNotFoundError:
        return False


def load_published(module_name: str, source: str, cdef: str, directory: PathLike, *,
                   flags: Flags = None, cache_dir: PathLike | None = None) -> types.ModuleType:
    """Load the extension previously published into `directory` if its checksum holds and its embedded
    key equals cache_key(...); otherwise (missing, stale, damaged) fall back to compile_extension.

    The published file is looked up under the name the current key implies, so a stale one is not even
    opened; one that fails its checksum is never opened: the cache supplies the module and, when the
    directory is writable, a good copy replaces the damaged one.
    """
    flags = _resolve_flags(flags)
    key = cache_key(module_name, source, cdef, flags)
    path = pathlib.Path(directory) / _extension_name(module_name, key)
    with _key_lock(key):
        if key in _LOADED or not path.is_file():
            return _cached(module_name, source, cdef, flags, key, cache_dir)
        manifest = writable_dir(cache_dir, f"{LAYOUT}/{key[:2]}") / key / "build.json"
        module = _try_load(path, manifest, _module_name(module_name, key), key,
                           "not loaded: the cache's copy is used and published again")
        if module is not None:
            _LOADED[key] = module
            _count("loaded")
            return module
        module = _cached(module_name, source, cdef, flags, key, cache_dir)
        with contextlib.suppress(OSError, BuildError):  # repair the directory if it is writable
            publish(module, directory)
        return module


def _copy_atomically(source: pathlib.Path, target: pathlib.Path) -> None:
    """Copy via a temporary sibling and os.replace, so `target` is never seen half-written. If
    another process publishing here removed our source meanwhile, its copy is just as good (every
    load checks the file against the cache's record first)."""
    try:
        data = source.read_bytes()
    except FileNotFoundError:
        if target.is_file():
            return
        raise BuildError(f"{source} vanished while publishing it into {target.parent} (another "
                         "process replaced it): build again") from None
    write_atomically(target, data)


# ---------------------------------------------------------------- the key


def _resolve_flags(flags: Flags) -> tuple[str, ...]:
    return default_flags() if flags is None else tuple(flags)


def _key_inputs(module_name: str, source: str, cdef: str,
                flags: tuple[str, ...]) -> dict[str, Any]:
    """Everything that can change the compiled binary (or whether it loads here)."""
    native = tuple(flag for flag in flags if flag.endswith("=native"))
    return {
        "layout": LAYOUT, "module_name": module_name, "source": source, "cdef": cdef,
        "flags": list(flags), "compiler": _compiler_identity(tuple(_compiler_command()), native),
        "sysconfig": {name: sysconfig.get_config_var(name) for name in ("CC", "CFLAGS", "LDSHARED")},
        "env": {name: os.environ[name] for name in COMPILER_ENV if name in os.environ},
        "ext_suffix": EXT_SUFFIX, "cffi": cffi.__version__, "hypergen": __version__,
        "templates": _templates_digest(),
    }


def _compiler_command() -> list[str]:
    """The compiler setuptools will run: $CC, else the one Python was built with."""
    return _split_variable("CC", sysconfig.get_config_var("CC") or "cc")


@functools.cache
def _links_openmp(command: tuple[str, ...]) -> bool:
    """Whether the compiler can build and link `-fopenmp` code (a compiler without an OpenMP
    runtime then gets serial kernels instead of failing every build). Once per process."""
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp, "omp.c")
        src.write_text("int main(void) {\n    int s = 0;\n#pragma omp parallel for reduction(+: s)\n"
                       "    for (int i = 0; i < 4; ++i) s += i;\n    return s != 6;\n}\n")
        try:
            done = subprocess.run([*command, "-fopenmp", str(src), "-o", str(src.with_suffix(""))],
                                  capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return False
        return done.returncode == 0


@functools.cache
def _compiler_identity(command: tuple[str, ...],
                       native_flags: tuple[str, ...]) -> dict[str, Any]:
    """Compiler path and version; with `-march=native` also the CPU target it expands to.

    Without the expansion, a cache directory shared between machines (an NFS home) would hand one
    machine's AVX-512 binary to another that dies on it with SIGILL. Computed once per process.
    """
    path = shutil.which(command[0]) or command[0]
    expansion = ""
    if native_flags:  # `-###` prints the driver's sub-commands (indented) with the flags expanded
        dry_run = _output([*command, *native_flags, "-###", "-E", "-x", "c", os.devnull])
        expansion = "\n".join(line for line in dry_run.splitlines() if line.startswith(" "))
    return {"path": path, "version": _output([path, "--version"]), "native": expansion}


def _output(command: list[str]) -> str:
    """Combined output of a short command, or the reason it could not run (still a stable key input)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable: {exc}"
    return done.stdout + done.stderr


def _templates_digest() -> str:
    """Digest of the Jinja templates, so template edits in an editable install invalidate the cache."""
    here = pathlib.Path(__file__).resolve().parent
    for directory in (here / "templates", here.parent / "templates"):
        if directory.is_dir():
            digest = hashlib.sha256()
            for template in sorted(directory.glob("*.j2")):
                content = template.read_bytes()
                digest.update(f"{template.name}\0{len(content)}\0".encode() + content)
            return digest.hexdigest()
    return ""


# ---------------------------------------------------------------- names and places


def _module_name(module_name: str, key: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", module_name):
        raise ValueError(f"module name {module_name!r} must be a C identifier")
    return f"_hg_{module_name}_{key[:16]}"


def _extension_name(module_name: str, key: str) -> str:
    return _module_name(module_name, key) + EXT_SUFFIX


def cache_root(cache_dir: PathLike | None) -> pathlib.Path:
    """cache_dir, else $HYPERGEN_CACHE_DIR, else $XDG_CACHE_HOME/hypergen or ~/.cache/hypergen.

    $HYPERGEN_CACHE_DIR must be an absolute path: an empty or relative one would put the cache
    (and the binaries loaded from it) wherever the current directory happens to be.
    """
    if cache_dir is None and "HYPERGEN_CACHE_DIR" in os.environ:
        value = os.environ["HYPERGEN_CACHE_DIR"]
        if not value.strip():
            raise ConfigError("$HYPERGEN_CACHE_DIR is set but empty: unset it (default "
                              "~/.cache/hypergen) or set it to an absolute directory")
        if not pathlib.Path(value).expanduser().is_absolute():
            raise ConfigError(f"$HYPERGEN_CACHE_DIR = {value!r} is a relative path (the cache would "
                              "follow the current directory): give an absolute directory")
        cache_dir = value
    if cache_dir is None:
        xdg = os.environ.get("XDG_CACHE_HOME")
        cache_dir = pathlib.Path(xdg if xdg else pathlib.Path.home() / ".cache") / "hypergen"
    return pathlib.Path(cache_dir).expanduser().absolute()


def writable_dir(cache_dir: PathLike | None, relative: str, stacklevel: int = 4) -> pathlib.Path:
    """cache_root(cache_dir)/relative, created (a compile-cache shard <LAYOUT>/<key[:2]>, or the
    modules `codegen.load` publishes); an unwritable cache (read-only, a path through a file)
    degrades to the same place under the private temp directory with a warning."""
    preferred = cache_root(cache_dir) / relative
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        if os.access(preferred, os.W_OK | os.X_OK):
            return preferred
    except OSError:
        pass
    fallback = _private_temp_root() / relative
    origin = " ($HYPERGEN_CACHE_DIR)" if cache_dir is None and "HYPERGEN_CACHE_DIR" in os.environ else ""
    warnings.warn(f"hypergen cache {preferred}{origin} is not writable; using {fallback}",
                  RuntimeWarning, stacklevel=stacklevel)
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def _private_temp_root() -> pathlib.Path:
    """<tempdir>/hypergen-<uid>, refused unless this user owns it and nobody else can write to it
    (otherwise another user could plant a binary there that we would load)."""
    root = pathlib.Path(tempfile.gettempdir()) / f"hypergen-{os.getuid()}"
    try:
        root.mkdir(mode=0o700, exist_ok=True)
        info = root.lstat()
    except OSError as exc:
        raise BuildError(f"no writable cache directory: {root}: {exc}; set HYPERGEN_CACHE_DIR") from exc
    if not root.is_dir() or root.is_symlink() or info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise BuildError(f"refusing to use {root} as a cache (not a private directory owned by this user); "
                         "set HYPERGEN_CACHE_DIR")
    return root


# ---------------------------------------------------------------- locking and loading


def _key_lock(key: str) -> threading.RLock:
    """Serialises this process's threads on one key (re-entrant: load_published falls back inside it)."""
    with _REGISTRY_LOCK:
        return _KEY_LOCKS.setdefault(key, threading.RLock())


def _count(what: str) -> None:
    with _REGISTRY_LOCK:
        stats[what] += 1


def lock_timeout() -> float:
    """Seconds to wait for another process's build lock: $HYPERGEN_LOCK_TIMEOUT, default 600."""
    text = os.environ.get("HYPERGEN_LOCK_TIMEOUT", "").strip() or str(DEFAULT_LOCK_TIMEOUT)
    with contextlib.suppress(ValueError):
        if float(text) > 0:
            return float(text)
    raise ConfigError(f"$HYPERGEN_LOCK_TIMEOUT = {text!r} is not a positive number of seconds")


@contextlib.contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[None]:
    """Exclusive inter-process lock (flock: released by the kernel if the holder dies). The lock file
    is never deleted: deleting it would let two processes hold "the" lock on different inodes. The
    holder writes its pid, host and start time into it, so a build that waits longer than
    lock_timeout() stops with a message naming the process it waited for."""
    timeout = lock_timeout()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, path, timeout)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": _timestamp(time.time())}
        with contextlib.suppress(OSError):  # the note is for people; a full disk must not block
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        os.close(fd)


def _acquire(fd: int, path: pathlib.Path, timeout: float) -> None:
    """flock(fd) within `timeout` seconds, warning once (naming the holder) after a few seconds."""
    started, pause, warned = time.monotonic(), 0.01, False
    while True:
        with contextlib.suppress(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        waited = time.monotonic() - started
        if waited >= timeout:
            raise BuildError(f"timed out after {timeout:g} s waiting for the build lock {path}, held "
                             f"by {_holder(fd)} (set $HYPERGEN_LOCK_TIMEOUT to wait longer; a lock "
                             "is released when its process ends)")
        if not warned and waited > min(5.0, timeout / 2):
            warned = True
            warnings.warn(f"waiting for the build lock {path}, held by {_holder(fd)}", stacklevel=5)
        time.sleep(min(pause, timeout - waited))
        pause = min(2 * pause, 0.5)


def _holder(fd: int) -> str:
    """Who holds a lock, from what it wrote into the lock file."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        note = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {note['pid']} on host {note['host']} since {note['since']}"
    return "another process (it wrote no pid into the lock file)"


# ---------------------------------------------------------------- checksums


def file_sha256(path: PathLike) -> str:
    """The sha256 hex digest of a file's bytes."""
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def write_atomically(path: pathlib.Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary sibling and os.replace (never seen half-written)."""
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # as a plain write would (mkstemp makes 0600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _checksum_problem(binary: pathlib.Path, manifest: pathlib.Path) -> str | None:
    """Why `binary` must not be loaded (the size or sha256 that build.json `manifest` records for it
    is missing or differs), or None. Checked before dlopen: a truncated shared object is mapped
    beyond its end and kills the process with SIGBUS."""
    try:
        record = json.loads(manifest.read_text())["extension"]
        size, sha256 = int(record["size"]), str(record["sha256"])
    except FileNotFoundError:
        return f"there is no record of its checksum ({manifest} is missing)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its checksum record {manifest} is unreadable ({type(exc).__name__}: {exc})"
    try:
        if binary.stat().st_size != size:
            return f"it has {binary.stat().st_size} bytes, {manifest} records {size}"
        return None if file_sha256(binary) == sha256 else f"its sha256 differs from {manifest}"
    except OSError as exc:
        return f"it cannot be read ({exc})"


def _load(path: pathlib.Path, module_name: str, key: str) -> types.ModuleType:
    """Import the extension at `path` under `module_name` and check the key it carries."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not a loadable extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    carried = module.ffi.string(getattr(module.lib, KEY_FUNCTION)()).decode()
    if carried != key:
        raise ImportError(f"{path} carries build key {carried}, expected {key}")
    return module


def _try_load(path: pathlib.Path, manifest: pathlib.Path, module_name: str, key: str,
              action: str) -> types.ModuleType | None:
    """The module at `path`, or None if it fails its checksum (then warn naming it and `action`)
    or fails to load for any other reason (foreign, stale key)."""
    problem = _checksum_problem(path, manifest)
    if problem is not None:
        warnings.warn(f"hypergen: {path} failed its check: {problem}; {action}", RuntimeWarning,
                      stacklevel=4)
        return None
    try:
        return _load(path, module_name, key)
    except Exception:  # noqa: BLE001 -- whatever a broken binary raises, the answer is "rebuild"
        return None


def _cached(module_name: str, source: str, cdef: str, flags: tuple[str, ...], key: str,
            cache_dir: PathLike | None) -> types.ModuleType:
    """In-process memo, then the disk cache under the key's file lock, then a build."""
    with _key_lock(key):
        if key in _LOADED:
            _count("reused")
            return _LOADED[key]
        shard = writable_dir(cache_dir, f"{LAYOUT}/{key[:2]}")
        artifact = shard / key / _extension_name(module_name, key)
        with _file_lock(shard / f"{key}.lock"):
            module = None
            if artifact.exists():
                module = _try_load(artifact, artifact.parent / "build.json",
                                   _module_name(module_name, key), key, "rebuilding it")
            if module is not None:
                _count("loaded")
            else:
                artifact.unlink(missing_ok=True)
                try:
                    _build(shard / key, module_name, source, cdef, flags, key)
                except OSError as exc:  # a full disk, a quota, a directory removed under us
                    raise BuildError(f"cannot write the build of {module_name} to "
                                     f"{exc.filename or shard}: {exc.strerror or exc} (free space "
                                     "there or set $HYPERGEN_CACHE_DIR)") from None
                try:
                    module = _load(artifact, _module_name(module_name, key), key)
                except Exception as exc:  # noqa: BLE001
                    raise BuildError(f"compiled {artifact} but could not load it: {exc}") from exc
        _LOADED[key] = module
        return module


# ---------------------------------------------------------------- building


def _build(entry: pathlib.Path, module_name: str, source: str, cdef: str, flags: tuple[str, ...],
           key: str) -> None:
    """Compile into a sibling temporary directory, then move the results into `entry`, extension last.

    Runs under the key's file lock, so leftover temporary directories of this key are from builds that
    died; they are removed first.
    """
    for leftover in entry.parent.glob(f".{key}.*"):
        shutil.rmtree(leftover, ignore_errors=True)
    command = _compiler_command()  # a missing compiler in one line, not on line 10 of a log
    if not command or shutil.which(command[0]) is None:
        raise BuildError(f"no C compiler: {' '.join(command)!r} (from $CC, else Python's sysconfig "
                         "CC) is not on PATH; install gcc or clang, or set CC to a C compiler")
    cffi_name = _module_name(module_name, key)
    full_source = f'{source}\nconst char *{KEY_FUNCTION}(void) {{ return "{key}"; }}\n'
    full_cdef = f"{cdef}\nconst char *{KEY_FUNCTION}(void);\n"
    work = pathlib.Path(tempfile.mkdtemp(prefix=f".{key}.", dir=entry.parent))
    try:
        (work / "module.c").write_text(full_source, encoding="utf-8")
        (work / "module.h").write_text(full_cdef, encoding="utf-8")
        job = {"module": cffi_name, "source": full_source, "cdef": full_cdef, "flags": list(flags),
               "tmpdir": str(work / "cffi")}
        started = time.time()
        done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], input=json.dumps(job), cwd=work,
                              capture_output=True, encoding="utf-8", errors="replace")
        seconds = time.time() - started
        log = done.stdout + done.stderr
        (work / "build.log").write_text(log, encoding="utf-8")
        built = work / "cffi" / (cffi_name + EXT_SUFFIX)
        if done.returncode != 0 or not built.is_file():
            _fail(work, entry, cffi_name, done.returncode, log)
        _count("compiled")
        inputs = _key_inputs(module_name, source, cdef, flags)
        binary = built.read_bytes()
        extension = {"file": built.name, "size": len(binary), "sha256": hashlib.sha256(binary).hexdigest()}
        record = {"key": key, "extension": extension, "module": cffi_name,
                  "inputs": _summarise(inputs), "python": sys.version,
                  "compile_seconds": round(seconds, 3), "compile_started": _timestamp(started),
                  "compile_finished": _timestamp(started + seconds), "pid": os.getpid()}
        (work / "build.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        entry.mkdir(exist_ok=True)
        for name in ("module.c", "module.h", "build.json", "build.log"):
            os.replace(work / name, entry / name)
        os.replace(built, entry / built.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _timestamp(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="seconds")


def _summarise(inputs: dict[str, Any]) -> dict[str, Any]:
    """Key inputs for build.json, with the two texts (kept beside it as module.c/.h) as digests."""
    summary = {name: value for name, value in inputs.items() if name not in ("source", "cdef")}
    for name in ("source", "cdef"):
        summary[f"{name}_sha256"] = hashlib.sha256(inputs[name].encode()).hexdigest()
    return summary


def _fail(work: pathlib.Path, entry: pathlib.Path, cffi_name: str, returncode: int,
          log: str) -> NoReturn:
    """Keep the failed build as <key>.failed/ for inspection and raise BuildError pointing at it."""
    kept = entry.parent / f"{entry.name}.failed"
    shutil.rmtree(kept, ignore_errors=True)
    os.replace(work, kept)
    if len(log) > 20000:
        log = f"{log[:4000]}\n[... {len(log) - 16000} characters cut; see build.log ...]\n{log[-12000:]}"
    cause = next((line.strip() for line in log.splitlines()
                  if "No space left" in line or "error:" in line), "see the log below")
    raise BuildError(
        f"compiling {cffi_name} failed (exit status {returncode}): {cause}\n"
        f"source: {kept / 'module.c'} (compiled as {kept / 'cffi' / (cffi_name + '.c')})\n"
        f"log: {kept / 'build.log'}\n"
        f"compiler command and output:\n{log}"
    )
