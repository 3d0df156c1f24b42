"""Write your own loss: a loss term of your own, named in the config by its dotted path.

    python -m experiments.train --config experiments/configs/faster_rcnn.py:cpu --workdir W \
        --config.model.loss.rpn_objectness=experiments.own_loss_example:objectness_focal

README's "Write your own loss" section shows the function below; tests/test_own_loss.py checks
it against a float64 NumPy focal loss and that Faster R-CNN trains with it.
"""

# --- README: Write your own loss ---
import jax
import jax.numpy as jnp


def objectness_focal(logits, targets, mask):
  """A "binary" term: focal loss (Lin et al. 2017, gamma 2, no alpha) per anchor.

  logits f32[N], targets f32[N] in {0, 1}, mask bool[N] -> f32[N], 0 outside the mask.
  """
  x = jnp.where(mask, logits, 0.0)                 # masked entries may hold anything, NaN too
  z = jnp.where(targets > 0.5, x, -x)              # the logit of the true outcome
  ce = -jax.nn.log_sigmoid(z)                      # -log p_t
  return jnp.where(mask, jax.nn.sigmoid(-z) ** 2 * ce, 0.0)   # (1 - p_t)^2 (-log p_t)
# --- end ---
