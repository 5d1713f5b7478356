"""Public API: __all__ against the docs, doctests, optax/Flax integration."""

import doctest
import pathlib
import re

from absl.testing import absltest
from absl.testing import parameterized
import chex
from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import fisher_optax as fo
from fisher_optax import _adafisher
from fisher_optax import _adaptive
from fisher_optax import _base
from fisher_optax import _kfac
from fisher_optax import _kronecker
from fisher_optax import _linearization
from fisher_optax import _mini_block_fisher
from fisher_optax import _pairing
from fisher_optax import _sharding
from fisher_optax import _tkfac
from fisher_optax import _train_state
from fisher_optax.capture import linen as capture_linen
from fisher_optax.capture import nnx as capture_nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]


class ApiTest(parameterized.TestCase):

  def test_all_matches_docs(self):
    text = (ROOT / 'docs' / 'api.md').read_text()
    documented = set(re.findall(r'^\| `fo\.(\w+)`', text, re.MULTILINE))
    self.assertEqual(documented, set(fo.__all__))
    for name in fo.__all__:
      self.assertTrue(hasattr(fo, name), name)

  @parameterized.parameters(fo, _adafisher, _adaptive, _base, _kfac,
                            _kronecker, _mini_block_fisher, _sharding,
                            _pairing, _tkfac, _train_state, _linearization,
                            capture_linen, capture_nnx)
  def test_doctests(self, module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    self.assertGreater(result.attempted, 0)
    self.assertEqual(result.failed, 0)

  def test_nnx_optimizer_forwards_layer_stats(self):
    model = nnx.Sequential(nnx.Linear(3, 8, rngs=nnx.Rngs(0)), nnx.relu,
                           nnx.Linear(8, 1, rngs=nnx.Rngs(1)))
    x = jax.random.normal(jax.random.key(0), (32, 3))
    y = jnp.sum(x, axis=1, keepdims=True)
    loss_fn = lambda m, x, y: jnp.mean((m(x) - y) ** 2)
    step_fn = fo.nnx.value_grad_and_stats(loss_fn)
    optimizer = nnx.Optimizer(model, fo.adafisher(), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
      loss, grads, stats = step_fn(model, x, y)
      optimizer.update(model, grads, layer_stats=stats)
      return loss

    losses = [float(train_step(model, optimizer, x, y)) for _ in range(30)]
    self.assertLess(losses[-1], 0.5 * losses[0])

  def test_linen_train_state_forwards_layer_stats(self):
    """Reference: the same steps written with tx.update by hand."""
    model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(1)])
    x = jax.random.normal(jax.random.key(0), (32, 3))
    y = jnp.sum(x, axis=1, keepdims=True)
    params = model.init(jax.random.key(1), x)['params']
    loss_fn = lambda p, x, y: jnp.mean((model.apply({'params': p}, x) - y)
                                       ** 2)
    step_fn = fo.linen.value_grad_and_stats(loss_fn)
    tx = fo.kfac(1e-2)
    state = fo.linen.TrainState.create(apply_fn=model.apply, params=params,
                                       tx=tx)

    @jax.jit
    def by_state(state):
      _, grads, stats = step_fn(state.params, x, y)
      return state.apply_gradients(grads=grads, layer_stats=stats)

    @jax.jit
    def by_hand(params, opt_state):
      _, grads, stats = step_fn(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params,
                                     layer_stats=stats)
      return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    for _ in range(3):
      state = by_state(state)
      params, opt_state = by_hand(params, opt_state)
    self.assertEqual(int(state.step), 3)
    chex.assert_trees_all_close(state.params, params)
    # Optimizers without statistics work as with Flax's own TrainState.
    adam = fo.linen.TrainState.create(apply_fn=model.apply, params=params,
                                      tx=optax.adam(1e-3))
    grads = jax.grad(loss_fn)(params, x, y)
    chex.assert_trees_all_close(
        adam.apply_gradients(grads=grads).params,
        optax.apply_updates(params, optax.adam(1e-3).update(
            grads, optax.adam(1e-3).init(params), params)[0]))


if __name__ == '__main__':
  absltest.main()
