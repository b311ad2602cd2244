"""errors.is_out_of_memory: the one test for "this failed for lack of GPU memory"."""
from __future__ import annotations

import torch

from qlora_lab.errors import is_out_of_memory


def test_out_of_memory_is_torchs_error_or_a_message_that_says_so():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))  # raised so by extensions
    assert not is_out_of_memory(RuntimeError("expected scalar type Float but found BFloat16"))
    assert not is_out_of_memory(OSError(28, "No space left on device"))
