"""A GGUF file as a base: its metadata, the refusal of an architecture transformers cannot dequantize, and the
dequantization into a plain Hugging Face folder (fp32 safetensors, tokenizer with its chat template,
generation config) that every later stage loads like any other base.

transformers dequantizes a GGUF on load (`from_pretrained(folder, gguf_file=name)`), but a model loaded that way
refuses `save_pretrained` ("quantized with gguf and is not serializable"): the weights are moved into a plain
model built from the same config without its `quantization_config`, every key matching, and that one is saved.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)

# llama.cpp's architecture names that transformers renames before its support check (load_gguf_checkpoint)
RENAMED = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2",
           "t5encoder": "t5"}
NOT_ARCHITECTURES = {"general", "tokenizer"}  # metadata prefixes in transformers' table, not models
BYTE_LEVEL_PRE = {None, "default", "gpt-2"}  # llama.cpp's pre-tokenizers that are GPT-2's, as transformers reads any


def metadata(path: Path | str) -> dict:
    """What the file says about itself, read without touching the weights."""
    from gguf import GGUFReader, LlamaFileType  # lazy: ~1 s of numpy, after the params check

    reader = GGUFReader(path)

    def field(key: str):
        found = reader.fields.get(key)
        return found.contents() if found is not None else None

    tensor_types = Counter(tensor.tensor_type.name for tensor in reader.tensors)
    file_type = field("general.file_type")
    # general.file_type is the writer's claim (llama_ftype); a file without one is named by its commonest tensor type
    quantization = (LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_") if file_type is not None
                    else tensor_types.most_common(1)[0][0] if tensor_types else None)
    return {"architecture": field("general.architecture"), "quantization": quantization,
            "tensor_types": dict(sorted(tensor_types.items())), "gguf_name": field("general.name"),
            "gguf_license": field("general.license"), "pre_tokenizer": field("tokenizer.ggml.pre")}


def supported_architectures() -> set[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES  # lazy: imports torch

    return set(GGUF_SUPPORTED_ARCHITECTURES) - NOT_ARCHITECTURES


def check_architecture(architecture: str | None, path: Path | str, param: str = "model.base") -> None:
    """Refuse, before any weight is read, a GGUF whose architecture transformers cannot dequantize."""
    supported = supported_architectures()
    if architecture not in supported and RENAMED.get(architecture or "") not in supported:
        raise SystemExit(f"{param}: {Path(path).name} is a GGUF of architecture {architecture!r}, which transformers "
                         f"cannot dequantize (it reads {', '.join(sorted(supported))}). Use a GGUF of one of those, or "
                         "the model's Hugging Face folder or hub id")


def pre_tokenizer(pre: str | None):
    """The pre-tokenizer for llama.cpp's `tokenizer.ggml.pre` where transformers' GGUF reader has none (its
    GGUF_PRE_TOKENIZER_SPLITS) and falls back to GPT-2's byte-level split: then "  27" and " ½" split unlike llama.cpp
    and unlike the model's own tokenizer.json. None: transformers' own is right (or unknown, with a warning)."""
    from tokenizers import pre_tokenizers
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    if pre == "smollm":  # SmolLM/SmolLM2's tokenizer.json: every digit (\p{N}) alone, then GPT-2's byte-level split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    if pre not in GGUF_PRE_TOKENIZER_SPLITS and pre not in BYTE_LEVEL_PRE:
        log.warning("the GGUF's pre-tokenizer %r is unknown to transformers, which splits text as GPT-2 does: its "
                    "tokenization may differ from llama.cpp's and the model's own", pre)
    return None


def dequantize(path: Path | str, out: Path | str, pre: str | None = None) -> dict:
    """Write the GGUF at `path` into `out` as a plain fp32 model folder; returns its parameter count. `pre`: the
    file's `tokenizer.ggml.pre` (metadata()'s pre_tokenizer)."""
    import torch  # lazy, as every heavy import here: the params check before this stays instant
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path, out = Path(path), Path(out)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    split = pre_tokenizer(pre)
    if split is not None:
        tokenizer.backend_tokenizer.pre_tokenizer = split
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # without it the config describes a plain model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)  # every key matching, or an error naming them
    del loaded
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    model.save_pretrained(out)
    for flag in ("is_local", "local_files_only"):  # how this machine loaded it, not a property of the tokenizer
        tokenizer.init_kwargs.pop(flag, None)
    tokenizer.save_pretrained(out)
    return {"parameters": model.num_parameters()}
