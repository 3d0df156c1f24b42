"""TrainState, optimizers, pure train/eval steps, the loop, data parallelism, checkpoints.

Imports only jax, flax, optax, orbax and numpy (tensorboardX and tqdm are optional, lazily).
"""

from jaxdet.train.loop import evaluate, make_runner, train_and_evaluate
from jaxdet.train.optim import make_optimizer, make_schedule
from jaxdet.train.state import TrainState, create_train_state
from jaxdet.train.step import eval_step, make_steps, train_step

__all__ = ["TrainState", "create_train_state", "eval_step", "evaluate", "make_optimizer",
           "make_runner", "make_schedule", "make_steps", "train_and_evaluate", "train_step"]
