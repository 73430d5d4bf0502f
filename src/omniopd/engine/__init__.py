"""The model engine: loading models (HF, GGUF, packaged wheels), chat prompts, sampling and decoding, the
forward pass over response tokens, and the alignment of two tokenizations."""
