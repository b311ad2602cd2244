"""Atomic writes, the one way this package writes a file a user keeps; and reading those files back.

Content goes to a temp file in the destination folder, is flushed to disk, and is renamed over the
target only when complete: a crash, a full disk or an error while producing the content leaves no
half-written file and an existing target exactly as it was. The file gets the mode a plain `open`
would give it (0o666 less the umask): mkstemp makes its temp files 0o600, readable by the owner only.

Files are read back as damaged ones may be (a disk that filled, a copy cut short, a hand edit): a
missing, empty, cut, garbled or wrong-kind file is a DamagedFileError naming the file and what is
wrong, in one line. Weights are read as safetensors; torch files (optimizer, scheduler, RNG state) with
`weights_only=True`, so a file that would build arbitrary objects is refused, never unpickled.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
from pathlib import Path

from .errors import DamagedFileError, UserError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PICKLE_ADAPTERS = ("adapter_model.bin", "adapter_model.pt")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
_MAX_SAFETENSORS_HEADER = 100 * 2**20  # bytes; the library's own limit


# ----------------------------------------------------------------------------- writing

def resource(*parts: str) -> Path:
    """A file or folder shipped in the package's resources/ (prompt sets, samples, demo data, launch
    configs), wherever the package is installed."""
    from importlib import resources

    return Path(str(resources.files("qlora_lab").joinpath("resources", *parts)))


def check_output_file(path) -> Path:
    """`path` can become a file: it is not a folder and no folder above it is a file. Checked before
    work whose result it will hold, so a wrong -o fails at once, in one line."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{p}: is a folder; expected a file to write")
    _check_parents(p)
    return p


def check_output_folder(path) -> Path:
    """`path` can be a folder to write into: it is not a file and no folder above it is a file."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{p}: is a file; expected a folder to write into")
    _check_parents(p)
    return p


def _check_parents(p: Path) -> None:
    for parent in p.parents:  # the nearest existing one must be a folder
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{parent}: is a file; cannot write {p} under it")
            return


@contextlib.contextmanager
def atomic_open(path, mode: str = "w"):
    """`with atomic_open(p) as f: f.write(...)`; the rename happens only if the block succeeds."""
    path = check_output_file(path)
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


# ----------------------------------------------------------------------------- reading back

def _size(p: Path, required: bool = True) -> int | None:
    """Bytes in `p`; None if it is missing and not required. DamagedFileError for the wrong kind."""
    if not p.exists():
        if required:
            raise DamagedFileError(f"{p}: missing")
        return None
    if p.is_dir():
        raise DamagedFileError(f"{p}: is a folder; expected a file")
    n = p.stat().st_size
    if n == 0:
        raise DamagedFileError(f"{p}: empty file")
    return n


def read_text(path, required: bool = True) -> str | None:
    """UTF-8 text of a file that is there, a file, non-empty and UTF-8 (else DamagedFileError)."""
    p = Path(path)
    if _size(p, required) is None:
        return None
    try:
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DamagedFileError(f"{p}: not UTF-8 text (byte {e.start + 1}): garbled") from None
    except OSError as e:
        raise DamagedFileError(f"{p}: cannot be read: {e.strerror}") from None


def read_json(path, required: bool = True) -> dict | None:
    """The JSON object in `path`; None if it is missing and not required. DamagedFileError otherwise."""
    p = Path(path)
    text = read_text(p, required)
    if text is None:
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        cut = " (cut short?)" if not text.rstrip().endswith("}") else ""  # what this package writes ends so
        raise DamagedFileError(f"{p}:{e.lineno}: invalid JSON: {e.msg}{cut}") from None
    if not isinstance(obj, dict):
        raise DamagedFileError(f"{p}: expected a JSON object, got {type(obj).__name__}")
    return obj


def check_safetensors(path) -> int:
    """Number of tensors in a whole safetensors file; DamagedFileError if it is cut or not one.

    Reads the header only (a few KB), not the weights."""
    p = Path(path)
    size = _size(p)
    with open(p, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise DamagedFileError(f"{p}: not a safetensors file ({size} bytes, no valid header): "
                                   f"cut short or garbled")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise DamagedFileError(f"{p}: safetensors header unreadable: cut short or garbled") from None
    try:
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        raise DamagedFileError(f"{p}: safetensors header malformed: garbled") from None
    if not ends:
        raise DamagedFileError(f"{p}: holds no tensors")
    want = 8 + n + max(ends)
    if size < want:
        raise DamagedFileError(f"{p}: cut short ({size} of {want} bytes)")
    try:  # the library's own checks: offsets, dtypes and shapes agree
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            f.keys()
    except Exception as e:  # SafetensorError and friends: one line, not a trace
        raise DamagedFileError(f"{p}: not a valid safetensors file ({_first_line(e)})") from None
    return len(ends)


def check_adapter(d) -> None:
    """A peft adapter folder that loads: adapter_config.json and a whole adapter_model.safetensors.

    Pickle weights (adapter_model.bin/.pt) are refused, never read: a plain UserError, not damage."""
    d = Path(d)
    weights = d / ADAPTER_WEIGHTS
    if not weights.exists():
        pickles = [n for n in _PICKLE_ADAPTERS if (d / n).exists()]
        if pickles:
            raise UserError(f"{d}: adapter weights are a pickle ({pickles[0]}); only {ADAPTER_WEIGHTS} "
                            f"is loaded, never a pickle")
    config = read_json(d / ADAPTER_CONFIG)
    if "peft_type" not in config:
        raise DamagedFileError(f"{d / ADAPTER_CONFIG}: no peft_type: not a peft adapter config")
    check_safetensors(weights)


def load_torch_file(path):
    """A torch file (optimizer, scheduler, RNG state) loaded with weights_only=True and memory-mapped
    (the tensors are not read). DamagedFileError if cut or garbled; a UserError refusal if it holds
    objects other than tensors (then nothing in it has run)."""
    import pickle

    import torch

    p = Path(path)
    _size(p)
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != _ZIP_MAGIC:
        if _builds_objects(p):
            raise UserError(f"{p}: a plain pickle that holds objects other than tensors; refused (not unpickled)")
        raise DamagedFileError(f"{p}: not a torch file (no zip header): garbled")
    if not zipfile.is_zipfile(p):  # the zip's directory is at its end: the first thing a cut loses
        raise DamagedFileError(f"{p}: cut short (the end of its zip archive is missing)")
    try:
        with _numpy_allowed():  # RNG states hold numpy arrays, as the Trainer allows
            return torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{p}: holds objects other than tensors; refused (not unpickled): "
                        f"{_first_line(e)}") from None
    except Exception as e:  # a zip cut short or garbled: RuntimeError, OSError, EOFError, ...
        raise DamagedFileError(f"{p}: cut short or garbled ({_first_line(e)})") from None


def _numpy_allowed():
    try:
        from transformers.trainer_pt_utils import safe_globals
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        return contextlib.nullcontext()
    return safe_globals()


def _builds_objects(p: Path) -> bool:
    """Whether `p` is a whole pickle that would import or call something (read, never run)."""
    import pickletools

    try:
        with open(p, "rb") as f:
            ops = {op.name for op, _, _ in pickletools.genops(f)}
    except Exception:  # not a pickle at all
        return False
    return bool(ops & {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX"})


def _first_line(e: Exception) -> str:
    s = (str(e).strip().splitlines() or [type(e).__name__])[0]
    s = s.split(". ")[0]  # torch appends paragraphs of advice to one line
    return s if len(s) <= 160 else s[:157] + "..."
