"""Offloaded checkpoints (kernels/recompute.py) train what torch's checkpoint trains: loss and every adapter
gradient, with dropout (the RNG restored for the recomputation), on the CPU (the host copies are plain copies
there; the pinned buffers and the copy stream run in tests/integration/test_gpu.py)."""
from __future__ import annotations

import re

import pytest
import torch

from qlora_lab.kernels import fused_lora, grouped_lora, lora_mlp, recompute
from qlora_lab.model import set_recomputation

from .test_fused_lora import _loss_and_grads, _model


def _ours(name, dropout, offload, k=None):
    torch.manual_seed(0)
    model = _model(name, f"lora.lora_dropout={dropout}")
    n = model.config.num_hidden_layers
    set_recomputation(model.get_base_model(), n if k is None else k, offload=offload)
    model.train()
    fused_lora.enable(model)
    grouped_lora.group(model)
    lora_mlp.enable(model)
    return model


@pytest.mark.parametrize("name", ["tiny_llama_qlora", "tiny_falcon_qlora"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_offloaded_checkpoints_match_torch_checkpoint(name, dropout):
    x = torch.randint(4, 200, (2, 16))
    results = []
    for offload in (False, True):
        model = _ours(name, dropout, offload)
        torch.manual_seed(5)
        results.append(_loss_and_grads(model, x))
    (loss0, g0), (loss1, g1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-7)
    assert g0.keys() == g1.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-7, msg=k)
    first = [g for k, g in g1.items() if re.search(r"\.(layers|h)\.0\.", k) and "lora_A" in k]
    assert first and all(g.abs().sum() > 0 for g in first)  # the first layer's adapters learn


def test_offloaded_on_some_layers_only():
    x = torch.randint(4, 200, (2, 16))
    ref_loss, ref = _loss_and_grads(_ours("tiny_llama_qlora", 0.0, False, k=0), x)
    loss, got = _loss_and_grads(_ours("tiny_llama_qlora", 0.0, True, k=1), x)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6, msg=k)


def test_two_forwards_before_a_backward_are_refused():
    """The host buffer of a layer holds one forward's input: a second forward before the first one's
    backward would make that backward use the wrong input, so it fails loudly instead."""
    model = _ours("tiny_llama_qlora", 0.0, True)
    x = torch.randint(4, 200, (2, 16))
    first = model(input_ids=x, labels=x).loss
    model(input_ids=x, labels=x).loss.backward()
    with pytest.raises(RuntimeError, match="another training forward"):
        first.backward()


def test_the_recomputation_is_marked():
    seen = []

    def layer(h):
        seen.append(recompute.active())
        return h * 2

    x = torch.randn(3, requires_grad=True)
    recompute.offloaded(layer, x, slot=0).sum().backward()
    assert seen == [False, True] and not recompute.active()
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0))


def test_an_input_without_grad_still_trains_the_layer():
    """The first layer's input (the embeddings' output) does not require grad: the call's backward runs for the
    layer's own parameters, and the input gets no gradient."""
    w = torch.randn(3, requires_grad=True)
    x = torch.randn(3)
    out = recompute.offloaded(lambda h: h * w, x, slot=0)
    assert out.requires_grad
    out.sum().backward()
    torch.testing.assert_close(w.grad, x)
    assert x.grad is None


@pytest.mark.parametrize("ends_in_add", [True, False])
def test_the_recomputed_output_is_freed_before_the_backward(ends_in_add):
    """The recomputation's output is thrown away: where the layer ends in its residual add its memory goes before the
    backward runs through the layer; the gradients are what they would be."""
    w = torch.randn(3, requires_grad=True)
    x = torch.randn(3, requires_grad=True)
    outs = []

    def layer(h):
        y = (h * w + h) if ends_in_add else (h + 1.0) * w
        if recompute.active():
            outs.append(y)
        return y

    recompute.offloaded(layer, x, slot=0).sum().backward()
    assert (outs[0].untyped_storage().nbytes() == 0) is ends_in_add
    torch.testing.assert_close(w.grad, x.detach() if ends_in_add else x.detach() + 1.0)
    torch.testing.assert_close(x.grad, (w + 1.0).detach() if ends_in_add else w.detach())


def test_the_first_forward_runs_the_training_arithmetic(monkeypatch):
    """An offloaded layer's first forward runs without autograd, yet through the fused LoRA path (whose
    dropout masks the recomputation draws again), not peft's module chain: on a GPU peft's dropout draws
    from another generator, so the loss and the gradients would belong to different masks."""
    from qlora_lab.kernels.lora_mlp import LoRAMLPFunction

    calls = []
    real = LoRAMLPFunction.forward
    monkeypatch.setattr(LoRAMLPFunction, "forward", staticmethod(lambda ctx, *a: calls.append(1) or real(ctx, *a)))
    model = _ours("tiny_llama_qlora", 0.1, True)
    x = torch.randint(4, 200, (2, 16))
    model(input_ids=x, labels=x).loss.backward()
    assert len(calls) == 2 * model.config.num_hidden_layers  # the first forward and the recomputation
