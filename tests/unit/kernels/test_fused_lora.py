"""The fused LoRA layer computes what peft + bitsandbytes compute: outputs and every gradient."""
from __future__ import annotations

import pytest
import torch

from qlora_lab.kernels import fused_lora
from qlora_lab.config import load_config
from qlora_lab.model import add_lora, load_model

from .conftest import CONFIGS


def _model(name, *sets, checkpointing=False, liger=False):
    cfg = load_config(CONFIGS / f"{name}.yaml", ["train.fused_lora=false", *sets])
    model, _, _ = load_model(cfg, for_training=True)
    if liger:  # the CUDA default: Liger's RoPE, RMSNorm, SwiGLU and fused loss (kernels/liger.py)
        from qlora_lab import kernels

        assert kernels.apply(model)
    model, _ = add_lora(model, cfg, model.config.num_hidden_layers if checkpointing else 0)
    torch.manual_seed(0)
    with torch.no_grad():  # B starts at zero; give it values so the LoRA branch shows in the output
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return model


def assert_same_step(loss, grads, ref_loss, ref) -> None:
    """The same loss and every adapter gradient as the reference step (fp32, CPU: summation order only)."""
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(grads[k], ref[k], rtol=1e-4, atol=1e-6, msg=k)


def _loss_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def peft_step(name, x, checkpointing=False):
    """The loss and adapter gradients of peft's own path without dropout: what every fused path must give."""
    torch.manual_seed(0)
    ref_model = _model(name, "lora.lora_dropout=0.0", checkpointing=checkpointing)
    ref_model.train()
    return _loss_and_grads(ref_model, x)


def assert_same_dropout_step(build, variants, x) -> None:
    """Each of build(v) for v in variants, from the same seed, gives the first one's loss and adapter gradients:
    dropout masks drawn alike."""
    results = []
    for v in variants:
        model = build(v)
        torch.manual_seed(5)
        results.append(_loss_and_grads(model, x))
    (loss0, g0), *others = results
    for loss1, g1 in others:
        torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-7)
        for k in g0:
            torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-7, msg=k)


@pytest.mark.parametrize("name", ["tiny_llama_qlora", "tiny_falcon_qlora", "tiny_llama_lora"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_same_loss_and_gradients_as_peft_without_dropout(name, checkpointing):
    model = _model(name, "lora.lora_dropout=0.0", checkpointing=checkpointing)
    model.train()
    x = torch.randint(4, 200, (2, 16))
    ref_loss, ref = _loss_and_grads(model, x)
    n = fused_lora.enable(model)
    assert n == fused_lora.count(model) > 0
    loss, got = _loss_and_grads(model, x)
    assert_same_step(loss, got, ref_loss, ref)
    assert any(g.abs().sum() > 0 for k, g in got.items() if "lora_A" in k)
    assert fused_lora.disable(model) == n and fused_lora.count(model) == 0
    loss2, _ = _loss_and_grads(model, x)
    torch.testing.assert_close(loss2, ref_loss)


def bf16_errors(model, x, device_type: str) -> dict:
    """Each path's error in bf16 against the same model computed in fp32 (no dropout).

    Returns {"loss": (peft, fused), name: (peft, fused)}: absolute loss error, and for every adapter
    gradient the normwise relative error ||g - g32|| / ||g32||. bf16 keeps 8 significant bits (unit
    roundoff 2^-8 ~ 3.9e-3) and every matmul input is rounded to it, so ~1e-2 is bf16's own floor for a
    gradient through a few layers; an elementwise tolerance cannot hold, since entries that are sums of
    cancelling terms carry errors of u x the sum of |terms|, far above |entry|. The fair question is
    whether the fused path is as accurate as peft's own bf16 path.
    """
    from qlora_lab.quant import is_4bit

    def run(autocast: bool, fused: bool):
        (fused_lora.enable if fused else fused_lora.disable)(model)
        model.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}

    model.train()
    peft_loss, peft = run(True, False)
    fused_loss, fused = run(True, True)
    model.float()  # the same weights, computed in fp32: norms and head upcast, 4-bit layers in fp32
    for m in model.modules():
        if is_4bit(m):
            m.compute_dtype = torch.float32
    loss32, ref = run(False, False)
    out = {"loss": (abs(peft_loss - loss32), abs(fused_loss - loss32)), "loss32": loss32}
    for k, g in ref.items():
        norm = g.norm()
        out[k] = (((peft[k] - g).norm() / norm).item(), ((fused[k] - g).norm() / norm).item())
    return out


def assert_fused_as_accurate_as_peft(errors: dict) -> None:
    """Fused error <= 1.5 x peft's (or under 2^-9, a quarter of bf16's roundoff), loss and every gradient."""
    peft, fused = errors["loss"]
    assert fused <= max(1.5 * peft, 2**-8 * abs(errors["loss32"])), errors["loss"]
    grads = {k: v for k, v in errors.items() if k not in ("loss", "loss32")}
    assert grads
    for k, (peft, fused) in grads.items():
        assert fused <= 1.5 * peft + 2**-9, (k, peft, fused)
        assert peft < 0.05, (k, peft)  # bf16's floor, not a broken reference


@pytest.mark.parametrize("name", ["tiny_llama_qlora", "tiny_falcon_qlora"])
def test_fused_is_as_accurate_as_peft_in_bf16_on_the_cpu(name):
    """CPU autocast bf16 (4-bit layers dequantized by bitsandbytes' CPU kernel); the GPU twin is in test_gpu."""
    model = _model(name, "lora.lora_dropout=0.0")
    assert_fused_as_accurate_as_peft(bf16_errors(model, torch.randint(4, 200, (2, 32)), "cpu"))


def test_layer_with_dropout_matches_the_same_mask_by_hand():
    check_dropout_by_hand("cpu")


def check_dropout_by_hand(device: str) -> None:
    """p > 0: the backward draws again the mask the forward drew (same seed, same mask), even when
    other random numbers were drawn in between, and leaves torch's generator where it found it.
    On "cuda" the mask is kernels/dropout.py's (test_gpu), on "cpu" torch's (the Mersenne Twister, rewound)."""
    from qlora_lab.kernels import dropout

    def rng_state():
        return torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()

    torch.manual_seed(1)
    x = torch.randn(3, 5, 8, device=device, requires_grad=True)
    w = torch.randn(6, 8, device=device)
    a = torch.randn(4, 8, device=device, requires_grad=True)
    b = torch.randn(6, 4, device=device, requires_grad=True)
    p, s, salt = 0.3, 0.5, 3
    torch.manual_seed(7)
    y = fused_lora.LoRALinearFunction.apply(x, w, None, None, a, b, s, p, salt, torch.float32)
    g = torch.randn_like(y)  # draws from the generator between forward and backward, as later layers do
    before = rng_state()
    y.backward(g)
    assert torch.equal(rng_state(), before)
    got = (y.detach(), x.grad.clone(), a.grad.clone(), b.grad.clone())
    for t in (x, a, b):
        t.grad = None
    if dropout.usable(x.device):  # the kernel's mask for this layer and seed
        keep = dropout.apply(torch.ones(15, 8, device=device), p, salt) != 0
        xd = x.reshape(-1, 8) * keep / (1 - p)
    else:
        torch.manual_seed(7)
        xd, _ = torch.native_dropout(x.reshape(-1, 8), p, True)
    ref = (x @ w.t() + s * (xd.view_as(x) @ a.t()) @ b.t())
    ref.backward(g)
    torch.testing.assert_close(got[0], ref.detach())
    for gg, t in zip(got[1:], (x, a, b)):
        torch.testing.assert_close(gg, t.grad)
    # Some elements were dropped, and the kept ones were scaled by 1/(1-p): not the p=0 result.
    assert not torch.allclose(got[0], x.detach() @ w.t() + s * (x.detach() @ a.detach().t()) @ b.detach().t())


def test_no_dropout_mask_is_kept_for_the_backward():
    """What the layer saves: x, x_a and the weights; no mask (bool or packed), no dropped-out copy of x."""
    x = torch.randn(64, 128, requires_grad=True)
    w, a, b = torch.randn(96, 128), torch.randn(4, 128, requires_grad=True), torch.randn(96, 4, requires_grad=True)
    saved = []

    def keep(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        y = fused_lora.LoRALinearFunction.apply(x, w, None, None, a, b, 1.0, 0.1, 0, torch.float32)
    assert sorted(t.numel() for t in saved) == sorted([x.numel(), 64 * 4, w.numel(), a.numel(), b.numel()])
    assert not [t for t in saved if t.dtype in (torch.uint8, torch.bool)]
    y.sum().backward()
    assert a.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", ["tiny_llama_qlora", "tiny_falcon_qlora"])
def test_dropout_with_recomputation_trains_the_same_as_without(name):
    """Recomputed layers run the forward again (its dropout too) before the backward draws the mask a
    third time: loss and every adapter gradient equal the no-recomputation step's, with dropout on."""
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same LoRA A init in both models
        model = _model(name, "lora.lora_dropout=0.2", checkpointing=checkpointing)
        model.train()
        assert fused_lora.enable(model) > 0
        torch.manual_seed(3)
        results.append(_loss_and_grads(model, torch.randint(4, 200, (2, 16))))
    (loss0, g0), (loss1, g1) = results
    torch.testing.assert_close(loss1, loss0)
    assert g0.keys() == g1.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7, msg=k)
    torch.manual_seed(0)
    model = _model(name, "lora.lora_dropout=0.0")  # and dropout did change the step
    model.train()
    fused_lora.enable(model)
    torch.manual_seed(3)
    loss_p0, _ = _loss_and_grads(model, torch.randint(4, 200, (2, 16)))
    assert not torch.allclose(loss_p0, loss0)


def test_fp32_adapters_get_fp32_gradients_under_bf16_compute():
    x = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(6, 8, dtype=torch.bfloat16)
    a = torch.randn(4, 8, requires_grad=True)
    b = torch.randn(6, 4, requires_grad=True)
    y = fused_lora.LoRALinearFunction.apply(x, w, None, None, a, b, 2.0, 0.0, 0, torch.bfloat16)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert a.grad.dtype == b.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


def test_eval_and_generation_use_peft_forward():
    """No grad (generation) or eval mode: the fused function is not called (bnb's inference kernels are)."""
    model = _model("tiny_llama_qlora")
    fused_lora.enable(model)
    calls = []
    orig = fused_lora.LoRALinearFunction.apply
    fused_lora.LoRALinearFunction.apply = staticmethod(lambda *a: calls.append(1) or orig(*a))
    try:
        x = torch.randint(4, 200, (1, 8))
        model.eval()
        with torch.no_grad():
            model(input_ids=x)
        assert not calls
        model.train()
        model(input_ids=x, labels=x).loss.backward()
        assert calls
    finally:
        fused_lora.LoRALinearFunction.apply = orig


def test_training_uses_it_by_default_and_config_turns_it_off(qlora_runs, tmp_path):
    """On: the shared tiny QLoRA run (conftest.py), trained with the config's default. Off: a 2-step run."""
    from qlora_lab.runs import RunFolder

    from ...conftest import train_tiny

    off = train_tiny("tiny_llama_qlora.yaml", ["train.max_steps=2", "data.eval_size=0", "train.save_steps=100",
                                               "train.fused_lora=false"], tmp_path / "off")
    s_on, s_off = RunFolder(qlora_runs["llama"][0]).read_json("model_summary.json"), \
        RunFolder(off).read_json("model_summary.json")
    assert s_on["fused_lora_modules"] == s_on["n_lora_modules"] > 0
    assert s_off["fused_lora_modules"] == 0
