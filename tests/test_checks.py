import numpy as np
import pytest

from jaxdet import checks


def test_check_boxes_names_argument_and_shape():
  with pytest.raises(ValueError, match=r"boxes: expected last dimension 4, got array of shape \(3, 5\)"):
    checks.check_boxes("boxes", np.zeros((3, 5), np.float32))
  with pytest.raises(TypeError, match="boxes: expected a floating dtype"):
    checks.check_boxes("boxes", np.zeros((3, 4), np.int32))
  with pytest.raises(ValueError, match="expected rank 2"):
    checks.check_boxes("boxes", np.zeros((4,), np.float32))


def test_check_box_values():
  good = np.array([[0, 0, 10, 10], [5, 5, 5, 5]], np.float32)
  checks.check_box_values("boxes", good, height=10, width=10)
  with pytest.raises(ValueError, match="box 1 has x2 < x1"):
    checks.check_box_values("boxes", np.array([[0, 0, 1, 1], [3, 0, 2, 1]], np.float32))
  with pytest.raises(ValueError, match="not finite"):
    checks.check_box_values("boxes", np.array([[0, np.nan, 1, 1]], np.float32))
  with pytest.raises(ValueError, match="outside"):
    checks.check_box_values("boxes", good, height=8, width=8, example_id=3)
  checks.check_box_values("boxes", np.zeros((0, 4), np.float32))


def test_check_label_values():
  checks.check_label_values("labels", np.array([0, 2], np.int32), 3)
  with pytest.raises(ValueError, match=r"label 3 at index 1 is outside \[0, 3\)"):
    checks.check_label_values("labels", np.array([0, 3], np.int32), 3)


def test_check_mask_and_positive():
  with pytest.raises(ValueError, match="mask: expected a bool mask of shape"):
    checks.check_mask("mask", np.zeros((3,), bool), "boxes", (4,))
  with pytest.raises(ValueError, match="output_size: expected values > 0"):
    checks.check_positive("output_size", (7, 0))


def test_check_boxes_accepts_bfloat16():
  import jax.numpy as jnp
  checks.check_boxes("boxes", jnp.zeros((3, 4), jnp.bfloat16))
  with pytest.raises(TypeError, match="integer dtype, got .*bfloat16"):
    checks.check_array("labels", jnp.zeros((3,), jnp.bfloat16), dtype_kind="iu")


@pytest.mark.parametrize("value, kw, interval", [
    (-0.1, {}, r"\[0, 1\]"), (1.5, {}, r"\[0, 1\]"), (0.0, {"open_low": True}, r"\(0, 1\]"),
    (1.0, {"open_high": True}, r"\[0, 1\)")])
def test_check_fraction_names_the_key_the_interval_and_the_value(value, kw, interval):
  with pytest.raises(ValueError, match=rf"config.model.x: expected a value in {interval}, "
                                       rf"got {value!r}"):
    checks.check_fraction("config.model.x", value, **kw)
  for ok in (0.5, 1.0 if not kw.get("open_high") else 0.0 if not kw.get("open_low") else 0.5):
    checks.check_fraction("config.model.x", ok, **kw)
