"""llama.cpp's convert_hf_to_gguf.py with two fixes, in a fresh interpreter (llamacpp.hf_to_gguf runs this file):

    python finetune/export/llamacpp_convert.py SCRIPT_DIR <convert_hf_to_gguf.py arguments>...

SCRIPT_DIR holds convert_hf_to_gguf.py, conversion/ and gguf-py/ (scripts/install_llamacpp.sh).
- convert_hf_to_gguf.py identifies BPE pre-tokenizers by hashing the token ids of a fixed string; a freshly
  trained vocab has an unknown hash, so it raises NotImplementedError. Our tokenizer is a plain GPT-2 byte-level
  BPE (ByteLevel pre-tokenizer with the GPT-2 regex, no normalizer), which is exactly llama.cpp's "gpt-2"
  pre-tokenizer. Only in that verified case is the unknown hash mapped to "gpt-2"; every known hash still goes
  through llama.cpp's own table, anything else still fails loudly.
- transformers 5 saves GPT-NeoX's rotary_pct as rope_parameters.partial_rotary_factor; the converter reads
  rotary_pct.
"""
import json
import logging
import sys

GPT2_NOTE = "llamacpp driver: unknown BPE hash, GPT-2 byte-level pre-tokenizer -> 'gpt-2'"  # hf_to_gguf reads it


def is_gpt2_byte_level(tokenizer: dict) -> bool:
    """Whether a tokenizer.json describes GPT-2's byte-level BPE pre-tokenization, llama.cpp's "gpt-2"."""
    pre = tokenizer.get("pre_tokenizer") or {}
    return (tokenizer.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False))


def with_rotary_pct(hparams: dict) -> dict:
    """A GPT-NeoX config as transformers 5 saves it, with the rotary_pct the converter reads."""
    rope = hparams.get("rope_parameters") or {}
    if hparams.get("model_type") == "gpt_neox" and "rotary_pct" not in hparams and "partial_rotary_factor" in rope:
        hparams["rotary_pct"] = rope["partial_rotary_factor"]
    return hparams


def patch(text_model, model_base) -> None:
    """Both fixes, on the converter's TextModel and ModelBase classes."""
    original_pre = text_model.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):
        if not is_gpt2_byte_level(json.loads((self.dir_model / "tokenizer.json").read_text(encoding="utf-8"))):
            return original_pre(self, tokenizer)
        converter_log = logging.getLogger("hf-to-gguf")
        level = converter_log.level
        converter_log.setLevel(logging.ERROR)  # hide the "not recognized" banner for this verified case
        try:
            return original_pre(self, tokenizer)
        except NotImplementedError:
            print(GPT2_NOTE, file=sys.stderr)
            return "gpt-2"
        finally:
            converter_log.setLevel(level)

    original_load_hparams = model_base.load_hparams

    def load_hparams(*args, **kwargs):
        return with_rotary_pct(original_load_hparams(*args, **kwargs))

    text_model.get_vocab_base_pre = get_vocab_base_pre
    model_base.load_hparams = staticmethod(load_hparams)


def main(argv: list[str]) -> None:
    script_dir = argv[1]
    # the converter's folders in place of this file's own (which holds the library's modules, not the converter's)
    sys.path[:1] = [script_dir, script_dir + "/gguf-py"]
    import convert_hf_to_gguf  # lazy: importable only once script_dir is on sys.path
    from conversion.base import ModelBase, TextModel

    patch(TextModel, ModelBase)
    sys.argv = ["convert_hf_to_gguf.py", *argv[2:]]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main(sys.argv)
