"""Small models of the major families with their real tokenizers, built offline (random weights).

llama.cpp ships vocab-only GGUF files of real tokenizers (the installer extracts a few into
`.venv/llama.cpp/models/`). A byte-level BPE vocabulary (Qwen2, Llama 3, GPT-NeoX) is built here from
the file's tokens and merges with the family's pre-tokenizer split; a SentencePiece one (Llama 2, Phi-3)
comes from transformers' GGUF loading, corrected. `AutoConfig.for_model` gives the architecture. The
result is a model folder like one downloaded from the Hub (config, safetensors, tokenizer, chat template,
generation config, `tokenizer.model` for SentencePiece), at a size chosen here: `tiny` for tests,
`small`/`medium` for scripts/family_matrix.py, `0.5b` for the memory benchmark (Qwen2.5-0.5B's shape).

What each family's real (chat) checkpoint has; each one tokenizes like llama.cpp on the same file:
- qwen2 (Qwen1.5/2 vocabulary, ChatML in the file): no BOS; end of turn `<|im_end|>`.
- llama3 (Llama 3 vocabulary): BOS `<|begin_of_text|>` added to every text, Llama 3's chat template,
  end of turn `<|eot_id|>`. (transformers' GGUF loading adds no BOS and a 128,257th token,
  GPT2Tokenizer's default unk `<|endoftext|>`, and takes 20-40 s for this file.)
- llama2 (Llama 2 SentencePiece vocabulary): Llama 2's chat template, end of turn `</s>`; the real
  checkpoint's Prepend/Replace normalizer, which puts SentencePiece's space after a special token
  (`<s>[INST]`) as llama.cpp does (transformers' GGUF loading gives a Metaspace that does not).
- phi3 (Phi-3 vocabulary, its template in the file): end of turn `<|end|>`; the chat markers strip
  the whitespace after them (`rstrip`, as in the real tokenizer.json and in llama.cpp).
- gpt_neox (GPT-NeoX-20B / Pythia vocabulary; transformers cannot load this file): NFC + GPT-2's
  byte-level BPE, runs of spaces as whole tokens; no chat template (format.template alpaca or chatml).
`tokenizer.model` (llama.cpp's converter reads it: Phi-3's requires it) is built from the file's pieces,
scores and types. The `[PADn]` placeholders the files carry past the real vocabulary are not tokens of
the real tokenizers: dropped (the embedding keeps the real checkpoint's row count).

    python scripts/family_models.py llama3 /tmp/llama3-tiny [--size tiny|small|medium|0.5b]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCABS = ROOT / ".venv" / "llama.cpp" / "models"

LLAMA3_TEMPLATE = (  # Meta-Llama-3-8B-Instruct's
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA2_TEMPLATE = (  # Llama-2-7b-chat-hf's
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# the pre-tokenizer splits of the real tokenizer.json files (GPT-NeoX uses GPT-2's own)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")

# family -> what a real (chat) checkpoint of it has: architecture, vocab file, the end-of-turn token that stops
# generation (and the other stops of its generation config), special tokens, template, BOS added to every text,
# pre-tokenizer split and NFC (byte-level BPE), pieces of its tokenizer.model (SentencePiece), tokens that rstrip
FAMILIES = {
    "qwen2": {"model_type": "qwen2", "vocab": "qwen2", "end_of_turn": "<|im_end|>", "also_stop": ["<|endoftext|>"],
              "bos": None, "pad": "<|endoftext|>", "tie_word_embeddings": True, "split": QWEN2_SPLIT, "nfc": True},
    "llama3": {"model_type": "llama", "vocab": "llama-bpe", "end_of_turn": "<|eot_id|>", "also_stop": ["<|end_of_text|>"],
               "add_bos": True, "chat_template": LLAMA3_TEMPLATE, "split": LLAMA3_SPLIT},
    "llama2": {"model_type": "llama", "vocab": "llama-spm", "end_of_turn": "</s>", "chat_template": LLAMA2_TEMPLATE,
               "sentencepiece": 32000},
    "phi3": {"model_type": "phi3", "vocab": "phi-3", "end_of_turn": "<|end|>", "also_stop": ["<|endoftext|>"],
             "pad": "<|endoftext|>", "sentencepiece": 32000,
             "rstrip": ["</s>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>", *[f"<|placeholder{i}|>" for i in range(1, 7)]]},
    "gpt_neox": {"model_type": "gpt_neox", "vocab": "gpt-neox", "end_of_turn": "<|endoftext|>", "pad": "<|padding|>",
                 "nfc": True},
}
# widths are multiples of 64 (bitsandbytes' CPU 4-bit kernels, QLoRA); a GPTQ group_size must divide them
SIZES = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 1024},
    "small": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 2048},
    "medium": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
               "num_key_value_heads": 4, "max_position_embeddings": 2048},
    # Qwen2.5-0.5B: 494M parameters, 151,936-token vocabulary, tied embeddings
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6},
}
PLACEHOLDER = re.compile(r"^\[PAD\d+\]$")
# GGUF token types (llama.cpp) are SentencePiece's piece types: 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte
UNKNOWN, CONTROL, USER_DEFINED = 2, 3, 4


def vocab_file(family: str) -> Path:
    path = VOCABS / f"ggml-vocab-{FAMILIES[family]['vocab']}.gguf"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `make install` (scripts/install_llamacpp.sh extracts it)")
    return path


GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


def read_metadata(path: Path) -> dict:
    """The key-value metadata of a GGUF file (format v2/v3). gguf's GGUFReader makes a numpy view per array
    element: 15 s for Llama 3's 128k tokens and 280k merges; this reads the same values in about a second."""
    import struct

    data = Path(path).read_bytes()
    if data[:4] != b"GGUF" or struct.unpack_from("<I", data, 4)[0] < 2:
        raise SystemExit(f"{path}: not a GGUF v2/v3 file")
    count, offset = struct.unpack_from("<Q", data, 16)[0], 24

    def string(at):
        length = struct.unpack_from("<Q", data, at)[0]
        return data[at + 8:at + 8 + length].decode("utf-8"), at + 8 + length

    def value(kind, at):
        if kind == STRING:
            return string(at)
        if kind == ARRAY:
            inner, length = struct.unpack_from("<IQ", data, at)
            at += 12
            if inner in GGUF_SCALARS:
                width = struct.calcsize(GGUF_SCALARS[inner])
                return list(struct.unpack_from(f"<{length}{GGUF_SCALARS[inner]}", data, at)), at + width * length
            items = []
            for _ in range(length):
                item, at = value(inner, at)
                items.append(item)
            return items, at
        return struct.unpack_from("<" + GGUF_SCALARS[kind], data, at)[0], at + struct.calcsize(GGUF_SCALARS[kind])

    metadata = {}
    for _ in range(count):
        key, offset = string(offset)
        kind = struct.unpack_from("<I", data, offset)[0]
        metadata[key], offset = value(kind, offset + 4)
    return metadata


def read_vocab(path: Path) -> dict:
    """tokens, types, scores (SentencePiece) and merges (BPE) of a llama.cpp vocab file, its special ids and template."""
    metadata = read_metadata(path)
    get = lambda key: metadata.get(f"tokenizer.ggml.{key}")  # noqa: E731
    return {"model": get("model"), "tokens": get("tokens"), "types": get("token_type"), "scores": get("scores") or [],
            "merges": get("merges") or [], "bos": get("bos_token_id"), "eos": get("eos_token_id"),
            "unk": get("unknown_token_id"), "chat_template": metadata.get("tokenizer.chat_template")}


def byte_level_bpe(vocab: dict, spec: dict):
    """A GPT-2-style byte-level BPE from the file's tokens and merges, with the family's pre-tokenizer split and
    normalizer: what the real tokenizer.json holds (its normal tokens are spelled in GPT-2's byte alphabet)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    real = {token: index for index, token in enumerate(vocab["tokens"]) if not PLACEHOLDER.match(token)}
    tokenizer = Tokenizer(models.BPE(vocab=real, merges=[tuple(merge.split(" ", 1)) for merge in vocab["merges"]],
                                     fuse_unk=False))
    if spec.get("nfc"):
        tokenizer.normalizer = normalizers.NFC()
    if spec.get("split"):
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(spec["split"]), behavior="isolated"),
                                                           pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:  # GPT-2's own split
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    byte_level = processors.ByteLevel(trim_offsets=False)
    if spec.get("add_bos"):
        bos = vocab["tokens"][vocab["bos"]]
        tokenizer.post_processor = processors.Sequence([byte_level, processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab["bos"])])])
    else:
        tokenizer.post_processor = byte_level
    # control tokens are special; user-defined ones (GPT-NeoX's runs of spaces, for code) are matched whole
    tokens_of = lambda kind: [token for token, found in zip(vocab["tokens"], vocab["types"])  # noqa: E731
                              if found == kind and token in real]
    tokenizer.add_tokens([AddedToken(token, normalized=True, special=False) for token in tokens_of(USER_DEFINED)])
    tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in tokens_of(CONTROL)])
    return tokenizer


def sentencepiece_tokenizer(path: Path, vocab: dict, spec: dict):
    """transformers' GGUF loading of a SentencePiece vocabulary, made what the real tokenizer.json holds."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    state = json.loads(AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).backend_tokenizer.to_str())
    size = len(vocab["tokens"])
    state["added_tokens"] = [token for token in state["added_tokens"]
                             if token["id"] < size and not PLACEHOLDER.match(token["content"])]
    kept = {token["content"] for token in state["added_tokens"]}
    state["model"]["vocab"] = {token: index for token, index in state["model"]["vocab"].items()
                               if not PLACEHOLDER.match(token) or token in kept}
    for token in state["added_tokens"]:
        token["rstrip"] = token["content"] in spec.get("rstrip", ())
    # legacy Llama normalizer: "▁" before every text fragment (after a special token too), as SentencePiece does
    state["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                               {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    state["pre_tokenizer"] = None
    return Tokenizer.from_str(json.dumps(state))


def load_tokenizer(family: str):
    """The family's real tokenizer, with its chat template and its end of turn as EOS (as chat checkpoints ship it)."""
    from transformers import PreTrainedTokenizerFast

    spec, path = FAMILIES[family], vocab_file(family)
    vocab = read_vocab(path)
    backend = byte_level_bpe(vocab, spec) if vocab["model"] == "gpt2" else sentencepiece_tokenizer(path, vocab, spec)
    token = lambda key: None if vocab[key] is None else vocab["tokens"][vocab[key]]  # noqa: E731
    # every special token is stated, None included: a model-specific tokenizer class (Qwen2Tokenizer, ...)
    # would otherwise add its own default (e.g. an unk `<|endoftext|>`) as a new id past the embedding
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=spec.get("bos", token("bos")), eos_token=spec["end_of_turn"],
        unk_token=token("unk"), pad_token=spec.get("pad"), chat_template=spec.get("chat_template", vocab["chat_template"]),
        add_bos_token=bool(spec.get("add_bos") or spec.get("sentencepiece")), add_eos_token=False)
    return tokenizer, vocab


def sentencepiece_model(vocab: dict, pieces: int) -> bytes:
    """tokenizer.model (SentencePiece BPE, byte fallback) from the file's first `pieces` tokens, scores and types."""
    from sentencepiece import sentencepiece_model_pb2 as sp

    model = sp.ModelProto()
    special = {vocab["unk"]: UNKNOWN, vocab["bos"]: CONTROL, vocab["eos"]: CONTROL}
    for index in range(pieces):
        piece = model.pieces.add()
        piece.piece, piece.score = vocab["tokens"][index], vocab["scores"][index]
        piece.type = special.get(index, vocab["types"][index])
    trainer = model.trainer_spec
    trainer.model_type, trainer.vocab_size, trainer.byte_fallback = sp.TrainerSpec.BPE, pieces, True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = vocab["unk"], vocab["bos"], vocab["eos"], -1
    normalizer = model.normalizer_spec
    normalizer.name, normalizer.add_dummy_prefix = "identity", True
    normalizer.remove_extra_whitespaces, normalizer.escape_whitespaces = False, True
    return model.SerializeToString()


def config_fields(model_type: str, size: str | dict) -> dict:
    """The size's config fields; a named size skips what the family's config lacks (GPT-NeoX has no KV heads)."""
    from transformers import AutoConfig

    known = set(AutoConfig.for_model(model_type).to_dict())
    if "rope_parameters" in known:  # transformers 5 folds rope_theta into rope_parameters
        known.add("rope_theta")
    if isinstance(size, dict):
        unknown = sorted(set(size) - known)
        if unknown:
            raise SystemExit(f"size: {unknown} are not {model_type} config fields")
        return dict(size)
    if size not in SIZES:
        raise SystemExit(f"unknown size {size!r}; known: {', '.join(SIZES)} or a dict of config fields")
    return {key: value for key, value in SIZES[size].items() if key in known}


def build(family: str, out: Path | str, size: str | dict = "tiny", seed: int = 0) -> Path:
    """Write a random-weight model of `family` at `size` (a SIZES name or a dict of config fields) to `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if family not in FAMILIES:
        raise SystemExit(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    spec, out = FAMILIES[family], Path(out)
    tokenizer, vocab = load_tokenizer(family)
    end_of_turn = tokenizer.convert_tokens_to_ids(spec["end_of_turn"])
    bos = vocab["bos"]
    config = AutoConfig.for_model(spec["model_type"], vocab_size=len(vocab["tokens"]), **config_fields(spec["model_type"], size),
                                  tie_word_embeddings=spec.get("tie_word_embeddings", False),
                                  bos_token_id=bos, eos_token_id=end_of_turn, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if size == "0.5b" else torch.float32)
    stops = sorted({end_of_turn, *([tokenizer.convert_tokens_to_ids(t) for t in spec.get("also_stop", [])])})
    model.generation_config = GenerationConfig(bos_token_id=bos, pad_token_id=tokenizer.pad_token_id,
                                               eos_token_id=stops if len(stops) > 1 else stops[0], do_sample=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if spec.get("sentencepiece"):
        (out / "tokenizer.model").write_bytes(sentencepiece_model(vocab, spec["sentencepiece"]))
    reloaded = AutoTokenizer.from_pretrained(out)  # as every stage loads it: the family's own tokenizer class
    largest = max(reloaded.get_vocab().values())
    if largest >= config.vocab_size:
        raise SystemExit(f"{family}: token id {largest} ({reloaded.convert_ids_to_tokens(largest)!r}) is past the "
                         f"embedding's {config.vocab_size} rows")
    (out / "family.json").write_text(json.dumps({"family": family, "size": size, "seed": seed,
                                                 "parameters": model.num_parameters(), "end_of_turn": spec["end_of_turn"],
                                                 "end_of_turn_id": end_of_turn}, indent=2))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build(args.family, args.out, args.size, args.seed), file=sys.stderr)
