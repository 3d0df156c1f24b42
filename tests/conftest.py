"""Test set-up shared by the whole suite."""

import os

# Tests run on the CPU; keep XLA from grabbing every core per process (pytest-xdist runs two).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest


@pytest.fixture
def rng():
  """A fresh NumPy generator per test; the seed is printed on failure via the test id."""
  seed = np.random.SeedSequence().entropy % (2**32)
  print(f"numpy seed {seed}")
  return np.random.default_rng(seed)
