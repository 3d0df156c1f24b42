"""Fixed-size balanced sampling of positive and negative rows (Fast/Faster R-CNN minibatches).

At most floor(num_samples * positive_fraction) positives are drawn uniformly at random without
replacement; negatives, drawn the same way, fill the rest up to num_samples (so with few
positives there are more negatives), as py-faster-rcnn and torchvision's
`BalancedPositiveNegativeSampler` do. Shapes are static: the draw gives every eligible row an
independent random 31-bit key and takes the rows with the largest keys by `lax.top_k`.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from jaxdet import checks


def _check(key: jax.Array, labels: jax.Array, num_samples: int,
           positive_fraction: float) -> None:
  checks.check_array("labels", labels, ndim=1, dtype_kind="iu")
  if not hasattr(key, "shape"):
    raise TypeError(f"key: expected a PRNG key array, got {key!r}")
  if not isinstance(num_samples, numbers.Integral) or isinstance(num_samples, bool):
    raise TypeError(f"num_samples: expected a Python int, got {num_samples!r}")
  checks.check_positive("num_samples", num_samples)
  if (not isinstance(positive_fraction, numbers.Real) or isinstance(positive_fraction, bool)
      or not 0.0 <= positive_fraction <= 1.0):
    raise ValueError(f"positive_fraction: expected a number in [0, 1], "
                     f"got {positive_fraction!r}")


def _random_rows(key: jax.Array, eligible: jax.Array, k: int) -> jax.Array:
  """k row indices i32[k]: the eligible rows first, in uniformly random order (needs k <= N)."""
  bits = jax.random.bits(key, eligible.shape, jnp.uint32)            # [N]
  score = jnp.where(eligible, (bits >> 1).astype(jnp.int32), -1)    # [N]; -1 = not eligible
  _, rows = jax.lax.top_k(score, k)                                  # [k]
  return rows.astype(jnp.int32)


def _pad(x: jax.Array, size: int) -> jax.Array:
  return jnp.concatenate([x, jnp.zeros((size - x.shape[0],), x.dtype)])


def sample_balanced(key: jax.Array, labels: jax.Array, num_samples: int,
                    positive_fraction: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Draws a balanced minibatch of rows.

  Args:
    key: a PRNG key.
    labels: i32[N] in {1 positive, 0 negative, -1 ignore} (e.g. from `match_boxes`).
    num_samples: S, the minibatch capacity (static).
    positive_fraction: the largest share of positives (static), e.g. 0.25 or 0.5.
  Returns:
    indices: i32[S] rows into `labels`: the drawn positives first, then the negatives, then
      padding (index 0);
    valid: bool[S], False for padding (fewer than S eligible rows);
    is_positive: bool[S].
  """
  _check(key, labels, num_samples, positive_fraction)
  n, s = labels.shape[0], num_samples
  max_pos = int(s * positive_fraction)
  key_pos, key_neg = jax.random.split(key)
  pos, neg = labels == 1, labels == 0                                # [N] each
  num_pos = jnp.minimum(jnp.sum(pos), max_pos)                       # []
  num_neg = jnp.minimum(jnp.sum(neg), s - num_pos)                   # []
  pos_rows = _pad(_random_rows(key_pos, pos, min(max_pos, n)), s)    # [S]
  neg_rows = _pad(_random_rows(key_neg, neg, min(s, n)), s)          # [S]
  slot = jnp.arange(s)                                               # [S]
  is_positive = slot < num_pos
  valid = slot < num_pos + num_neg
  neg_part = neg_rows[jnp.clip(slot - num_pos, 0, s - 1)]            # [S]
  indices = jnp.where(is_positive, pos_rows, jnp.where(valid, neg_part, 0))
  return indices.astype(jnp.int32), valid, is_positive


def balanced_sample_mask(key: jax.Array, labels: jax.Array, num_samples: int,
                         positive_fraction: float) -> tuple[jax.Array, jax.Array]:
  """The rows of `sample_balanced` as masks (the same key draws the same rows).

  Args:
    key, labels, num_samples, positive_fraction: as in `sample_balanced`.
  Returns:
    pos_mask: bool[N], the drawn positives (at most floor(num_samples * positive_fraction));
    neg_mask: bool[N], the drawn negatives (pos + neg <= num_samples, = when enough exist).
  """
  indices, valid, is_positive = sample_balanced(key, labels, num_samples, positive_fraction)
  n = labels.shape[0]
  empty = jnp.zeros((n,), bool)
  pos_mask = empty.at[jnp.where(valid & is_positive, indices, n)].set(True, mode="drop")
  neg_mask = empty.at[jnp.where(valid & ~is_positive, indices, n)].set(True, mode="drop")
  return pos_mask, neg_mask
