"""Training service: DeepSpeed config rendering, engine, EMA, checkpoints, metrics, loop."""
