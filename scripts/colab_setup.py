"""Colab set-up, run by each notebook's first cell once the repo is cloned (it cannot live in the package:
the package is what it installs):

    %run /content/qlora-lab/scripts/colab_setup.py

- installs only what Colab lacks or ships too old (requirements-colab.txt), with Colab's own torch,
  numpy, pandas and ipykernel held at the versions it ships (a pip constraints file), so nothing the
  runtime depends on is swapped out;
- installs qlora-lab itself without dependencies and not editable, for the `qlora-lab` command;
- puts the clone's src/ first on sys.path, so the next cell imports qlora_lab in this same kernel
  (an editable install is found only by a new interpreter: it would need a restart);
- makes the clone the working directory (the notebooks' paths are relative to the repo root).

Running it again is harmless: pip finds everything installed, sys.path is not extended twice.
QLORA_LAB_PIP replaces `python -m pip install -q` (the tests use a stand-in that records its arguments).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import shlex
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Colab's own builds: a CUDA torch matched to its driver, and the kernel and data stack its UI runs on.
KEEP = ("torch", "numpy", "pandas", "ipykernel")


def pip_command() -> list[str]:
    custom = os.environ.get("QLORA_LAB_PIP")
    return shlex.split(custom) if custom else [sys.executable, "-m", "pip", "install", "-q"]


def constraints() -> str:
    """`name==version` for each of KEEP that is installed: pip must fail rather than change them."""
    lines = []
    for name in KEEP:
        try:
            lines.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return "".join(line + "\n" for line in lines)


def main() -> None:
    pip = pip_command()
    with tempfile.NamedTemporaryFile("w", prefix="colab-constraints-", suffix=".txt", delete=False) as f:
        f.write(constraints())
    try:
        subprocess.run([*pip, "-r", os.path.join(REPO, "requirements-colab.txt"), "-c", f.name], check=True)
        subprocess.run([*pip, "--no-deps", REPO], check=True)
    finally:
        os.unlink(f.name)
    src = os.path.join(REPO, "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    importlib.invalidate_caches()
    os.chdir(REPO)
    print(f"qlora-lab ready: {REPO} (import qlora_lab works in this kernel)")


if __name__ == "__main__":
    main()
