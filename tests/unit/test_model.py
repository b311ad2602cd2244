"""4-bit loading is verified, not trusted: Llama and Falcon, the loader's blind spot, LoRA targets."""
from __future__ import annotations

import pytest
import torch

from qlora_lab.config import load_config
from qlora_lab.model import TARGETS, add_lora, load_model
from qlora_lab.quant import QuantizationError

from .conftest import CONFIGS


def _cfg(name, *sets):
    return load_config(CONFIGS / f"{name}.yaml", list(sets))


@pytest.mark.parametrize("name,n_layers_linear", [("tiny_llama_qlora", 7), ("tiny_falcon_qlora", 4)])
def test_qlora_quantizes_every_block_linear(name, n_layers_linear):
    import bitsandbytes as bnb

    cfg = _cfg(name)
    model, tok, s = load_model(cfg)
    n_layers = model.config.num_hidden_layers
    assert s["quantization"] == "nf4" and s["double_quant"]
    assert s["n_linear_4bit"] == n_layers * n_layers_linear == s["n_linear_expected_4bit"]
    assert s["n_linear_total"] == s["n_linear_4bit"] + 1  # lm_head stays 16-bit, as in QLoRA
    for name_, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            assert m.weight.quant_type == "nf4" and m.weight.compress_statistics  # double quant
    assert tok.pad_token_id != tok.eos_token_id


def test_lora_config_loads_16bit():
    model, _, s = load_model(_cfg("tiny_llama_lora"))
    assert s["quantization"] is None and s["n_linear_4bit"] == 0
    assert next(model.parameters()).dtype == torch.float32  # CPU compute dtype


def test_falcon_linear_subclass_would_be_skipped_by_the_loader(monkeypatch):
    """Without our alias the loader leaves FalconLinear in 16 bits; the fallback quantizes it."""
    import qlora_lab.quant as Q

    monkeypatch.setattr(Q, "_LINEAR_ALIASES", {})
    _, _, s = load_model(_cfg("tiny_falcon_qlora"))
    assert s["n_linear_4bit"] == s["n_linear_expected_4bit"] == 8


def test_still_16bit_after_fallback_is_an_error(monkeypatch):
    import qlora_lab.quant as Q

    monkeypatch.setattr(Q, "_LINEAR_ALIASES", {})
    monkeypatch.setattr(Q, "quantize_in_place", lambda *a, **k: None)
    with pytest.raises(QuantizationError, match="still 16-bit"):
        load_model(_cfg("tiny_falcon_qlora"))


@pytest.mark.parametrize("name", ["tiny_llama_qlora", "tiny_falcon_qlora", "tiny_llama_lora"])
def test_lora_on_all_linear_and_gradients_flow(name):
    cfg = _cfg(name)
    model, _, _ = load_model(cfg, for_training=True)
    arch = model.config.model_type
    peft_model, info = add_lora(model, cfg, recompute_layers=model.config.num_hidden_layers)
    assert info["lora_targets"] == TARGETS[arch]
    assert info["n_lora_modules"] == len(TARGETS[arch]) * model.config.num_hidden_layers
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    peft_model.train()
    embedded = []
    peft_model.get_input_embeddings().register_forward_hook(lambda m, i, out: embedded.append(out.requires_grad))
    x = torch.randint(4, 200, (2, 12))
    loss = peft_model(input_ids=x, labels=x).loss
    loss.backward()  # no "does not require grad" with checkpointing on
    grads = [p.grad for n, p in peft_model.named_parameters() if p.requires_grad and "lora_B" in n]
    assert all(g is not None for g in grads)
    # The embeddings' output is not made to require grad (what transformers and peft do when checkpointing is on):
    # autograd would hold it through the backward and give it a gradient nobody reads.
    assert embedded == [False]


@pytest.mark.parametrize("name", ["tiny_llama_lora", "tiny_falcon_qlora"])
def test_recomputation_is_a_layer_count(name):
    """set_recomputation(model, k): the first k decoder layers recompute, 0 = none, the depth = all."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from qlora_lab.model import set_recomputation

    model, _, _ = load_model(_cfg(name), for_training=True)
    n = model.config.num_hidden_layers
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert len(layers) == n
    for k, want in [(n, [True] * n), (1, [True] + [False] * (n - 1)), (0, [False] * n)]:
        set_recomputation(model, k)
        assert [bool(m.gradient_checkpointing) for m in layers] == want, k
    with pytest.raises(TypeError, match="a layer count"):
        set_recomputation(model, True)  # would read as 1 layer


def test_explicit_targets_are_respected():
    cfg = _cfg("tiny_llama_qlora", "lora.target_modules=[q_proj, v_proj]")
    model, _, _ = load_model(cfg, for_training=True)
    _, info = add_lora(model, cfg, recompute_layers=0)
    assert info["n_lora_modules"] == 2 * model.config.num_hidden_layers


def test_unknown_target_is_a_user_error():
    from qlora_lab.errors import UserError

    cfg = _cfg("tiny_llama_qlora", "lora.target_modules=[nope_proj]")
    model, _, _ = load_model(cfg, for_training=True)
    with pytest.raises((UserError, ValueError)):
        add_lora(model, cfg, recompute_layers=0)


def test_trust_remote_code_is_off_by_default():
    for p in CONFIGS.glob("*.yaml"):
        assert load_config(p).model.trust_remote_code is False


# ----------------------------------------------------------------------------- FSDP: 4-bit weights in a float dtype

def _spy_from_pretrained(monkeypatch) -> dict:
    """Record what load_model passes to from_pretrained (and still load for real)."""
    from transformers import AutoModelForCausalLM

    seen = {}
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *a, **kw):
        seen.update(kw)
        return real(cls, *a, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    return seen


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fsdp_loader_stores_4bit_in_the_compute_dtype_without_device_map(monkeypatch, dtype):
    import bitsandbytes as bnb

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config sets
    seen = _spy_from_pretrained(monkeypatch)
    cfg = _cfg("tiny_llama_qlora", f"quant.bnb_4bit_compute_dtype={dtype}")
    model, _, s = load_model(cfg, for_training=True)
    want = getattr(torch, dtype)
    assert seen["device_map"] is None  # FSDP places the shards
    assert seen["quantization_config"].bnb_4bit_quant_storage == want == seen["dtype"]
    assert s["n_linear_4bit"] == s["n_linear_expected_4bit"] == 14 and s["quant_storage"] == dtype
    peft_model, _ = add_lora(model, cfg, recompute_layers=model.config.num_hidden_layers)
    # One dtype for everything FSDP flattens together: no fp32 upcast (not even of fp16 norms).
    frozen = {p.dtype for p in peft_model.parameters() if not p.requires_grad}
    assert frozen == {want}
    assert all(m.weight.quant_storage == want for m in peft_model.modules() if isinstance(m, bnb.nn.Linear4bit))


def test_without_fsdp_storage_is_uint8_and_fp16_norms_are_upcast(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    seen = _spy_from_pretrained(monkeypatch)
    cfg = _cfg("tiny_llama_qlora", "quant.bnb_4bit_compute_dtype=float16")
    model, _, s = load_model(cfg, for_training=True)
    assert seen["quantization_config"].bnb_4bit_quant_storage == torch.uint8 and s["quant_storage"] == "uint8"
    assert seen["device_map"] == {"": torch.device("cpu")}
    peft_model, _ = add_lora(model, cfg, recompute_layers=0)
    assert torch.float32 in {p.dtype for p in peft_model.parameters() if not p.requires_grad}


def test_bf16_storage_gives_the_same_loss_as_uint8_and_trains():
    x = torch.randint(4, 200, (2, 16))
    losses, models = {}, {}
    for storage in ("uint8", "bfloat16"):
        cfg = _cfg("tiny_llama_qlora", f"quant.bnb_4bit_quant_storage={storage}")
        model, _, s = load_model(cfg, for_training=True)
        assert s["n_linear_4bit"] == s["n_linear_expected_4bit"] == 14 and s["quant_storage"] == storage
        with torch.no_grad():
            losses[storage] = model(input_ids=x, labels=x).loss.item()
        models[storage] = (model, cfg)
    assert abs(losses["uint8"] - losses["bfloat16"]) <= 1e-5, losses  # same bytes, another label

    model, cfg = models["bfloat16"]
    torch.manual_seed(0)
    peft_model, _ = add_lora(model, cfg, recompute_layers=model.config.num_hidden_layers)
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    before = peft_model(input_ids=x, labels=x).loss
    before.backward()
    opt.step()
    opt.zero_grad()
    after = peft_model(input_ids=x, labels=x).loss
    assert torch.isfinite(after) and after.item() < before.item()


# ----------------------------------------------------------------------------- the 4-bit CPU kernel
# These run with bitsandbytes claiming AVX512-BF16 (tests/support/sitecustomize.py), on any CPU.

def test_bitsandbytes_would_repack_an_unpinned_layer_on_its_first_eval_forward():
    """Why pin_cpu_kernel exists: one no-grad eval forward changes what every later forward computes."""
    import bitsandbytes as bnb

    assert bnb.nn.modules.has_avx512bf16() is True  # the claim tests/support makes
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)._quantize("cpu")
    x = torch.randn(4, 64)
    train_out = layer.train()(x)
    with torch.no_grad():
        layer.eval()(x)
    assert layer.weight.quant_state.packing_format_for_cpu  # repacked in place, and it stays
    assert not torch.equal(layer.train()(x), train_out)


@pytest.mark.parametrize("name", ["tiny_llama_qlora", "tiny_falcon_qlora"])
def test_4bit_layers_compute_the_same_in_training_eval_generation_and_reload(name):
    from qlora_lab.quant import cpu_repacked_layers

    cfg = load_config(CONFIGS / f"{name}.yaml")
    model, tok, _ = load_model(cfg)
    x = torch.randint(4, 200, (2, 12))
    with torch.no_grad():
        train_logits = model.train()(input_ids=x).logits
        eval_logits = model.eval()(input_ids=x).logits
        model.generate(input_ids=x[:1], max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
        after = model.train()(input_ids=x).logits
    assert cpu_repacked_layers(model) == []
    torch.testing.assert_close(eval_logits, train_logits, rtol=0, atol=0)
    torch.testing.assert_close(after, train_logits, rtol=0, atol=0)
    again, _, _ = load_model(cfg)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(input_ids=x).logits, train_logits, rtol=0, atol=0)
