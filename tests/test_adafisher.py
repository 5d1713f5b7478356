"""AdaFisher against loop-based numpy references."""

import itertools

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import fisher_optax as fo
from fisher_optax import _stats

from _tolerance import assert_close
from _tolerance import assert_trees_close
from _tolerance import tree_scale


def _capture(model, x, loss=None, **init_kw):
  params = model.init(jax.random.key(0), x, **init_kw)['params']
  loss = loss or (lambda p, x: jnp.mean(
      jnp.sin(model.apply({'params': p}, x)) ** 2))
  step = jax.jit(fo.linen.value_grad_and_stats(loss))
  _, grads, stats = step(params, x)
  return params, grads, stats


def _np(x):
  return np.asarray(x, np.float64)


def _minmax(v, eps, relative):
  lo, hi = v.min(), v.max()
  return (v - lo) / (hi - lo + (eps * abs(hi) + np.finfo(np.float32).tiny
                                if relative else eps))


class StatisticsTest(parameterized.TestCase):
  """Raw factors H_D, S_D against per-row numpy loops."""

  def test_dense(self):
    x = jax.random.normal(jax.random.key(1), (6, 5, 3))  # tokens as rows
    _, _, stats = _capture(nn.Dense(4), x)
    st = stats['']
    factors, normalise_h = jax.jit(
        lambda s: _stats.adafisher_factors(s, False))(st)
    a = _np(st.a).reshape(-1, 3)
    g = _np(st.g).reshape(-1, 4)
    h = np.array([np.mean([r[j] ** 2 for r in a]) for j in range(3)])
    s = np.array([np.mean([r[i] ** 2 for r in g]) for i in range(4)])
    self.assertTrue(normalise_h)
    assert_close(factors['kernel'].h[:, 0], h, rtol=1e-5)
    assert_close(factors['kernel'].s[0], s, rtol=1e-5)
    np.testing.assert_allclose(factors['bias'].h, [1.0])
    assert_close(factors['bias'].s, s, rtol=1e-5)

  @parameterized.named_parameters(
      ('valid', dict(padding='VALID')),
      ('same_stride', dict(padding='SAME', strides=2)),
      ('dilated', dict(padding='SAME', kernel_dilation=2)),
      ('explicit', dict(padding=((1, 2), (0, 1)))),
      ('groups', dict(padding='SAME', feature_group_count=2)),
      ('circular', dict(padding='CIRCULAR')),
  )
  def test_conv(self, kw):
    x = jax.random.normal(jax.random.key(2), (2, 7, 6, 4))
    conv = nn.Conv(6, (3, 2), **kw)
    _, _, stats = _capture(conv, x)
    st = stats['']
    factors, _ = jax.jit(lambda s: _stats.adafisher_factors(s, False))(st)
    cfg = dict(st.meta.config)
    # Loop im2col: explicit padding, strides, dilation, group pooling.
    xs = _np(x)
    kh, kw_ = cfg['kernel_size']
    sh, sw = cfg['strides']
    dh, dw = cfg['rhs_dilation']
    if cfg['pre_pad'] is not None:
      mode, pads = cfg['pre_pad']
      xs = np.pad(xs, ((0, 0),) + tuple(pads) + ((0, 0),), mode=mode)
    pad = cfg['padding']
    if isinstance(pad, str):
      pad = jax.lax.padtype_to_pads(
          xs.shape[1:3], ((kh - 1) * dh + 1, (kw_ - 1) * dw + 1), (sh, sw),
          pad)
    xs = np.pad(xs, ((0, 0), tuple(pad[0]), tuple(pad[1]), (0, 0)))
    oh = (xs.shape[1] - (kh - 1) * dh - 1) // sh + 1
    ow = (xs.shape[2] - (kw_ - 1) * dw - 1) // sw + 1
    groups = cfg['groups']
    cg = 4 // groups
    acc = np.zeros((kh, kw_, cg))
    rows = 0
    for b, i, j in itertools.product(range(2), range(oh), range(ow)):
      rows += 1
      for p, q in itertools.product(range(kh), range(kw_)):
        for grp in range(groups):
          v = xs[b, i * sh + p * dh, j * sw + q * dw,
                 grp * cg:(grp + 1) * cg]
          acc[p, q] += v ** 2 / groups
    assert_close(factors['kernel'].h[..., 0], acc / rows, rtol=1e-5)
    g = _np(st.g).reshape(-1, 6)
    assert_close(factors['kernel'].s.reshape(-1), np.mean(g ** 2, 0),
                 rtol=1e-5)

  def test_embed(self):
    ids = jnp.array([[1, 3, 3], [0, 3, 1]])
    _, _, stats = _capture(nn.Embed(5, 4), ids)
    st = stats['']
    factors, _ = jax.jit(lambda s: _stats.adafisher_factors(s, False))(st)
    counts = np.bincount(np.asarray(ids).ravel(), minlength=5) / ids.size
    assert_close(factors['embedding'].h[:, 0], counts, rtol=1e-6)
    g = _np(st.g).reshape(-1, 4)
    assert_close(factors['embedding'].s[0], np.mean(g ** 2, 0), rtol=1e-5)

  def test_norm_paper_is_exact_diagonal_fisher(self):
    """Per-example gradients from vmap(grad) of a per-example loss."""
    model = nn.LayerNorm()
    x = jax.random.normal(jax.random.key(3), (5, 3, 4)) * 2 + 1
    params = model.init(jax.random.key(0), x)['params']
    w = jax.random.normal(jax.random.key(4), (3, 4))
    per_example = lambda p, xi: jnp.sum(
        jnp.sin(model.apply({'params': p}, xi) * w))
    # Batched apply (LayerNorm acts per example); vmap only in the reference.
    loss = lambda p, x: jnp.mean(jnp.sum(
        jnp.sin(model.apply({'params': p}, x) * w), axis=(1, 2)))
    _, _, stats = _capture(model, x, loss=loss)
    factors, normalise_h = jax.jit(
        lambda s: _stats.adafisher_factors(s, False))(stats[''])
    self.assertFalse(normalise_h)
    grads = jax.vmap(jax.grad(per_example), (None, 0))(params, x)
    for name in ('scale', 'bias'):
      # g carries the 1/B of the batch-mean loss.
      ref = np.mean(_np(grads[name]) ** 2, 0) / x.shape[0] ** 2
      assert_close(factors[name].s, ref, rtol=1e-4, scale_atol=1e-5)

  def test_batchnorm_reference_construction(self):
    model = nn.BatchNorm(use_running_average=False)
    x = jax.random.normal(jax.random.key(5), (4, 3, 3, 2)) + 0.5
    variables = model.init(jax.random.key(0), x)
    loss = lambda p, x: jnp.mean(jnp.sin(model.apply(
        {'params': p, 'batch_stats': variables['batch_stats']}, x,
        mutable=['batch_stats'])[0]))
    _, _, stats = _capture(model, x, loss=loss)
    st = stats['']
    factors, _ = jax.jit(lambda s: _stats.adafisher_factors(s, True))(st)
    xs, g = _np(st.a[0]), _np(st.g[0])
    b = xs.shape[0]
    u = np.array([xs[..., c].sum() / 9 ** 2 for c in range(2)])
    assert_close(factors['scale'].h, [np.sum(u ** 2) / b ** 2], rtol=1e-5)
    assert_close(factors['bias'].h, [2 / b ** 2], rtol=1e-6)
    s = np.array([g[..., c].sum() ** 2 / b for c in range(2)])
    assert_close(factors['scale'].s, s, rtol=1e-5)

  def test_layernorm_reference_construction(self):
    model = nn.LayerNorm()
    x = jax.random.normal(jax.random.key(6), (3, 5, 4)) + 0.3
    _, _, stats = _capture(model, x)
    st = stats['']
    factors, _ = jax.jit(lambda s: _stats.adafisher_factors(s, True))(st)
    xs, g = _np(st.a[0]), _np(st.g[0])
    u = np.array([xs[:, t, :].sum() / 4 ** 2 for t in range(5)])
    assert_close(factors['scale'].h, [np.sum(u ** 2) / 9], rtol=1e-5)
    assert_close(factors['bias'].h, [5 / 9], rtol=1e-6)
    s = np.array([g[..., d].sum() ** 2 / 3 for d in range(4)])
    assert_close(factors['bias'].s, s, rtol=1e-5)


class Mlp(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(5)(x))
    return nn.Dense(3)(x)


def _reference_run(stats_seq, grads_seq, params, mode, lr, b1, damping,
                   decay, eps, stats_every, weight_decay=0.0):
  """Hand-written AdaFisher (dense layers) over several steps, numpy."""
  reference = mode == 'reference'
  fill = 1.0 if reference else 0.0
  layers = sorted(stats_seq[0])
  h = {k: None for k in layers}
  s = {k: None for k in layers}
  mu = jax.tree.map(lambda p: np.zeros(p.shape), params)
  params = jax.tree.map(_np, params)
  fisher = {}
  for t, (stats, grads) in enumerate(zip(stats_seq, grads_seq)):
    grads = jax.tree.map(_np, grads)
    grads = jax.tree.map(lambda g, p: g + weight_decay * p, grads, params)
    if t % stats_every == 0:
      for k in layers:
        a = _np(stats[k].a).reshape(-1, stats[k].a.shape[-1])
        g = _np(stats[k].g).reshape(-1, stats[k].g.shape[-1])
        h_new = np.append(np.mean(a ** 2, 0), 1.0)  # bias-augmented
        s_new = np.mean(g ** 2, 0)
        if h[k] is None:
          h[k] = np.full_like(h_new, fill)
          s[k] = np.full_like(s_new, fill)
        if reference:
          h[k] = decay / 10 * h[k] + decay / 100 * _minmax(h_new, eps, False)
          s[k] = decay / 10 * s[k] + decay / 100 * _minmax(s_new, eps, False)
          fisher[k] = np.outer(h[k], s[k]) + damping
        else:
          h[k] = decay * h[k] + (1 - decay) * h_new
          s[k] = decay * s[k] + (1 - decay) * s_new
          fisher[k] = np.outer(_minmax(h[k], eps, True),
                               _minmax(s[k], eps, True)) + damping
    new = {}
    for k in layers:
      new[k] = {}
      for name in ('kernel', 'bias'):
        mu[k][name] = b1 * mu[k][name] + (1 - b1) * grads[k][name]
        m_hat = mu[k][name] / (1 - b1 ** (t + 1))
        f = fisher[k][:-1] if name == 'kernel' else fisher[k][-1]
        new[k][name] = params[k][name] - lr * m_hat / f
    params = new
  return params


class UpdateTest(parameterized.TestCase):

  @parameterized.parameters(
      itertools.product(('paper', 'reference'), (0.0, 1e-2)))
  def test_matches_hand_written_reference(self, mode, weight_decay):
    model = Mlp()
    x = jax.random.normal(jax.random.key(7), (8, 4))
    y = jax.random.normal(jax.random.key(8), (8, 3))
    params = model.init(jax.random.key(0), x)['params']
    loss = lambda p, x, y: jnp.mean((model.apply({'params': p}, x) - y) ** 2)
    step_fn = fo.linen.value_grad_and_stats(loss)
    hp = dict(b1=0.9, damping=1e-2, fisher_decay=0.8, eps=1e-6)
    tx = fo.adafisher(1e-3, weight_decay=weight_decay, stats_every=2,
                      mode=mode, **hp)

    @jax.jit
    def step(p, state, x, y):
      _, grads, stats = step_fn(p, x, y)
      updates, state = tx.update(grads, state, p, layer_stats=stats)
      return optax.apply_updates(p, updates), state, grads, stats

    state = tx.init(params)
    p = params
    stats_seq, grads_seq = [], []
    for t in range(5):
      xt = x * (1 + 0.1 * t)
      p, state, grads, stats = step(p, state, xt, y)
      stats_seq.append(stats)
      grads_seq.append(grads)
    ref = _reference_run(stats_seq, grads_seq, params, mode, 1e-3,
                         hp['b1'], hp['damping'], hp['fisher_decay'],
                         hp['eps'], 2, weight_decay)
    assert_trees_close(p, ref, rtol=2e-5)

  def test_adafisherw_decay_is_decoupled(self):
    """AdaFisherW minus AdaFisher(no decay) equals -lr*wd*theta exactly."""
    model = Mlp()
    x = jax.random.normal(jax.random.key(9), (8, 4))
    params = model.init(jax.random.key(0), x)['params']
    loss = lambda p, x: jnp.mean(model.apply({'params': p}, x) ** 2)
    _, grads, stats = jax.jit(fo.linen.value_grad_and_stats(loss))(params, x)
    txw = fo.adafisherw(1e-2, weight_decay=0.1)
    tx0 = fo.adafisherw(1e-2, weight_decay=0.0)
    uw, _ = jax.jit(lambda g, p, s: txw.update(
        g, txw.init(p), p, layer_stats=s))(grads, params, stats)
    u0, _ = jax.jit(lambda g, p, s: tx0.update(
        g, tx0.init(p), p, layer_stats=s))(grads, params, stats)
    # a - b cancels the shared step, so its float32 error is relative to the
    # step's scale, not to the decay's.
    scale = tree_scale(u0)
    jax.tree.map(lambda a, b, p: assert_close(
        a - b, -1e-2 * 0.1 * p, rtol=1e-4, scale_atol=1e-5, scale=scale),
                 uw, u0, params)

  def test_no_recompilation_and_refresh_only_every_period(self):
    model = Mlp()
    x = jax.random.normal(jax.random.key(10), (8, 4))
    params = model.init(jax.random.key(0), x)['params']
    traces = []

    def loss(p, x):
      traces.append(1)
      return jnp.mean(model.apply({'params': p}, x) ** 2)

    step_fn = fo.linen.value_grad_and_stats(loss)
    tx = fo.adafisher(1e-3, stats_every=3)

    @jax.jit
    def step(p, state, x):
      _, grads, stats = step_fn(p, x)
      updates, state = tx.update(grads, state, p, layer_stats=stats)
      return optax.apply_updates(p, updates), state

    state = tx.init(params)
    p, state = step(params, state, x)
    n = len(traces)
    h_after = [state[1].s]
    for t in range(1, 5):
      p, state = step(p, state, x * (t + 1))
      h_after.append(state[1].s)
    self.assertLen(traces, n)  # no retrace
    same = lambda a, b: all(jax.tree.leaves(jax.tree.map(
        lambda u, v: bool(jnp.all(u == v)), a, b)))
    self.assertTrue(same(h_after[0], h_after[1]))  # t=1, 2: no refresh
    self.assertTrue(same(h_after[1], h_after[2]))
    self.assertFalse(same(h_after[2], h_after[3]))  # t=3 refreshes

  def test_nonfinite_statistics_keep_previous_factors(self):
    model = Mlp()
    x = jax.random.normal(jax.random.key(11), (8, 4))
    params = model.init(jax.random.key(0), x)['params']
    loss = lambda p, x: jnp.mean(model.apply({'params': p}, x) ** 2)
    _, grads, stats = jax.jit(fo.linen.value_grad_and_stats(loss))(params, x)
    tx = fo.scale_by_adafisher(stats_every=1)
    state = tx.init(params)
    _, state = jax.jit(lambda s: tx.update(grads, s, params,
                                           layer_stats=stats))(state)
    bad = dict(stats)
    st = bad['Dense_0']
    bad['Dense_0'] = fo.LayerStats(st.a.at[0, 0, 0].set(jnp.inf), st.g,
                                   st.meta)
    _, new = jax.jit(lambda s: tx.update(grads, s, params,
                                         layer_stats=bad))(state)
    self.assertEqual(int(new.nonfinite), 1)
    np.testing.assert_array_equal(new.s['Dense_0']['kernel'],
                                  state.s['Dense_0']['kernel'])
    self.assertTrue(np.all(np.isfinite(new.s['Dense_1']['kernel'])))

  def test_inject_hyperparams(self):
    model = Mlp()
    x = jax.random.normal(jax.random.key(12), (8, 4))
    params = model.init(jax.random.key(0), x)['params']
    loss = lambda p, x: jnp.mean(model.apply({'params': p}, x) ** 2)
    _, grads, stats = jax.jit(fo.linen.value_grad_and_stats(loss))(params, x)
    plain = fo.adafisher(1e-3, damping=3e-3, stats_every=2)
    injected = optax.inject_hyperparams(
        fo.adafisher, static_args=('stats_every',))(
            learning_rate=1e-3, damping=3e-3, stats_every=2)
    u1, _ = plain.update(grads, plain.init(params), params, layer_stats=stats)
    u2, _ = jax.jit(lambda s: injected.update(
        grads, s, params, layer_stats=stats))(injected.init(params))
    assert_trees_close(u1, u2, rtol=1e-6, scale_atol=1e-7)


class ViTish(nn.Module):
  """cls token and positional embedding (uncovered) plus a frozen head."""

  @nn.compact
  def __call__(self, x):
    cls = self.param('cls', nn.initializers.normal(1.0), (1, 1, 8))
    pos = self.param('pos', nn.initializers.normal(1.0), (1, 5, 8))
    x = nn.Dense(8, name='embed')(x)
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, 8)), x], 1)
    x = nn.LayerNorm(name='norm')(x + pos)
    x = x + jnp.mean(x, axis=1, keepdims=True)  # token mixing
    x = nn.Dense(8, name='mlp')(nn.gelu(x))
    return nn.Dense(2, name='head')(x[:, 0])


class CoverageTest(parameterized.TestCase):

  @parameterized.parameters('adam', 'momentum', 'damping')
  def test_every_trainable_parameter_moves_and_frozen_does_not(self, fb):
    model = ViTish()
    x = jax.random.normal(jax.random.key(13), (4, 4, 3))
    params = model.init(jax.random.key(0), x)['params']
    loss = lambda p, x: jnp.mean(model.apply({'params': p}, x) ** 2)
    step_fn = fo.linen.value_grad_and_stats(loss)
    labels = {k: jax.tree.map(lambda _, k=k: 'frozen' if k == 'mlp'
                              else 'train', v) for k, v in params.items()}
    tx = optax.partition({'train': fo.adafisher(1e-3, fallback=fb),
                          'frozen': optax.set_to_zero()}, labels)

    @jax.jit
    def step(p, state, x):
      _, grads, stats = step_fn(p, x)
      updates, state = tx.update(grads, state, p, layer_stats=stats)
      return optax.apply_updates(p, updates), state, stats

    new, _, stats = step(params, tx.init(params), x)
    flat_old = fo._base.flatten_with_paths(params)  # pylint: disable=protected-access
    flat_new = fo._base.flatten_with_paths(new)  # pylint: disable=protected-access
    for path in flat_old:
      moved = not np.allclose(flat_old[path], flat_new[path])
      self.assertEqual(moved, not path.startswith('mlp/'), path)
    table = str(fo.coverage(params, stats, fallback=fb))
    self.assertRegex(table, rf'cls\s+\(1, 1, 8\)\s+-\s+fallback: {fb}')
    self.assertRegex(table, rf'pos\s+\(1, 5, 8\)\s+-\s+fallback: {fb}')
    self.assertIn('norm scale', table)


class ErrorTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    model = Mlp()
    x = jax.random.normal(jax.random.key(14), (8, 4))
    self.params = model.init(jax.random.key(0), x)['params']
    loss = lambda p, x: jnp.mean(model.apply({'params': p}, x) ** 2)
    _, self.grads, self.stats = jax.jit(
        fo.linen.value_grad_and_stats(loss))(self.params, x)
    self.tx = fo.adafisher(1e-3)
    self.state = self.tx.init(self.params)

  def _update(self, stats, params=None, grads=None):
    params = self.params if params is None else params
    grads = self.grads if grads is None else grads
    return self.tx.update(grads, self.tx.init(params), params,
                          layer_stats=stats)

  def test_missing_layer_stats(self):
    with self.assertRaisesRegex(ValueError, 'needs `layer_stats=`'):
      self.tx.update(self.grads, self.state, self.params)

  def test_stats_for_unknown_path(self):
    stats = {'Dense_9': self.stats['Dense_0'], **self.stats}
    with self.assertRaisesRegex(ValueError, "no 'Dense_9/(kernel|bias)'"):
      self._update(stats)

  def test_wrong_shape(self):
    params = dict(self.params)
    params['Dense_0'] = {'kernel': jnp.zeros((4, 7)), 'bias': jnp.zeros(7)}
    with self.assertRaisesRegex(ValueError,
                                "'Dense_0/(kernel|bias)' has shape"):
      self._update(self.stats, params, params)

  def test_bad_options(self):
    with self.assertRaisesRegex(ValueError, 'mode'):
      fo.adafisher(mode='official')
    with self.assertRaisesRegex(ValueError, 'stats_every'):
      fo.adafisher(stats_every=0)


if __name__ == '__main__':
  absltest.main()
