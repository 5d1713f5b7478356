"""K-FAC, EKFAC, TKFAC, TEKFAC: faults, bad inputs, float64, frozen layers."""

from absl.testing import absltest
from absl.testing import parameterized
import chex
from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import fisher_optax as fo
from fisher_optax import _kronecker
from fisher_optax import _stats

# (name, factory, extra options): every method and both damping modes.
_METHODS = (
    ('kfac', fo.kfac, {}),
    ('kfac_eigen', fo.kfac, {'damping_mode': 'eigen'}),
    ('tkfac', fo.tkfac, {}),
    ('tkfac_eigen', fo.tkfac, {'damping_mode': 'eigen'}),
    ('ekfac', fo.ekfac, {}),
    ('tekfac', fo.tekfac, {}),
)


class _Net(nn.Module):
  """Conv -> LayerNorm -> Dense -> Dense; an optional zero-initialised head."""

  zero_head: bool = False

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(3, (3, 3), padding='SAME')(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.LayerNorm()(x)
    x = jnp.tanh(nn.Dense(5)(x))
    init = nn.initializers.zeros if self.zero_head else (
        nn.initializers.lecun_normal())
    return nn.Dense(2, kernel_init=init)(x)


def _problem(zero_head=False, dtype=jnp.float32):
  model = _Net(zero_head)
  x = jax.random.normal(jax.random.key(0), (8, 4, 4, 2), dtype)
  y = jax.random.normal(jax.random.key(1), (8, 2), dtype)
  params = model.init(jax.random.key(2), x)['params']
  params = jax.tree.map(lambda p: p.astype(dtype), params)
  loss = lambda p, x, y: jnp.mean((model.apply({'params': p}, x) - y) ** 2)
  return fo.linen.value_grad_and_stats(loss), params, x, y


def _finite(tree):
  return all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(tree))


def _kron_state(state):
  return state[1]  # chain(add_decayed_weights, kronecker, scale_by_lr)


class NonFiniteTest(parameterized.TestCase):

  @parameterized.product(method=[m[0] for m in _METHODS],
                         norm_value=[np.inf, np.nan])
  def test_poisoned_statistics_are_kept_out(self, method, norm_value):
    """Inf/NaN in a dense, a conv and a LayerNorm layer's a/g."""
    _, factory, kw = next(m for m in _METHODS if m[0] == method)
    step_fn, params, x, y = _problem()
    tx = factory(0.05, damping=0.1, inverse_every=1, **kw)
    update = jax.jit(lambda g, s, p, st: tx.update(g, s, p, layer_stats=st))
    _, grads, stats = jax.jit(step_fn)(params, x, y)
    updates, state = update(grads, tx.init(params), params, stats)
    params = optax.apply_updates(params, updates)
    _, grads, stats = jax.jit(step_fn)(params, x * 1.5, y)
    poison = dict(stats)
    poison['Conv_0'] = fo.LayerStats(
        stats['Conv_0'].a.at[0, 0, 1, 1, 0].set(np.inf), stats['Conv_0'].g,
        stats['Conv_0'].meta, stats['Conv_0'].extras)
    poison['Dense_0'] = fo.LayerStats(
        stats['Dense_0'].a, stats['Dense_0'].g.at[0, 3, 1].set(np.nan),
        stats['Dense_0'].meta, stats['Dense_0'].extras)
    poison['LayerNorm_0'] = fo.LayerStats(
        stats['LayerNorm_0'].a,
        stats['LayerNorm_0'].g.at[0, 2, 5].set(norm_value),
        stats['LayerNorm_0'].meta, stats['LayerNorm_0'].extras)
    new_updates, new_state = update(grads, state, params, poison)
    self.assertTrue(_finite(new_updates))
    self.assertTrue(_finite(optax.apply_updates(params, new_updates)))
    old, new = _kron_state(state), _kron_state(new_state)
    for key in ('Conv_0', 'Dense_0'):
      for name, value in old.stats[key].items():
        np.testing.assert_array_equal(new.stats[key][name], value,
                                      err_msg=f'{key} {name}')
      for name, value in old.precond[key].items():
        np.testing.assert_allclose(
            new.precond[key][name], value, rtol=1e-5,
            atol=1e-6 * float(np.max(np.abs(value))), err_msg=name)
    for name in ('scale', 'bias'):
      np.testing.assert_array_equal(new.nu['LayerNorm_0'][name],
                                    old.nu['LayerNorm_0'][name])
    # The unpoisoned layer did refresh.
    self.assertFalse(np.array_equal(new.stats['Dense_1'][
        next(iter(old.stats['Dense_1']))], old.stats['Dense_1'][
            next(iter(old.stats['Dense_1']))]))
    self.assertGreaterEqual(int(new.nonfinite) - int(old.nonfinite), 3)

  @parameterized.named_parameters(*_METHODS)
  def test_zero_initialised_head_trains_finite(self, factory, kw):
    """Every layer below a zero head has zero output cotangents at step 0."""
    step_fn, params, x, y = _problem(zero_head=True)
    tx = factory(0.05, damping=1e-3, weight_decay=1e-4, inverse_every=1,
                 **kw)

    @jax.jit
    def step(p, s):
      loss, grads, stats = step_fn(p, x, y)
      updates, s = tx.update(grads, s, p, layer_stats=stats)
      return optax.apply_updates(p, updates), s, loss

    state = tx.init(params)
    losses = []
    for _ in range(4):
      params, state, loss = step(params, state)
      losses.append(float(loss))
      self.assertTrue(_finite(params))
    self.assertTrue(np.all(np.isfinite(losses)))


class HyperparameterTest(parameterized.TestCase):

  @parameterized.product(
      factory=['kfac', 'tkfac', 'ekfac', 'tekfac'],
      bad=[('damping', 0.0), ('damping', -1.0), ('damping', np.nan),
           ('fisher_decay', 1.0), ('fisher_decay', -0.1),
           ('momentum', 1.0), ('fallback_b2', 1.0),
           ('fallback_eps', -1.0), ('weight_decay', -1.0),
           ('learning_rate', np.nan), ('inverse_method', 'bogus')])
  def test_bad_value_names_argument_and_factory(self, factory, bad):
    name, value = bad
    kwargs = {'learning_rate': 0.1, name: value}
    with self.assertRaisesRegex(ValueError, f'{factory}.*{name}'):
      getattr(fo, factory)(**kwargs)
    if name not in ('learning_rate', 'weight_decay'):
      kwargs.pop('learning_rate')
      with self.assertRaisesRegex(ValueError, f'scale_by_{factory}: {name}'):
        getattr(fo, f'scale_by_{factory}')(**kwargs)

  @parameterized.parameters('tkfac', 'tekfac')
  def test_conv_damping_names_factory(self, factory):
    with self.assertRaisesRegex(ValueError, f'scale_by_{factory}: '
                                'conv_damping'):
      getattr(fo, factory)(0.1, conv_damping='bogus')

  @parameterized.parameters('kfac', 'tekfac')
  def test_inject_hyperparams_traced_values_unchecked(self, factory):
    step_fn, params, x, y = _problem()
    _, grads, stats = jax.jit(step_fn)(params, x, y)
    plain = getattr(fo, factory)(0.1, damping=0.03, inverse_every=3)
    injected = optax.inject_hyperparams(
        getattr(fo, factory), static_args=('stats_every', 'inverse_every'))(
            learning_rate=0.1, damping=0.03, inverse_every=3)
    u1, _ = jax.jit(lambda s: plain.update(
        grads, s, params, layer_stats=stats))(plain.init(params))
    u2, _ = jax.jit(lambda s: injected.update(
        grads, s, params, layer_stats=stats))(injected.init(params))
    # Injected, loss_scale is a traced 1.0: the same arithmetic, compiled
    # into other fusions, so the float32 factors' inverses round
    # differently (up to 1e-5 of the update's scale seen).
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
      np.testing.assert_allclose(a, b, rtol=1e-5,
                                 atol=1e-4 * float(np.max(np.abs(a))))


class _Mixed(nn.Module):
  """Dense, Conv, Embed and LayerNorm, every Kronecker kind."""

  @nn.compact
  def __call__(self, x, ids):
    h = jnp.tanh(nn.Conv(2, (2, 2), padding='SAME')(x))
    h = h.reshape(h.shape[0], -1)
    h = h + jnp.sum(nn.Embed(7, h.shape[-1])(ids), axis=1)
    h = nn.LayerNorm()(h)
    return nn.Dense(2)(jnp.tanh(nn.Dense(4)(h)))


def _mixed_data():
  """Inputs and params as float32 numpy (x64 changes jax.random's values)."""
  x = jax.random.normal(jax.random.key(3), (6, 3, 3, 2), jnp.float32)
  ids = jax.random.randint(jax.random.key(4), (6, 3), 0, 7, jnp.int32)
  y = jax.random.normal(jax.random.key(5), (6, 2), jnp.float32)
  params = _Mixed().init(jax.random.key(6), x, ids)['params']
  return jax.tree.map(np.asarray, (x, ids, y, params))


def _mixed_run(factory, kw, dtype, data, steps=2):
  model = _Mixed()
  x, ids, y, params = data
  x, y = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
  params = jax.tree.map(lambda p: jnp.asarray(p, dtype), params)
  loss = lambda p: jnp.mean((model.apply({'params': p}, x, ids) - y) ** 2)
  step_fn = fo.linen.value_grad_and_stats(loss)
  tx = factory(0.05, damping=0.1, inverse_every=1, **kw)

  @jax.jit
  def step(p, s):
    _, grads, stats = step_fn(p)
    updates, s = tx.update(grads, s, p, layer_stats=stats)
    return optax.apply_updates(p, updates), s

  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


class DtypeTest(parameterized.TestCase):

  @parameterized.named_parameters(*_METHODS)
  def test_float64_matches_float32(self, factory, kw):
    data = _mixed_data()
    p32, _ = _mixed_run(factory, kw, jnp.float32, data)
    with jax.enable_x64(True):
      p64, s64 = _mixed_run(factory, kw, jnp.float64, data)
      kron = _kron_state(s64)
      for leaf in jax.tree.leaves((kron.stats, kron.precond, kron.nu)):
        self.assertEqual(leaf.dtype, jnp.float64)
      for leaf in jax.tree.leaves(p64):
        self.assertEqual(leaf.dtype, jnp.float64)
    for a, b in zip(jax.tree.leaves(p32), jax.tree.leaves(p64)):
      # float32 round-off through two inverses and eigenbases (EKFAC: 4e-5
      # of the scale); the dtypes themselves are checked above.
      np.testing.assert_allclose(a, b, rtol=1e-3,
                                 atol=1e-4 * float(np.max(np.abs(b))))

  def test_bfloat16_params_keep_float32_statistics(self):
    params, state = _mixed_run(fo.kfac, {}, jnp.bfloat16, _mixed_data(),
                               steps=1)
    kron = _kron_state(state)
    for leaf in jax.tree.leaves((kron.stats, kron.precond, kron.nu)):
      self.assertEqual(leaf.dtype, jnp.float32)
    for leaf in jax.tree.leaves(params):
      self.assertEqual(leaf.dtype, jnp.bfloat16)
    self.assertTrue(_finite(params))


class _Three(nn.Module):
  bias_1: bool = True

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(4, name='Dense_0')(x))
    x = jnp.tanh(nn.Dense(3, use_bias=self.bias_1, name='Dense_1')(x))
    return nn.Dense(2, name='Dense_2')(x)


def _three(bias_1=True):
  model = _Three(bias_1)
  x = jax.random.normal(jax.random.key(7), (16, 5))
  params = model.init(jax.random.key(8), x)['params']
  loss = lambda p: jnp.mean(jnp.sin(model.apply({'params': p}, x)))
  return fo.linen.value_grad_and_stats(loss), params


class FrozenTest(parameterized.TestCase):

  @parameterized.product(method=[m[0] for m in _METHODS],
                         wrapper=['masked', 'multi_transform'])
  def test_frozen_layer_and_frozen_bias(self, method, wrapper):
    """Dense_0 frozen, Dense_1's bias frozen: a bias-less Dense_1."""
    _, factory, kw = next(m for m in _METHODS if m[0] == method)
    del factory
    inner = {'kfac': fo.scale_by_kfac, 'kfac_eigen': fo.scale_by_kfac,
             'tkfac': fo.scale_by_tkfac, 'tkfac_eigen': fo.scale_by_tkfac,
             'ekfac': fo.scale_by_ekfac, 'tekfac': fo.scale_by_tekfac}[method]
    step_fn, params = _three()
    # Dense_1's bias is zero at init, so the model without it computes the
    # same a and g: its update is the reference.
    ref_fn, ref_params = _three(bias_1=False)
    ref_params['Dense_0'] = params['Dense_0']
    ref_params['Dense_1'] = {'kernel': params['Dense_1']['kernel']}
    ref_params['Dense_2'] = params['Dense_2']
    labels = {'Dense_0': {'kernel': 'frozen', 'bias': 'frozen'},
              'Dense_1': {'kernel': 'train', 'bias': 'frozen'},
              'Dense_2': {'kernel': 'train', 'bias': 'train'}}
    make = lambda: inner(damping=0.1, momentum=0.0, **kw)
    if wrapper == 'masked':
      mask = jax.tree.map(lambda lab: lab == 'train', labels)
      tx = optax.masked(make(), mask)
    else:
      tx = optax.multi_transform(
          {'train': make(), 'frozen': optax.set_to_zero()}, labels)
    _, grads, stats = jax.jit(step_fn)(params)
    updates, state = jax.jit(lambda g, s: tx.update(
        g, s, params, layer_stats=stats))(grads, tx.init(params))
    ref = make()
    _, ref_grads, ref_stats = jax.jit(ref_fn)(ref_params)
    want, _ = jax.jit(lambda g, s: ref.update(
        g, s, ref_params, layer_stats=ref_stats))(ref_grads,
                                                   ref.init(ref_params))
    for path in (('Dense_1', 'kernel'), ('Dense_2', 'kernel'),
                 ('Dense_2', 'bias')):
      w = np.asarray(want[path[0]][path[1]])
      np.testing.assert_allclose(updates[path[0]][path[1]], w, rtol=1e-4,
                                 atol=1e-5 * float(np.max(np.abs(w))),
                                 err_msg=str(path))
    self.assertTrue(_finite(updates))
    del state

  def test_one_optimizer_two_models(self):
    step_a, params_a = _three()
    step_b, params_b, x, y = _problem()
    tx = fo.kfac(0.1, damping=0.1, inverse_every=2)
    state_a, state_b = tx.init(params_a), tx.init(params_b)
    for _ in range(2):
      _, grads, stats = step_a(params_a)
      updates, state_a = tx.update(grads, state_a, params_a,
                                   layer_stats=stats)
      params_a = optax.apply_updates(params_a, updates)
      _, grads, stats = step_b(params_b, x, y)
      updates, state_b = tx.update(grads, state_b, params_b,
                                   layer_stats=stats)
      params_b = optax.apply_updates(params_b, updates)
    self.assertTrue(_finite((params_a, params_b)))

  def test_uncaptured_layer_gets_the_adam_fallback(self):
    """A kernel init found but no layer captured: Adam, as fo.coverage says."""
    step_fn, params = _three()
    tx = fo.scale_by_kfac(momentum=0.0)
    _, grads, stats = step_fn(params)
    state = tx.init(params)
    stats = {k: v for k, v in stats.items() if k != 'Dense_1'}
    updates, _ = jax.jit(lambda g, s, st: tx.update(g, s, layer_stats=st))(
        grads, state, stats)
    for name in ('kernel', 'bias'):
      g = np.asarray(grads['Dense_1'][name], np.float64)
      # Adam's first step: g / (sqrt(g^2) + eps).
      want = g / (np.abs(g) + 1e-8)
      np.testing.assert_allclose(updates['Dense_1'][name], want, rtol=1e-5,
                                 atol=1e-6)
    self.assertIn('fallback: adam', str(fo.coverage(params, stats)))

  @parameterized.parameters(*[m[0] for m in _METHODS])
  def test_layer_missing_later_keeps_its_inverses(self, method):
    """Captured on step 0, missing on step 1: cached inverses, no refresh.

    The reference refreshes on even steps only and sees Dense_1 on both:
    on step 1 it preconditions Dense_1 with the inverses of step 0, which
    the run without Dense_1's statistics must reproduce (not the Adam
    fallback, which the run took before).
    """
    kw = dict(next(m for m in _METHODS if m[0] == method)[2])
    inner = {'kfac': fo.scale_by_kfac, 'kfac_eigen': fo.scale_by_kfac,
             'tkfac': fo.scale_by_tkfac, 'tkfac_eigen': fo.scale_by_tkfac,
             'ekfac': fo.scale_by_ekfac, 'tekfac': fo.scale_by_tekfac}[method]
    step_fn, params = _three()
    step_fn = jax.jit(step_fn)

    def run(drop, every):
      tx = inner(damping=0.1, stats_every=every, inverse_every=every, **kw)
      update = jax.jit(lambda g, s, st: tx.update(g, s, layer_stats=st))
      p, state, history = params, tx.init(params), []
      for step in range(2):
        _, grads, stats = step_fn(p)
        if step == 1 and drop:
          stats = {k: v for k, v in stats.items() if k != 'Dense_1'}
        updates, state = update(grads, state, stats)
        history.append((updates, state))
        p = optax.apply_updates(p, updates)
      return history

    got, want = run(True, 1), run(False, 2)
    (_, before), (updates, after) = got
    for name in ('kernel', 'bias'):
      w = np.asarray(want[1][0]['Dense_1'][name])
      np.testing.assert_allclose(updates['Dense_1'][name], w, rtol=1e-4,
                                 atol=1e-5 * float(np.max(np.abs(w))),
                                 err_msg=name)
    # Dense_1 kept its statistics and inverses; Dense_0 refreshed both.
    for part in ('stats', 'precond'):
      old, new = getattr(before, part), getattr(after, part)
      chex.assert_trees_all_equal(old['Dense_1'], new['Dense_1'])
      with self.assertRaises(AssertionError):
        chex.assert_trees_all_equal(old['Dense_0'], new['Dense_0'])


class ForeignInputTest(parameterized.TestCase):

  @parameterized.parameters('kfac', 'tkfac', 'ekfac', 'tekfac')
  def test_grads_not_matching_state_names_path(self, factory):
    step_fn, params = _three()
    tx = getattr(fo, f'scale_by_{factory}')()
    _, grads, stats = step_fn(params)
    state = tx.init(params)
    bad = {**grads, 'Dense_2': {'kernel': grads['Dense_2']['kernel']}}
    with self.assertRaisesRegex(ValueError, 'Dense_2/bias'):
      tx.update(bad, state, params, layer_stats=stats)
    bad = {**grads, 'Dense_2': {'kernel': grads['Dense_2']['kernel'][:2],
                                'bias': grads['Dense_2']['bias']}}
    with self.assertRaisesRegex(ValueError, 'Dense_2/kernel'):
      tx.update(bad, state, params, layer_stats=stats)
    # A leaf no layer owns: lists would be zipped out of step.
    bad = {**grads, 'step_scale': jnp.ones(3)}
    with self.assertRaisesRegex(ValueError, "'step_scale'"):
      tx.update(bad, state, params, layer_stats=stats)

  @parameterized.product(factory=['kfac', 'tkfac', 'ekfac', 'tekfac'],
                         fault=['feature', 'batch'])
  def test_bad_layer_stats_name_the_layer(self, factory, fault):
    step_fn, params = _three()
    tx = getattr(fo, f'scale_by_{factory}')()
    _, grads, stats = step_fn(params)
    st = stats['Dense_1']
    if fault == 'feature':
      a = jnp.concatenate([st.a, st.a[..., :1]], -1)
      g = st.g
    else:
      a, g = st.a, st.g[:, :-1]
    stats = {**stats, 'Dense_1': fo.LayerStats(a, g, st.meta, st.extras)}
    with self.assertRaisesRegex(ValueError, r"layer_stats\['Dense_1'\]"):
      tx.update(grads, tx.init(params), params, layer_stats=stats)

  def test_nnx_error_suggests_nnx_layers(self):
    model = nnx.Sequential(
        nnx.Conv(4, 4, (3, 3), feature_group_count=2, rngs=nnx.Rngs(0)),
        lambda x: x.reshape(x.shape[0], -1))
    x = jax.random.normal(jax.random.key(9), (2, 5, 5, 4))
    loss_fn = lambda m, x: jnp.mean(m(x) ** 2)
    _, grads, stats = fo.nnx.value_grad_and_stats(loss_fn)(model, x)
    params = nnx.state(model, nnx.Param)
    tx = fo.scale_by_kfac()
    with self.assertRaisesRegex(ValueError, 'nnx.eval_shape'):
      tx.update(grads, tx.init(params), params, layer_stats=stats)


def _options(**kw):
  base = dict(where='test', damping=0.1, fisher_decay=0.9, momentum=0.5,
              stats_every=2, inverse_every=1, block_size=None,
              damping_mode='factored', momentum_style='heavy_ball',
              loss_reduction='mean', inverse_method='cholesky',
              fallback_b2=0.999, fallback_eps=1e-8, axis_name=None,
              eigen_correction=False, decay_schedule='constant',
              conv_scaling='per_example', dense_damping='beta')
  return _kronecker.Options(**{**base, **kw})


class StageTest(parameterized.TestCase):
  """The engine's stages, each alone."""

  @parameterized.parameters('constant', 'martens')
  def test_average_weight(self, schedule):
    opts = _options(decay_schedule=schedule)
    for count in range(0, 40, 2):
      k = count // 2 + 1
      decay = 0.9 if schedule == 'constant' else min(1 - 1 / k, 0.9)
      want = 1.0 if count == 0 else 1 - decay
      np.testing.assert_allclose(
          _kronecker.average_weight(opts, jnp.asarray(count)), want,
          rtol=1e-6)

  def test_refresh_norm_diagonals_averages_and_guards(self):
    step_fn, params, x, y = _problem()
    _, _, stats = jax.jit(step_fn)(params, x, y)
    st = stats['LayerNorm_0']
    old = {'LayerNorm_0/scale': jnp.full((48,), 2.0),
           'LayerNorm_0/bias': jnp.full((48,), 3.0)}
    opts = _options()
    norms = {'LayerNorm_0': st}
    new, bad = jax.jit(lambda n: _kronecker.refresh_norm_diagonals(
        opts, norms, n, jnp.asarray(2)))(old)
    fresh = _stats.adafisher_factors(st, False)[0]
    for name in ('scale', 'bias'):
      want = 0.9 * old[f'LayerNorm_0/{name}'] + 0.1 * 8 ** 2 * fresh[name].s
      np.testing.assert_allclose(new[f'LayerNorm_0/{name}'], want,
                                 rtol=1e-5, atol=1e-6 * np.max(want))
    self.assertEqual(int(bad), 0)
    poison = {'LayerNorm_0': fo.LayerStats(
        st.a, st.g.at[0, 0, 0].set(np.inf), st.meta, st.extras)}
    new, bad = jax.jit(lambda n: _kronecker.refresh_norm_diagonals(
        opts, poison, n, jnp.asarray(2)))(old)
    for path, value in old.items():
      np.testing.assert_array_equal(new[path], value)
    self.assertEqual(int(bad), 2)

  def test_heavy_ball(self):
    opts = _options(momentum=0.5)
    out, mu = _kronecker.heavy_ball(opts, [jnp.ones(3)], [jnp.full(3, 4.0)])
    np.testing.assert_array_equal(out[0], np.full(3, 3.0))
    np.testing.assert_array_equal(mu[0], np.full(3, 3.0))


if __name__ == '__main__':
  absltest.main()
