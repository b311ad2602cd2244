"""tests/conftest.py's helpers under the name the test files here import them by (`from .conftest import ...`)."""
from ..conftest import CONFIGS, FIXTURES, ROOT, SAMPLES, background, run_cli, start_cli  # noqa: F401
