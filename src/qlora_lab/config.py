"""YAML <-> frozen dataclasses, validation, and `--set section.key=value` overrides.

Every key a config may hold is a field below, with its help text and allowed values beside it.
Validation runs before any model is loaded; an error names the file, the line, the key and what
is allowed, e.g. ``configs/x.yaml:12: lora.r: must be an integer >= 1 (got 0)``. A schema only: whether
this machine can run the config (bitsandbytes, FSDP) is plan.check_machine's, which names the key's line
through `Config.where`.
Key names reuse the library arguments they feed (peft's ``lora_alpha``, transformers'
``per_device_train_batch_size``, bitsandbytes' ``bnb_4bit_quant_type``).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import yaml

from .distributed import STORAGE_CHOICES
from .errors import ConfigError
from .presets import PRESETS


def _f(default, help: str, *, choices=None, min=None, max=None, factory=None):
    meta = {"help": help, "choices": choices, "min": min, "max": max}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: Optional[str] = _f(None, "hub id (e.g. meta-llama/Llama-2-7b-hf) or a local folder")
    random_init: Optional[str] = _f(None, "build a random-weight model of a preset shape instead", choices=PRESETS)
    revision: Optional[str] = _f(None, "hub revision (branch, tag or commit) to pin")
    trust_remote_code: bool = _f(False, "run model code from the hub; off unless you trust the repo")
    attn_implementation: str = _f("sdpa", "attention kernel", choices=("sdpa", "eager", "flash_attention_2"))


@dataclass(frozen=True)
class QuantConfig:
    bits: Optional[int] = _f(4, "4 = QLoRA (NF4 base weights); null = plain 16-bit LoRA", choices=(4, None))
    bnb_4bit_quant_type: str = _f("nf4", "4-bit data type; nf4 is the QLoRA paper's", choices=("nf4", "fp4"))
    bnb_4bit_use_double_quant: bool = _f(True, "quantize the quantization constants too (~0.4 bit/param saved)")
    bnb_4bit_compute_dtype: str = _f(
        "auto", "dtype of the matmuls; auto = bf16 where the GPU has it, else fp16",
        choices=("auto", "bfloat16", "float16", "float32"))
    bnb_4bit_quant_storage: str = _f(
        "auto", "dtype the packed 4-bit weights are stored in; auto = uint8, or the compute dtype under FSDP "
        "(which shards only float tensors of one dtype)", choices=STORAGE_CHOICES)


@dataclass(frozen=True)
class LoraConfig:
    r: int = _f(64, "adapter rank: higher = more capacity and memory", min=1)
    lora_alpha: int = _f(16, "scale = lora_alpha / r", min=1)
    lora_dropout: float = _f(0.05, "dropout on the adapter input", min=0.0, max=1.0)
    target_modules: Union[str, list] = _f("all-linear", "'all-linear' or a list of module names")
    bias: str = _f("none", "train biases too?", choices=("none", "all", "lora_only"))


@dataclass(frozen=True)
class DataConfig:
    train_file: Optional[str] = _f(None, "prepared JSONL (`qlora-lab data ...` output), path relative to the repo or absolute")
    eval_file: Optional[str] = _f(None, "held-out JSONL for eval loss; if null, eval_size rows are split off train")
    eval_size: Union[int, float] = _f(0.05, "rows (int) or fraction (float) held out when eval_file is null; 0 = no eval", min=0)
    format: str = _f("guanaco", "prompt format", choices=("guanaco", "lima_eot", "chat_template"))
    max_length: int = _f(512, "tokens per example; longer ones are truncated", min=8)
    truncation_side: str = _f("right", "which end is cut when too long", choices=("right", "left"))
    train_on_inputs: bool = _f(False, "also train on user tokens (default: assistant tokens only)")
    packing: bool = _f(False, "concatenate examples padding-free, attention kept within each example")
    max_examples: Optional[int] = _f(None, "use only the first N training rows (quick runs)", min=1)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = _f(42, "seeds data order, LoRA init and dropout", min=0)
    max_steps: int = _f(200, "optimizer steps", min=1)
    per_device_train_batch_size: int = _f(4, "sequences per micro-batch", min=1)
    gradient_accumulation_steps: int = _f(4, "micro-batches per optimizer step", min=1)
    learning_rate: float = _f(2e-4, "peak learning rate", min=0.0)
    lr_scheduler_type: str = _f("constant", "schedule after warmup",
                                choices=("constant", "linear", "cosine", "constant_with_warmup"))
    warmup_ratio: float = _f(0.03, "fraction of max_steps spent warming up", min=0.0, max=1.0)
    weight_decay: float = _f(0.0, "AdamW weight decay on the adapters", min=0.0)
    max_grad_norm: float = _f(0.3, "gradient clipping (0.3 as in the QLoRA paper)", min=0.0)
    optim: str = _f("paged_adamw_32bit", "optimizer; paged = states spill to CPU instead of OOM",
                    choices=("paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch", "adamw_8bit"))
    logging_steps: int = _f(1, "log train loss every N steps", min=1)
    eval_steps: Optional[int] = _f(50, "eval loss every N steps; null = only at the end", min=1)
    save_steps: int = _f(50, "checkpoint every N steps (what --resume starts from)", min=1)
    save_total_limit: Optional[int] = _f(2, "keep at most N checkpoints", min=1)
    gradient_checkpointing: Union[str, bool] = _f(
        "auto", "recompute activations: true saves memory, false is faster; auto decides from the memory budget",
        choices=("auto", True, False))
    offload_checkpoints: Union[str, bool] = _f(
        "auto", "recomputed layers keep their input in pinned CPU memory until the backward (kernels/recompute.py): "
        "2 x hidden bytes per token and layer less GPU memory (1 GiB for a 7B at 4,096 tokens), copies hidden behind "
        "the matmuls, replayed from the layer graphs (offload_graphs); auto = where the plan finds it fastest within the "
        "budget; one GPU only", choices=("auto", True, False))
    kernels: str = _f("auto", "fused Triton kernels (Liger) on CUDA: auto = where supported", choices=("auto", "liger", "none"))
    fused_lora: Union[str, bool] = _f(
        "auto", "one autograd function per LoRA layer (dequantize + matmul + adapter) instead of peft's module "
        "chain: same maths, fewer kernels; auto = on unless FSDP shards the model", choices=("auto", True, False))
    group_lora: bool = _f(
        True, "with fused_lora: LoRA layers that share an input (q/k/v, gate/up) as one autograd function "
        "(kernels/grouped_lora.py; same maths, one autograd node and input gradient per group; 11% faster alone on an H200)")
    fused_mlp: bool = _f(
        True, "with fused_lora: each MLP block (Llama's SwiGLU, Falcon's GELU) as one autograd function that does "
        "not keep the activation's output (kernels/lora_mlp.py): one MLP-width vector per token and layer less "
        "(2.7 GiB for Llama-2-7B at 4,096 tokens), and a recomputed block skips its last matmul")
    optimizer_sync: str = _f(
        "per-step", "bitsandbytes optimizers: wait for the GPU after each parameter's update (per-parameter, "
        "bitsandbytes' own) or once per step (per-step: same kernels in the same order, 447 fewer device syncs "
        "per step for a 7B LoRA, 16% faster alone on an H200; kernels/optimizer_step.py)", choices=("per-parameter", "per-step"))
    optimizer_direct: bool = _f(
        True, "with optimizer_sync per-step on a GPU: call bitsandbytes' C prefetch and update functions directly "
        "(the same functions with the same arguments) instead of through its Python layers, ~75 us less host time "
        "per adapter tensor a step (kernels/optimizer_step.py; bit for bit bitsandbytes' step; +2.6-4.4% on an "
        "H100, bench run 22)")
    optimizer_fused: bool = _f(
        False, "with optimizer_sync per-step on a GPU with Triton: bitsandbytes' 32-bit paged AdamW states of every "
        "adapter tensor in one paged buffer (one prefetch a step) and every update in one kernel launch instead of "
        "448 (kernels/fused_adam.py; the same update to within fp32 rounding; weight decay 0 only, else bitsandbytes' "
        "own). Off until a GPU run measures it")
    nf4_kernel: bool = _f(
        True, "with fused_lora on CUDA: dequantize NF4 weights in one Triton kernel (kernels/nf4.py; checked against "
        "bitsandbytes once per GPU) instead of bitsandbytes' three: same numbers, 23-33% faster on an H200")
    cuda_graphs: bool = _f(
        True, "with fused_lora on one CUDA GPU: replay each decoder layer's forward and backward from a CUDA graph "
        "(kernels/graphs.py; same kernels, launched by the GPU instead of Python; captured on the first steps of "
        "each batch shape, so fixed shapes (data.packing) gain the most)")
    offload_graphs: bool = _f(
        True, "with cuda_graphs: offloaded layers (offload_checkpoints) replay from the layer graphs too, their "
        "copies to and from CPU memory between the replays (kernels/graphs.py; 1.62x the eager offloaded layers on an "
        "H100, bench run 20); false = offloaded layers run eagerly")
    memory_budget_gib: Optional[float] = _f(None, "cap GPU memory to this many GiB (15 = a Colab T4)", min=1.0)
    output_dir: str = _f("runs", "run folders go under this directory")
    run_name: Optional[str] = _f(None, "folder and wandb run name; default: config file name")
    dataloader_num_workers: int = _f(0, "data loader processes", min=0)


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = _f(500, "answer length cap", min=1)
    do_sample: bool = _f(True, "sample (true) or greedy (false)")
    temperature: float = _f(0.8, "sampling temperature", min=0.0)
    top_p: float = _f(0.9, "nucleus sampling mass", min=0.0, max=1.0)
    num_beams: int = _f(1, "beam search width", min=1)
    repetition_penalty: float = _f(1.0, "1.0 = none", min=0.0)
    seed: int = _f(0, "sampling seed, so a table can be regenerated", min=0)
    batch_size: int = _f(8, "prompts per generate() call", min=1)
    prompts: Optional[str] = _f(None, "prompt set (YAML) used by generate/compare")


@dataclass(frozen=True)
class LoggingConfig:
    report_to: str = _f("wandb", "wandb (offline if no API key) or none; metrics.jsonl is always written",
                        choices=("wandb", "none"))
    project: str = _f("qlora-lab", "wandb project")
    entity: Optional[str] = _f(None, "wandb entity (team or user)")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Where the config came from (not a key): relative data paths resolve against the repo root.
    source: Optional[str] = field(default=None, compare=False)
    # Where each key was set ("section.key" -> "file:line" or "--set"), for messages about it (not a key).
    locations: dict = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source", None)
        d.pop("locations", None)
        return d

    def where(self, section: str, key: str) -> str:
        """Where `section.key` was set, for an error message: "file:line", "--set", or the file."""
        return self.locations.get(f"{section}.{key}") or self.source or "<config>"

    def replace(self, **sections) -> "Config":
        return dataclasses.replace(self, **sections)

    def set(self, *assignments: str) -> "Config":
        """Return a copy with `section.key=value` overrides applied (values parsed as YAML)."""
        raw = self.to_dict()
        for a in assignments:
            _apply_override(raw, a, "--set")
        return from_dict(raw, source=self.source or "<overrides>")

    @property
    def is_qlora(self) -> bool:
        return self.quant.bits == 4

    @property
    def method(self) -> str:
        return "qlora" if self.is_qlora else "lora"


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config) if f.name not in ("source", "locations")}
_SECTION_CLASSES = {
    "model": ModelConfig, "quant": QuantConfig, "lora": LoraConfig, "data": DataConfig,
    "train": TrainConfig, "generation": GenerationConfig, "logging": LoggingConfig,
}


# ----------------------------------------------------------------------------- loading

class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping key, for error messages."""


def _construct_mapping(loader, node, deep=False):
    mapping = yaml.SafeLoader.construct_mapping(loader, node, deep=deep)
    lines = {}
    for key_node, _ in node.value:
        lines[key_node.value] = key_node.start_mark.line + 1
    mapping = _Lines(mapping)
    mapping.lines = lines
    return mapping


class _Lines(dict):
    lines: dict


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_config(path, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config, apply `section.key=value` overrides, validate. Raises ConfigError."""
    p = Path(path)
    if p.is_dir():
        found = sorted(c.name for c in p.glob("*.yaml"))
        hint = f" (YAML files in it: {', '.join(found)})" if found else ""
        raise ConfigError(f"{p}: is a directory; give a config file{hint}")
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start})") from None
    try:
        raw = yaml.load(text, Loader=_LineLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{p}{line}: invalid YAML: {problem}") from None
    if raw is None:
        raise ConfigError(f"{p}: empty config")
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}:1: a config is a mapping of sections ({', '.join(SECTIONS)})")
    for a in overrides:
        _apply_override(raw, a, "--set")
    return from_dict(raw, source=str(p))


def _apply_override(raw: dict, assignment: str, origin: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"{origin} {assignment!r}: expected section.key=value")
    key, _, value = assignment.partition("=")
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"{origin} {assignment!r}: key must be section.key, e.g. train.max_steps")
    section, name = parts
    if section not in SECTIONS:
        raise ConfigError(f"{origin} {key}: unknown section {section!r}; allowed: {', '.join(SECTIONS)}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    sec = raw.get(section)
    if not isinstance(sec, dict):
        sec = {}
    else:
        old_lines = getattr(sec, "lines", None)
        sec = _Lines(sec)
        sec.lines = dict(old_lines or {})
        sec.lines[name] = origin
    sec[name] = parsed
    raw[section] = sec


def from_dict(raw: dict, source: str = "<dict>") -> Config:
    """Build and validate a Config from a plain dict (e.g. a notebook's parameters)."""
    lines = getattr(raw, "lines", {})

    def loc(section, key=None):
        where = lines.get(section) if key is None else getattr(raw.get(section), "lines", {}).get(key)
        if where == "--set":
            return "--set"
        return f"{source}:{where}" if isinstance(where, int) else source

    sections = {}
    for name, value in raw.items():
        if name not in _SECTION_CLASSES:
            raise ConfigError(f"{loc(name)}: unknown section {name!r}; allowed: {', '.join(SECTIONS)}")
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{loc(name)}: {name}: must be a mapping of keys")
        cls = _SECTION_CLASSES[name]
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, v in value.items():
            if key not in known:
                raise ConfigError(
                    f"{loc(name, key)}: {name}.{key}: unknown key; allowed: {', '.join(known)}")
            kwargs[key] = _check(v, known[key], f"{loc(name, key)}: {name}.{key}")
        sections[name] = cls(**kwargs)
    locations = {f"{name}.{key}": loc(name, key) for name, value in raw.items() if isinstance(value, dict)
                 for key in value}
    cfg = Config(**sections, source=source, locations=locations)
    _check_consistency(cfg, loc)
    return cfg


def _type_name(tp) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            list: "a list"}.get(tp, getattr(tp, "__name__", str(tp)))


def _check(value, f: dataclasses.Field, where: str):
    tp = typing.get_type_hints(_owner(f))[f.name] if isinstance(f.type, str) else f.type
    meta = f.metadata
    choices = meta.get("choices")
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    optional = (origin in (Union, types.UnionType) and type(None) in args)
    allowed = [a for a in args if a is not type(None)] if origin in (Union, types.UnionType) else [tp]

    if value is None:
        if optional or (choices and None in choices):
            return None
        raise ConfigError(f"{where}: must not be null; {_describe(allowed, meta)}")
    if choices is not None:
        if any(value == c and type(value) is type(c) for c in choices):
            return value
        shown = ", ".join("null" if c is None else str(c).lower() if isinstance(c, bool) else str(c) for c in choices)
        raise ConfigError(f"{where}: must be one of {shown} (got {value!r})")
    if float in allowed and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    for t in allowed:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value) if not (int in allowed and isinstance(value, int)) else value
            break
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            break
        if t is bool and isinstance(value, bool):
            break
        if t is str and isinstance(value, str):
            break
        if t is list and isinstance(value, list):
            if not value or not all(isinstance(x, str) and x for x in value):
                raise ConfigError(f"{where}: must be a non-empty list of names")
            value = list(value)
            break
    else:
        raise ConfigError(f"{where}: must be {_describe(allowed, meta)} (got {value!r})")
    lo, hi = meta.get("min"), meta.get("max")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value != value:  # NaN
            raise ConfigError(f"{where}: must be a finite number (got nan)")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(f"{where}: must be {_describe(allowed, meta)} (got {value!r})")
    return value


def _owner(f):  # pragma: no cover - dataclass fields keep their owner implicit
    for cls in _SECTION_CLASSES.values():
        if f in dataclasses.fields(cls):
            return cls
    raise KeyError(f.name)


def _describe(allowed, meta) -> str:
    s = " or ".join(_type_name(t) for t in allowed)
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        s += f" in [{lo}, {hi}]"
    elif lo is not None:
        s += f" >= {lo}"
    elif hi is not None:
        s += f" <= {hi}"
    return s


def _check_consistency(cfg: Config, loc) -> None:
    m = cfg.model
    if (m.name_or_path is None) == (m.random_init is None):
        raise ConfigError(f"{loc('model')}: model: set exactly one of name_or_path (hub id or folder) "
                          f"or random_init ({', '.join(PRESETS)})")
    if isinstance(cfg.lora.target_modules, str) and cfg.lora.target_modules != "all-linear":
        raise ConfigError(f"{loc('lora', 'target_modules')}: lora.target_modules: must be 'all-linear' "
                          f"or a list of module names (got {cfg.lora.target_modules!r})")
    if isinstance(cfg.data.eval_size, float) and cfg.data.eval_size >= 1.0:
        raise ConfigError(f"{loc('data', 'eval_size')}: data.eval_size: a fraction must be < 1 "
                          f"(got {cfg.data.eval_size}); use an integer for a row count")
    if cfg.train.learning_rate <= 0:
        raise ConfigError(f"{loc('train', 'learning_rate')}: train.learning_rate: must be > 0 "
                          f"(got {cfg.train.learning_rate})")


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

