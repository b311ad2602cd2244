"""qlora-lab: QLoRA vs LoRA fine-tuning of 7B models, as a small package the notebooks call.

Importing this package loads no GPU code: torch-heavy modules (model, train, generate, bench)
are imported by whoever needs them.
"""
__version__ = "0.1.0"

from .config import Config, load_config  # noqa: E402,F401
from .errors import ConfigError, DataError, UserError  # noqa: E402,F401
