"""Training: the loop (``trainer``), the step pipeline, checkpoints and exact resume, data parallel and
FSDP2 sharding, LoRA, and the metric loggers."""
