"""AdaFisher under faults: dead layers, bad statistics, bad arguments.

Also float64, frozen (masked) parameters, several models served by one
optimizer object, integer leaves and the official code's conv statistics.
"""

import itertools

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import fisher_optax as fo

from _tolerance import assert_close


def _np(x):
  return np.asarray(x, np.float64)


def _flat(tree):
  return fo._base.flatten_with_paths(tree)  # pylint: disable=protected-access


def _all_finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def _inner(state):
  """The ScaleByAdaFisherState inside a chain (or a wrapper's) state."""
  is_state = lambda s: isinstance(s, fo.ScaleByAdaFisherState)
  (found,) = [s for s in jax.tree.leaves(state, is_leaf=is_state)
              if is_state(s)]
  return found


class Net(nn.Module):
  """hidden -> relu -> LayerNorm -> head, plus a branch the loss ignores."""

  zero_head: bool = True
  dead_relu: bool = False

  @nn.compact
  def __call__(self, x):
    nn.Dense(3, name='unused')(x)  # computed, never reaches the loss
    bias = nn.initializers.constant(-100.0 if self.dead_relu else 0.1)
    h = nn.relu(nn.Dense(6, name='hidden', bias_init=bias)(x))
    h = nn.LayerNorm(name='norm')(h)
    head_init = (nn.initializers.zeros if self.zero_head
                 else nn.initializers.lecun_normal())
    return nn.Dense(2, name='head', kernel_init=head_init)(h)


class ZeroRangeTest(parameterized.TestCase):
  """Layers whose output gradients are all zero get ``F = damping``."""

  @parameterized.parameters(itertools.product(
      ('paper', 'reference'), ('zero_head', 'dead_relu', 'zero_loss')))
  def test_dead_layers_are_finite(self, mode, case):
    model = Net(zero_head=case != 'dead_relu', dead_relu=case == 'dead_relu')
    x = jax.random.normal(jax.random.key(0), (8, 4))
    y = jax.random.normal(jax.random.key(1), (8, 2))
    params = model.init(jax.random.key(2), x)['params']
    factor = 0.0 if case == 'zero_loss' else 1.0
    loss = lambda p, x, y: factor * jnp.mean(
        (model.apply({'params': p}, x) - y) ** 2)
    step_fn = fo.linen.value_grad_and_stats(loss)
    lr, b1, damping, wd = 1e-2, 0.9, 1e-3, 1e-2
    # Coupled L2 makes the dead layers' gradients non-zero from step 1.
    tx = fo.adafisher(lr, b1=b1, damping=damping, weight_decay=wd,
                      stats_every=10, mode=mode)

    @jax.jit
    def step(p, state):
      _, grads, stats = step_fn(p, x, y)
      updates, state = tx.update(grads, state, p, layer_stats=stats)
      return optax.apply_updates(p, updates), state, grads, updates

    dead = {'zero_head': ('unused', 'hidden', 'norm'),
            'dead_relu': ('unused', 'hidden'),
            'zero_loss': ('unused', 'hidden', 'norm', 'head')}[case]
    state = tx.init(params)
    p = params
    mu = {k: 0.0 for k in _flat(params)}
    for t in range(1, 4):
      old = _flat(p)
      p, state, grads, updates = step(p, state)
      self.assertTrue(_all_finite(p), f'step {t}')
      self.assertTrue(_all_finite(state), f'step {t}')
      if mode != 'paper':
        continue
      # Paper mode: minmax of a zero-range S_D is 0, so F = damping and the
      # update is the closed form -lr * m_hat / damping (no refresh after
      # step 0 with stats_every=10, so it holds on every step here).
      for path, g in _flat(grads).items():
        mu[path] = b1 * mu[path] + (1 - b1) * (_np(g) + wd * _np(old[path]))
        if path.split('/')[0] in dead:
          want = -lr * mu[path] / (1 - b1 ** t) / damping
          assert_close(_flat(updates)[path], want, rtol=1e-5,
                       err_msg=f'{path} step {t}')
    self.assertEqual(int(_inner(state).nonfinite), 0)


def _replace_inner(state, **fields):
  """``state`` with the ScaleByAdaFisherState's ``fields`` replaced."""
  is_state = lambda s: isinstance(s, fo.ScaleByAdaFisherState)
  return jax.tree.map(lambda s: s._replace(**fields) if is_state(s) else s,
                      state, is_leaf=is_state)


def _ulps_above(value, n):
  x = np.float32(value)
  for _ in range(n):
    x = np.nextafter(x, np.float32(np.inf))
  return x


class RoundingTest(parameterized.TestCase):
  """Rounding in the output-side factor never decides the preconditioner.

  A layer with one output feature (a scalar regression head) has one
  ``S_D`` for its kernel and bias, so its exact ``F`` is the damping. XLA
  computed the averaged factor twice, rounded an ulp apart; the paper-mode
  min-max turned that ulp into a normalised factor of ~0.1, or, with the
  stored entry below its own minimum, into a negative ``F`` that diverged.
  """

  @parameterized.parameters(0, 1, 8, 64, 4096)
  def test_range_within_rounding_is_no_range(self, ulps):
    rng = np.random.default_rng(ulps)
    value = np.float32(1.5e-4)
    s_kernel, s_bias = value, _ulps_above(value, ulps)
    h_kernel = rng.uniform(0.1, 0.9, (4, 1)).astype(np.float32)
    zeros = [jnp.zeros((4, 1)), jnp.zeros((1,))]
    old = fo._adafisher.Curvature(zeros, zeros, zeros, zeros)  # pylint: disable=protected-access
    eps = 1e-6
    # fisher_decay=0: the averages are this step's factors, bit for bit.
    paper = fo._adafisher.paper_average_then_normalise  # pylint: disable=protected-access
    combine = jax.jit(lambda o, h, s: paper(o, h, s, 0, 0.0, eps, True))
    new = combine(old, [jnp.asarray(h_kernel), jnp.ones((1,))],
                  [jnp.full((1,), s_kernel), jnp.full((1,), s_bias)])
    got = [np.asarray(sc * (s - sh), np.float64)
           for sc, s, sh in zip(new.scale, new.s, new.shift)]
    if ulps <= 64:
      # No range: F = damping on the whole layer, as in exact arithmetic.
      for x in got:
        np.testing.assert_array_equal(x, 0.0)
      return
    # A range above rounding is normalised as the paper says (float64).
    h = np.concatenate([h_kernel.ravel(), [1.0]]).astype(np.float64)
    s = np.array([s_kernel] * 4 + [s_bias], np.float64)
    mm = lambda v: (v - v.min()) / (v.max() - v.min() + eps * v.max())
    want = mm(h) * mm(s)
    assert_close(np.concatenate([x.ravel() for x in got]), want, rtol=1e-4)
    self.assertGreater(want.max(), 0.9)

  @parameterized.parameters('adafisher', 'adafisherw')
  def test_entry_below_its_minimum_keeps_f_at_the_damping(self, name):
    model = nn.Dense(1)
    x = jax.random.normal(jax.random.key(0), (16, 3))
    y = jax.random.normal(jax.random.key(1), (16, 1))
    params = model.init(jax.random.key(2), x)['params']
    loss = lambda p: jnp.mean((model.apply({'params': p}, x) - y) ** 2)
    step_fn = fo.linen.value_grad_and_stats(loss)
    lr, b1, damping = 1e-3, 0.9, 1e-3
    tx = getattr(fo, name)(lr, b1=b1, damping=damping, weight_decay=0.0,
                           stats_every=10, mode='paper')

    @jax.jit
    def step(p, state):
      _, grads, stats = step_fn(p)
      updates, state = tx.update(grads, state, p, layer_stats=stats)
      return updates, state

    _, state = step(params, tx.init(params))
    inner = _inner(state)
    # The state that diverged: the kernel's stored factor an ulp below the
    # layer's minimum, times the scale ~1/(eps max S) of a one-value range.
    shift = inner.shift['kernel']
    below = jnp.nextafter(jnp.broadcast_to(shift, inner.s['kernel'].shape),
                          -jnp.inf)
    state = _replace_inner(
        state, s=dict(inner.s, kernel=below),
        scale=dict(inner.scale, kernel=jnp.full_like(shift, 1e9)))
    updates, state = step(params, state)  # count 1: no refresh
    m_hat = _np(_inner(state).mu['kernel']) / (1 - b1 ** 2)
    assert_close(updates['kernel'], -lr * m_hat / damping, rtol=1e-5)


class Mlp(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(5)(x))
    x = nn.LayerNorm(name='norm')(x)
    return nn.Dense(3)(x)


def _mlp_setup(seed=0):
  model = Mlp()
  x = jax.random.normal(jax.random.key(seed), (8, 4))
  params = model.init(jax.random.key(seed + 1), x)['params']
  loss = lambda p, x: jnp.mean(jnp.sin(model.apply({'params': p}, x)) ** 2)
  _, grads, stats = jax.jit(fo.linen.value_grad_and_stats(loss))(params, x)
  return params, grads, stats


def _with(st, field, value, index=(0, 0, 0)):
  a = st.a.at[index].set(value) if field == 'a' else st.a
  g = st.g.at[index].set(value) if field == 'g' else st.g
  return fo.LayerStats(a, g, st.meta, st.extras)


class GuardTest(parameterized.TestCase):
  """A refresh that would make anything used non-finite is skipped."""

  @parameterized.parameters(
      ('paper', 'Dense_0', 'a', np.inf),
      ('paper', 'Dense_0', 'g', np.nan),
      ('paper', 'norm', 'g', np.inf),
      ('paper', 'norm', 'g', np.nan),
      ('reference', 'Dense_1', 'a', np.nan),
      ('reference', 'norm', 'a', np.inf),
      ('reference', 'norm', 'g', np.nan),
  )
  def test_bad_layer_keeps_state_others_refresh(self, mode, layer, field,
                                                value):
    params, grads, stats = _mlp_setup()
    tx = fo.adafisher(1e-3, stats_every=1, mode=mode)
    update = jax.jit(lambda s, st: tx.update(grads, s, params,
                                             layer_stats=st))
    _, state = update(tx.init(params), stats)
    bad = dict(stats)
    bad[layer] = _with(stats[layer], field, value)
    updates, new = update(state, bad)
    self.assertTrue(_all_finite(optax.apply_updates(params, updates)))
    inner, inner_new = _inner(state), _inner(new)
    self.assertEqual(int(inner_new.nonfinite), 1)
    for slot in ('h', 's', 'scale', 'shift'):
      old_slot = _flat(getattr(inner, slot))
      new_slot = _flat(getattr(inner_new, slot))
      for path in old_slot:
        if path.startswith(layer + '/'):
          np.testing.assert_array_equal(new_slot[path], old_slot[path],
                                        err_msg=f'{slot} {path}')
    # The other layers were refreshed (the EMA moved).
    for other in set(stats) - {layer}:
      path = other + '/' + ('scale' if other == 'norm' else 'kernel')
      self.assertFalse(np.array_equal(_flat(inner_new.s)[path],
                                      _flat(inner.s)[path]), path)


class HyperparameterTest(parameterized.TestCase):

  @parameterized.parameters(
      (dict(damping=0.0), 'damping'),
      (dict(damping=-1.0), 'damping'),
      (dict(damping=float('nan')), 'damping'),
      (dict(b1=1.0), 'b1'),
      (dict(fisher_decay=1.5), 'fisher_decay'),
      (dict(learning_rate=float('nan')), 'learning_rate'),
      (dict(eps=-1e-6), 'eps'),
      (dict(weight_decay=-1.0), 'weight_decay'),
      (dict(fallback_b2=1.0), 'fallback_b2'),
      (dict(fallback_eps=-1.0), 'fallback_eps'),
  )
  def test_bad_values_name_the_argument(self, kwargs, name):
    for make in (fo.adafisher, fo.adafisherw, fo.scale_by_adafisher):
      kw = dict(kwargs)
      if make is fo.scale_by_adafisher and ('learning_rate' in kw or
                                            'weight_decay' in kw):
        continue
      with self.assertRaisesRegex(ValueError, name):
        make(**kw)

  @parameterized.parameters(itertools.product(
      (fo.adafisher, fo.adafisherw), ('paper', 'reference')))
  def test_inject_hyperparams_still_works(self, make, mode):
    """Traced (injected) values are not checked, and give the same update."""
    params, grads, stats = _mlp_setup()
    tx = optax.inject_hyperparams(
        make, static_args=('stats_every', 'mode', 'fallback'))(
            learning_rate=1e-3, damping=3e-3, weight_decay=1e-2,
            stats_every=2, mode=mode, fallback='adam')
    plain = make(1e-3, damping=3e-3, weight_decay=1e-2, stats_every=2,
                 mode=mode)
    u1, _ = jax.jit(lambda s: tx.update(grads, s, params,
                                        layer_stats=stats))(tx.init(params))
    u2, _ = jax.jit(lambda s: plain.update(
        grads, s, params, layer_stats=stats))(plain.init(params))
    jax.tree.map(lambda a, b: assert_close(a, b, rtol=1e-6), u1, u2)


class ConvNet(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.dtype)
    x = nn.tanh(nn.Conv(4, (3, 3), padding='SAME', **kw)(x))
    x = nn.LayerNorm(**kw)(x)
    return nn.Dense(2, **kw)(x.reshape(x.shape[0], -1))


class Float64Test(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    # Drawn once in float32: under x64 jax.random draws other numbers.
    self.x = np.asarray(jax.random.normal(jax.random.key(0), (4, 5, 5, 2)))
    self.y = np.asarray(jax.random.normal(jax.random.key(1), (4, 2)))
    self.params = jax.tree.map(np.asarray, ConvNet().init(
        jax.random.key(2), self.x)['params'])

  def _run(self, make, dtype, mode):
    model = ConvNet(dtype)
    x, y = jnp.asarray(self.x, dtype), jnp.asarray(self.y, dtype)
    params = jax.tree.map(lambda p: jnp.asarray(p, dtype), self.params)
    loss = lambda p: jnp.mean((model.apply({'params': p}, x) - y) ** 2)
    step_fn = fo.linen.value_grad_and_stats(loss)
    tx = make(1e-3, stats_every=2, mode=mode)

    @jax.jit
    def step(p, state):
      _, grads, stats = step_fn(p)
      updates, state = tx.update(grads, state, p, layer_stats=stats)
      return optax.apply_updates(p, updates), state

    state = tx.init(params)
    p = params
    for _ in range(3):
      p, state = step(p, state)
    return params, p, state

  @parameterized.parameters(itertools.product(
      (fo.adafisher, fo.adafisherw), ('paper', 'reference')))
  def test_float64_matches_float32(self, make, mode):
    p0_32, p32, _ = self._run(make, jnp.float32, mode)
    with jax.enable_x64(True):
      p0_64, p64, state = self._run(make, jnp.float64, mode)
      for leaf in jax.tree.leaves(p64):
        self.assertEqual(leaf.dtype, jnp.float64)
      inner = _inner(state)
      for slot in ('mu', 'h', 's', 'scale', 'shift'):
        for leaf in jax.tree.leaves(getattr(inner, slot)):
          self.assertEqual(leaf.dtype, jnp.float64, slot)
      d64 = jax.tree.map(lambda a, b: _np(a) - _np(b), p64, p0_64)
    d32 = jax.tree.map(lambda a, b: _np(a) - _np(b), p32, p0_32)
    # float32 rounding of the normalised factors reaches the step through
    # 1/F <= 1/damping = 1e3: measured 1.6e-4 of max|step| ('paper'), 3e-6
    # ('reference'); a float32 state or statistic anywhere fails too.
    jax.tree.map(lambda a, b: assert_close(a, b, rtol=1e-3, scale_atol=1e-3),
                 d32, d64)

  @parameterized.parameters('paper', 'reference')
  def test_bfloat16_params_keep_float32_statistics(self, mode):
    _, p, state = self._run(fo.adafisherw, jnp.bfloat16, mode)
    self.assertTrue(_all_finite(p))
    inner = _inner(state)
    for slot in ('h', 's', 'scale', 'shift'):
      for leaf in jax.tree.leaves(getattr(inner, slot)):
        self.assertEqual(leaf.dtype, jnp.float32, slot)

  def test_conv_patch_second_moment_float64(self):
    with jax.enable_x64(True):
      model = nn.Conv(3, (2, 2), padding='VALID', param_dtype=jnp.float64,
                      dtype=jnp.float64)
      x = jax.random.normal(jax.random.key(3), (2, 4, 4, 2), jnp.float64)
      params = model.init(jax.random.key(0), x)['params']
      loss = lambda p: jnp.sum(model.apply({'params': p}, x) ** 2)
      _, _, stats = jax.jit(fo.linen.value_grad_and_stats(loss))(params)
      total, count = jax.jit(
          lambda a: fo._stats.conv_patch_second_moment(  # pylint: disable=protected-access
              a, stats[''].meta))(stats[''].a[0])
      self.assertEqual(total.dtype, jnp.float64)
      xs = _np(x)
      want = sum(xs[:, i:i + 2, j:j + 2] ** 2 for i in range(3)
                 for j in range(3)).sum(0)
      np.testing.assert_allclose(_np(total), want, rtol=1e-12)
      self.assertEqual(count, 18)


class Two(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(5, name='first')(x))
    return nn.Dense(3, name='second', use_bias=False)(x)


class FrozenAndForeignTest(parameterized.TestCase):

  def _grads_stats(self, model, params, x):
    loss = lambda p: jnp.mean(jnp.sin(model.apply({'params': p}, x) + 1) ** 2)
    _, grads, stats = jax.jit(fo.linen.value_grad_and_stats(loss))(params)
    return grads, stats

  @parameterized.parameters(itertools.product(
      ('masked', 'multi_transform'), ('paper', 'reference')))
  def test_frozen_layer_and_frozen_bias(self, wrapper, mode):
    """A frozen bias makes a bias-less layer; a frozen layer is ignored."""
    x = jax.random.normal(jax.random.key(0), (8, 4))
    params = Mlp().init(jax.random.key(1), x)['params']
    grads, stats = self._grads_stats(Mlp(), params, x)
    # The same network without Dense_1's bias (zero-initialised, so the
    # forward pass, gradients and statistics are the same).

    class NoBias(nn.Module):

      @nn.compact
      def __call__(self, x):
        x = nn.tanh(nn.Dense(5)(x))
        x = nn.LayerNorm(name='norm')(x)
        return nn.Dense(3, use_bias=False)(x)

    nb_params = {k: v for k, v in params.items()}
    nb_params['Dense_1'] = {'kernel': params['Dense_1']['kernel']}
    nb_grads, nb_stats = self._grads_stats(NoBias(), nb_params, x)
    trainable = {'Dense_0': {'kernel': False, 'bias': False},
                 'norm': {'scale': True, 'bias': True},
                 'Dense_1': {'kernel': True, 'bias': False}}
    inner = fo.adafisher(1e-2, stats_every=1, mode=mode)
    if wrapper == 'masked':
      tx = optax.masked(inner, trainable)
    else:
      labels = jax.tree.map(lambda t: 'train' if t else 'frozen', trainable)
      tx = optax.multi_transform(
          {'train': inner, 'frozen': optax.set_to_zero()}, labels)
    ref = fo.adafisher(1e-2, stats_every=1, mode=mode)
    step = jax.jit(lambda tx, g, s, p, st: tx.update(g, s, p, layer_stats=st),
                   static_argnums=0)
    state, ref_state = tx.init(params), ref.init(nb_params)
    for _ in range(2):
      updates, state = step(tx, grads, state, params, stats)
      ref_updates, ref_state = step(ref, nb_grads, ref_state, nb_params,
                                    nb_stats)
    assert_close(updates['Dense_1']['kernel'], ref_updates['Dense_1']['kernel'],
                 rtol=1e-5)
    frozen = (lambda g: g) if wrapper == 'masked' else jnp.zeros_like
    for path in ('Dense_0/kernel', 'Dense_0/bias', 'Dense_1/bias'):
      np.testing.assert_array_equal(_flat(updates)[path],
                                    frozen(_flat(grads)[path]), path)

  @parameterized.parameters(itertools.product(
      ('adafisher', 'adafisherw'), ('paper', 'reference'), ('adam', 'damping')))
  def test_layer_missing_later_keeps_its_curvature(self, name, mode,
                                                   fallback):
    """Captured on step 0, missing on step 1: stored curvature, no refresh.

    The reference refreshes on even steps only and sees Dense_1 on both:
    on step 1 it preconditions Dense_1 with the curvature of step 0, which
    the run without Dense_1's statistics must reproduce (it took the
    fallback before, and the Adam fallback overwrote ``s``). A layer never
    captured still takes the fallback.
    """
    x = jax.random.normal(jax.random.key(0), (8, 4))
    params = Mlp().init(jax.random.key(1), x)['params']
    loss = lambda p: jnp.mean(jnp.sin(Mlp().apply({'params': p}, x)) ** 2)
    step_fn = jax.jit(fo.linen.value_grad_and_stats(loss))

    def run(drop, every, steps=2, drop_from=1):
      tx = getattr(fo, name)(0.1, damping=0.1, weight_decay=0.0, mode=mode,
                             stats_every=every, fallback=fallback)
      update = jax.jit(lambda g, s, p, st: tx.update(g, s, p,
                                                     layer_stats=st))
      p, state, history = params, tx.init(params), []
      for step in range(steps):
        _, grads, stats = step_fn(p)
        if step >= drop_from and drop:
          stats = {k: v for k, v in stats.items() if k != 'Dense_1'}
        updates, state = update(grads, state, p, stats)
        history.append((updates, _inner(state)))
        p = optax.apply_updates(p, updates)
      return history

    got, want = run(True, 1), run(False, 2)
    (_, before), (updates, after) = got
    for leaf in ('kernel', 'bias'):
      w = _np(want[1][0]['Dense_1'][leaf])
      assert_close(updates['Dense_1'][leaf], w, rtol=1e-5,
                   err_msg=f'Dense_1 {leaf}')
      for slot in ('h', 's', 'scale', 'shift'):
        np.testing.assert_array_equal(
            getattr(after, slot)['Dense_1'][leaf],
            getattr(before, slot)['Dense_1'][leaf], err_msg=slot)
      self.assertTrue(bool(after.captured['Dense_1'][leaf]))
    # Dense_0 refreshed on step 1.
    self.assertFalse(np.array_equal(after.s['Dense_0']['kernel'],
                                    before.s['Dense_0']['kernel']))
    # Never captured: the fallback, as fo.coverage says.
    (updates, state), = run(True, 1, steps=1, drop_from=0)
    self.assertFalse(bool(state.captured['Dense_1']['kernel']))
    g = _np(step_fn(params)[1]['Dense_1']['kernel'])
    # The first step: m_hat = g; Adam's denominator |g| + eps, else damping.
    denom = np.abs(g) + 1e-8 if fallback == 'adam' else 0.1
    want = -0.1 * g / denom
    assert_close(updates['Dense_1']['kernel'], want, rtol=1e-5)

  def test_one_optimizer_two_models(self):
    tx = fo.adafisher(1e-3, stats_every=1)
    update = jax.jit(lambda g, s, p, st: tx.update(g, s, p, layer_stats=st))
    xa = jax.random.normal(jax.random.key(0), (8, 4))
    pa = Mlp().init(jax.random.key(1), xa)['params']
    ga, sa = self._grads_stats(Mlp(), pa, xa)
    xb = jax.random.normal(jax.random.key(2), (8, 6))
    pb = Two().init(jax.random.key(3), xb)['params']
    gb, sb = self._grads_stats(Two(), pb, xb)
    state_a, state_b = tx.init(pa), tx.init(pb)
    for _ in range(2):
      ua, state_a = update(ga, state_a, pa, sa)
      ub, state_b = update(gb, state_b, pb, sb)
    self.assertTrue(_all_finite(ua))
    self.assertTrue(_all_finite(ub))
    # Each model's update is the one a fresh optimizer gives it.
    fresh = fo.adafisher(1e-3, stats_every=1)
    fb = fresh.init(pb)
    for _ in range(2):
      ub2, fb = fresh.update(gb, fb, pb, layer_stats=sb)
    jax.tree.map(lambda a, b: assert_close(a, b, rtol=1e-6), ub, ub2)

  @parameterized.parameters(itertools.product(
      (('missing', r"has no 'Dense_1/bias'"),
       ('extra', r"'Dense_2/kernel'"),
       ('shape', r"'Dense_0/kernel' has shape")),
      ('scale_by_adafisher', 'adafisher', 'adafisherw')))
  def test_grads_not_matching_state(self, case, name):
    kind, pattern = case
    params, grads, stats = _mlp_setup()
    tx = getattr(fo, name)()
    state = tx.init(params)
    grads = jax.tree.map(lambda x: x, grads)
    if kind == 'missing':
      del grads['Dense_1']['bias']
    elif kind == 'extra':
      grads['Dense_2'] = {'kernel': jnp.zeros((3, 3))}
    else:
      grads['Dense_0']['kernel'] = jnp.zeros((4, 6))
    with self.assertRaisesRegex(ValueError, pattern):
      tx.update(grads, state, params, layer_stats=stats)

  @parameterized.parameters(fo.adafisher, fo.adafisherw)
  def test_integer_leaf_is_not_touched(self, make):
    params, grads, stats = _mlp_setup()
    params = dict(params, step=jnp.array(7, jnp.int32))
    grads = dict(grads, step=jnp.array(0, jnp.int32))
    tx = make(1e-2, weight_decay=0.5)

    @jax.jit
    def step(p, state):
      updates, state = tx.update(grads, state, p, layer_stats=stats)
      return optax.apply_updates(p, updates), state

    p, state = params, tx.init(params)
    for _ in range(3):
      p, state = step(p, state)
    self.assertEqual(p['step'].dtype, jnp.int32)
    self.assertEqual(int(p['step']), 7)
    self.assertTrue(_all_finite({k: v for k, v in p.items() if k != 'step'}))

  @parameterized.named_parameters(
      ('feature_size', 'features'),
      ('batch_mismatch', 'batch'),
  )
  def test_bad_layer_stats_arrays_name_the_layer(self, kind):
    params, grads, stats = _mlp_setup()
    st = stats['Dense_0']
    if kind == 'features':
      st = fo.LayerStats(st.a[..., :-1], st.g, st.meta)
    else:
      st = fo.LayerStats(st.a[:, :5], st.g, st.meta)
    bad = dict(stats, Dense_0=st)
    tx = fo.adafisher(1e-3)
    with self.assertRaisesRegex(ValueError, r"layer_stats\['Dense_0'\]"):
      tx.update(grads, tx.init(params), params, layer_stats=bad)


class StageTest(parameterized.TestCase):
  """The update's stages on their own, against closed forms."""

  @parameterized.parameters(False, True)
  def test_paper_stage(self, dead):
    from fisher_optax import _adafisher  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng(0)
    hk = rng.random(3)
    sv = np.zeros(4) if dead else rng.random(4) * 1e-3
    # A dense (3, 4) kernel and its (4,) bias, from a zero state.
    old = _adafisher.Curvature(
        [jnp.zeros((3, 1)), jnp.zeros((1,))], [jnp.zeros((3, 4)),
                                               jnp.zeros((4,))],
        [jnp.zeros((3, 1)), jnp.zeros((1,))], [jnp.zeros((3, 1)),
                                               jnp.zeros((1,))])
    new_h = [jnp.asarray(hk[:, None], jnp.float32), jnp.ones((1,))]
    new_s = [jnp.broadcast_to(jnp.asarray(sv, jnp.float32), (3, 4)),
             jnp.asarray(sv, jnp.float32)]
    decay, eps, damping = 0.8, 1e-6, 1e-3
    curv = jax.jit(lambda o, h, s: _adafisher.paper_average_then_normalise(
        o, h, s, 0, decay, eps, True))(old, new_h, new_s)
    f = [c * (s_ - t) + damping
         for c, s_, t in zip(curv.scale, curv.s, curv.shift)]
    h = (1 - decay) * np.append(hk, 1.0)
    s_ema = (1 - decay) * sv
    tiny = np.finfo(np.float32).tiny
    mm_h = (h - h.min()) / (h.max() - h.min() + eps * h.max() + tiny)
    spread = s_ema.max() - s_ema.min() + eps * s_ema.max()
    mm_s = ((s_ema - s_ema.min()) / (spread + tiny) if spread >= tiny
            else np.zeros(4))
    want = np.outer(mm_h, mm_s) + damping
    assert_close(f[0], want[:3], rtol=1e-5)
    assert_close(f[1], want[3], rtol=1e-5)
    if dead:
      np.testing.assert_array_equal(np.concatenate(
          [np.ravel(f[0]), f[1]]), np.float32(damping))

  def test_keep_finite(self):
    from fisher_optax import _adafisher  # pylint: disable=g-import-not-at-top
    old = _adafisher.Curvature([jnp.ones(2)], [jnp.ones(3)], [jnp.ones(2)],
                               [jnp.zeros(2)])
    new = old._replace(scale=[jnp.array([2.0, jnp.inf])])
    kept, finite = _adafisher.keep_finite(new, old)
    self.assertFalse(bool(finite))
    np.testing.assert_array_equal(kept.scale[0], old.scale[0])
    good = old._replace(s=[jnp.full(3, 5.0)])
    kept, finite = _adafisher.keep_finite(good, old)
    self.assertTrue(bool(finite))
    np.testing.assert_array_equal(kept.s[0], good.s[0])


def _official_conv_step(x, g, kernel, bias, grads, lr, damping, eps, groups):
  """One step of the official AdaFisher on a conv with bias (numpy loops).

  Follows optimizers/AdaFisher.py (AtlasAnalyticsLab/AdaFisher, eb858c6):
  H_D over ones-augmented patches pooled across groups, divided by
  ``batch * positions * D`` (``D`` the patch length of one group); S_D the
  mean of squared output gradients; min-max (absolute eps) of both; EMA
  ``0.08 * ones + 0.008 * new``; ``F = S_D[o] * H_D[j] + damping``; step 1
  of the bias-corrected momentum is the gradient.
  """
  b, hh, ww, c_in = x.shape
  kh, kw, cg, c_out = kernel.shape
  oh, ow = hh - kh + 1, ww - kw + 1
  d = kh * kw * cg
  acc = np.zeros(d + 1)
  for n, i, j, grp in itertools.product(range(b), range(oh), range(ow),
                                        range(groups)):
    patch = x[n, i:i + kh, j:j + kw, grp * cg:(grp + 1) * cg].reshape(-1)
    acc += np.append(patch, 1.0) ** 2
  h_new = acc / (b * oh * ow * d)
  s_new = np.mean(g.reshape(-1, c_out) ** 2, 0)
  minmax = lambda v: (v - v.min()) / (v.max() - v.min() + eps)
  gamma = 0.8
  h = gamma / 10 * np.ones(d + 1) + gamma / 100 * minmax(h_new)
  s = gamma / 10 * np.ones(c_out) + gamma / 100 * minmax(s_new)
  f = np.outer(h, s) + damping  # (d + 1, c_out); last row is the bias
  new_kernel = kernel - lr * grads['kernel'] / f[:-1].reshape(kernel.shape)
  new_bias = bias - lr * grads['bias'] / f[-1]
  return new_kernel, new_bias


class ReferenceConvTest(parameterized.TestCase):

  @parameterized.parameters(1, 2)
  def test_conv_with_bias_matches_official_code(self, groups):
    model = nn.Conv(4, (3, 3), padding='VALID', feature_group_count=groups)
    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 4)) * 0.5 + 0.2
    params = model.init(jax.random.key(1), x)['params']
    loss = lambda p: jnp.mean(jnp.sin(model.apply({'params': p}, x) + 0.3))
    lr, damping, eps = 1e-2, 1e-3, 0.1  # a large eps shows the scale of H_D
    tx = fo.adafisher(lr, damping=damping, eps=eps, mode='reference')
    step_fn = fo.linen.value_grad_and_stats(loss)

    @jax.jit
    def step(p, state):
      _, grads, stats = step_fn(p)
      updates, state = tx.update(grads, state, p, layer_stats=stats)
      return optax.apply_updates(p, updates), grads, stats

    new, grads, stats = step(params, tx.init(params))
    want_kernel, want_bias = _official_conv_step(
        _np(x), _np(stats[''].g[0]), _np(params['kernel']),
        _np(params['bias']), jax.tree.map(_np, grads), lr, damping, eps,
        groups)
    assert_close(_np(new['kernel']) - _np(params['kernel']),
                 want_kernel - _np(params['kernel']), rtol=1e-4)
    assert_close(_np(new['bias']) - _np(params['bias']),
                 want_bias - _np(params['bias']), rtol=1e-4)


if __name__ == '__main__':
  absltest.main()
