"""The package version: part of every cache key and of the generated files' headers."""
__version__ = "0.1.0"

#: The generated module's calling convention (kernel signatures, meta.json): a module built for
#: another ABI is refused at load with a request to rebuild.
ABI_VERSION = 7
