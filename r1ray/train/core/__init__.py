"""The loop machinery every training stage shares: the per-worker loop, the driver and the TorchTrainer launch,
checkpoints, fault injection, the exactly-once sampler, the DeepSpeed config, preflight checks, optimizers,
chunked losses, FLOPs accounting and the configs of the loop's blocks. No stage lives here."""
