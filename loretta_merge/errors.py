"""Error types. Every error caused by user input derives from :class:`LorettaError`.

The command line prints a :class:`LorettaError` as one line (no traceback) and exits
non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LorettaError(Exception):
    """Base class of every error caused by input: files, configs, options, shapes."""

    exit_code = 2


class ConfigError(LorettaError, ValueError):
    """An option or a config field has a value that breaks a rule."""


class ShapeError(LorettaError, ValueError):
    """Tensors, cores or modules whose shapes do not fit together."""


class FormatError(LorettaError):
    """A file or directory is missing, corrupt, or not what it is claimed to be."""


class UnsafeInputError(LorettaError):
    """An input would need unsafe handling (unpickling, remote code, escaping paths)."""


class OutputExistsError(LorettaError):
    """The output path exists and --force was not given."""


class NumericsError(LorettaError):
    """Non-finite values, or a numerical check (verify, validation) failed."""


class OutputError(LorettaError, OSError):
    """Writing an output failed for a reason of the file system (disk full, permissions,
    read-only mount). The message names the path and what to free or change."""


class MissingDependencyError(LorettaError, ImportError):
    """An optional package a command needs is not installed; the message gives the one
    ``pip install`` line that fixes it."""
