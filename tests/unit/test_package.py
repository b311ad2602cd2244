"""`import qlora_lab` is light (no torch, bitsandbytes or wandb until a verb needs them; a fresh interpreter
checks it), every verb has help, and imports flow one way."""
from __future__ import annotations

import subprocess
import sys


def test_import_loads_no_gpu_or_logging_stack():
    """Neither the package nor the CLI (every verb module, for `qlora-lab --help`) loads them."""
    code = ("import sys, qlora_lab, qlora_lab.cli; heavy = [m for m in ('torch', 'bitsandbytes', 'wandb', 'transformers', 'peft') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_imports_flow_one_way_as_design_md_says():
    """No module imports a later stage of config -> data -> model -> training -> runs -> results -> studies."""
    import ast
    from pathlib import Path

    import qlora_lab

    pkg = Path(qlora_lab.__file__).parent
    stage = {"errors": 0, "fileio": 0, "presets": 0, "prompts": 0, "distributed": 0, "console": 0,
             "config": 1, "data": 2, "quant": 3, "kernels": 3, "memory": 3, "plan": 3, "model": 3, "runs": 4,
             "training": 5, "generate": 6, "report": 6, "plots": 6, "merge": 6, "gguf_export": 6, "studies": 7}
    seen = 0
    for f in pkg.rglob("*.py"):
        parts = f.relative_to(pkg).with_suffix("").parts
        own = stage.get(parts[0])
        if own is None:  # entry points (cli, bench, demo, baseline) may import anything
            continue
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = parts[:len(parts) - node.level]  # the package the relative import starts from
            names = [*(node.module.split(".") if node.module else [])]
            targets = [names] if names else [[a.name] for a in node.names]
            for t in targets:
                full = [*base, *t]
                if not full or full[0] not in stage:
                    continue
                seen += 1
                assert stage[full[0]] <= own, f"{f.relative_to(pkg)} imports {'.'.join(full)} (a later stage)"
    assert seen > 50  # the walk found the package's imports
