"""End-to-end: tiny HF Llama -> llama.cpp GGUF (f16, q8_0, q4_k_m) -> load, tokenize, score, generate; and
the converter driver's fixes and the generation settings on their own."""
import dataclasses
import json
import math
import random
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import GPTNeoXConfig, LlamaConfig

from finetune.export import llamacpp, llamacpp_convert

CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ("the quick brown fox jumps over a lazy dog while small language models learn from data and "
         "we like to read books write code train networks measure loss tune rates sunny days rain").split()


def _texts(n, seed):
    r = random.Random(seed)
    return [" ".join(r.choice(WORDS) for _ in range(r.randint(6, 16))).capitalize() + r.choice([".", "!", "?"])
            for _ in range(n)]


def _build_tiny_model(d):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    train = _texts(500, seed=0)
    tok.train_from_iterator(train, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
        special_tokens=[("<|bos|>", tok.token_to_id("<|bos|>"))])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|im_end|>",
                                     pad_token="<|pad|>", unk_token=None, chat_template=CHATML)
    cfg = LlamaConfig(vocab_size=len(hf_tok), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
                      pad_token_id=hf_tok.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    # a few optimizer steps so the logits are not near-uniform (random weights hide quantization error)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = hf_tok(train[:64], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for _ in range(30):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(d, safe_serialization=True)
    hf_tok.save_pretrained(d)
    return model.eval(), hf_tok


def _hf_ppl(model, hf_tok, texts):
    total, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = hf_tok(t, return_tensors="pt")["input_ids"]
            k = ids.shape[1] - 1
            total += model(ids, labels=ids).loss.item() * k
            n += k
    return math.exp(total / n)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    try:
        llamacpp.convert_script_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    d = tmp_path_factory.mktemp("llamacpp")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model; a shared 2-core box is far slower with 2 torch threads
    model, hf_tok = _build_tiny_model(d / "hf")
    f16 = llamacpp.hf_to_gguf(d / "hf", d / "model-f16.gguf", outtype="f16")
    files = {"f16": f16}
    for q in ("q8_0", "q4_k_m"):
        files[q] = llamacpp.quantize_gguf(f16, d / f"model-{q}.gguf", q)
    yield model, hf_tok, files
    torch.set_num_threads(threads)


def test_export_tokenize_and_perplexity(exported):
    model, hf_tok, files = exported
    in_domain = _texts(8, seed=123)
    texts = in_domain + ["Hello, world! It's 2024: café, naïve, 3.14 -- ok?", "  two  spaces\nand a newline"]
    assert _hf_ppl(model, hf_tok, in_domain) < 0.5 * len(hf_tok)  # trained a little: clearly not uniform
    hf_ppl = _hf_ppl(model, hf_tok, texts)
    res = {k: llamacpp.load_and_score(p, texts, hf_tokenizer=hf_tok) for k, p in files.items()}
    for k, r in res.items():
        assert r["tokenization_matches_hf"] is True, k
        assert r["add_bos"] is True, k
        assert r["n_vocab"] == len(hf_tok), k
        assert math.isfinite(r["ppl"]), k
    print({"hf": hf_ppl, **{k: (r["ppl"], r["size_bytes"]) for k, r in res.items()}})
    assert abs(res["f16"]["ppl"] / hf_ppl - 1) < 0.01
    assert abs(res["q8_0"]["ppl"] / res["f16"]["ppl"] - 1) < 0.02
    assert abs(res["q4_k_m"]["ppl"] / res["f16"]["ppl"] - 1) < 0.15
    assert files["q4_k_m"].stat().st_size < files["q8_0"].stat().st_size < files["f16"].stat().st_size


def test_generate_greedy_matches_hf(exported):
    model, hf_tok, files = exported
    prompt = hf_tok.apply_chat_template([{"role": "user", "content": "the quick brown fox"}],
                                        tokenize=False, add_generation_prompt=True)
    ids = hf_tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == hf_tok.bos_token_id and (ids[0] == hf_tok.bos_token_id).sum() == 1
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=hf_tok.eos_token_id,
                             pad_token_id=hf_tok.pad_token_id)
    hf_text = hf_tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    llm = llamacpp.load(files["f16"])
    a = llamacpp.generate(llm, prompt, max_tokens=8)
    assert a == llamacpp.generate(llm, ids[0].tolist(), max_tokens=8)
    assert a == hf_text


def test_gguf_is_named_after_the_architecture_not_the_folder(exported):
    """llama.cpp keys tokenizer behaviour on general.name (Phi-3's chat markers strip the whitespace after them
    only when it says phi3); the converter would name the model after its folder ("Hf", "Merged")."""
    llm = llamacpp.load(exported[2]["f16"])
    assert llm.metadata["general.name"] == "llama"


def test_no_stray_temp_files(exported):
    files = exported[2]
    parent = files["f16"].parent
    assert not [p for p in parent.iterdir() if ".tmp" in p.name]


def test_generate_takes_a_decoding_or_transformers_keywords(exported):
    model, hf_tok, files = exported
    ids = hf_tok("The quick brown fox", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=hf_tok.eos_token_id,
                                  pad_token_id=hf_tok.pad_token_id)
    lm = llamacpp.LlamaCppLM(files["f16"])
    by_keywords = lm.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=hf_tok.eos_token_id,
                              pad_token_id=hf_tok.pad_token_id, use_cache=True)
    decoding = llamacpp.Decoding(max_new_tokens=6, stop_ids=frozenset({hf_tok.eos_token_id}),
                                 pad_token_id=hf_tok.pad_token_id)
    assert by_keywords.tolist() == lm.generate(ids, decoding=decoding).tolist() == expected.tolist()
    with pytest.raises(TypeError, match="not both"):
        lm.generate(ids, decoding=decoding, max_new_tokens=6)


def test_llamacpp_constrained_decoding_follows_the_same_table_as_transformers(exported):
    """The quantize stage scores GGUF files with the evaluate stage's code: constrained decoding reaches llama.cpp as a
    logits processor and gives the f16 file the labels transformers gives the model it came from."""
    from finetune.evaluation import scoring

    model, hf_tok, files = exported
    prompts = [hf_tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
               for text in ["the quick brown fox", "a b c d e", "which team handles refunds"]]
    choices = ["the quick", "brown", "fox jumps over"]
    continuations = [hf_tok(choice + "\n", add_special_tokens=False)["input_ids"] for choice in choices]
    allowed = {}
    for continuation in continuations:
        for position, token in enumerate(continuation):
            allowed.setdefault(tuple(continuation[:position]), set()).add(token)
    allowed = {prefix: sorted(tokens) for prefix, tokens in allowed.items()}
    expected = scoring.generate(model, hf_tok, prompts, 10, batch_size=3, allowed=allowed)
    lm = llamacpp.LlamaCppLM(files["f16"], generation_config=model.generation_config)
    assert scoring.generate(lm, hf_tok, prompts, 10, batch_size=3, allowed=allowed) == expected
    assert all(answer in choices for answer in expected), expected


def test_decoding_from_transformers_keywords():
    decoding = llamacpp.Decoding.from_generate_kwargs(max_new_tokens=4, eos_token_id=[2, 7, None], pad_token_id=None,
                                                      use_cache=True, do_sample=True, temperature=0.8, top_p=0.9,
                                                      num_return_sequences=3)
    assert decoding == llamacpp.Decoding(max_new_tokens=4, stop_ids=frozenset({2, 7}), pad_token_id=0, do_sample=True,
                                         temperature=0.8, top_p=0.9, num_return_sequences=3)
    assert decoding.sampler() == {"temp": 0.8, "top_p": 0.9, "top_k": 0}
    greedy = llamacpp.Decoding.from_generate_kwargs(eos_token_id=5, pad_token_id=1, do_sample=False)
    assert greedy.stop_ids == {5} and greedy.pad_token_id == 1 and greedy.sampler() == {"temp": 0.0, "top_k": 1}
    assert llamacpp.Decoding.from_generate_kwargs().stop_ids == frozenset()
    with pytest.raises(TypeError, match="top_k"):  # would have been ignored silently: llama.cpp's top_k is fixed
        llamacpp.Decoding.from_generate_kwargs(top_k=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        greedy.max_new_tokens = 9


def byte_level_tokenizer(normalizer=None, **options) -> dict:
    """A tokenizer.json as the tokenizers library writes it."""
    tokenizer = Tokenizer(models.BPE())
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(**{"add_prefix_space": False, "use_regex": True, **options})
    return json.loads(tokenizer.to_str())


def test_driver_maps_only_a_plain_gpt2_byte_level_tokenizer_to_gpt2():
    assert llamacpp_convert.is_gpt2_byte_level(byte_level_tokenizer())
    assert not llamacpp_convert.is_gpt2_byte_level(byte_level_tokenizer(add_prefix_space=True))
    assert not llamacpp_convert.is_gpt2_byte_level(byte_level_tokenizer(use_regex=False))
    assert not llamacpp_convert.is_gpt2_byte_level(byte_level_tokenizer(normalizers.NFC()))
    metaspace = Tokenizer(models.BPE())
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace()
    assert not llamacpp_convert.is_gpt2_byte_level(json.loads(metaspace.to_str()))


def test_driver_gives_the_converter_gpt_neox_rotary_pct():
    neox = GPTNeoXConfig(rotary_pct=0.25, hidden_size=64, num_attention_heads=4, num_hidden_layers=1).to_dict()
    assert "rotary_pct" not in neox and llamacpp_convert.with_rotary_pct(neox)["rotary_pct"] == 0.25
    llama = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1).to_dict()
    assert llamacpp_convert.with_rotary_pct(dict(llama)) == llama


def test_driver_runs_the_converter_by_path():
    try:
        script_dir = llamacpp.convert_script_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    result = subprocess.run([sys.executable, str(llamacpp.DRIVER), str(script_dir), "--help"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "--outtype" in result.stdout, result.stderr[-2000:]
