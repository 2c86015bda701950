"""Training stages on Ray Train + DeepSpeed: the shared per-worker loop (``loop``), the DeepSpeed config
builder (``deepspeed``), checkpoints (``checkpoint``), the exactly-once sample order (``sampler``), and one
module per stage (``pretrain``). Importing this package imports nothing heavy.
"""
