"""Small models of the major families with their real tokenizers, built offline (random weights).

llama.cpp ships vocab-only GGUF files of real tokenizers (the installer extracts a few into
`.venv/llama.cpp/models/`); transformers turns them into fast tokenizers, and
`AutoConfig.for_model` gives the family's architecture. The result is a model folder like one
downloaded from the Hub (config, safetensors, tokenizer, chat template, generation config), at a
size chosen here: `tiny` for tests, `0.5b` for the memory benchmark (Qwen2.5-0.5B's shape).

    python scripts/family_models.py qwen2 /tmp/qwen2-tiny [--size tiny|0.5b]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCABS = ROOT / ".venv" / "llama.cpp" / "models"

# family -> what a real checkpoint of it has: architecture, vocab file, the end-of-turn token that stops
# generation, and its chat template when the vocab file lacks one
FAMILIES = {
    "qwen2": {"model_type": "qwen2", "vocab": "qwen2", "end_of_turn": "<|im_end|>", "also_stop": ["<|endoftext|>"], "tie_word_embeddings": True},
}
SIZES = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 1024},
    # Qwen2.5-0.5B: 494M parameters, 151,936-token vocabulary, tied embeddings
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6},
}


def load_tokenizer(family: str):
    from transformers import AutoTokenizer

    spec = FAMILIES[family]
    path = VOCABS / f"ggml-vocab-{spec['vocab']}.gguf"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `make install` (scripts/install_llamacpp.sh extracts it)")
    tokenizer = AutoTokenizer.from_pretrained(VOCABS, gguf_file=path.name)
    tokenizer.eos_token = spec["end_of_turn"]  # chat checkpoints end a turn with it (the instruct variants' eos)
    return tokenizer


def build(family: str, out: Path | str, size: str | dict = "tiny", seed: int = 0) -> Path:
    """Write a random-weight model of `family` at `size` (a SIZES name or a dict of config fields) to `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if family not in FAMILIES:
        raise SystemExit(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    spec, shape = FAMILIES[family], SIZES[size] if isinstance(size, str) else size
    out = Path(out)
    tokenizer = load_tokenizer(family)
    end_of_turn = tokenizer.convert_tokens_to_ids(spec["end_of_turn"])
    config = AutoConfig.for_model(spec["model_type"], vocab_size=len(tokenizer), **shape,
                                  tie_word_embeddings=spec.get("tie_word_embeddings", False),
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=end_of_turn,
                                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if size == "0.5b" else torch.float32)
    stops = sorted({end_of_turn, *([tokenizer.convert_tokens_to_ids(t) for t in spec.get("also_stop", [])])})
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                                               eos_token_id=stops if len(stops) > 1 else stops[0], do_sample=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "family.json").write_text(json.dumps({"family": family, "size": size, "seed": seed,
                                                 "parameters": model.num_parameters()}, indent=2))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build(args.family, args.out, args.size, args.seed), file=sys.stderr)
