"""The exceptions hypergen raises; each message names the culprit (symbol, array, shape, line)."""


class HypergenError(Exception):
    """Base class of every error hypergen raises on purpose."""


class ProblemError(HypergenError, ValueError):
    """The problem statement is invalid (raised at `Problem` construction or while lowering)."""


class BindError(HypergenError, ValueError):
    """Data given to `bind` does not match the problem (missing, unknown, shape, dtype, NaN)."""


class BuildError(HypergenError, RuntimeError):
    """Compiling the generated C failed; the message has the command, stderr and the source path."""


class KernelError(HypergenError, RuntimeError):
    """A generated kernel returned a non-zero status (non-finite value, invalid size)."""


class ConfigError(HypergenError, ValueError):
    """An environment variable hypergen reads (HYPERGEN_CACHE_DIR, HYPERGEN_CFLAGS, CC, ...) is
    invalid; the message names the variable and its value."""
