"""Deployable artifacts: GGUF through llama.cpp, GPTQ and AWQ through GPTQModel."""
