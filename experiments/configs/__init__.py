"""Experiment configs: each file starts with the command that runs it."""
