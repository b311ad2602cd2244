"""What a multi-GPU launch means for this process: data-parallel, or sharded (FSDP).

`torchrun` and `accelerate launch` start one process per GPU and say so in the environment (RANK,
LOCAL_RANK, WORLD_SIZE). An accelerate config with `distributed_type: FSDP` (configs/accelerate/
fsdp_qlora.yaml) also sets ACCELERATE_USE_FSDP=true: then the Trainer shards the model over the
processes (FSDP-QLoRA), and the loader must store the 4-bit weights in a float dtype FSDP can
flatten together with the 16-bit ones. `fsdp_active()` is the one test for it, used everywhere.

This module is the only reader of those variables (a test greps the package for others): the rest of
the package asks `rank()`, `world_size()`, `local_rank()`, `is_main_process()` and `fsdp_active()`.
"""
from __future__ import annotations

import os
import re

# accelerate's str_to_bool: what it accepts as "on" for its ACCELERATE_* flags.
_TRUE = ("1", "true", "t", "yes", "y", "on")

# bnb_4bit_quant_storage names -> torch dtype names.
STORAGE_CHOICES = ("auto", "uint8", "bfloat16", "float16", "float32")


def fsdp_active() -> bool:
    """Launched by `accelerate launch` with an FSDP config (sharded, not one model per GPU).

    Anything that reads or patches a layer's weights outside the forward (a fused LoRA kernel,
    a weight-reading fused loss) must check this: under FSDP the weights are flat shards.
    """
    return os.environ.get("ACCELERATE_USE_FSDP", "false").strip().lower() in _TRUE


def rank() -> int:
    """This process's index among all processes of the launch (0 without a launcher)."""
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    """Processes in the launch (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    """This process's index on its machine: the GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", 0))


def gpu_env(gpu: int) -> dict:
    """The environment for a child process that is to see only GPU `gpu` (as its cuda:0)."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}


def use_gpus(gpus) -> None:
    """Let this process see only `gpus` (before it first touches CUDA; after, it changes nothing)."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)


def is_main_process() -> bool:
    """Rank 0: the one process that writes the run folder and reports."""
    return rank() == 0


def quant_storage(requested: str, compute_dtype: str) -> tuple[str, str]:
    """(dtype name, why) the packed 4-bit weights are stored in.

    uint8 is bitsandbytes' default. FSDP flattens and shards only float tensors, and only together
    with tensors of the same dtype: under FSDP the storage is the compute dtype, the dtype of every
    other parameter (the bytes are the same; only their label changes).
    """
    if requested != "auto":
        return requested, "set in config"
    if fsdp_active():
        return compute_dtype, "FSDP shards float tensors of one dtype: the compute dtype"
    return "uint8", "bitsandbytes' default (one model per process)"


def set_local_device() -> None:
    """Make this process's GPU the current one (the 4-bit loader places weights on it)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())


def full_state_dict(trainer) -> dict | None:
    """The gathered, unsharded state dict (on rank 0; empty elsewhere) under FSDP, else None.

    A collective: every process must call it at the same point. accelerate gathers FULL_STATE_DICT,
    offloaded to the CPU, whatever state dict type the checkpoints use.
    """
    if not getattr(trainer, "is_fsdp_enabled", False):
        return None
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    return {_unwrapped_name(k): v for k, v in state.items()}


# Module names that wrappers insert between a model's own: FSDP units, activation-checkpoint wrappers,
# DDP/compile. A saved adapter must use the model's own names, or peft cannot load it.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod", "module")


def _saved_adapter_key(name: str, adapter: str) -> str | None:
    """A model parameter's key in a saved peft adapter (the adapter name dropped), or None if not the adapter's."""
    m = re.search(rf"\.(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector)\.{re.escape(adapter)}(\.|$)", name)
    if m is None:
        return None
    return (name[:m.start()] + f".{m.group(1)}" + m.group(2) + name[m.end():]).rstrip(".")


def _unwrapped_name(key: str) -> str:
    parts = key.split(".")
    while parts and parts[0] in _WRAPPER_SEGMENTS:
        parts.pop(0)
    return ".".join(p for i, p in enumerate(parts) if p not in _WRAPPER_SEGMENTS[:3])


def write_adapter(model, state_dict: dict, out_dir, adapter: str = "default") -> int:
    """Write a peft adapter folder (adapter_model.safetensors + adapter_config.json) from a gathered full
    state dict; returns the tensor count.

    peft's own save_pretrained(state_dict=...) picks the adapter's entries by the module names of the model
    it is given, and under FSDP those carry `_fsdp_wrapped_module` inside (one unit per decoder layer and per
    LoRA layer), so it keeps none of them (seen on 2 H200s: 0 tensors saved). The keys are the model's own
    here (full_state_dict), so the LoRA entries are picked by name, in peft's layout (adapter name removed).
    """
    import copy
    from pathlib import Path

    from safetensors.torch import save_file

    tensors = {key: v.detach().cpu().contiguous() for k, v in state_dict.items()
               if (key := _saved_adapter_key(k, adapter)) is not None}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.peft_config[adapter])
    config.inference_mode = True
    config.save_pretrained(str(out))
    return len(tensors)


def load_adapter_into_shards(model, adapter_file, adapter: str = "default") -> int:
    """Copy a saved adapter (peft's layout) into an FSDP-wrapped model, on every process; returns the count.

    Inside summon_full_params each process sees the whole parameters under the model's own names and
    writes its shard back. Every adapter tensor must find its parameter, or this raises.
    """
    import torch
    from safetensors.torch import load_file
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    saved = load_file(str(adapter_file))
    done = set()
    with FSDP.summon_full_params(model, writeback=True), torch.no_grad():
        for name, p in model.named_parameters():
            key = _saved_adapter_key(_unwrapped_name(name), adapter)
            if key in saved:
                p.copy_(saved[key].to(p.device, p.dtype))
                done.add(key)
    missing = set(saved) - done
    if missing:
        from .errors import UserError

        raise UserError(f"{adapter_file}: {len(missing)} adapter tensors match no parameter of the model "
                        f"(e.g. {sorted(missing)[0]})")
    return len(done)
