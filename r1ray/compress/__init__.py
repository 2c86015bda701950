"""Compression: structured pruning (``prune``), torchao INT8/FP8 weight quantization (``quantize``), GGUF files
for llama.cpp (``gguf``), speed measurements (``measure``), and the job (``config``, ``run``) that evaluates the
base and the compressed model with the evaluation job and publishes only what passes the quality gate
(``gate``). See docs/compress.md.
"""
