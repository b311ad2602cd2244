"""Errors a user can fix. The CLI prints them as one line and exits with code 2, no traceback."""
from __future__ import annotations


class UserError(Exception):
    """Bad input: a config, a data file, a CLI argument. The message names what and where."""

    exit_code = 2


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class DamagedFileError(UserError):
    """A file a run wrote is missing, empty, cut short, garbled or of the wrong kind (a disk that
    filled, a copy cut short, a hand edit). The message names the file and what is wrong."""


def is_out_of_memory(e: BaseException) -> bool:
    """torch's OutOfMemoryError, or an error that says "out of memory" (CUDA errors raised as RuntimeError by
    extensions such as bitsandbytes). The one test every layer uses: training, evaluation, loading, bench."""
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def where(path, line: int | None = None, field: str | None = None) -> str:
    """'file:line: field' prefix used by every input error."""
    s = str(path)
    if line is not None:
        s += f":{line}"
    if field:
        s += f": {field}"
    return s
