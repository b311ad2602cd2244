"""Atomic writes, the one way this package writes a file a user keeps.

Content goes to a temp file in the destination folder, is flushed to disk, and is renamed over the
target only when complete: a crash, a full disk or an error while producing the content leaves no
half-written file and an existing target exactly as it was. The file gets the mode a plain `open`
would give it (0o666 less the umask): mkstemp makes its temp files 0o600, readable by the owner only.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_open(path, mode: str = "w"):
    """`with atomic_open(p) as f: f.write(...)`; the rename happens only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        kw = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
        with os.fdopen(fd, mode, **kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process umask. Read from /proc where there is one: setting it to read it back would,
    for a moment, change the mode of files other threads create."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, data) -> Path:
    """Write text or bytes to `path` atomically; returns the path."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return Path(path)
