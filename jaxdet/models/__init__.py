"""Flax linen backbones, heads and one module per detector."""
