"""Public API: __all__ against the docs, doctests, optax/Flax integration."""

import doctest
import os
import pathlib
import re
import subprocess
import sys
import textwrap

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
from fisher_optax import _base
from fisher_optax import _kfac
from fisher_optax import _mini_block_fisher
from fisher_optax import _pairing
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

  @parameterized.parameters(fo, _adafisher, _base, _kfac, _mini_block_fisher,
                            _pairing, _tkfac, _train_state,
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
    optimizer = nnx.Optimizer(model, fo.adafisher(1e-2), wrt=nnx.Param)

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


class MultiDeviceTest(absltest.TestCase):

  def test_shard_map_equals_single_device(self):
    """8 forced host devices with axis_name vs one device, same batch.

    AdaFisher, K-FAC, TKFAC and MBF: the per-device statistics are pmean-ed, so
    three steps on 8 shards of the batch equal three steps on the whole.
    """
    script = textwrap.dedent('''
      import functools
      import flax.linen as nn, jax, jax.numpy as jnp, numpy as np, optax
      from jax.sharding import Mesh, PartitionSpec as P
      import fisher_optax as fo
      assert jax.device_count() == 8, jax.devices()
      model = nn.Sequential([nn.Dense(16), nn.tanh, nn.Dense(3)])
      x = jax.random.normal(jax.random.key(0), (64, 5))
      y = jax.random.normal(jax.random.key(1), (64, 3))
      params = model.init(jax.random.key(2), x)['params']
      loss = lambda p, x, y: jnp.mean((model.apply({'params': p}, x) - y)**2)
      step_fn = fo.linen.value_grad_and_stats(loss)
      def run(tx, step):
        state = tx.init(params)
        p = params
        for _ in range(3):
          p, state = step(tx, p, state, x, y)
        return p
      @functools.partial(jax.jit, static_argnums=0)
      def single(tx, p, state, x, y):
        _, g, st = step_fn(p, x, y)
        u, state = tx.update(g, state, p, layer_stats=st)
        return optax.apply_updates(p, u), state
      mesh = Mesh(np.array(jax.devices()), ('data',))
      @functools.partial(jax.jit, static_argnums=0)
      def sharded(tx, p, state, x, y):
        def body(p, state, x, y):
          _, g, st = step_fn(p, x, y)
          g = jax.lax.pmean(g, 'data')
          u, state = tx.update(g, state, p, layer_stats=st)
          return optax.apply_updates(p, u), state
        return jax.shard_map(body, mesh=mesh,
                             in_specs=(P(), P(), P('data'), P('data')),
                             out_specs=(P(), P()), check_vma=False)(
                                 p, state, x, y)
      # Dampings fixed (not the defaults): a smaller damping amplifies the
      # all-reduce's rounding beyond what this float32 comparison allows.
      for make in (lambda **kw: fo.adafisher(1e-3, damping=1e-3,
                                             stats_every=2, **kw),
                   lambda **kw: fo.kfac(0.05, damping=1e-3, inverse_every=2,
                                        **kw),
                   lambda **kw: fo.tkfac(0.05, damping=1e-3, inverse_every=2,
                                         **kw),
                   lambda **kw: fo.mini_block_fisher(
                       0.01, damping=1e-3, inverse_every=2, **kw)):
        a = run(make(), single)
        b = run(make(axis_name='data'), sharded)
        jax.tree.map(lambda u, v: np.testing.assert_allclose(
            u, v, rtol=2e-4, atol=2e-6 * np.max(np.abs(v))), a, b)
      print('MULTIDEVICE OK')
    ''')
    env = dict(os.environ,
               XLA_FLAGS='--xla_force_host_platform_device_count=8',
               JAX_PLATFORMS='cpu',
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get(
                   'PYTHONPATH', ''))
    out = subprocess.run([sys.executable, '-c', script], env=env,
                         capture_output=True, text=True, timeout=300,
                         check=False)
    self.assertIn('MULTIDEVICE OK', out.stdout, out.stderr[-3000:])


if __name__ == '__main__':
  absltest.main()
