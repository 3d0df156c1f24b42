"""Loss terms a user would write, given to systems by dotted path ("custom_terms:<name>") in
the tests that check that `config.model.loss.<term>` is the function trained with.

Each is twice a built-in term of its kind (jaxdet.losses, "Loss terms"), so a system trained
with it reports `loss/<term>` twice the built-in's value on the same variables, batch and key,
and every call is counted in CALLS (traced calls: once per trace).
"""

from jaxdet import losses

CALLS: dict[str, int] = {}


def _count(name):
  CALLS[name] = CALLS.get(name, 0) + 1


def doubled_class(logits, labels, mask):
  """2 x softmax cross-entropy (a "class" term)."""
  _count("doubled_class")
  return 2.0 * losses.softmax_cross_entropy(logits, labels, mask)


def doubled_binary(predictions, targets, mask):
  """2 x sigmoid binary cross-entropy (a "binary" term)."""
  _count("doubled_binary")
  return 2.0 * losses.sigmoid_binary_cross_entropy(predictions, targets, mask)


def doubled_squared_error(predictions, targets, mask):
  """2 x squared error (a "binary" term, YOLO's confidences)."""
  _count("doubled_squared_error")
  return 2.0 * losses.squared_error(predictions, targets, mask)


def doubled_squared_error_onehot(logits, labels, mask):
  """2 x YOLO's class term (a "class" term)."""
  _count("doubled_squared_error_onehot")
  return 2.0 * losses.squared_error_onehot(logits, labels, mask)


def doubled_box(predictions, targets, mask, *, decode):
  """2 x smooth L1 (a "box" term); checks that `decode` gives boxes of the same shape."""
  _count("doubled_box")
  assert decode(predictions).shape == predictions.shape
  return 2.0 * losses.box_smooth_l1(predictions, targets, mask, decode=decode)


def doubled_box_l2(predictions, targets, mask, *, decode):
  """2 x the summed squared error (a "box" term)."""
  _count("doubled_box_l2")
  assert decode(predictions).shape == predictions.shape
  return 2.0 * losses.box_l2(predictions, targets, mask, decode=decode)


def assert_doubled(loss_fn, term, path, want_total, want, terms):
  """`loss_fn` (a system's jitted loss, curried to its variables, batch and key), built with
  `model.loss.<term>` = `path` (one of the functions above), gives twice the built-in's
  `loss/<term>` (`want`, `want_total`: the system with the built-in), the total rises by
  exactly that, the terms `terms` add up to the total, and the function was called."""
  import numpy as np
  name = path.split(":")[1]
  calls = CALLS.get(name, 0)
  total, got, _ = loss_fn()
  assert CALLS.get(name, 0) > calls, f"{path} was not called"
  assert float(want[f"loss/{term}"]) > 0
  np.testing.assert_allclose(float(got[f"loss/{term}"]), 2 * float(want[f"loss/{term}"]),
                             rtol=1e-5)
  np.testing.assert_allclose(float(total) - float(want_total), float(want[f"loss/{term}"]),
                             rtol=1e-4, atol=1e-6 * float(want_total))
  np.testing.assert_allclose(float(total), sum(float(got[f"loss/{t}"]) for t in terms),
                             rtol=1e-6)
