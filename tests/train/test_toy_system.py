"""The toy system (the template detector of tests/train/toy_system.py) trains with the loss
terms its config names."""

import jax
import numpy as np
import pytest

from toy_system import build_system, toy_batch, toy_config


@pytest.mark.parametrize("term,custom", [("box", "custom_terms:doubled_box_l2"),
                                         ("cls", "custom_terms:doubled_class")])
def test_a_term_given_by_dotted_path_is_the_one_trained_with(term, custom):
  batch, key = toy_batch(0, 0, 4), jax.random.PRNGKey(1)
  ref = build_system(toy_config())
  other = build_system(toy_config(**{"model.loss": {term: custom}}))
  variables = ref.init(jax.random.PRNGKey(0), batch)
  total_ref, m_ref, _ = jax.jit(ref.loss)(variables, batch, key)
  total, m, _ = jax.jit(other.loss)(variables, batch, key)
  assert float(m_ref[f"loss/{term}"]) > 0
  np.testing.assert_allclose(float(m[f"loss/{term}"]), 2 * float(m_ref[f"loss/{term}"]),
                             rtol=1e-5)
  np.testing.assert_allclose(float(total) - float(total_ref),
                             float(m[f"loss/{term}"]) - float(m_ref[f"loss/{term}"]), rtol=1e-5)
  np.testing.assert_allclose(float(total_ref), float(m_ref["loss/box"] + m_ref["loss/cls"]),
                             rtol=1e-6)


def test_settings_name_the_bad_key():
  with pytest.raises(ValueError, match=r"config\.model\.loss\.box"):
    build_system(toy_config(**{"model.loss": {"box": "hubr"}}))
  with pytest.raises(ValueError, match=r"config\.model.*featurez"):
    build_system(toy_config(**{"model.featurez": 4}))
