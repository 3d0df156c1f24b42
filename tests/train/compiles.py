"""Counting XLA compilations of a runner's train step (tests that assert one compile)."""

import jax


def run_counting_compiles(runner, state, rng, batches):
  """Runs `runner.step` over `batches` from `state`; returns (backend compiles, last metrics)."""
  compiles = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    dstate, drng = runner.put_state(state), runner.put_rng(rng)
    metrics = None
    for b in batches:
      dstate, metrics = runner.step(dstate, runner.put_batch(b), drng)
      jax.block_until_ready(metrics)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  return len(compiles), metrics
