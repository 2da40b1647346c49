"""llama.cpp export: HF Llama folder -> GGUF (llama.cpp's convert_hf_to_gguf.py) -> quants -> scoring.

`LlamaCppLM` puts a loaded GGUF behind the two calls the evaluation code makes on a Hugging Face
model (`model(input_ids, attention_mask).logits` and `model.generate(...)`), so a GGUF is scored
by the evaluation stage's own code, with every logit and every generated token from llama.cpp.

Needs `scripts/install_llamacpp.sh VENV` (llama-cpp-python 0.3.36 + sentencepiece + the convert
script and its vendored gguf-py extracted from the sdist).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

from finetune.runtime.env import VERBOSE

log = logging.getLogger(__name__)

ENV_VAR = "LLAMACPP_CONVERT_DIR"
DEFAULT_CONVERT_DIR = Path(sys.prefix) / "llama.cpp"  # installed into the venv by scripts/install_llamacpp.sh

# The driver around llama.cpp's convert_hf_to_gguf.py (its two fixes are in its docstring), run by path
DRIVER = Path(__file__).with_name("llamacpp_convert.py")

# llama_ftype values (llama.h)
QTYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10,
          "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16,
          "q5_k_m": 17, "q6_k": 18, "bf16": 32}


def convert_script_dir(path: str | os.PathLike | None = None) -> Path:
    """Folder holding convert_hf_to_gguf.py, conversion/ and gguf-py/ (arg > $LLAMACPP_CONVERT_DIR > .venv/llama.cpp)."""
    d = Path(path or os.environ.get(ENV_VAR) or DEFAULT_CONVERT_DIR).resolve()
    if not (d / "convert_hf_to_gguf.py").is_file() or not (d / "gguf-py" / "gguf").is_dir():
        raise FileNotFoundError(f"llama.cpp convert script not found in {d}; run scripts/install_llamacpp.sh")
    return d


def _tmp_for(out: Path) -> Path:
    return out.with_name(f".{out.stem}.{os.getpid()}.tmp{out.suffix}")


def hf_to_gguf(model_dir, out_path, outtype: str = "f16", script_dir=None, timeout: float = 1800,
               model_name: str | None = None) -> Path:
    """Convert an HF model folder with llama.cpp's convert_hf_to_gguf.py (subprocess); atomic write.

    The GGUF's general.name is `model_name`, else the config's model_type: llama.cpp keys tokenizer behaviour on
    it (Phi-3's chat markers strip the whitespace after them only when the name says phi3, as its HF tokenizer
    does), and the converter would otherwise name the model after its folder (models/merged: "Merged")."""
    import json

    d, out = convert_script_dir(script_dir), Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_for(out)
    name = model_name or json.loads((Path(model_dir) / "config.json").read_text()).get("model_type") or Path(model_dir).name
    cmd = [sys.executable, str(DRIVER), str(d), str(model_dir), "--outfile", str(tmp), "--outtype", outtype,
           "--model-name", name]
    env = {**os.environ, "NO_LOCAL_GGUF": "1"}  # the driver puts the vendored gguf-py first itself
    log.info("converting %s -> %s (%s)", model_dir, out.name, outtype)
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0 or not tmp.is_file():
            raise RuntimeError(f"convert_hf_to_gguf failed (rc={r.returncode}):\n{r.stderr[-4000:]}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    if "-> 'gpt-2'" in r.stderr:
        log.info("BPE pre-tokenizer hash unknown to llama.cpp; verified GPT-2 byte-level -> tokenizer.ggml.pre=gpt-2")
    log.info("wrote %s (%.2f MB)", out.name, out.stat().st_size / 1e6)
    return out


@contextlib.contextmanager
def native_stderr():
    """Hold what native code writes to the process's stderr (llama.cpp prints a line per tensor, some
    straight to fd 2, past its log callback) and yield a function returning it, for an error message;
    with FINETUNE_VERBOSE it goes through as before."""
    if VERBOSE:
        yield lambda: ""
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lambda: (sink.seek(0), sink.read().decode(errors="replace"))[1]
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def quantize_gguf(src, dst, qtype: str, n_threads: int | None = None) -> Path:
    """Quantize an f32/f16 GGUF with llama.cpp (K-quants included); atomic write."""
    import llama_cpp

    ftype = QTYPES[qtype.lower()]
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_for(dst)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = n_threads or (os.cpu_count() or 1)
    try:
        with native_stderr() as output:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0 or not tmp.is_file():
            raise RuntimeError(f"llama_model_quantize({src}, {qtype}) returned {rc}:\n{output()[-4000:]}")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("quantized %s -> %s (%s, %.2f MB)", Path(src).name, dst.name, qtype, dst.stat().st_size / 1e6)
    return dst


def load(gguf_path, n_ctx: int = 512, n_threads: int | None = None):
    import llama_cpp

    # n_threads_batch too: llama-cpp-python defaults it to every core, and prompt batches on a busy
    # 2-core machine then stalled ~0.6 s each for seconds after loading (5 ms once both are 1)
    return llama_cpp.Llama(model_path=str(gguf_path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, verbose=False,
                           n_threads=n_threads or 1, n_threads_batch=n_threads or 1, seed=0)


def tokenize(llm, text: str, add_bos: bool = True) -> list[int]:
    """llama.cpp tokenization; add_bos=True means "as the model's metadata says" (add_bos_token)."""
    return llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)


def sequence_nll(llm, ids: list[int]) -> tuple[float, int]:
    """Summed NLL (nats) of ids[1:] given the prefix, and the number of scored tokens."""
    import numpy as np

    if len(ids) < 2:
        return 0.0, 0
    if len(ids) > llm.n_ctx():
        log.warning("truncating a %d-token sequence to n_ctx=%d", len(ids), llm.n_ctx())
        ids = ids[: llm.n_ctx()]
    llm.reset()
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
    logz = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
    tgt = np.asarray(ids[1:])
    return float((logz - logits[np.arange(len(tgt)), tgt]).sum()), len(tgt)


def generate(llm, prompt, max_tokens: int = 32) -> str:
    """Greedy (temperature 0) completion of a text prompt (special tokens parsed) or token ids."""
    if isinstance(prompt, str):
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        if llm._model.add_bos_token() and ids[:1] != [llm.token_bos()]:
            ids = [llm.token_bos()] + ids  # unless the chat template already rendered {{ bos_token }}
    else:
        ids = list(prompt)
    out = llm.create_completion(ids, max_tokens=max_tokens, temperature=0.0, top_k=1, seed=0)
    return out["choices"][0]["text"]


def load_and_score(gguf_path, texts, hf_tokenizer=None, n_ctx: int = 512, n_threads: int | None = None) -> dict:
    """Mean per-token NLL / perplexity over texts (str, tokenized by llama.cpp) or token-id lists.

    With hf_tokenizer, also reports whether llama.cpp tokenization equals the HF ids (incl. BOS)."""
    llm = load(gguf_path, n_ctx=n_ctx, n_threads=n_threads)
    total, n, match = 0.0, 0, None
    for t in texts:
        ids = tokenize(llm, t) if isinstance(t, str) else list(t)
        if hf_tokenizer is not None and isinstance(t, str):
            same = ids == list(hf_tokenizer(t)["input_ids"])
            match = same if match is None else (match and same)
            if not same:
                log.warning("tokenization differs for %r: llama.cpp %s vs HF %s", t, ids, hf_tokenizer(t)["input_ids"])
        s, k = sequence_nll(llm, ids)
        total, n = total + s, n + k
    nll = total / max(n, 1)
    res = {"gguf": str(gguf_path), "size_bytes": Path(gguf_path).stat().st_size, "n_tokens": n,
           "nll": nll, "ppl": math.exp(nll), "add_bos": bool(llm._model.add_bos_token()),
           "n_vocab": llm.n_vocab(), "tokenization_matches_hf": match}
    del llm
    return res


def tensor_types(gguf_path) -> dict[str, int]:
    """How many tensors of each type the file really holds (llama.cpp may fall back, e.g. Q4_K -> Q5_0)."""
    from collections import Counter

    from gguf import GGUFReader

    return dict(sorted(Counter(tensor.tensor_type.name for tensor in GGUFReader(str(gguf_path)).tensors).items()))


@dataclass(frozen=True)
class Decoding:
    """How LlamaCppLM.generate picks tokens and when it stops: transformers' generate() arguments of the same
    names, except `stop_ids` (eos_token_id: one id or a list) and a pad id that is never None."""
    max_new_tokens: int = 32
    min_new_tokens: int = 0
    stop_ids: frozenset[int] = frozenset()
    pad_token_id: int = 0
    do_sample: bool = False  # greedy unless set; then temperature and top_p
    temperature: float = 1.0
    top_p: float = 1.0
    num_return_sequences: int = 1
    prefix_allowed_tokens_fn: object = None  # transformers' (row, ids so far) -> allowed next ids: constrained decoding

    @classmethod
    def from_generate_kwargs(cls, eos_token_id=None, pad_token_id=None, **kwargs) -> Decoding:
        """From transformers-style keywords, as evaluation passes them; any other is an error, not ignored."""
        known = {field.name for field in fields(cls)} - {"stop_ids", "pad_token_id"}
        if unknown := sorted(set(kwargs) - known - MOOT):
            raise TypeError(f"LlamaCppLM.generate got {', '.join(unknown)}: it takes eos_token_id, pad_token_id "
                            f"and {', '.join(sorted(known))} (and ignores {', '.join(sorted(MOOT))})")
        stops = frozenset(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]) - {None}
        return cls(stop_ids=stops, pad_token_id=0 if pad_token_id is None else pad_token_id,
                   **{name: value for name, value in kwargs.items() if name not in MOOT})

    def sampler(self) -> dict:
        """llama.cpp's sampling arguments."""
        if self.do_sample:
            return {"temp": self.temperature, "top_p": self.top_p, "top_k": 0}
        return {"temp": 0.0, "top_k": 1}


# generate() keywords that mean nothing to llama.cpp: it always keeps its KV cache, and has no segment ids
MOOT = frozenset({"use_cache", "token_type_ids"})


class LlamaCppLM:
    """A GGUF model in llama.cpp, answering like a transformers causal LM (batch of token ids in, torch out).

    Each row of a batch is run on its own (reset, eval), padding removed via attention_mask; generation
    is greedy, or sampled with temperature/top_p when do_sample is set."""

    def __init__(self, gguf_path, generation_config=None, n_ctx: int = 512, n_threads: int = 1):
        self.llm = load(gguf_path, n_ctx=n_ctx, n_threads=n_threads)
        self.generation_config = generation_config
        self.argmax_by_sequence: dict[tuple, list[int]] = {}  # from every forward, so agreement needs no second pass

    def _ids(self, input_ids, attention_mask, row: int) -> list[int]:
        ids = input_ids[row].tolist()
        if attention_mask is not None:
            ids = [token for token, keep in zip(ids, attention_mask[row].tolist()) if keep]
        if len(ids) > self.llm.n_ctx():
            raise ValueError(f"a {len(ids)}-token sequence does not fit llama.cpp's n_ctx={self.llm.n_ctx()}")
        return ids

    def __call__(self, input_ids, attention_mask=None, **_):
        """Logits of every position; right padding (as evaluation batches it) gets zeros."""
        import types

        import torch

        logits = torch.zeros(*input_ids.shape, self.llm.n_vocab())
        for row in range(input_ids.shape[0]):
            ids = self._ids(input_ids, attention_mask, row)
            self.llm.reset()
            self.llm.eval(ids)
            scores = torch.from_numpy(self.llm.scores[: len(ids)].copy())
            logits[row, attention_mask[row].bool() if attention_mask is not None else slice(0, len(ids))] = scores
            self.argmax_by_sequence[tuple(ids)] = scores.argmax(-1).tolist()
        return types.SimpleNamespace(logits=logits)

    def generate(self, input_ids, attention_mask=None, decoding: Decoding | None = None, **generate_kwargs):
        """Like transformers: each prompt row (as given, padding kept) followed by its new tokens, then pad.
        Takes a Decoding, or transformers' keyword arguments (max_new_tokens=..., eos_token_id=...)."""
        import torch

        if decoding is not None and generate_kwargs:
            raise TypeError("LlamaCppLM.generate: pass a Decoding or keyword arguments, not both")
        decoding = decoding or Decoding.from_generate_kwargs(**generate_kwargs)
        # sampling reads the context's last logits: skip every position's, as a deployed llama.cpp does
        self.llm._logits_all = False
        try:
            rows = self._generate(input_ids, attention_mask, decoding)
        finally:
            self.llm._logits_all = True
        width = max(len(row) for row in rows)
        return torch.tensor([row + [decoding.pad_token_id] * (width - len(row)) for row in rows])

    @staticmethod
    def _constrain(decoding: Decoding, prompt: list[int], context: int, row: int):
        """llama.cpp's logits processor for `prefix_allowed_tokens_fn`: called, as transformers calls it, with the
        prompt row as given (padding kept) and the tokens generated so far, the `context` ones before them aside."""
        if decoding.prefix_allowed_tokens_fn is None:
            return None
        import numpy as np
        import torch

        def mask(tokens, scores):
            new = [int(token) for token in tokens[context:]]
            allowed = decoding.prefix_allowed_tokens_fn(row, torch.tensor(prompt + new))
            kept = np.full_like(scores, -np.inf)
            kept[allowed] = scores[allowed]
            return kept

        return [mask]

    def _generate(self, input_ids, attention_mask, decoding: Decoding) -> list[list[int]]:
        rows = []
        for row in range(input_ids.shape[0]):
            ids = self._ids(input_ids, attention_mask, row)
            for sample in range(decoding.num_return_sequences):
                self.llm.reset()
                self.llm.set_seed(sample)
                new: list[int] = []
                for token in self.llm.generate(ids, repeat_penalty=1.0, min_p=0.0, **decoding.sampler(),
                                               logits_processor=self._constrain(decoding, input_ids[row].tolist(),
                                                                                len(ids), row)):
                    if token in decoding.stop_ids and len(new) >= decoding.min_new_tokens:
                        new.append(token)
                        break
                    new.append(token)
                    if len(new) >= decoding.max_new_tokens or len(ids) + len(new) >= self.llm.n_ctx():
                        break
                rows.append(input_ids[row].tolist() + new)
        return rows
