"""The standard Hugging Face QLoRA recipe, as a user would write it from the docs: the bench's reference.

TRL SFTTrainer + peft LoraConfig + bitsandbytes NF4 with double quantization, peft's
prepare_model_for_kbit_training (which upcasts every non-4-bit parameter to fp32), gradient
checkpointing, paged_adamw_32bit, bf16. Standalone on purpose: nothing from model.py or training/,
so none of our fixes reach it. In particular transformers quantizes only modules whose type *is*
nn.Linear, so Falcon's FalconLinear layers stay 16-bit here; `linear_layers` reports it.
"""
from __future__ import annotations

import torch
from torch import nn


def load(path: str, compute_dtype: torch.dtype, lora_r: int, lora_alpha: int, lora_dropout: float):
    """(model, tokenizer, peft LoraConfig, facts): the recipe's loading half."""
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=compute_dtype)
    device = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=compute_dtype,
                                                 device_map=device, attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(path)
    facts = {"weights_bytes_loaded": int(model.get_memory_footprint()), **linear_layers(model)}
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    facts["weights_bytes"] = int(model.get_memory_footprint())  # after the fp32 upcast: what training holds
    lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules="all-linear",
                      bias="none", task_type="CAUSAL_LM")
    return model, tok, lora, facts


def linear_layers(model) -> dict:
    """How many linear layers (the output head aside) are 4-bit, and how many were left 16-bit."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    lin = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head]
    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in lin)
    return {"n_linear": len(lin), "n_linear_4bit": n4, "n_linear_16bit": len(lin) - n4}


def trainer(model, tok, lora_config, dataset, *, out_dir: str, seq_len: int, batch_size: int, steps: int,
            learning_rate: float, max_grad_norm: float, weight_decay: float, lr_scheduler_type: str,
            warmup_steps: int, seed: int, bf16: bool, optim: str, callbacks=()):
    """SFTTrainer with the recipe's settings; batches in dataset order (so both paths see the same ones)."""
    from torch.utils.data import SequentialSampler
    from trl import SFTConfig, SFTTrainer

    class _InOrder(SFTTrainer):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    args = SFTConfig(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
        learning_rate=learning_rate, lr_scheduler_type=lr_scheduler_type, warmup_steps=warmup_steps,
        weight_decay=weight_decay, max_grad_norm=max_grad_norm, optim=optim, bf16=bf16, fp16=False,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", seed=seed, data_seed=seed,
        max_length=seq_len, packing=False, use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
    from peft import PeftModel

    peft_config = None if isinstance(model, PeftModel) else lora_config  # reused across shapes in one process
    return _InOrder(model=model, args=args, train_dataset=dataset, processing_class=tok, peft_config=peft_config,
                    callbacks=list(callbacks))
