"""Training: state, steps, per-stage loops, checkpointing, metrics and distributed setup."""
