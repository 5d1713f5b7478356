"""Mini-Block Fisher under faults and unusual inputs (issue 10).

Non-finite and dead gradients, invalid hyperparameters, float64 and
bfloat16 parameters, frozen and foreign parameters, mismatched trees and
statistics, and the released code's fallback rule.
"""

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
from fisher_optax import _mini_block_fisher


class _Net(nn.Module):
  """Conv 3x3 (bias: fallback), LayerNorm, Dense with and without bias."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(3, (3, 3))(x))
    x = nn.LayerNorm()(x)
    x = nn.relu(nn.Dense(5)(x.reshape(x.shape[0], -1)))
    return nn.Dense(3, use_bias=False)(x)


def _params(dtype=jnp.float32):
  params = _Net().init(jax.random.key(0), jnp.ones((2, 4, 4, 2)))['params']
  return jax.tree.map(lambda p: p.astype(dtype), params)


def _grads(params, n, seed=0):
  leaves, treedef = jax.tree.flatten(params)
  out = []
  for t in range(n):
    keys = jax.random.split(jax.random.key(seed * 1000 + t), len(leaves))
    out.append(treedef.unflatten([
        jax.random.normal(k, leaf.shape).astype(leaf.dtype)
        for k, leaf in zip(keys, leaves)]))
  return out


def _close(got, want, rtol=1e-5, scale_atol=1e-6, err_msg=''):
  """float32 comparison with an atol tied to the scale of the result."""
  want = np.asarray(want, np.float64)
  atol = scale_atol * (float(np.max(np.abs(want))) if want.size else 0.0)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol,
                             atol=atol, err_msg=err_msg)


def _trees_close(got, want, **kw):
  jax.tree.map(lambda g, w: _close(g, w, **kw), got, want)


def _run(tx, params, grads_seq, state=None, **extra):
  state = tx.init(params) if state is None else state
  step = jax.jit(lambda g, s: tx.update(g, s, params, **extra))
  outs = []
  for g in grads_seq:
    u, state = step(g, state)
    outs.append(u)
  return outs, state


_KW = dict(damping=0.3, fisher_decay=0.8, momentum=0.9, stats_every=1,
           inverse_every=1)


def _set(tree, path, index, value):
  """``tree`` with ``tree[path][index] = value`` (path 'Layer/name')."""
  layer, name = path.split('/')
  tree = jax.tree.map(lambda x: x, tree)
  tree[layer] = dict(tree[layer])
  tree[layer][name] = tree[layer][name].at[index].set(value)
  return tree


class NonFiniteTest(parameterized.TestCase):

  @parameterized.product(
      case=[
          # (dense_blocks, fallback, leaf, index, layer, form, bad blocks)
          ('average', 'adam', 'Dense_0/kernel', (0, 0), 'Dense_0',
           'average', None),
          ('column', 'adam', 'Dense_0/kernel', (2, 1), 'Dense_0',
           'column', (2,)),
          ('chunks', 'adam', 'Dense_0/bias', (1,), 'Dense_0', 'chunks',
           None),
          ('average', 'adam', 'Conv_0/kernel', (1, 1, 1, 2), 'Conv_0',
           'conv', (1 * 3 + 2,)),
          ('average', 'adam', 'Conv_0/bias', (1,), None, None, None),
          ('average', 'adam_gradient', 'Conv_0/bias', (1,), None, None,
           None),
          ('average', 'diagonal', 'LayerNorm_0/scale', (1,),
           'LayerNorm_0/scale', 'diagonal', (1,)),
      ],
      value=[np.inf, np.nan],
  )
  def test_one_bad_gradient_entry_spares_everything_else(self, case, value):
    dense_blocks, fallback, leaf, index, layer, form, bad_blocks = case
    params = _params()
    kw = dict(_KW, dense_blocks=dense_blocks, fallback=fallback)
    tx = fo.scale_by_mini_block_fisher(**kw)
    g0, g1, g2, g3, g4 = _grads(params, 5)
    step = jax.jit(tx.update)
    _, before = _run(tx, params, [g0, g1])
    bad = _set(g2, leaf, index, value)
    upd_bad, after_bad = step(bad, before)
    upd_clean, after_clean = step(g2, before)

    # The bad entry is passed through as given; every other entry is finite.
    flat_bad = fo_flat(upd_bad)
    got = np.asarray(flat_bad[leaf])
    np.testing.assert_array_equal(np.isfinite(got[index]), False)
    if np.isnan(value):
      self.assertTrue(np.isnan(got[index]))
    else:
      self.assertEqual(got[index], value)
    mask = np.ones(got.shape, bool)
    mask[index] = False
    self.assertTrue(np.all(np.isfinite(got[mask])))
    for path, u in flat_bad.items():
      if path != leaf:
        self.assertTrue(np.all(np.isfinite(u)), path)

    # The state took nothing from the bad entry and stays finite.
    chex.assert_tree_all_finite(after_bad)
    self.assertGreaterEqual(int(after_bad.nonfinite), 1)
    self.assertEqual(int(after_clean.nonfinite), 0)
    m_bad, m_clean, m_before = (fo_flat(s.momentum) for s in
                                (after_bad, after_clean, before))
    for path in m_bad:
      want = m_clean[path].copy()
      if path == leaf:
        want[index] = m_before[path][index]
      _close(m_bad[path], want, err_msg=path)
    for key in after_clean.stats:
      for part in ('stats', 'inverses'):
        got = np.asarray(getattr(after_bad, part)[key][
            next(iter(after_clean.stats[key]))])
        want = np.asarray(getattr(after_clean, part)[key][
            next(iter(after_clean.stats[key]))]).copy()
        prev = np.asarray(getattr(before, part)[key][
            next(iter(after_clean.stats[key]))])
        if key == layer:
          if bad_blocks is None:
            want = prev
          else:
            for b in bad_blocks:
              want[b] = prev[b]
        _close(got, want, err_msg=f'{part} {key}')
    for path in after_clean.nu:
      want = np.asarray(after_clean.nu[path]).copy()
      if path == leaf:
        # The bad entry's second moment takes no gradient: the released
        # rule squares the kept momentum, the gradient rule keeps it.
        prev = np.asarray(before.nu[path])[index]
        want[index] = prev if fallback == 'adam_gradient' else (
            0.999 * prev + 0.001 * (0.1 * m_before[path][index]) ** 2)
      _close(after_bad.nu[path], want, err_msg=path)

    # Training goes on with finite updates.
    state = after_bad
    for g in (g3, g4):
      u, state = step(g, state)
      chex.assert_tree_all_finite(u)
    chex.assert_tree_all_finite(state)

  def test_a_wholly_nonfinite_step_is_forgotten(self):
    params = _params()
    tx = fo.scale_by_mini_block_fisher(**_KW)
    g = _grads(params, 4)
    nan = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), g[0])
    _, state = _run(tx, params, g[:2])
    _, skipped = _run(tx, params, [nan, g[2], g[3]], state)
    _, ref = _run(tx, params, [g[2], g[3]], state)
    chex.assert_tree_all_finite(skipped)
    _trees_close(skipped.momentum, ref.momentum)
    _trees_close(skipped.stats, ref.stats)
    self.assertGreater(int(skipped.nonfinite), 0)

  def test_apply_if_finite_skips_the_step(self):
    params = _params()
    tx = optax.apply_if_finite(fo.mini_block_fisher(0.1, **_KW), 3)
    g = _grads(params, 3)
    bad = _set(g[1], 'Dense_0/kernel', (0, 0), jnp.nan)
    state = tx.init(params)
    step = jax.jit(lambda g, s: tx.update(g, s, params))
    _, state = step(g[0], state)
    u, skipped = step(bad, state)
    chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, u))
    self.assertEqual(int(skipped.notfinite_count), 1)
    u_skip, _ = step(g[2], skipped)
    u_ref, _ = step(g[2], state)
    _trees_close(u_skip, u_ref)

  @parameterized.product(fallback=['adam', 'adam_gradient', 'diagonal'],
                         dense_blocks=['average', 'column', 'chunks'])
  def test_dead_layers_give_finite_updates(self, fallback, dense_blocks):
    params = _params()
    tx = fo.mini_block_fisher(
        0.1, **dict(_KW, fallback=fallback, dense_blocks=dense_blocks,
                    fallback_eps=0.0, inverse_every=3))
    grads = _grads(params, 4)
    dead = [dict(g, Conv_0=jax.tree.map(jnp.zeros_like, g['Conv_0']),
                 LayerNorm_0=jax.tree.map(jnp.zeros_like, g['LayerNorm_0']))
            for g in grads]
    zeros = jax.tree.map(jnp.zeros_like, params)
    outs, state = _run(tx, params, [zeros] + dead)
    for u in outs:
      chex.assert_tree_all_finite(u)
      np.testing.assert_array_equal(u['Conv_0']['bias'], 0.0)
      np.testing.assert_array_equal(u['LayerNorm_0']['scale'], 0.0)
    chex.assert_tree_all_finite(state)
    self.assertEqual(int(state[0].nonfinite), 0)

  def test_overflowing_statistics_are_kept(self):
    params = _params()
    tx = fo.scale_by_mini_block_fisher(**dict(_KW, fallback='diagonal'))
    g = _grads(params, 3)
    _, state = _run(tx, params, g[:1])
    huge = jax.tree.map(lambda x: x * 1e25, g[1])
    _, after = _run(tx, params, [huge], state)
    chex.assert_tree_all_finite(after)
    self.assertGreater(int(after.nonfinite), 0)
    _trees_close(after.stats, state.stats)

  def test_warm_start_keeps_nonfinite_blocks(self):
    params = _params()
    tx = fo.scale_by_mini_block_fisher(**_KW)
    g = _grads(params, 2)
    bad = _set(g[1], 'Dense_0/kernel', (0, 0), jnp.nan)
    state = fo.mini_block_fisher_warm_start(tx.init(params), [g[0], bad])
    clean = fo.mini_block_fisher_warm_start(tx.init(params), g)
    chex.assert_tree_all_finite(state)
    np.testing.assert_array_equal(state.stats['Dense_0']['chunks'], 0.0)
    _trees_close(state.stats['Conv_0'], clean.stats['Conv_0'])
    self.assertGreaterEqual(int(state.nonfinite), 1)


def fo_flat(tree):
  return {'/'.join(str(getattr(k, 'key', k)) for k in path):
          np.asarray(leaf) for path, leaf in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


class HyperparameterTest(parameterized.TestCase):

  @parameterized.parameters(
      ('damping', 0.0), ('damping', -1e-3), ('damping', np.nan),
      ('damping', np.inf), ('fisher_decay', 1.0), ('fisher_decay', -0.1),
      ('momentum', 1.0), ('momentum', np.nan), ('fallback_b2', 1.0),
      ('fallback_eps', -1e-8), ('weight_decay', -0.1),
      ('learning_rate', np.nan), ('learning_rate', np.inf),
  )
  def test_bad_values_are_named(self, name, value):
    with self.assertRaisesRegex(ValueError, name):
      fo.mini_block_fisher(**{name: value})
    if name not in ('weight_decay', 'learning_rate'):
      with self.assertRaisesRegex(ValueError, name):
        fo.scale_by_mini_block_fisher(**{name: value})

  def test_schedules_and_injected_values_pass(self):
    params = _params()
    grads = _grads(params, 3)
    fo.mini_block_fisher(optax.linear_schedule(0.1, 0.0, 10))
    tx = optax.inject_hyperparams(
        fo.mini_block_fisher, static_args=('stats_every', 'inverse_every'))(
            learning_rate=0.1, damping=0.3, fisher_decay=0.8, momentum=0.9,
            weight_decay=0.01, fallback_b2=0.99, fallback_eps=1e-6,
            stats_every=1, inverse_every=1)
    got, _ = _run(tx, params, grads)
    ref = fo.mini_block_fisher(0.1, 0.3, 0.8, 0.9, 0.01, stats_every=1,
                               inverse_every=1, fallback_b2=0.99,
                               fallback_eps=1e-6)
    want, _ = _run(ref, params, grads)
    for g, w in zip(got, want):
      _trees_close(g, w)


class DtypeTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('average', dict()),
      ('average_blocks', dict(block_size=2)),
      ('average_diagonal', dict(block_size=1)),
      ('column', dict(dense_blocks='column')),
      ('column_blocks', dict(dense_blocks='column', block_size=2)),
      ('chunks', dict(dense_blocks='chunks')),
      ('chunks_blocks', dict(dense_blocks='chunks', block_size=3)),
      ('diagonal_fallback', dict(fallback='diagonal')),
      ('gradient_fallback', dict(fallback='adam_gradient')),
      ('cholesky', dict(inverse_method='cholesky')),
      ('eigh', dict(inverse_method='eigh')),
  )
  def test_float64_state_and_float32_agreement(self, kw):
    kw = dict(_KW, inverse_every=2, **kw)
    with jax.enable_x64(True):
      p64 = _params(jnp.float64)
      grads = _grads(p64, 4)
      tx = fo.mini_block_fisher(0.1, weight_decay=0.01, **kw)
      got, state = _run(tx, p64, grads)
      inner = state[0]
      for leaf in jax.tree.leaves((inner.momentum, inner.stats,
                                   inner.inverses, inner.nu, got)):
        self.assertEqual(leaf.dtype, jnp.float64)
      warm = fo.mini_block_fisher_warm_start(state, grads[:2])
      for leaf in jax.tree.leaves(warm[0].stats):
        self.assertEqual(leaf.dtype, jnp.float64)
      want, _ = _run(tx, _params(), [jax.tree.map(
          lambda x: x.astype(jnp.float32), g) for g in grads])
      for g, w in zip(got, want):
        _trees_close(g, w, rtol=1e-4, scale_atol=1e-5)

  def test_bfloat16_parameters_keep_float32_statistics(self):
    params = _params(jnp.bfloat16)
    tx = fo.scale_by_mini_block_fisher(**_KW)
    got, state = _run(tx, params, _grads(params, 2))
    for leaf in jax.tree.leaves((state.stats, state.inverses, state.nu)):
      self.assertEqual(leaf.dtype, jnp.float32)
    for leaf in jax.tree.leaves(got):
      self.assertEqual(leaf.dtype, jnp.bfloat16)
    chex.assert_tree_all_finite(got)


def _mlp():
  model = nn.Sequential([nn.Dense(4), nn.tanh, nn.Dense(3)])
  x = jax.random.normal(jax.random.key(0), (8, 5))
  params = model.init(jax.random.key(1), x)['params']
  y = jax.random.normal(jax.random.key(2), (8, 3))
  loss = lambda p, x: jnp.mean((model.apply({'params': p}, x) - y) ** 2)
  step_fn = jax.jit(fo.linen.value_grad_and_stats(loss))
  return params, x, step_fn


def _drop(tree, *paths):
  out = {k: dict(v) for k, v in tree.items()}
  for path in paths:
    layer, name = path.split('/')
    del out[layer][name]
    if not out[layer]:
      del out[layer]
  return out


class FrozenAndForeignTest(parameterized.TestCase):

  @parameterized.parameters(
      (('layers_0/bias',), 'multi_transform', True, False),
      (('layers_0/bias',), 'masked', True, True),
      (('layers_2/kernel', 'layers_2/bias'), 'multi_transform', True, True),
      (('layers_2/kernel', 'layers_2/bias'), 'masked', False, False),
      (('layers_2/bias',), 'multi_transform', False, True),
  )
  def test_frozen_parameters_are_ignored(self, frozen, wrapper, with_stats,
                                         with_layers):
    params, x, step_fn = _mlp()
    # nn.Sequential names its Dense layers layers_0 and layers_2.
    flat = fo_flat(params)
    trainable = {p: p not in frozen for p in flat}
    mask = {k: {n: trainable[f'{k}/{n}'] for n in v}
            for k, v in params.items()}
    layers = jax.eval_shape(step_fn, params, x)[2] if with_layers else None
    inner = fo.scale_by_mini_block_fisher(**_KW, layers=layers)
    if wrapper == 'masked':
      tx = optax.masked(inner, mask)
    else:
      labels = jax.tree.map(lambda t: 'train' if t else 'frozen', mask)
      tx = optax.multi_transform(
          {'train': inner, 'frozen': optax.set_to_zero()}, labels)
    state = tx.init(params)
    ref_tx = fo.scale_by_mini_block_fisher(**_KW)
    pruned = _drop(params, *frozen)
    ref_state = ref_tx.init(pruned)
    step = jax.jit(lambda g, s, st: tx.update(
        g, s, params, **({'layer_stats': st} if with_stats else {})))
    xs = jax.random.normal(jax.random.key(3), (3,) + x.shape)
    for xb in xs:
      _, grads, stats = step_fn(params, xb)
      u, state = step(grads, state, stats)
      w, ref_state = jax.jit(ref_tx.update)(_drop(grads, *frozen), ref_state)
      got = fo_flat(u)
      for path, want in fo_flat(w).items():
        _close(got[path], want, err_msg=path)
      for path in frozen:
        if wrapper == 'multi_transform':
          np.testing.assert_array_equal(got[path], 0.0)

  def test_one_optimizer_serves_two_models(self):
    params_a, x_a, step_a = _mlp()
    params_b = _params()
    tx = fo.mini_block_fisher(0.1, **_KW)
    state_a, state_b = tx.init(params_a), tx.init(params_b)
    ref_a = fo.mini_block_fisher(0.1, **_KW)
    ref_b = fo.mini_block_fisher(0.1, **_KW)
    rs_a, rs_b = ref_a.init(params_a), ref_b.init(params_b)
    for gb in _grads(params_b, 3):
      _, ga, stats = step_a(params_a, x_a)
      ua, state_a = tx.update(ga, state_a, params_a, layer_stats=stats)
      ub, state_b = tx.update(gb, state_b, params_b)
      wa, rs_a = ref_a.update(ga, rs_a, params_a)
      wb, rs_b = ref_b.update(gb, rs_b, params_b)
      _trees_close(ua, wa)
      _trees_close(ub, wb)

  @parameterized.parameters('missing', 'extra', 'shape')
  def test_grads_that_do_not_match_the_state_are_named(self, how):
    params = _params()
    tx = fo.mini_block_fisher(0.1, **_KW)
    state = tx.init(params)
    grads = _grads(params, 1)[0]
    if how == 'missing':
      grads = _drop(grads, 'LayerNorm_0/bias')
      name = 'LayerNorm_0/bias'
    elif how == 'extra':
      grads = dict(grads, Extra={'w': jnp.zeros(3)})
      name = 'Extra/w'
    else:
      grads = dict(grads, LayerNorm_0=dict(grads['LayerNorm_0'],
                                           scale=jnp.zeros(7)))
      name = 'LayerNorm_0/scale'
    with self.assertRaisesRegex(ValueError, name):
      tx.update(grads, state, params)

  def test_weight_decay_leaves_integer_leaves_alone(self):
    params = dict(_params(), step=jnp.array(7, jnp.int32))
    grads = dict(_grads(_params(), 1)[0], step=jnp.array(0, jnp.int32))
    tx = fo.mini_block_fisher(0.1, weight_decay=0.5, **_KW)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    self.assertEqual(int(new['step']), 7)
    self.assertEqual(new['step'].dtype, jnp.int32)

  @parameterized.parameters(('hidden', 3, 'hidden'),
                            ('layers_0', 7, 'layers_0/(kernel|bias)'))
  def test_statistics_of_another_model_are_named_without_layers_hint(
      self, name, width, message):
    params, x, step_fn = _mlp()

    class Other(nn.Module):

      @nn.compact
      def __call__(self, x):
        return nn.Dense(3, name='layers_2')(nn.Dense(width, name=name)(x))

    other = Other()
    o_params = other.init(jax.random.key(1), x)['params']
    o_loss = lambda p, x: jnp.mean(other.apply({'params': p}, x) ** 2)
    _, _, o_stats = fo.linen.value_grad_and_stats(o_loss)(o_params, x)
    _, grads, _ = step_fn(params, x)
    tx = fo.scale_by_mini_block_fisher(**_KW)
    with self.assertRaisesRegex(ValueError, message) as cm:
      tx.update(grads, tx.init(params), layer_stats=o_stats)
    self.assertNotIn('layers=', str(cm.exception))

  def test_mismatched_a_and_g_are_named(self):
    params, x, step_fn = _mlp()
    _, grads, stats = step_fn(params, x)
    st = stats['layers_0']
    stats = dict(stats, layers_0=type(st)(st.a[:, :5], st.g, st.meta,
                                          st.extras))
    tx = fo.scale_by_mini_block_fisher(**_KW)
    with self.assertRaisesRegex(ValueError, "layers_0"):
      tx.update(grads, tx.init(params), layer_stats=stats)

  def test_nnx_layers_hint(self):
    # Bias-less, its (5, 2, 3) kernel has the parameters of a 1-D conv: the
    # guess from the parameters is wrong and the captured kind says so.
    model = nnx.Sequential(
        nnx.LinearGeneral(5, (2, 3), use_bias=False, rngs=nnx.Rngs(0)))
    x = jnp.ones((4, 5))
    loss = lambda m, x: jnp.mean(m(x) ** 2)
    _, grads, stats = fo.nnx.value_grad_and_stats(loss)(model, x)
    params = nnx.state(model, nnx.Param)
    tx = fo.scale_by_mini_block_fisher(**_KW)
    with self.assertRaisesRegex(ValueError, 'nnx.eval_shape'):
      tx.update(grads, tx.init(params), layer_stats=stats)


def _released_fallback(grads_seq, *, momentum, b2, eps):
  """The released code's Adam-like rule, written as its loop does it."""
  b = np.zeros_like(grads_seq[0])
  v = np.zeros_like(grads_seq[0])
  out = []
  for t, g in enumerate(grads_seq):
    b = momentum * b + (1 - momentum) * g
    v = b2 * v + (1 - b2) * b ** 2
    out.append(b / (eps + np.sqrt(v / (1 - b2 ** (t + 1)))))
  return out


def _gradient_fallback(grads_seq, *, momentum, b2, eps):
  """The rule before issue 10: Adam's second moment of the gradient."""
  m = np.zeros_like(grads_seq[0])
  v = np.zeros_like(grads_seq[0])
  out = []
  for t, g in enumerate(grads_seq):
    m = momentum * m + g
    v = b2 * v + (1 - b2) * g ** 2
    out.append((1 - momentum) * m / (eps + np.sqrt(v / (1 - b2 ** (t + 1)))))
  return out


class FallbackRuleTest(parameterized.TestCase):

  @parameterized.parameters(('adam', _released_fallback),
                            ('adam_gradient', _gradient_fallback))
  def test_fallback_matches_loop_reference(self, fallback, reference):
    params = _params()
    grads = _grads(params, 6)
    kw = dict(_KW, fallback=fallback, fallback_b2=0.9, fallback_eps=1e-3)
    got, _ = _run(fo.scale_by_mini_block_fisher(**kw), params, grads)
    for path in ('Conv_0/bias', 'LayerNorm_0/scale', 'LayerNorm_0/bias'):
      seq = [np.asarray(fo_flat(g)[path], np.float64) for g in grads]
      want = reference(seq, momentum=0.9, b2=0.9, eps=1e-3)
      for t, (g, w) in enumerate(zip(got, want)):
        _close(fo_flat(g)[path], w, err_msg=f'{path} step {t}')


class StagesTest(absltest.TestCase):
  """The module-level stages alone, against values worked out by hand."""

  def test_momentum_step_keeps_nonfinite_entries(self):
    grads = {'a': jnp.array([1.0, jnp.inf, jnp.nan]), 'b': jnp.ones(2)}
    old = {'a': jnp.array([2.0, 3.0, 4.0]), 'b': jnp.zeros(2)}
    new, bad = _mini_block_fisher.momentum_step(grads, old, 0.5)
    np.testing.assert_array_equal(new['a'], [2.0, 3.0, 4.0])
    np.testing.assert_array_equal(new['b'], [1.0, 1.0])
    self.assertEqual(int(bad), 1)

  def test_adam_fallback_by_hand(self):
    nu = {'a': jnp.array([0.0, 4.0])}
    m = {'a': jnp.array([0.0, 10.0])}
    g = {'a': jnp.array([0.0, 3.0])}
    count = jnp.array(1)
    new, d, bad = _mini_block_fisher.adam_fallback(
        nu, m, g, count, 0.9, 0.5, 0.0, 'momentum')
    # b = 0.1 m = [0, 1]; v = 0.5 nu + 0.5 b^2 = [0, 2.5]; v_hat = 2 v.
    np.testing.assert_allclose(new['a'], [0.0, 2.5], rtol=1e-6)
    np.testing.assert_allclose(d['a'], [0.0, 1.0 / np.sqrt(5.0)], rtol=1e-6)
    new, d, _ = _mini_block_fisher.adam_fallback(
        nu, m, g, count, 0.9, 0.5, 0.0, 'gradient')
    np.testing.assert_allclose(new['a'], [0.0, 6.5], rtol=1e-6)
    np.testing.assert_allclose(d['a'], [0.0, 1.0 / np.sqrt(13.0)],
                               rtol=1e-6)
    self.assertEqual(int(bad), 0)


if __name__ == '__main__':
  absltest.main()
