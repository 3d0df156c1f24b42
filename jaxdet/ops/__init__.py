"""Pure array ops, one image at a time, jit/vmap safe; no flax."""
