"""How each optimizer's step scales when the loss is multiplied by ``c``.

A summed loss is the mean loss times the batch size, and a loss summed over
pixels or tokens is its mean times their count, so this is what decides how a
learning rate moves between reductions (``docs/choosing.md``). With the loss
scaled by ``c`` the gradients and the captured output cotangents scale by
``c``; the closed forms are

* Adam: ``c**0`` (a ratio of first and second moments);
* SGD, AdaFisher (both modes) and AdaFisherW: ``c**1`` (AdaFisher's
  curvature is min-max normalised, so only the momentum scales);
* the Kronecker family and MBF: ``c**-1`` while the damping is negligible
  (a curvature of scale ``c**2`` inverted against a gradient of scale
  ``c``), ``c**1`` once the damping dominates (``g / damping``).

Each case takes the first update of a small MLP in float64, where both
regimes are exact up to rounding.
"""

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import fisher_optax as fo

C = 10.0
_PERIODS = dict(stats_every=1)
_KRONECKER = dict(stats_every=1, inverse_every=1)

# name -> (factory(damping), exponent with damping ~ 0, exponent with a
# dominant damping or None where the optimizer has no damping).
_CASES = {
    'adam': (lambda d: optax.adam(1e-3, eps=1e-30), 0, None),
    'sgd': (lambda d: optax.sgd(1e-3, momentum=0.9), 1, None),
    'adafisher': (lambda d: fo.adafisher(
        1e-3, damping=d, mode='paper', **_PERIODS), 1, 1),
    'adafisher_reference': (lambda d: fo.adafisher(
        1e-3, damping=d, mode='reference', **_PERIODS), 1, 1),
    'adafisherw': (lambda d: fo.adafisherw(
        1e-3, damping=d, weight_decay=0.0, mode='paper', **_PERIODS), 1, 1),
    'kfac': (lambda d: fo.kfac(1e-3, damping=d, **_KRONECKER), -1, 1),
    'ekfac': (lambda d: fo.ekfac(1e-3, damping=d, **_KRONECKER), -1, 1),
    'tkfac': (lambda d: fo.tkfac(1e-3, damping=d, **_KRONECKER), -1, 1),
    'tekfac': (lambda d: fo.tekfac(1e-3, damping=d, **_KRONECKER), -1, 1),
    'mini_block_fisher': (lambda d: fo.mini_block_fisher(
        1e-3, damping=d, **_KRONECKER), -1, 1),
}
# Tiny enough to vanish against every factor's eigenvalues in float64 (the
# factored damping adds its square root), and huge enough to swamp them.
_NEGLIGIBLE, _DOMINANT = 1e-24, 1e16
_NEGLIGIBLE_FOR = {
    # AdaFisher's normalised curvature is exactly 0 on its smallest entry,
    # where a vanishing damping would leave rounding; its exponent does not
    # depend on the damping, so it keeps its default.
    'adafisher': 1e-3, 'adafisher_reference': 1e-3, 'adafisherw': 1e-3,
}
# The official min-max has an absolute epsilon (1e-6 of a range of order
# 1e-3 here), which scaling the loss moves relative to the range.
_RTOL = {'adafisher_reference': 1e-3}


class Mlp(nn.Module):
  """4-3-3: no wider than its inputs, so that MBF's dense blocks (3 x 3
  from 5 and 4 rows) are not singular and a vanishing damping is exact."""

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(3)(x))
    return nn.Dense(3)(x)


def _first_update(tx, scale):
  model = Mlp()
  x = jax.random.normal(jax.random.key(0), (16, 4), jnp.float64)
  y = jax.random.normal(jax.random.key(1), (16, 3), jnp.float64)
  params = model.init(jax.random.key(2), x)['params']
  params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
  loss = lambda p, x, y: scale * jnp.mean(
      (model.apply({'params': p}, x) - y) ** 2)
  step = fo.linen.value_grad_and_stats(loss)

  @jax.jit
  def update(params, x, y):
    _, grads, stats = step(params, x, y)
    return tx.update(grads, tx.init(params), params, layer_stats=stats)[0]

  # numpy: the comparisons run after the float64 context has closed.
  return [np.asarray(u) for u in jax.tree.leaves(update(params, x, y))]


class LossScaleTest(parameterized.TestCase):

  @parameterized.named_parameters(
      [(f'{name}_{regime}', name, regime) for name, case in _CASES.items()
       for regime in ('negligible', 'dominant')
       if regime == 'negligible' or case[2] is not None])
  def test_update_scales_as_documented(self, name, regime):
    factory, small, large = _CASES[name]
    damping = (_NEGLIGIBLE_FOR.get(name, _NEGLIGIBLE)
               if regime == 'negligible' else _DOMINANT)
    exponent = small if regime == 'negligible' else large
    with jax.enable_x64(True):
      base = _first_update(factory(damping), 1.0)
      scaled = _first_update(factory(damping), C)
    for got, want in zip(scaled, base):
      scale = np.max(np.abs(want))
      self.assertGreater(scale, 0.0)
      np.testing.assert_allclose(got, C ** exponent * want,
                                 rtol=_RTOL.get(name, 1e-6),
                                 atol=1e-6 * C ** exponent * scale)

  def test_a_wrong_exponent_fails(self):
    # K-FAC's step does not keep its size under loss scaling.
    with jax.enable_x64(True):
      base = _first_update(_CASES['kfac'][0](_NEGLIGIBLE), 1.0)
      scaled = _first_update(_CASES['kfac'][0](_NEGLIGIBLE), C)
    self.assertGreater(np.max(np.abs(scaled[0] - base[0])),
                       0.5 * np.max(np.abs(base[0])))


# The library's optimizers at their defaults (periods of 1, so that three
# steps refresh every statistic and inverse).
_FISHER = {
    'adafisher': lambda **kw: fo.adafisher(
        1e-2, mode='paper', **_PERIODS, **kw),
    'adafisher_reference': lambda **kw: fo.adafisher(
        1e-2, mode='reference', **_PERIODS, **kw),
    'adafisherw': lambda **kw: fo.adafisherw(
        1e-2, mode='paper', **_PERIODS, **kw),
    'kfac': lambda **kw: fo.kfac(1e-3, **_KRONECKER, **kw),
    'ekfac': lambda **kw: fo.ekfac(1e-3, **_KRONECKER, **kw),
    'tkfac': lambda **kw: fo.tkfac(1e-3, **_KRONECKER, **kw),
    'tekfac': lambda **kw: fo.tekfac(1e-3, **_KRONECKER, **kw),
    'mini_block_fisher': lambda **kw: fo.mini_block_fisher(
        1e-5, **_KRONECKER, **kw),
}
PIXELS = 784.0


def _three_steps(tx, scale):
  """Parameters after three steps on ``scale`` times the mean loss."""
  model = Mlp()
  x = jax.random.normal(jax.random.key(0), (16, 4), jnp.float64)
  y = jax.random.normal(jax.random.key(1), (16, 3), jnp.float64)
  params = model.init(jax.random.key(2), x)['params']
  params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
  loss = lambda p, x, y: scale * jnp.mean(
      (model.apply({'params': p}, x) - y) ** 2)
  step = fo.linen.value_grad_and_stats(loss)

  @jax.jit
  def train(params):
    state = tx.init(params)
    for _ in range(3):
      _, grads, stats = step(params, x, y)
      updates, state = tx.update(grads, state, params, layer_stats=stats)
      params = optax.apply_updates(params, updates)
    return params

  return ([np.asarray(p) for p in jax.tree.leaves(train(params))],
          [np.asarray(p) for p in jax.tree.leaves(params)])


class LossScaleOptionTest(parameterized.TestCase):

  @parameterized.named_parameters(*_FISHER.items())
  def test_a_summed_loss_trains_as_the_mean_one(self, factory):
    """Reference: the same optimizer on the mean loss (float64)."""
    with jax.enable_x64(True):
      want, start = _three_steps(factory(), 1.0)
      got, _ = _three_steps(factory(loss_scale=PIXELS), PIXELS)
      unscaled, _ = _three_steps(factory(), PIXELS)
    moved = max(np.max(np.abs(w - s)) for w, s in zip(want, start))
    self.assertGreater(moved, 0.0)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-9 * moved)
    # Without the option the summed loss takes other steps.
    self.assertGreater(
        max(np.max(np.abs(u - w)) for u, w in zip(unscaled, want)),
        1e-3 * moved)

  def test_loss_scale_must_be_positive(self):
    for factory in _FISHER.values():
      with self.assertRaisesRegex(ValueError, 'loss_scale'):
        factory(loss_scale=0.0)


if __name__ == '__main__':
  absltest.main()
