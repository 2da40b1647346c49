"""memory_plan: the memory a training run needs, from params.yaml and the base's config.json alone,
before any weight is loaded; and whether this device holds it.

The model is built on PyTorch's meta device (shapes, no storage) for its parameter and layer shapes and
the modules `train.lora.target_modules` resolves to. Every component is a formula of those shapes, the
batch (from data/formatted when train calls it) and the method:

- weights: the frozen base in the resolved dtype (lora, prompt tuning), 4-bit linear weights (nf4/fp4:
  half a byte + one absmax per 64 weights, itself 8-bit with double quant) and the rest in that dtype
  (qlora), or fp32 master weights (full);
- adapter, gradients, optimizer states: every trainable parameter in fp32 (4 + 4 bytes), AdamW's two
  fp32 states (8 bytes; 8-bit optimizers: 2 bytes, fp32 for tensors under 4,096 elements) and its
  temporaries in the optimizer step;
- activations: what autograd saves per token per layer, counted tensor by tensor for the Llama-style
  decoder layer (norms keep a fp32 copy of their input; attention keeps q, k, v and its output; the
  MLP its gate, activation and up projections; a linear layer keeps its input only when its weight
  trains or when a LoRA adapter reads it, and LoRA dropout keeps its noise and output per module);
  with gradient checkpointing only each layer's input, plus one layer recomputed during backward;
- logits: only at the trained positions (trainer.step_loss), with their fp32 copy, log-softmax and
  gradient;
- the framework itself: the measured RSS of this process (torch, transformers, peft, the tokenizer,
  the data) on a CPU; the CUDA context on a GPU;
- on a CPU, what glibc's heap keeps of freed tensors: nothing counted when the train stage bounds it
  (device.limit_heap_retention, the default on glibc: the formulas above match autograd's saved tensors
  to 1%, and RSS within 1% at tiny sizes, 12% under them at 0.5B); without that bound, activations x 1.3
  kept through the optimizer step and saving (RSS ran 7-32% above autograd's tensors). For qlora, what
  bitsandbytes' CPU conversions leave (measured without the bound).

Peak = the framework plus the largest of four phases: loading, the training step (forward and
backward), the optimizer step, and saving (the reference logits).

    python scripts/memory_plan.py [--base DIR | --shape NAME] [--device cuda --dtype bfloat16] [train.method=qlora ...]
    python scripts/memory_plan.py --readme    # the README table: 0.5B / 8B / 70B shapes on a GPU in bf16
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from finetune.data import IGNORE
from finetune.training.batching import LengthGroupedSampler, pack
from finetune.training.reference import REFERENCE_PROMPTS, REFERENCE_TOKENS

MIB = 2**20
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CUDA_CONTEXT_MIB = 600  # torch's CUDA context and library handles: outside its caching allocator
# CPU: what the first steps add beyond the measured framework (oneDNN/MKL buffers, autograd, the Trainer)
CPU_RUNTIME_MIB = 32
# CPU: glibc's heap keeps the freed blocks of mid-sized tensors (under its mmap threshold, which climbs to
# 32 MiB), so RSS stays 7-32% above what autograd keeps, through the optimizer step and saving. The train
# stage bounds that (device.limit_heap_retention: blocks over 1 MiB are mmapped and unmapped when freed);
# this factor is for a run without it (FINETUNE_HEAP_LIMIT=0, or not glibc). At 0.5B, 4 x 104 tokens: peak
# 2,930 MiB without the bound, 2,681 MiB with it (plan 3,431 and 3,047)
CPU_HEAP_FACTOR = 1.3
# CPU, the default: the train stage loads under that bound, then keeps each step's freed buffers in the heap for the
# next (device.reuse_heap_in_loop: no page-fault tax). The widest batch comes first, so the heap grows once, in the
# first step, to what autograd holds plus what glibc cannot fit back into its free chunks, and stays there through
# the optimizer and saving. Measured on the default (SmolLM2, 16 x 127 tokens, 2 threads): peak RSS 7,617 MiB where
# the bounded plan says 5,909 with 4,173 MiB of activations: x 1.41 on the activations
CPU_LOOP_HEAP_FACTOR = 1.41
# CPU qlora: bitsandbytes converts each 4-bit weight on loading and repacks it for its CPU kernels at the
# first forward; the heap keeps ~2 bytes per 4-bit weight of those transients (measured at 0.5B)
CPU_4BIT_HEAP_BYTES = 2.0
OPTIMIZER_8BIT_MIN_SIZE = 4096  # bitsandbytes keeps fp32 states for smaller tensors
OPTIMIZER_8BIT_BLOCK = 256  # one fp32 absmax per block per state
QUANT_BLOCK = 64  # bitsandbytes 4-bit: one absmax per 64 weights
PHASES = ("load", "step", "optimizer", "save")
# GPU sizes as cudaMemGetInfo reports their totals (MiB): RTX 4090, A100 40GB, L40S, H100 80GB, H200
GPU_TOTALS_MIB = {"24 GB": 24_564, "40 GB": 40_960, "48 GB": 46_068, "80 GB": 81_559, "141 GB": 143_771}
ATTENTION_OUT = {"o_proj", "dense", "out_proj", "c_proj", "wo", "o"}

# config.json values of public checkpoints (typed here, nothing downloaded): the README table
PUBLIC_SHAPES = {
    "Qwen2.5-0.5B": {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                     "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                     "tie_word_embeddings": True},
    "Llama-3-8B": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "tie_word_embeddings": False},
    "Llama-3-70B": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
                    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                    "tie_word_embeddings": False},
}


# --------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Linear:
    name: str
    in_features: int
    out_features: int
    role: str  # attn_in (q/k/v), attn_out (o), mlp_in (gate/up), mlp_mid (down), head (lm_head), other
    layer: int | None


@dataclass(frozen=True)
class Shape:
    """What the plan needs of the model, read from its config on the meta device."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    kv_dim: int  # num_key_value_heads x head_dim
    q_dim: int  # num_attention_heads x head_dim
    norms_per_layer: int
    gated_mlp: bool  # gate and up projections (SwiGLU), not one up projection
    eager_attention: bool  # attention probabilities materialised (not SDPA)
    linears: tuple[Linear, ...]
    parameters: tuple[tuple[str, int], ...]  # every parameter tensor (tied ones once): name, elements
    lora_targets: tuple[str, ...]  # the linears train.lora.target_modules resolves to (full names)
    checkpoint_bytes: int  # the weights on disk (0: unknown)

    @property
    def total_params(self) -> int:
        return sum(count for _, count in self.parameters)

    @property
    def quantizable(self) -> list[Linear]:
        """The linears bitsandbytes stores in 4 bits (every one but the output head)."""
        return [linear for linear in self.linears if linear.role != "head"]


@dataclass(frozen=True)
class Settings:
    """The train params (and placement) that shape memory."""
    method: str
    device: str  # cpu | cuda
    dtype: str  # the resolved dtype of a frozen base
    mixed_precision: str | None  # train.bf16 / train.fp16: autocast over fp32 weights
    gradient_checkpointing: bool
    optimizer: str
    lora_r: int
    lora_dropout: float
    use_dora: bool
    quant_type: str
    double_quant: bool
    compute_dtype: str
    virtual_tokens: int
    num_processes: int
    heap_limited: bool = True  # CPU: glibc returns freed tensors over 1 MiB (device.limit_heap_retention)
    heap_reused: bool = False  # ... until the loop starts, which then reuses them (device.reuse_heap_in_loop)

    @classmethod
    def from_params(cls, cfg, placement) -> Settings:
        from finetune.runtime.device import heap_retention_limited, heap_reused_in_loop, qlora_compute_dtype

        return cls(method=cfg.method, device=placement.device, dtype=placement.dtype,
                   mixed_precision="bfloat16" if cfg.bf16 else "float16" if cfg.fp16 else None,
                   gradient_checkpointing=cfg.gradient_checkpointing, optimizer=cfg.optimizer, lora_r=cfg.lora.r,
                   lora_dropout=cfg.lora.dropout, use_dora=cfg.lora.use_dora, quant_type=cfg.qlora.quant_type,
                   double_quant=cfg.qlora.double_quant, compute_dtype=qlora_compute_dtype(cfg.qlora.compute_dtype, placement),
                   virtual_tokens=cfg.prompt_tuning.num_virtual_tokens if cfg.method == "prompt_tuning" else 0,
                   num_processes=cfg.num_processes, heap_limited=heap_retention_limited(),
                   heap_reused=heap_reused_in_loop())


@dataclass(frozen=True)
class Workload:
    """The largest micro-batch, per device."""
    rows: int  # train.batch_size (packed rows with packing)
    sequence_length: int  # the widest batch, tokens
    trained_columns: int  # the most positions of a batch whose next token is trained (logits are computed there)
    tokens_per_step: float  # real tokens per optimizer step, per device (FLOPs)
    reference_tokens: int  # tokens of the prompts whose logits train saves after training


@dataclass(frozen=True)
class Component:
    name: str
    bytes: float
    phases: tuple[str, ...]
    note: str


@dataclass(frozen=True)
class Plan:
    settings: Settings
    components: tuple[Component, ...]
    flops_per_token: int
    flops_per_step: float
    trainable_params: int

    def phase_bytes(self, phase: str) -> float:
        return sum(c.bytes for c in self.components if phase in c.phases)

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=self.phase_bytes)

    @property
    def peak_mib(self) -> float:
        return self.phase_bytes(self.peak_phase) / MIB

    def metrics(self) -> dict:
        return {"plan_peak_memory_mb": round(self.peak_mib), "plan_flops_per_step": float(f"{self.flops_per_step:.4g}"),
                "plan": {f"{c.name}_mb": round(c.bytes / MIB, 1) for c in self.components}}

    def table(self) -> list[str]:
        width = max(len(c.name) for c in self.components)
        lines = [f"  {c.name:<{width}} {c.bytes / MIB:>10,.1f} MiB  "
                 f"{'/'.join(c.phases) if len(c.phases) < len(PHASES) else 'all':<22} {c.note}" for c in self.components]
        lines.append("  " + ", ".join(f"{phase} {self.phase_bytes(phase) / MIB:,.0f}" for phase in PHASES) + " MiB")
        lines.append(f"  peak {self.peak_mib:,.0f} MiB ({self.peak_phase}); {self.flops_per_token:.3g} FLOPs/token, "
                     f"{self.flops_per_step:.3g} FLOPs/step")
        return lines


# --------------------------------------------------------------------------- the model's shapes
def describe(config, target_modules=None, checkpoint_bytes: int = 0) -> Shape:
    """The Shape of the model `config` describes, built on the meta device (no weights anywhere);
    `target_modules`: train.lora.target_modules, for lora and qlora."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.training import lora_targets

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    head = model.get_output_embeddings()
    linears = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        found = re.search(r"\.(\d+)\.", name)
        leaf, parent = name.split(".")[-1], name.rsplit(".", 1)[0]
        if module is head:
            role = "head"
        elif found and re.search(r"attn|attention", parent):
            role = "attn_out" if leaf in ATTENTION_OUT or module.in_features != hidden else "attn_in"
        elif found and re.search(r"mlp|feed_forward|ffn", parent):
            role = "mlp_in" if module.in_features == hidden else "mlp_mid"
        else:
            role = "other"
        layer = int(found.group(1)) if found else None
        linears.append(Linear(name, module.in_features, module.out_features, role, layer))
    first = [linear for linear in linears if linear.layer == 0]
    intermediate = next((linear.in_features for linear in first if linear.role == "mlp_mid"), 4 * hidden)
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // text.num_attention_heads
    layer_zero = model.get_submodule(first[0].name.split(".0.")[0] + ".0") if first else model
    norms = sum(1 for module in layer_zero.modules() if "norm" in type(module).__name__.lower()
                and getattr(module, "weight", None) is not None and module.weight.numel() == hidden)
    resolved = lora_targets.resolve(target_modules, model) if target_modules is not None else []
    targets = tuple(linear.name for linear in linears if linear.role != "head"
                    and (resolved == "all-linear" or linear.name.split(".")[-1] in resolved))
    return Shape(vocab_size=text.vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                 num_layers=text.num_hidden_layers, num_heads=text.num_attention_heads, kv_dim=kv_heads * head_dim,
                 q_dim=text.num_attention_heads * head_dim, norms_per_layer=max(norms, 1),
                 gated_mlp=sum(linear.out_features for linear in first if linear.role == "mlp_in") >= 2 * intermediate,
                 eager_attention=model.config._attn_implementation == "eager", linears=tuple(linears),
                 parameters=tuple((name, p.numel()) for name, p in model.named_parameters()),
                 lora_targets=targets, checkpoint_bytes=checkpoint_bytes)


def describe_base(base_dir, target_modules) -> Shape:
    """The Shape of a model folder, from its config.json (and the size of its weight files)."""
    from transformers import AutoConfig

    files = [path for path in Path(base_dir).iterdir() if path.suffix in (".safetensors", ".bin")]
    return describe(AutoConfig.from_pretrained(base_dir), target_modules, sum(path.stat().st_size for path in files))


# --------------------------------------------------------------------------- the formulas
def activation_bytes_per_token_layer(shape: Shape, s: Settings, sequence_length: int) -> float:
    """Bytes autograd keeps per token for one decoder layer (see the module docstring)."""
    base_bytes = 4 if s.method == "full" else DTYPE_BYTES[s.dtype]
    fp32_weights = base_bytes == 4
    autocast = s.mixed_precision is not None and fp32_weights
    act = 2 if autocast else base_bytes  # linear and attention outputs
    normed = 4 if fp32_weights else base_bytes  # a norm's output (its weight multiplies in the weight's dtype)
    noise = 4 if s.device == "cpu" else 1  # LoRA dropout keeps a fp32 noise tensor on CPU, a bool mask on CUDA
    h, i = shape.hidden_size, shape.intermediate_size
    trains_base = s.method == "full"
    lora = set(shape.lora_targets) if s.method in ("lora", "qlora") else set()
    total = shape.norms_per_layer * (4 * h + 4 + (normed * h if trains_base else 0))  # fp32 input copy, rstd
    total += act * (2 * shape.q_dim + 2 * shape.kv_dim) + 4 * shape.num_heads  # SDPA: q, k, v, output, logsumexp
    if shape.eager_attention:
        total += shape.num_heads * sequence_length * (4 + act)  # the probabilities, fp32 and cast
    total += (3 if shape.gated_mlp else 1) * i * act  # gate, activation, up (or the up projection)
    inputs = {"attn_in": (normed, False), "attn_out": (act, True), "mlp_in": (normed, False), "mlp_mid": (act, False)}
    layer = [linear for linear in shape.linears if linear.layer == 0]
    for role, (dtype_bytes, already_kept) in inputs.items():
        modules = [linear for linear in layer if linear.role == role]
        if not modules:
            continue
        width, kept, extra = modules[0].in_features, already_kept, 0.0
        for linear in modules:
            if trains_base:
                if autocast and dtype_bytes != act:
                    extra += act * width  # autocast's cast of the input, per module
                else:
                    kept = True
            if linear.name in lora:
                if s.lora_dropout > 0:
                    extra += (noise + (2 if autocast else 4)) * width  # dropout's noise and output (autocast: cast)
                elif autocast:
                    extra += 2 * width
                elif dtype_bytes == 4:
                    kept = True  # lora_A reads the input itself
                else:
                    extra += 4 * width  # cast to the adapter's fp32
                extra += (2 if autocast else 4) * s.lora_r  # lora_B's input
        total += (dtype_bytes * width if kept and not already_kept else 0) + extra
    return total


def adapter_params(shape: Shape, s: Settings) -> list[int]:
    """The trainable tensors of a peft method, by elements."""
    if s.method == "prompt_tuning":
        return [s.virtual_tokens * shape.hidden_size]
    if s.method not in ("lora", "qlora"):
        return []
    by_name = {linear.name: linear for linear in shape.linears}
    tensors = []
    for name in shape.lora_targets:
        linear = by_name[name]
        tensors += [s.lora_r * linear.in_features, s.lora_r * linear.out_features]
        if s.use_dora:
            tensors.append(linear.out_features)
    return tensors


def optimizer_state_bytes(tensors: list[int], optimizer: str) -> float:
    if optimizer == "adamw_torch":
        return 8.0 * sum(tensors)
    return sum(2 * n + 8 * n / OPTIMIZER_8BIT_BLOCK if n >= OPTIMIZER_8BIT_MIN_SIZE else 8 * n for n in tensors)


def four_bit_bytes(elements: int, double_quant: bool) -> float:
    absmax = 1 / QUANT_BLOCK + 4 / (QUANT_BLOCK * 256) if double_quant else 4 / QUANT_BLOCK
    return elements * (0.5 + absmax)


def plan(shape: Shape, s: Settings, work: Workload, framework_mib: float) -> Plan:
    """Every component of the run's memory, by phase (pure arithmetic on the inputs)."""
    components: list[Component] = []

    def add(name: str, size: float, phases, note: str) -> None:
        if size:
            components.append(Component(name, float(size), tuple(phases), note))

    base_bytes = DTYPE_BYTES[s.dtype]
    total, adapter = shape.total_params, adapter_params(shape, s)
    trainable = total if s.method == "full" else sum(adapter)
    tensors = [count for _, count in shape.parameters] if s.method == "full" else adapter
    framework = "measured RSS: torch, transformers, peft, tokenizer, data" if s.device == "cpu" else "CUDA context"
    # measured, so it varies run to run: named for scripts/check_metrics.py's `*memory*` skip
    add("framework_memory", framework_mib * MIB, PHASES, framework)
    if s.device == "cpu":
        add("runtime", CPU_RUNTIME_MIB * MIB, PHASES[1:], "kernels' buffers, autograd, the Trainer")
    if s.method == "full":
        weights = 4.0 * total
        add("weights", weights, PHASES, f"{total / 1e6:,.1f}M params, fp32 master weights")
    elif s.method == "qlora":
        quantized = sum(linear.in_features * linear.out_features for linear in shape.quantizable)
        weights = four_bit_bytes(quantized, s.double_quant) + base_bytes * (total - quantized)
        add("weights", base_bytes * (total - quantized), PHASES,
            f"{(total - quantized) / 1e6:,.1f}M params not quantized, {s.dtype}")
        add("weights_4bit", four_bit_bytes(quantized, s.double_quant), PHASES,
            f"{quantized / 1e6:,.1f}M params, {s.quant_type} + absmax{' (double quant)' if s.double_quant else ''}")
    else:
        weights = base_bytes * total
        add("weights", weights, PHASES, f"{total / 1e6:,.1f}M params, frozen, {s.dtype}")
    add("adapter", 4.0 * sum(adapter), PHASES, f"{sum(adapter):,} trainable params, fp32")
    converted = s.method == "qlora" or abs(weights - shape.checkpoint_bytes) > 0.1 * weights  # not mapped as they are
    if s.device == "cpu" and shape.checkpoint_bytes and converted:
        add("checkpoint_pages", shape.checkpoint_bytes, ("load",), "the weight files' pages while converting them")
    add("gradients", 4.0 * trainable, ("step", "optimizer"), "fp32, one per trainable param")
    if s.num_processes > 1:
        add("ddp_buckets", 4.0 * trainable, ("step", "optimizer"), "DDP's gradient buckets")
    add("optimizer_states", optimizer_state_bytes(tensors, s.optimizer), ("step", "optimizer", "save"),
        "AdamW: 2 fp32 states" if s.optimizer == "adamw_torch" else f"{s.optimizer}: 2 8-bit states + absmax")
    if s.optimizer == "adamw_torch" and tensors:
        # foreach on CUDA: a sqrt of every second moment at once; the CPU loop: two of the largest tensor
        temporary = 4.0 * trainable if s.device == "cuda" else 8.0 * max(tensors)
        add("optimizer_temporary", temporary, ("optimizer",), "AdamW's sqrt(second moment)")
    tokens = work.rows * (work.sequence_length + s.virtual_tokens)
    per_layer = activation_bytes_per_token_layer(shape, s, work.sequence_length + s.virtual_tokens)
    weights_fp32 = s.method == "full" or base_bytes == 4
    autocast = s.mixed_precision is not None and weights_fp32
    act = 2 if autocast else 4 if s.method == "full" else base_bytes
    stream = 4 if weights_fp32 else base_bytes  # the residual stream's dtype
    head_input = work.rows * work.trained_columns * shape.hidden_size * act if s.method == "full" else 0
    final_norm = tokens * (4 * shape.hidden_size + (4 * shape.hidden_size if s.method == "full" else 0))
    if s.gradient_checkpointing:
        # each layer's input is kept; backward recomputes one layer at a time (and holds its gradients)
        activations = tokens * (shape.num_layers * shape.hidden_size * stream + 2 * per_layer)
        note = f"checkpointed: {shape.num_layers} layer inputs + 1 layer recomputed, {tokens:,} tokens"
    else:
        activations = tokens * (shape.num_layers * per_layer + per_layer)  # + the backward's working set
        note = f"{per_layer / 1024:,.1f} KiB/token/layer x {shape.num_layers} layers x {tokens:,} tokens"
    if s.device == "cpu" and s.heap_limited and s.heap_reused:  # the heap keeps the first step's buffers for the next
        add("activations", CPU_LOOP_HEAP_FACTOR * (activations + final_norm + head_input), ("step", "optimizer", "save"),
            note + f", x {CPU_LOOP_HEAP_FACTOR} heap reused by every step")
    elif s.device == "cpu" and not s.heap_limited:  # glibc keeps the freed blocks: RSS stays up after the step
        add("activations", CPU_HEAP_FACTOR * (activations + final_norm + head_input), ("step", "optimizer", "save"),
            note + f", x {CPU_HEAP_FACTOR} heap")
    else:  # a GPU, or glibc returning freed blocks over 1 MiB (what the heap keeps of smaller ones is noise)
        add("activations", activations + final_norm + head_input, ("step",), note)
    positions = work.rows * work.trained_columns
    # backward of the loss holds log-softmax's fp32 output, its gradient and the logits' (then cast back)
    per_logit = 12 + (act if act != 4 else 0)
    add("logits", positions * shape.vocab_size * per_logit, ("step",),
        f"{positions:,} trained positions x {shape.vocab_size:,} vocab x {per_logit} B")
    if autocast:
        linear_params = sum(linear.in_features * linear.out_features for linear in shape.linears)
        add("autocast_weights", 2.0 * linear_params, ("step",), f"{s.mixed_precision} copies of the linear weights")
    if s.method == "qlora":
        largest = max(linear.in_features * linear.out_features for linear in shape.quantizable)
        add("dequantized_weight", 2.0 * DTYPE_BYTES[s.compute_dtype] * largest, ("step",),
            "the largest layer, de-quantized")
        if s.device == "cpu":
            quantized = sum(linear.in_features * linear.out_features for linear in shape.quantizable)
            add("cpu_4bit_heap", CPU_4BIT_HEAP_BYTES * quantized, ("step", "optimizer", "save"),
                "heap left by bitsandbytes' CPU conversions")
    # train keeps the reference prompts' fp32 logits on the host; safetensors writes from the tensors themselves
    reference = (work.reference_tokens if s.device == "cpu" else REFERENCE_TOKENS) * shape.vocab_size * 4
    add("reference_logits", reference, ("save",),
        f"{work.reference_tokens} prompt tokens x {shape.vocab_size:,} vocab, fp32")
    by_name = {linear.name: linear for linear in shape.linears}
    linear_flops = sum(linear.in_features * linear.out_features for linear in shape.linears)
    lora_flops = 0 if s.method not in ("lora", "qlora") else \
        sum(s.lora_r * (by_name[name].in_features + by_name[name].out_features) for name in shape.lora_targets)
    # train.parameter_counts' convention: 4N + 2N_trainable over every linear layer, LoRA's included
    flops_per_token = 4 * (linear_flops + lora_flops) + 2 * (linear_flops if s.method == "full" else lora_flops)
    return Plan(s, tuple(components), flops_per_token, flops_per_token * work.tokens_per_step, trainable)


# --------------------------------------------------------------------------- the device
def rss_mib() -> float:
    """This process's resident memory now."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def framework_mib(device: str) -> float:
    return rss_mib() if device == "cpu" else CUDA_CONTEXT_MIB


def capacity_mib(device: str) -> tuple[float, str]:
    """What the plan must fit in: the GPU's total memory, or the RAM available plus what this process holds."""
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[1] / MIB, f"{torch.cuda.get_device_name()} total"
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
    return int(meminfo["MemAvailable"].split()[0]) / 1024 + rss_mib(), "RAM available (MemAvailable + this process)"


def alternatives(shape: Shape, s: Settings, work: Workload, framework: float, capacity: float) -> list[str]:
    """The knob changes that fit `capacity` MiB: gradient checkpointing, qlora, an 8-bit optimizer (full
    fine-tuning), alone and together, each with the largest batch that fits; fewest knobs first, and no
    set that only adds knobs to one that already fits."""
    from itertools import combinations

    knobs = []
    if not s.gradient_checkpointing:
        knobs.append(("train.gradient_checkpointing: true", {"gradient_checkpointing": True}))
    if s.method in ("lora", "full"):
        knobs.append(("train.method: qlora", {"method": "qlora"}))
    if s.method == "full" and s.optimizer == "adamw_torch":
        knobs.append(("train.optimizer: adamw_bnb_8bit", {"optimizer": "adamw_bnb_8bit"}))
    found, enough = [], []
    for count in range(len(knobs) + 1):
        for chosen in combinations(knobs, count):
            changes = {key: value for _, change in chosen for key, value in change.items()}
            names = {text for text, _ in chosen}
            if changes.get("method") == "qlora" and "optimizer" in changes or any(fits <= names for fits in enough):
                continue  # an 8-bit optimizer means nothing for qlora's small adapter
            settings = replace(s, **changes)
            rows = work.rows if chosen else work.rows // 2
            while rows >= 1:
                smaller = replace(work, rows=rows, tokens_per_step=work.tokens_per_step * rows / work.rows)
                peak = plan(shape, settings, smaller, framework).peak_mib
                if peak <= capacity:
                    batch = [] if rows == work.rows else [f"train.batch_size: {rows} (gradient_accumulation_steps x "
                                                          f"{math.ceil(work.rows / rows)} keeps the batch)"]
                    found.append(f"{' + '.join([text for text, _ in chosen] + batch)} ({peak:,.0f} MiB)")
                    if rows == work.rows:
                        enough.append(names)
                    break
                rows //= 2
    return found[:4]


def check_fits(result: Plan, shape: Shape, work: Workload, framework: float, capacity: float, what: str) -> None:
    """Refuse at once, naming the knobs that would fit, when the plan's peak exceeds `capacity` MiB."""
    if result.peak_mib <= capacity:
        return
    options = alternatives(shape, result.settings, work, framework, capacity)
    fix = ("these would fit: " + "; ".join(options)) if options else \
        "nothing among qlora, gradient checkpointing and batch_size 1 fits: this needs a larger device"
    raise SystemExit(f"train: the memory plan needs {result.peak_mib:,.0f} MiB at its peak ({result.peak_phase}), "
                     f"but {what} is {capacity:,.0f} MiB; {fix}")


def log_plan(result: Plan, work: Workload, log) -> None:
    s = result.settings
    rows = [line.strip() for line in result.table()]
    log.info("memory plan: %s on %s (%s%s), %d rows x %d tokens, %d trained positions, gradient checkpointing %s, %s\n  %s"
             "\nmemory plan: %s", s.method, s.device, s.dtype, f", {s.mixed_precision} autocast" if s.mixed_precision else "",
             work.rows, work.sequence_length + s.virtual_tokens, work.rows * work.trained_columns,
             "on" if s.gradient_checkpointing else "off", s.optimizer, "\n  ".join(rows[:-1]), rows[-1])


# --------------------------------------------------------------------------- command line
def planned_workload(train_rows: list[dict], eval_rows: list[dict], cfg, seed: int):
    """The batches this run will see, as the memory plan needs them (memory_plan.Workload): the widest one,
    the most positions a batch trains (logits are computed there), the mean real tokens per optimizer
    step, from the sampler's own order over the first epochs; and the reference prompts saved at the end."""
    dataset = pack(train_rows, cfg.packing_length) if cfg.packing else train_rows
    lengths = [len(row["input_ids"]) for row in dataset]
    spans = []  # first and last position whose next token is trained
    for row in dataset:
        targets = row["labels"][1:]
        first = next((i for i, label in enumerate(targets) if label != IGNORE), None)
        last = next((len(targets) - 1 - i for i, label in enumerate(reversed(targets)) if label != IGNORE), None)
        spans.append((first, last) if first is not None else None)
    per_epoch = math.ceil(len(dataset) / cfg.batch_size)
    steps = cfg.max_steps * cfg.gradient_accumulation_steps if cfg.max_steps > 0 else per_epoch * cfg.num_epochs
    sampler = LengthGroupedSampler(lengths, cfg.batch_size, seed, cfg.group_by_length or cfg.packing)
    widest = trained = 0
    for epoch in range(min(3, max(1, math.ceil(steps / per_epoch)))):
        sampler.set_epoch(epoch)
        order = list(sampler)
        for start in range(0, len(order), cfg.batch_size):
            batch = order[start:start + cfg.batch_size]
            widest = max(widest, max(lengths[i] for i in batch))
            marked = [spans[i] for i in batch if spans[i]]
            if marked:
                trained = max(trained, max(last for _, last in marked) - min(first for first, _ in marked) + 1)
    prompts = (eval_rows or train_rows)[:REFERENCE_PROMPTS]  # reference.reference_prompts
    return Workload(rows=cfg.batch_size, sequence_length=widest, trained_columns=trained,
                    tokens_per_step=sum(lengths) / per_epoch * cfg.gradient_accumulation_steps,
                    reference_tokens=sum(min(REFERENCE_TOKENS, len(row["input_ids"])) for row in prompts))


def synthetic_workload(cfg, max_seq_len: int) -> Workload:
    """No data: every row as long as it may be, every position trained (an upper bound)."""
    length = cfg.packing_length if cfg.packing else max_seq_len
    return Workload(rows=cfg.batch_size, sequence_length=length, trained_columns=length - 1,
                    tokens_per_step=float(cfg.batch_size * length * cfg.gradient_accumulation_steps),
                    reference_tokens=REFERENCE_PROMPTS * min(REFERENCE_TOKENS, length))


def readme_table(params: dict) -> str:
    """The README table: public 0.5B / 8B / 70B shapes x full / lora / qlora, on a GPU in bf16 (full: fp32
    master weights under bf16 autocast; qlora: bf16 compute), 8 rows x 1,024 tokens, 256 trained positions
    per row, gradient checkpointing, the rest as params.yaml has it."""
    from transformers import AutoConfig

    from finetune.runtime.device import Placement
    from finetune.params.core import merge, validate
    from finetune.params.train import Train

    rows, length, trained = 8, 1024, 256
    work = Workload(rows, length, trained, float(rows * length), REFERENCE_PROMPTS * REFERENCE_TOKENS)
    lines = ["| model | method | weights | adapter, gradients, optimizer | activations | logits | peak GiB | fits on | "
             "TFLOP/step |", "|---|---|---|---|---|---|---|---|---|"]
    for name, fields in PUBLIC_SHAPES.items():
        config = AutoConfig.for_model(**fields)
        for method in ("full", "lora", "qlora"):
            changes = {"method": method, "batch_size": rows, "gradient_checkpointing": True, "bf16": method == "full",
                       "qlora": {"compute_dtype": "bfloat16"}}
            cfg = validate(merge(params, {"train": changes}), {"train": Train}).train
            shape = describe(config, cfg.lora.target_modules if method != "full" else None)
            result = plan(shape, Settings.from_params(cfg, Placement("cuda", "bfloat16")), work, CUDA_CONTEXT_MIB)
            gib = {c.name: c.bytes / 2**30 for c in result.components}
            weights = gib["weights"] + gib.get("weights_4bit", 0)
            trainable = sum(gib.get(key, 0) for key in ("adapter", "gradients", "optimizer_states"))
            peak = result.peak_mib * MIB / 2**30
            fits = next((label for label, size in GPU_TOTALS_MIB.items() if result.peak_mib <= size), "no single GPU")
            lines.append(f"| {name} ({shape.total_params / 1e9:.2f}B) | {method} | {weights:.1f} | {trainable:.1f} | "
                         f"{gib['activations']:.1f} | {gib['logits']:.1f} | **{peak:.1f}** | {fits} | "
                         f"{result.flops_per_step / 1e12:,.0f} |")
    return "\n".join(lines)
