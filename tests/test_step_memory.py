"""The fused train step holds no more than its two halves need.

A user jits capture and update together, and the Kronecker family refreshes
its statistics and inverses under ``lax.cond``. XLA may copy a conditional's
operands (jax-ml/jax#39449), and the captured activations are operands of
the statistics' conditional. Run as one program, the step needs at most
every captured array alive beside the capture's own temporaries or beside
the update's, whichever are larger. A copy of the captured arrays
or of the curvature state would push the fused step's temporaries (XLA's
memory analysis of the compiled step) above that bound.

The fused step's temporaries are one allocation per call on XLA:CPU; see
docs/choosing.md ("The fixed step's floor on a CPU") for why its size, not
a copy, made the fused step slower than the split one under glibc.
"""

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import fisher_optax as fo


class ConvNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))
    # Pooled: the captured activations, not the factors, fill the memory.
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


def _memory(compiled):
  analysis = compiled.memory_analysis()
  return analysis.temp_size_in_bytes, analysis.output_size_in_bytes


class FusedStepMemoryTest(parameterized.TestCase):

  @parameterized.product(weight_sharing=('expand', 'reduce'),
                         periods=((10, 100), (1000, 1000)))
  def test_fused_step_needs_no_more_than_its_halves(self, weight_sharing,
                                                    periods):
    model = ConvNet()
    x = jax.random.normal(jax.random.key(0), (64, 16, 16, 1))
    y = jax.random.randint(jax.random.key(1), (64,), 0, 10)
    params = model.init(jax.random.key(2), x)['params']

    def loss_fn(p, x, y):
      logits = model.apply({'params': p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, y).mean()

    capture = fo.linen.value_grad_and_stats(loss_fn)
    layers = jax.eval_shape(capture, params, x, y)[2]
    tx = fo.kfac(1e-3, damping=1e-3, stats_every=periods[0],
                 inverse_every=periods[1], layers=layers,
                 weight_sharing=weight_sharing)
    state = tx.init(params)

    def update(params, state, grads, stats):
      updates, state = tx.update(grads, state, params, layer_stats=stats)
      return optax.apply_updates(params, updates), state

    def fused(params, state, x, y):
      _, grads, stats = capture(params, x, y)
      return update(params, state, grads, stats)

    _, grads, stats = capture(params, x, y)
    capture_temp, captured = _memory(
        jax.jit(capture).lower(params, x, y).compile())
    update_temp, _ = _memory(jax.jit(update, donate_argnums=(0, 1)).lower(
        params, state, grads, stats).compile())
    fused_temp, _ = _memory(jax.jit(fused, donate_argnums=(0, 1)).lower(
        params, state, x, y).compile())
    bound = captured + max(capture_temp, update_temp)
    # 10% for XLA's buffer packing.
    self.assertLessEqual(fused_temp, 1.1 * bound,
                         f'fused {fused_temp} B; capture {capture_temp} B, '
                         f'update {update_temp} B, captured {captured} B')
    # And the check can fail: one more copy of the captured arrays (a
    # conditional's operands) would exceed the bound.
    self.assertGreater(fused_temp + captured, 1.1 * bound)

if __name__ == '__main__':
  absltest.main()
