"""experiments.cost_table's reading of the compiled HLO against XLA's own cost analysis and
hand counts (the train-step path itself compiles a whole train step, 16 s at the cpu preset:
left to the script's runs)."""

import jax
import jax.numpy as jnp
import numpy as np

from experiments import cost_table


def test_hlo_traffic_counts_operands_and_results_as_xla_does():
  def fn(a, b):
    return jnp.tanh(a @ b)
  a = jax.ShapeDtypeStruct((64, 128), jnp.float32)
  b = jax.ShapeDtypeStruct((128, 32), jnp.float32)
  cost = cost_table.compiled_cost(fn, a, b)
  ops = cost_table.hlo_traffic(cost["hlo"])
  total = sum(r["bytes"] for r in ops)
  # Read a and b, write the result; tanh is fused into the dot or reads + writes it again.
  by_hand = 4 * (64 * 128 + 128 * 32 + 64 * 32)
  assert total in (by_hand, by_hand + 2 * 4 * 64 * 32), (total, by_hand)
  np.testing.assert_allclose(total, cost["bytes"], rtol=0.05)
  assert cost["flops"] >= 2 * 64 * 128 * 32
  assert cost_table.hlo_loops(cost["hlo"]) == []
  assert cost_table.shape_bytes("(f32[2,3]{1,0}, bf16[4]{0}, pred[])") == 24 + 8 + 1


def test_hlo_loops_finds_a_matmul_in_a_loop_body():
  def fn(x, w):
    return jax.lax.fori_loop(0, 7, lambda i, x: jnp.tanh(x @ w), x)
  cost = cost_table.compiled_cost(fn, jax.ShapeDtypeStruct((8, 16), jnp.float32),
                                  jax.ShapeDtypeStruct((16, 16), jnp.float32))
  loops = cost_table.hlo_loops(cost["hlo"])
  assert len(loops) == 1 and loops[0][1]            # the dot runs in the body
  assert loops[0][0] in (7, None)                   # XLA's known trip count, when it knows it


def test_program_part_names_the_method_and_direction():
  part = cost_table.program_part
  assert part("jit(guarded_train_step)/transpose(jvp(FasterRCNNNet.pool))/vmap()/scatter-add") \
      == "pool backward"
  assert part("jit(guarded_train_step)/jvp(FasterRCNNNet.features)/conv/conv1_1/add") \
      == "features forward"
  assert part("jit(guarded_train_step)/jvp(vmap())/while/body/and") == "other forward"
  assert part("jit(guarded_train_step)/jit(_where)/select_n").startswith("update")
