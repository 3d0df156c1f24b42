"""Classification pretraining on object crops: settings, the loss by config, typed extras."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet.models import classify

KW = {"stride": 4, "widths": (4, 8), "fc_features": (8,), "roi_size": 2, "dropout_rate": 0.3}
CONFIG = {"num_classes": 3, "model": {"backbone_kw": KW, "input_size": 8}}


def _batch(rng, n=2, m=3, size=24):
  xy = rng.uniform(0, size / 2, (n, m, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(4, size / 2, (n, m, 2))], -1).astype(np.float32)
  return {"image": jnp.asarray(rng.integers(0, 256, (n, size, size, 3)), jnp.uint8),
          "image_size": jnp.full((n, 2), size, jnp.int32), "boxes": jnp.asarray(boxes),
          "labels": jnp.asarray(rng.integers(0, 3, (n, m)), jnp.int32),
          "box_mask": jnp.array([[True, True, False], [True, False, False]])}


@pytest.mark.parametrize("term, custom", [("cls", "doubled_class")])
def test_loss_term_given_by_dotted_path_is_the_one_trained_with(rng, term, custom):
  builtin = classify.build_system(CONFIG)
  mine = classify.build_system({**CONFIG, "model": {**CONFIG["model"],
                                                    "loss": {term: f"custom_terms:{custom}"}}})
  batch = _batch(rng)
  variables = builtin.init(jax.random.PRNGKey(0), batch)
  want, want_m, _ = jax.jit(builtin.loss)(variables, batch, jax.random.PRNGKey(1))
  got, got_m, _ = jax.jit(mine.loss)(variables, batch, jax.random.PRNGKey(1))
  assert set(want_m) == {"loss/cls", "classify/accuracy"} and float(want_m["loss/cls"]) > 0
  np.testing.assert_allclose(want, want_m["loss/cls"], rtol=1e-6)
  np.testing.assert_allclose(got_m[f"loss/{term}"], 2 * want_m[f"loss/{term}"], rtol=1e-5)
  np.testing.assert_allclose(got - want, want_m[f"loss/{term}"], rtol=1e-5)


def test_settings_and_extras():
  from experiments.configs import classify as classify_config
  config = classify_config.get_config("cpu")
  system = classify.build_system(config)
  assert system.extras.settings == classify.Settings.from_config(config)
  assert system.extras.settings.loss == classify.Loss()
  assert classify.build_system({"num_classes": 4, "model": {"backbone_kw": KW}}).num_classes == 4
  with pytest.raises(ValueError, match=r"config.model: unknown keys \['input'\]"):
    classify.build_system({"num_classes": 3, "model": {"input": 8}})
  with pytest.raises(ValueError, match="config.model.loss.cls: unknown class loss"):
    classify.build_system({"num_classes": 3, "model": {"loss": {"cls": "l2"}}})
  with pytest.raises(ValueError, match=r"config.model.jitter: expected a value in \[0, 1\)"):
    classify.build_system({"num_classes": 3, "model": {"jitter": 1.5}})
