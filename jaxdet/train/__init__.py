"""TrainState, optimizers, pure train/eval steps, the loop, data parallelism, checkpoints."""
