"""tests/conftest.py's helpers under the name the test files here import them by (`from .conftest import ...`),
and the runner of Triton kernels in Triton's CPU interpreter."""
import importlib.util
import os
import subprocess
import sys

import pytest

from ...conftest import CONFIGS, FIXTURES, ROOT, SAMPLES, run_cli  # noqa: F401


def run_in_triton_interpreter(module: str, function: str) -> str:
    """Call tests.unit.kernels.<module>.<function>() in a child process with TRITON_INTERPRET=1 (read when Triton
    itself is imported, hence the fresh process); returns its standard output. Skips where Triton is not installed."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed: its interpreter runs the kernel on the CPU")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", f"from tests.unit.kernels.{module} import {function} as f; f()"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout
