"""Thin experiment entry points and their ml_collections configs."""
