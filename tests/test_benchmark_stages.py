"""``benchmarks/stages.py`` times the engine's own stages.

The stage functions are rebuilt from ``_kronecker``'s pieces, so they could
drift from what ``update`` runs. On a small conv + dense model, the first
step of each method must equal what the stages compute from the same
inputs: the statistics (the first average has weight 1), the inverses, and
the preconditioned step (heavy-ball momentum starts at zero).
"""

import os
import sys

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import fisher_optax as fo
from fisher_optax import _base
from fisher_optax import _kronecker
from fisher_optax import _pairing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'benchmarks'))
import stages  # noqa: E402  pylint: disable=g-import-not-at-top


class _Net(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(4, (3, 3), strides=2)(x))
    x = nn.LayerNorm()(x)
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def _close(got, want, err_msg=''):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  np.testing.assert_allclose(got, want, rtol=1e-4,
                             atol=1e-5 * float(np.max(np.abs(want))),
                             err_msg=err_msg)


class StagesTest(parameterized.TestCase):

  @parameterized.product(method=list(stages.METHODS),
                         weight_sharing=['expand', 'reduce'])
  def test_stages_compute_the_first_step(self, method, weight_sharing):
    model = _Net()
    x = jax.random.normal(jax.random.key(0), (8, 6, 6, 2))
    y = jax.random.normal(jax.random.key(1), (8, 3))
    params = model.init(jax.random.key(2), x)['params']
    loss = lambda p: jnp.mean((model.apply({'params': p}, x) - y) ** 2)
    _, grads, layer_stats = jax.jit(fo.linen.value_grad_and_stats(loss))(
        params)
    kw = {'weight_sharing': weight_sharing}
    tx = stages.METHODS[method][0](
        **kw, damping=stages.DAMPING, stats_every=stages.PERIODS[0],
        inverse_every=stages.PERIODS[1])
    state = tx.init(params)
    updates, after = jax.jit(lambda g, s, st: tx.update(
        g, s, params, layer_stats=st))(grads, state, layer_stats)

    algorithm, opts = stages.options(method, kw)
    layouts, norms = _kronecker._check_layouts(  # pylint: disable=protected-access
        algorithm, opts, grads, layer_stats, state,
        _pairing.pair(grads, layer_stats, 'test'))
    fns = stages.stage_functions(algorithm, opts, layouts, norms, grads)
    run = lambda name, s: jax.jit(fns[name])(layer_stats, s, grads)

    fresh = run('statistics', state)
    for key in layouts:
      for name, value in after.stats[key].items():
        _close(fresh[key][name], value, f'{key} {name}')
    # The inverses of the averaged statistics, from the state before the
    # refresh (EKFAC/TEKFAC measure their scaling in the new basis).
    precond, _ = run('inverses', state._replace(stats=after.stats))
    for key in layouts:
      for name in ('in_inv', 'out_inv', 'scaling'):
        if name in after.precond[key]:
          _close(precond[key][name], after.precond[key][name],
                 f'{key} {name}')
    done = run('precondition', after._replace(
        mu=jax.tree.map(jnp.zeros_like, after.mu)))
    paths, leaves, _ = _base.flatten_leaves(updates)
    for i, value in done.items():
      _close(value, leaves[i], paths[i])


if __name__ == '__main__':
  absltest.main()
