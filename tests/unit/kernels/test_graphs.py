"""kernels/graphs.py on the CPU: when the layer graphs decline, and what their key tells apart.

Capture and replay need CUDA: tests/integration/test_gpu.py trains graphed against eager there (loss and
every adapter gradient, with dropout, recomputation and accumulation).
"""
from __future__ import annotations

import logging

import torch

from qlora_lab.kernels import fused_lora, graphs

from .test_fused_lora import _model


def test_no_cuda_no_graphs(caplog):
    model = _model("tiny_llama_qlora", "lora.lora_dropout=0.0")
    fused_lora.enable(model)
    with caplog.at_level(logging.INFO, logger="qlora_lab.train"):
        assert graphs.enable(model) == 0
    assert "cuda graphs: off (no CUDA device)" in caplog.text
    assert graphs.count(model) == 0 and graphs.captures(model) == 0


def test_graphs_decline_layers_they_cannot_replay_faithfully(monkeypatch):
    """Where a GPU is present, every decoder layer must be replayable: LoRA through the fused path, and
    adapter dropout drawn by the graph-safe kernel (a CPU model stands in; its layers are the real classes)."""
    model = _model("tiny_llama_qlora", "lora.lora_dropout=0.1")
    plain = _model("tiny_llama_qlora", "lora.lora_dropout=0.0")
    falcon = _model("tiny_falcon_qlora", "lora.lora_dropout=0.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert len(graphs.decoder_layers(model)) == model.config.num_hidden_layers
    assert graphs.why_not(model) == "a LoRA layer outside the fused path"
    fused_lora.enable(model)
    assert graphs.why_not(model) == "adapter dropout needs the graph-safe kernel (Triton)"  # CPU tensors: torch's
    fused_lora.enable(plain)
    assert graphs.why_not(plain) is None
    from qlora_lab.model import set_recomputation

    base = plain.get_base_model()
    layers = graphs.decoder_layers(base)
    set_recomputation(base, plain.config.num_hidden_layers, offload=True)
    assert graphs.why_not(plain).startswith("offloaded checkpoints")  # train.offload_graphs: false
    assert graphs.why_not(plain, offloaded=True) is None  # their copies run between the replays
    off_all = graphs._recomputation(layers)
    assert off_all == ((True, True),) * len(layers)
    layers[0].gradient_checkpointing = False  # kept, then offloaded: the buffers used in turn would not do
    assert graphs.why_not(plain, offloaded=True).startswith("an offloaded layer after one that is not")
    set_recomputation(base, plain.config.num_hidden_layers)  # torch's own checkpoint: the graphs recompute it
    assert graphs.why_not(plain) is None
    assert graphs._recomputation(layers) == ((True, False),) * len(layers) != off_all  # a key apart
    set_recomputation(base, 0)
    assert graphs.why_not(plain, fp16=True).startswith("fp16 compute (a T4)")
    fused_lora.enable(falcon)
    assert graphs.why_not(falcon).startswith("an attention whose heads transformers splits with a list index")
    from qlora_lab.kernels.falcon_attention import falcon_flash_attention

    assert falcon_flash_attention(falcon) == falcon.config.num_hidden_layers
    assert graphs.why_not(falcon) is None
    monkeypatch.setattr(falcon.config, "model_type", "gpt2")
    assert graphs.why_not(falcon).startswith("model_type 'gpt2' is not verified")


def test_the_key_tells_apart_what_a_replay_cannot_see():
    x = torch.zeros(2, 8, 4)
    cos = torch.zeros(1, 8, 2)
    base = graphs._key(x, {"position_embeddings": (cos, cos), "use_cache": False}, (False,))
    assert base == graphs._key(torch.ones(2, 8, 4), {"position_embeddings": (cos + 1, cos), "use_cache": False}, (False,))
    assert base != graphs._key(torch.zeros(2, 9, 4), {"position_embeddings": (cos, cos), "use_cache": False}, (False,))
    assert base != graphs._key(x, {"position_embeddings": (cos, cos), "use_cache": True}, (False,))
    assert base != graphs._key(x, {"position_embeddings": (cos, cos), "use_cache": False}, (True,))
    assert base != graphs._key(x.requires_grad_(), {"position_embeddings": (cos, cos), "use_cache": False}, (False,))
    assert base != graphs._key(torch.zeros(2, 8, 4), {"position_embeddings": (cos.half(), cos), "use_cache": False}, (False,))


def _replay_buffers(offload: list) -> int:
    """Play graphs.py's buffer schedule for offloaded layers on labels instead of tensors: the forward in layer
    order, then the backward in reverse, with each copy back started while the layer above replays its backward
    (as _Replay.backward does). Checks that every offloaded layer finds its own input in its buffer when its
    backward starts, and that no copy back writes the buffer the replay beside it reads. Returns the copies."""
    writes, copied = graphs.offload_schedule(offload)
    n = len(offload)
    ahead, host, source = {}, {}, []
    for i in range(n):  # forward
        source.append(0 if i == 0 else ("ahead", (i - 1) % 2) if writes[i - 1] else ("pool", i - 1))
        if i > 0 and writes[i - 1]:
            assert ahead[(i - 1) % 2] == f"h{i}"  # what layer i reads is layer i-1's output
        if copied[i]:
            host[i] = ahead[(i - 1) % 2]
        if writes[i]:
            ahead[i % 2] = f"h{i + 1}"
    for i in reversed(range(n)):  # backward
        if i > 0 and copied[i - 1]:  # layer i-1's input comes back while layer i replays
            assert source[i - 1] != source[i], i
            ahead[(i - 2) % 2] = host[i - 1]
        if offload[i] and i > 0:
            assert source[i] == ("ahead", (i - 1) % 2) and ahead[(i - 1) % 2] == f"h{i}", (offload, i)
    return sum(copied)


def test_offloaded_inputs_stay_in_their_buffers_or_come_back_before_their_backward():
    """kernels/graphs.offload_schedule (the CUDA run of it: tests/integration/test_gpu.py): layer 0 reads x0 and
    the last two offloaded layers' inputs are never overwritten, so only the others are copied out and back; every
    offloaded layer finds its own input when its backward starts."""
    for n in range(1, 9):
        for k in range(n + 1):  # the plan offloads the first k layers
            offload = [i < k for i in range(n)]
            assert _replay_buffers(offload) == max(k - 3, 0), (n, k)
    writes, copied = graphs.offload_schedule([True] * 6 + [False] * 2)
    assert writes == [True] * 5 + [False] * 3 and copied == [False, True, True, True, False, False, False, False]
