"""`python -m qlora_lab.cli <verb>`: the console script, as a module (studies and launchers start it so)."""
import os
import sys

from . import main

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.exit(main())
