"""jaxdet.ops.sampling: counts, eligibility, consistency, determinism and uniformity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet.ops import sampling as Sm

NUM_SAMPLES, FRACTION = 16, 0.25


def random_labels(rng, n, p_pos, p_neg):
  u = rng.random(n)
  return np.where(u < p_pos, 1, np.where(u < p_pos + p_neg, 0, -1)).astype(np.int32)


@jax.jit
def draw(keys, labels):
  """Both entry points over a batch of (key, labels) with S = 16, fraction 0.25."""
  f = lambda k, l: (Sm.sample_balanced(k, l, NUM_SAMPLES, FRACTION),
                    Sm.balanced_sample_mask(k, l, NUM_SAMPLES, FRACTION))
  return jax.vmap(f)(keys, labels)


@pytest.mark.parametrize("n", [10, 60])
def test_counts_eligibility_and_consistency(rng, n):
  # Many positives, few positives, no positives, only ignored rows, mixed.
  labels = np.stack([random_labels(rng, n, 0.5, 0.4), random_labels(rng, n, 0.03, 0.9),
                     random_labels(rng, n, 0.0, 0.5), np.full(n, -1, np.int32),
                     random_labels(rng, n, 0.2, 0.2)])
  labels[1, 0] = 1
  keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), len(labels))
  (indices, valid, is_pos), (pos_mask, neg_mask) = jax.tree.map(np.asarray, draw(keys, labels))
  assert indices.shape == (5, NUM_SAMPLES) and indices.dtype == np.int32
  max_pos = int(NUM_SAMPLES * FRACTION)
  for k, lab in enumerate(labels):
    num_pos = min(int((lab == 1).sum()), max_pos)
    num_neg = min(int((lab == 0).sum()), NUM_SAMPLES - num_pos)
    # Counts, positives first, then negatives, then padding.
    np.testing.assert_array_equal(is_pos[k], np.arange(NUM_SAMPLES) < num_pos)
    np.testing.assert_array_equal(valid[k], np.arange(NUM_SAMPLES) < num_pos + num_neg)
    assert pos_mask[k].sum() == num_pos and neg_mask[k].sum() == num_neg
    # Only eligible rows, each at most once; padding points at row 0.
    chosen = indices[k][valid[k]]
    assert len(set(chosen.tolist())) == len(chosen)
    assert np.all(lab[indices[k][is_pos[k]]] == 1)
    assert np.all(lab[indices[k][valid[k] & ~is_pos[k]]] == 0)
    np.testing.assert_array_equal(indices[k][~valid[k]], 0)
    # The masks hold the same rows as the indices.
    np.testing.assert_array_equal(np.flatnonzero(pos_mask[k]),
                                  np.sort(indices[k][is_pos[k]]))
    np.testing.assert_array_equal(np.flatnonzero(neg_mask[k]),
                                  np.sort(indices[k][valid[k] & ~is_pos[k]]))


def test_same_key_same_draw_other_key_other_draw(rng):
  labels = np.tile(random_labels(rng, 60, 0.3, 0.6), (5, 1))   # the shapes of the test above
  labels[:, :8] = [1, 1, 1, 1, 1, 1, 0, 0]                  # enough of both to choose among
  key = jax.random.key(7)
  keys = jnp.stack([key, key, jax.random.key(8), key, key])
  (indices, _, _), _ = draw(keys, labels)
  np.testing.assert_array_equal(indices[0], indices[1])
  assert not np.array_equal(indices[0], indices[2])
  # A raw uint32 key works too.
  raw = jax.jit(Sm.sample_balanced, static_argnums=(2, 3))(jax.random.PRNGKey(3), labels[0],
                                                           8, 0.5)
  assert raw[0].shape == (8,) and bool(np.all(labels[0][np.asarray(raw[0])[raw[1]]] >= 0))


def test_draws_are_roughly_uniform():
  # 10 positives of which 4 are drawn, 30 negatives of which 12 are drawn, over many keys:
  # each positive is drawn with probability 0.4, each negative with 0.4.
  labels = np.array([1] * 10 + [0] * 30 + [-1] * 20, np.int32)
  trials = 1500
  keys = jax.random.split(jax.random.key(0), trials)
  _, (pos_mask, neg_mask) = draw(keys, np.broadcast_to(labels, (trials, labels.size)))
  pos_counts = np.asarray(pos_mask).sum(0)
  neg_counts = np.asarray(neg_mask).sum(0)
  assert np.all(pos_counts[10:] == 0) and np.all(neg_counts[:10] == 0)
  assert np.all(neg_counts[40:] == 0)
  for counts in (pos_counts[:10], neg_counts[10:40]):
    expected = trials * 0.4
    chi2 = np.sum((counts - expected) ** 2 / expected)
    # A loose bound: chi-square with 9 or 29 degrees of freedom stays far below 3 * dof + 30.
    assert chi2 < 3 * (len(counts) - 1) + 30, (chi2, counts)


def test_bad_arguments_raise():
  key, labels = jax.random.key(0), jnp.zeros(5, jnp.int32)
  with pytest.raises(ValueError, match="positive_fraction: expected a number in \\[0, 1\\]"):
    Sm.sample_balanced(key, labels, 4, 1.5)
  with pytest.raises(ValueError, match="num_samples: expected values > 0"):
    Sm.balanced_sample_mask(key, labels, 0, 0.5)
  with pytest.raises(TypeError, match="num_samples: expected a Python int"):
    Sm.sample_balanced(key, labels, 4.0, 0.5)
  with pytest.raises(TypeError, match="labels: expected a signed integer or unsigned integer"):
    Sm.sample_balanced(key, jnp.zeros(5), 4, 0.5)
  with pytest.raises(ValueError, match="labels: expected rank 1"):
    Sm.sample_balanced(key, jnp.zeros((2, 5), jnp.int32), 4, 0.5)
