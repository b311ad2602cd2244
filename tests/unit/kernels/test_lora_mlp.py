"""The LoRA MLP function (kernels/lora_mlp.py) trains what peft trains: loss and every adapter gradient, with
and without dropout and recomputation, for Llama's SwiGLU and Falcon's GELU blocks (CPU: torch's SiLU-mul and
GELU, float32; the GPU path with Liger's SwiGLU kernel is in tests/integration/test_gpu.py)."""
from __future__ import annotations

import pytest
import torch

from qlora_lab.kernels import fused_lora, lora_mlp, recompute

from .test_fused_lora import _loss_and_grads, assert_same_dropout_step, assert_same_step, peft_step
from .test_grouped_lora import _fused


def _ours(name, *sets, checkpointing=False, mlp=True):
    """The fused, grouped layers (Falcon has no groups) and, unless `mlp` is False, the fused MLP."""
    model = _fused(name, *sets, checkpointing=checkpointing, grouped="falcon" not in name)
    if mlp:
        assert lora_mlp.enable(model) == model.config.num_hidden_layers
    return model


@pytest.mark.parametrize("name", ["tiny_llama_qlora", "tiny_falcon_qlora", "tiny_llama_lora"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_same_loss_and_gradients_as_peft_without_dropout(name, checkpointing):
    x = torch.randint(4, 200, (2, 16))
    ref_loss, ref = peft_step(name, x, checkpointing)
    model = _ours(name, "lora.lora_dropout=0.0", checkpointing=checkpointing)
    loss, got = _loss_and_grads(model, x)
    assert_same_step(loss, got, ref_loss, ref)
    down = "down_proj" if "llama" in name else "dense_4h_to_h"
    assert any(g.abs().sum() > 0 for k, g in got.items() if f"{down}.lora_A" in k)


@pytest.mark.parametrize("name", ["tiny_llama_qlora", "tiny_falcon_qlora"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_dropout_masks_as_the_layer_by_layer_path(name, checkpointing):
    """With dropout each projection keeps its own mask, drawn in the order the layers draw them one by one."""
    x = torch.randint(4, 200, (2, 16))
    assert_same_dropout_step(lambda mlp: _ours(name, "lora.lora_dropout=0.2", checkpointing=checkpointing, mlp=mlp),
                             (False, True), x)


def test_the_activation_output_is_not_saved():
    """What the block keeps for its backward: the input, the up projections' outputs, small LoRA terms; not
    the down projection's input (counted through saved-tensor hooks, which see everything autograd keeps)."""
    def saved_bytes(mlp: bool) -> int:
        model = _ours("tiny_llama_qlora", "lora.lora_dropout=0.0", mlp=mlp)
        block = model.get_base_model().model.layers[0].mlp
        x = torch.randn(2, 16, model.config.hidden_size, requires_grad=True)
        seen = {}

        def pack(t):
            seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(x)
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        return sum(n for (ptr, _), n in seen.items() if ptr not in weights)
    m = _ours("tiny_llama_qlora").config.intermediate_size
    layer_by_layer, ours = saved_bytes(False), saved_bytes(True)
    assert layer_by_layer - ours >= 2 * 16 * m * 4  # at least the (tokens x m) fp32 activation output


def _tensors_held(obj, out, depth=0):
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (tuple, list)) and depth < 4:
        for v in obj:
            _tensors_held(v, out, depth + 1)
    elif hasattr(obj, "__dict__") and depth < 4 and not isinstance(obj, type):
        for v in vars(obj).values():
            _tensors_held(v, out, depth + 1)
    return out


def test_a_checkpointed_block_holds_no_activation():
    """Under torch's checkpoint, which drops what a layer saves and recomputes it, the block's autograd node keeps
    no activation alive through another route (run 13: an MLP input per layer held that way cost 1.2 GiB)."""
    from torch.utils.checkpoint import checkpoint

    model = _ours("tiny_llama_qlora", "lora.lora_dropout=0.0")
    block = model.get_base_model().model.layers[0].mlp
    x = torch.randn(2, 16, model.config.hidden_size, requires_grad=True)
    y = checkpoint(lambda t: block(t * 2.0), x, use_reentrant=False)
    assert type(y.grad_fn).__name__ == "LoRAMLPFunctionBackward"
    # Activations have a token dimension (2 x 16 = 32 rows); weights and quantization states do not.
    held = [tuple(t.shape) for t in _tensors_held(y.grad_fn, []) if t.shape[:1] == (32,) or t.shape[:2] == (2, 16)]
    assert held == []
    y.sum().backward()  # and the recomputation still gives the gradients
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_backward_dequantizes_with_no_other_large_temporary_alive(monkeypatch, dropout, checkpointing):
    """Every weight the backward dequantizes (the recomputation's forward included) is made while no other
    dequantized weight, no recomputed activation h (the down projection's input, made again in the backward)
    and no dropped-out input is alive: each costs a (tokens x MLP width) or (MLP width x hidden) tensor at the
    backward's peak (Llama-2-7B at 4,096 tokens: 86 MiB each). Storages are watched through weak references; the
    CPU path (bitsandbytes' dequantization, torch's SiLU-mul and dropout) exercises the same order of calls as
    the GPU's, whose kernels only replace what each call computes."""
    import weakref

    from qlora_lab.kernels import grouped_lora

    model = _ours("tiny_llama_qlora", f"lora.lora_dropout={dropout}", checkpointing=checkpointing)
    x = torch.randint(4, 200, (2, 16))
    loss = model(input_ids=x, labels=x).loss
    temporaries, seen, watching = [], [], [False]

    def watch(kind, t):
        if watching[0]:
            temporaries.append((kind, weakref.ref(t.untyped_storage())))
        return t

    real_deq, real_act, real_redraw = fused_lora._dequantize, lora_mlp._act_forward, fused_lora.redraw

    def dequantize(*args):
        if watching[0]:
            seen.append([kind for kind, ref in temporaries if ref() is not None])
        return watch("weight", real_deq(*args))

    def redraw(*args):
        xd, mask = real_redraw(*args)
        return watch("dropped input", xd), mask

    for module in (fused_lora, lora_mlp, grouped_lora):
        monkeypatch.setattr(module, "_dequantize", dequantize)
    monkeypatch.setattr(fused_lora, "redraw", redraw)
    monkeypatch.setattr(grouped_lora, "redraw", redraw)
    monkeypatch.setattr(lora_mlp, "_act_forward", lambda kind, ups: watch("activation", real_act(kind, ups)))
    watching[0] = True
    loss.backward()
    layers = model.config.num_hidden_layers
    # q, k, v, o and gate, up, down once each in every layer's backward, but the first layer's q, k, v (its input,
    # the embeddings' output, needs no gradient), and all but down again in a recomputation
    assert len(seen) == layers * 7 - 3 + (layers * 6 if checkpointing else 0)
    assert sum(kind == "activation" for kind, _ in temporaries) == layers * (2 if checkpointing else 1)
    assert [alive for alive in seen if alive] == []


def test_recomputation_skips_the_down_projection_but_not_its_gradients(monkeypatch):
    """Inside a recomputation the block's output is not computed (its product is thrown away): the output
    is left unwritten, and the gradients are those of an ordinary backward."""
    model = _ours("tiny_llama_qlora", "lora.lora_dropout=0.0")
    block = model.get_base_model().model.layers[0].mlp
    x = torch.randn(2, 8, model.config.hidden_size)
    calls = []
    real = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    y = block(x)
    n_normal = len(calls)
    calls.clear()
    with recompute.context_fn()[1]:
        assert recompute.active()
        block(x)
    assert not recompute.active()
    assert len(calls) < n_normal  # the down projection's base matmul is gone
    assert y.abs().sum() > 0


def test_falls_back_where_a_layer_would(tmp_path):
    """Eval and no-grad forwards, and fused layers switched off, take the module's own forward: same output."""
    model = _ours("tiny_llama_qlora", "lora.lora_dropout=0.0")
    block = model.get_base_model().model.layers[0].mlp
    x = torch.randn(1, 4, model.config.hidden_size)
    with torch.no_grad():
        eager = block(x)
    fused_lora.disable(model)
    with torch.no_grad():
        torch.testing.assert_close(block(x), eager)
    assert lora_mlp.disable(model) == model.config.num_hidden_layers and lora_mlp.count(model) == 0


def test_an_mlp_with_another_activation_is_left_alone():
    model = _ours("tiny_llama_qlora", mlp=False)
    block = model.get_base_model().model.layers[0].mlp
    block.act_fn = torch.nn.ReLU()
    assert lora_mlp.enable(model) == model.config.num_hidden_layers - 1


def test_a_liger_swiglu_mlp_is_recognised_by_its_config():
    """Liger replaces transformers' LlamaMLP class, so a model built after it holds LigerSwiGLUMLP blocks, which
    have no activation module: recognised by hidden_act (silu), refused for another activation."""
    model = _ours("tiny_llama_qlora", mlp=False)
    block = model.get_base_model().model.layers[0].mlp
    del block.act_fn
    block.__class__ = type("LigerSwiGLUMLP", (type(block),), {})
    assert lora_mlp._kind(block) == "swiglu"
    block.config = type("Config", (), {"hidden_act": "gelu"})()
    assert lora_mlp._kind(block) is None
