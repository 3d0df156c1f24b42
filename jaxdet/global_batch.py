"""Global-batch semantics under data parallelism: what a loss needs to not see the device split.

A train step over D devices at global batch B must compute the update of one device at batch
B (jaxdet.train.parallel runs `train_step` per device under the axis `AXIS` and averages the
gradients with `pmean`). Three things would otherwise depend on D, and each has its helper here:

* randomness: the step's key is the same on every device; per-example keys come from the
  example's global index (`example_keys`, `example_index`), never from the device index;
* loss normalisers: a mean over sampled RoIs, anchors or objects divides the device's sum by
  the mean count per device (`normaliser`, `masked_mean`), so that the `pmean` of the device
  losses (and gradients) is the sum over the global batch divided by the global count;
* batch statistics: BatchNorm takes `axis_name=bound_axis()` (jaxdet.models.backbones.batch_norm)
  and dropout draws each row's mask from its global row (jaxdet.models.backbones.Dropout).

Every helper asks `bound_axis()` whether the trace runs under the data axis (shard_map, pmap,
or a vmap with that axis name); outside it they reduce to the one-device computation, so a
`System.loss` is one function for both cases and its callers pass nothing extra.

Rows must be example-major with a fixed count per example (the RoIs, windows or crops of
image 0, then image 1, ...), as every detector's flattening is: then the global row of local
row i on device d is d * n_local + i.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

AXIS = "data"   # the device axis of jaxdet.train.parallel


def bound_axis(axis_name: str = AXIS) -> str | None:
  """`axis_name` if the current trace runs under that named axis, else None (trace time)."""
  try:
    jax.lax.axis_index(axis_name)
  except NameError:   # "unbound axis name"
    return None
  return axis_name


def num_shards() -> int:
  """D, the number of devices the global batch is split over (1 outside the data axis)."""
  axis = bound_axis()
  return 1 if axis is None else int(jax.lax.axis_size(axis))


def example_index(n: int) -> Array:
  """i32[n] global indices of this device's n rows: axis_index * n + arange(n)."""
  axis = bound_axis()
  offset = 0 if axis is None else jax.lax.axis_index(axis) * n
  return offset + jnp.arange(n, dtype=jnp.int32)


def example_keys(rng: Array, n: int) -> Array:
  """key[n]: fold_in(rng, global index) for this device's n examples (or rows).

  With the same `rng` on every device, example j of the global batch gets the same key
  whatever the split. Replaces `jax.random.split(rng, n)`, whose keys depend on n.
  """
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(example_index(n))


def device_mean(x: Array) -> Array:
  """The mean of `x` over the devices of the data axis (x itself outside it)."""
  axis = bound_axis()
  return x if axis is None else jax.lax.pmean(x, axis)


def normaliser(count: Array) -> Array:
  """f32[]: the denominator for a sum over this device's part of a global mean.

  count: this device's number of terms (sampled RoIs, anchors, objects). Returns the mean of
  the counts over the devices, or 1 where every count is 0 (the sums are then 0 too), so that
  pmean_d(sum_d / normaliser) = sum over the global batch / global count, with one device
  giving sum / max(count, 1).
  """
  mean = device_mean(jnp.asarray(count, jnp.float32))
  return jnp.where(mean > 0, mean, 1.0)


def masked_mean(values: Array, mask: Array | None = None) -> Array:
  """f32[]: this device's share of the mean of `values` over the mask's True entries of the
  global batch (see `normaliser`); the one-device value is jaxdet.losses.masked_mean's.

  values: f[...]; mask: bool broadcastable to values (None = all entries count).
  """
  values = values.astype(jnp.float32)
  if mask is None:
    mask = jnp.ones((), bool)
  full = jnp.broadcast_to(mask, jnp.broadcast_shapes(mask.shape, values.shape))
  total = jnp.sum(jnp.where(full, values, 0.0))
  return total / normaliser(jnp.sum(full))
