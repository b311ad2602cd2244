"""Loaded by every Python process the tests start (tests/support is put on PYTHONPATH by conftest.py).

bitsandbytes picks its 4-bit CPU kernel by CPU feature: where the CPU has AVX512-BF16, a Linear4bit
repacks its weight for another kernel on its first no-grad forward outside training mode. The machines
that run these tests differ (that path broke resume and reload on one CPU generation and passed on
another), so every test process reports the feature as present: the path a repack would take is the one
tested everywhere, and qlora_lab must keep it from happening (quant.pin_cpu_kernel).
"""
import importlib.abc
import importlib.util
import sys

_TARGET = "bitsandbytes.nn.modules"


def _claim_avx512bf16(module) -> None:
    module.has_avx512bf16 = lambda: True  # read by Linear4bit.__init__


class _ClaimAvx512Bf16(importlib.abc.MetaPathFinder):
    """Patches bitsandbytes.nn.modules as it is imported (without importing bitsandbytes earlier)."""

    def find_spec(self, name, path=None, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _claim_avx512bf16(module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if _TARGET in sys.modules:
        _claim_avx512bf16(sys.modules[_TARGET])
    elif not any(isinstance(f, _ClaimAvx512Bf16) for f in sys.meta_path):
        sys.meta_path.insert(0, _ClaimAvx512Bf16())


install()
