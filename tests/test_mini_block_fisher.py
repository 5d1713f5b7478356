"""Mini-Block Fisher against a loop reference that inverts block by block."""

from absl.testing import absltest
from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import fisher_optax as fo
from fisher_optax import _mini_block_fisher

from _tolerance import assert_close
from _tolerance import assert_trees_close
from _tolerance import tree_scale


class _Net(nn.Module):
  """Conv 3x3 (bias: fallback), 1x1 conv, LayerNorm, two Dense layers."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = nn.Conv(3, (1, 1), use_bias=False)(x)
    x = nn.LayerNorm()(x)
    x = nn.relu(nn.Dense(5)(x.reshape(x.shape[0], -1)))
    return nn.Dense(3, use_bias=False)(x)


def _params():
  x = jnp.ones((2, 4, 4, 2))
  return _Net().init(jax.random.key(0), x)['params']


def _random_grads(params, n, seed=0):
  leaves, treedef = jax.tree.flatten(params)
  out = []
  for t in range(n):
    keys = jax.random.split(jax.random.key(seed * 1000 + t), len(leaves))
    out.append(treedef.unflatten([
        jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves)]))
  return out


def _flat(tree):
  return {'/'.join(str(getattr(k, 'key', k)) for k in path):
          np.asarray(leaf, np.float64)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _reference_blocks(g, block_size, dense_blocks, fallback):
  """``{block id: (param path, index arrays, vector)}`` built with loops.

  A block id maps to a list of ``(path, index)`` pairs, one per entry of the
  block vector, so the reference reads and writes parameters entry by entry.
  Averaged dense blocks share one statistic: their ids are
  ``('avg', layer, j)`` for the output slice starting at ``j``, and each
  row (or, for ``'chunks'``, each run of ``O`` consecutive entries of the
  output-major ``[W^T | b]``) is a separate vector.
  """
  blocks = []  # (stat id, [(path, index), ...])
  blocked = set()
  for path in g:
    layer, name = path.rpartition('/')[::2]
    arr = g[path]
    if name != 'kernel':
      continue
    if arr.ndim == 4:  # conv (kh, kw, Ci, Co): one block per (i, o)
      kh, kw, ci, co = arr.shape
      for i in range(ci):
        for o in range(co):
          idx = [(path, (y, x, i, o)) for y in range(kh) for x in range(kw)]
          blocks.append((('conv', layer, i, o), idx))
      blocked.add(path)
      continue
    n_in, n_out = arr.shape
    bias = f'{layer}/bias'
    rows = [[(path, (r, c)) for c in range(n_out)] for r in range(n_in)]
    if bias in g:
      rows.append([(bias, (c,)) for c in range(n_out)])
      blocked.add(bias)
    if dense_blocks == 'chunks':
      # PyTorch order: output unit by output unit, its inputs then its bias.
      flat = [row[c] for c in range(n_out) for row in rows]
      rows = [flat[k:k + n_out] for k in range(0, len(flat), n_out)]
    b = n_out if block_size is None else block_size
    for r, row in enumerate(rows):
      for j in range(0, n_out, b):
        sid = (('col', layer, r, j) if dense_blocks == 'column'
               else ('avg', layer, j))
        blocks.append((sid, row[j:j + b]))
    blocked.add(path)
  for path, arr in g.items():
    if path not in blocked and fallback == 'diagonal':
      for index in np.ndindex(arr.shape):
        blocks.append((('diag', path, index), [(path, index)]))
  fallback_paths = [p for p in g if p not in blocked]
  return blocks, fallback_paths


def _reference(grads_seq, *, damping, decay, momentum, stats_every,
               inverse_every, block_size=None, dense_blocks='chunks',
               fallback='adam', b2=0.999, eps=1e-8, warm=None):
  """MBF written as the paper's Algorithm box, one block at a time."""
  flat_seq = [_flat(g) for g in grads_seq]
  blocks, fallback_paths = _reference_blocks(
      flat_seq[0], block_size, dense_blocks, fallback)
  m = {p: np.zeros_like(a) for p, a in flat_seq[0].items()}
  nu = {p: np.zeros_like(flat_seq[0][p]) for p in fallback_paths}
  stats, inverse = {}, {}
  num_stats = 0

  def statistics(g):
    sums, counts = {}, {}
    for sid, idx in blocks:
      v = np.array([g[p][i] for p, i in idx])
      sums[sid] = sums.get(sid, 0) + np.outer(v, v)
      counts[sid] = counts.get(sid, 0) + 1
    return {sid: sums[sid] / counts[sid] for sid in sums}

  if warm is not None:
    ws = [statistics(_flat(g)) for g in warm]
    stats = {sid: sum(w[sid] for w in ws) / len(ws) for sid in ws[0]}
    num_stats = len(ws)
  out = []
  for t, g in enumerate(flat_seq):
    for p in m:
      m[p] = momentum * m[p] + g[p]
    do_stats = t % stats_every == 0
    if do_stats:
      fresh = statistics(g)
      stats = fresh if num_stats == 0 else {
          s: decay * stats[s] + (1 - decay) * fresh[s] for s in fresh}
      num_stats += 1
    if t % inverse_every == 0 or (do_stats and t < inverse_every):
      inverse = {s: np.linalg.inv(f + damping * np.eye(len(f)))
                 for s, f in stats.items()}
    d = {p: np.zeros_like(a) for p, a in m.items()}
    for sid, idx in blocks:
      v = np.array([m[p][i] for p, i in idx])
      for (p, i), x in zip(idx, inverse[sid] @ v):
        d[p][i] = x
    for p in nu if fallback == 'adam' else ():
      # The released rule squares the averaged momentum (1 - mu) m.
      nu[p] = b2 * nu[p] + (1 - b2) * ((1 - momentum) * m[p]) ** 2
      v_hat = nu[p] / (1 - b2 ** (t + 1))
      d[p] = (1 - momentum) * m[p] / (np.sqrt(v_hat) + eps)
    out.append(d)
  return out


def _run(tx, params, grads_seq, state=None):
  state = tx.init(params) if state is None else state
  step = jax.jit(tx.update)
  outs = []
  for g in grads_seq:
    u, state = step(g, state, params)
    outs.append(_flat(u))
  return outs, state


_KW = dict(damping=0.3, fisher_decay=0.8, momentum=0.9, stats_every=2,
           inverse_every=3)


def _ref_kw(**kw):
  kw = {**_KW, **kw}
  kw['decay'] = kw.pop('fisher_decay')
  return kw


class MiniBlockFisherTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('average', dict()),
      ('average_blocks', dict(block_size=2)),
      ('average_diagonal', dict(block_size=1)),
      ('column', dict(dense_blocks='column')),
      ('column_blocks', dict(dense_blocks='column', block_size=2)),
      ('chunks', dict(dense_blocks='chunks')),
      ('chunks_blocks', dict(dense_blocks='chunks', block_size=2)),
      ('diagonal_fallback', dict(fallback='diagonal', block_size=4)),
      ('cholesky', dict(inverse_method='cholesky')),
      ('eigh', dict(inverse_method='eigh')),
  )
  def test_update_matches_loop_reference(self, kw):
    params = _params()
    grads = _random_grads(params, 7)
    tx = fo.scale_by_mini_block_fisher(**_KW, **kw)
    got, state = _run(tx, params, grads)
    kw.pop('inverse_method', None)
    want = _reference(grads, **_ref_kw(**kw))
    for t, (g, w) in enumerate(zip(got, want)):
      for path in w:
        assert_close(g[path], w[path], rtol=2e-4, scale_atol=1e-5,
                     err_msg=f'step {t}, {path}', scale=tree_scale(w))
    self.assertEqual(int(state.nonfinite), 0)
    self.assertEqual(int(state.num_stats), 4)

  def test_alias_adds_decoupled_decay_times_learning_rate(self):
    params = _params()
    grads = _random_grads(params, 3)
    lr, wd = 0.05, 0.1
    tx = fo.mini_block_fisher(lr, weight_decay=wd, **_KW)
    got, _ = _run(tx, params, grads)
    want = _reference(grads, **_ref_kw())
    p = _flat(params)
    for g, w in zip(got, want):
      whole = {k: -lr * (w[k] + wd * p[k]) for k in w}
      for path in w:
        assert_close(g[path], whole[path], rtol=2e-4, scale_atol=1e-5,
                     scale=tree_scale(whole), err_msg=path)

  def test_conv_block_covers_one_channel_pair(self):
    params = _params()
    grads = jax.tree.map(jnp.zeros_like, params)
    kernel = grads['Conv_0']['kernel']  # (3, 3, 2, 4)
    i, o = 1, 2
    patch = jax.random.normal(jax.random.key(5), (3, 3))
    grads['Conv_0']['kernel'] = kernel.at[:, :, i, o].set(patch)
    state = fo.scale_by_mini_block_fisher(**_KW).init(params)
    _, state = jax.jit(fo.scale_by_mini_block_fisher(**_KW).update)(
        grads, state)
    conv = np.asarray(state.stats['Conv_0']['conv'])
    self.assertEqual(conv.shape, (2 * 4, 1, 9, 9))
    vec = np.asarray(patch).reshape(-1)
    assert_close(conv[i * 4 + o, 0], np.outer(vec, vec), rtol=1e-6,
                 scale_atol=1e-7)
    others = np.delete(conv, i * 4 + o, axis=0)
    np.testing.assert_array_equal(others, 0.0)
    # The 1x1 conv has scalar blocks: a diagonal.
    self.assertEqual(state.stats['Conv_1']['conv'].shape, (4 * 3, 1, 1, 1))

  @parameterized.parameters('average', 'column', 'chunks')
  def test_dense_statistic_by_hand(self, dense_blocks):
    params = _params()
    grads = _random_grads(params, 1)[0]
    tx = fo.scale_by_mini_block_fisher(dense_blocks=dense_blocks, **_KW)
    _, state = jax.jit(tx.update)(grads, tx.init(params))
    d = grads['Dense_0']
    g_tilde = np.concatenate([np.asarray(d['kernel']),
                              np.asarray(d['bias'])[None]], 0)  # (I+1, O)
    got = np.asarray(state.stats['Dense_0'][dense_blocks])
    if dense_blocks == 'average':
      want = g_tilde.T @ g_tilde / g_tilde.shape[0]
      assert_close(got[0], want, rtol=1e-5)
    elif dense_blocks == 'chunks':
      # PyTorch's [dW | db] (O, I+1) in memory, read as (I+1, O) rows.
      c = np.ascontiguousarray(g_tilde.T).reshape(g_tilde.shape)
      self.assertFalse(np.allclose(c, g_tilde))
      assert_close(got[0], c.T @ c / c.shape[0], rtol=1e-5)
    else:
      want = np.einsum('ri,rj->rij', g_tilde, g_tilde)
      assert_close(got[:, 0], want, rtol=1e-5)
    # No bias: the kernel rows alone.
    k = np.asarray(grads['Dense_1']['kernel'])
    got = np.asarray(state.stats['Dense_1'][dense_blocks])
    if dense_blocks == 'average':
      assert_close(got[0], k.T @ k / k.shape[0], rtol=1e-5)

  @parameterized.parameters('average', 'column')
  def test_block_size_extremes(self, dense_blocks):
    """block_size=1 is a diagonal; block_size=O is the full output block."""
    params = _params()
    grads = _random_grads(params, 1)[0]
    kw = dict(_KW, dense_blocks=dense_blocks)
    run = lambda **k: _run(fo.scale_by_mini_block_fisher(**kw, **k),
                           params, [grads])[0][0]
    full, wide, diag = run(), run(block_size=5), run(block_size=1)
    assert_close(wide['Dense_0/kernel'], full['Dense_0/kernel'], rtol=1e-6)
    d = grads['Dense_0']
    g_tilde = np.concatenate([np.asarray(d['kernel']),
                              np.asarray(d['bias'])[None]], 0)
    f = np.square(g_tilde)
    if dense_blocks == 'average':
      f = np.broadcast_to(f.mean(0), f.shape)
    want = g_tilde / (f + _KW['damping'])  # m = g on the first step
    assert_close(diag['Dense_0/kernel'], want[:-1], rtol=1e-5)
    assert_close(diag['Dense_0/bias'], want[-1], rtol=1e-5)

  def test_no_retrace_and_stable_state(self):
    params = _params()
    tx = fo.mini_block_fisher(0.01, **_KW)
    traces = []

    @jax.jit
    def step(grads, state):
      traces.append(1)
      return tx.update(grads, state, params)

    state0 = tx.init(params)
    state = state0
    for g in _random_grads(params, 7):
      _, state = step(g, state)
    self.assertLen(traces, 1)
    chex.assert_trees_all_equal_shapes_and_dtypes(state0, state)

  def test_nonfinite_refresh_keeps_previous_statistics(self):
    params = _params()
    tx = fo.scale_by_mini_block_fisher(
        **dict(_KW, stats_every=1, inverse_every=1))
    step = jax.jit(tx.update)
    g0, g1 = _random_grads(params, 2)
    _, state = step(g0, tx.init(params))
    g1['Dense_0']['kernel'] = g1['Dense_0']['kernel'].at[0, 0].set(jnp.inf)
    _, after = step(g1, state)
    assert_trees_close(after.stats['Dense_0'], state.stats['Dense_0'],
                       rtol=1e-6, scale_atol=1e-7)
    assert_trees_close(after.inverses['Dense_0'], state.inverses['Dense_0'],
                       rtol=1e-6, scale_atol=1e-7)
    chex.assert_tree_all_finite(after.inverses)
    self.assertGreaterEqual(int(after.nonfinite), 1)
    # Other layers refreshed as usual.
    self.assertFalse(np.allclose(after.stats['Conv_0']['conv'],
                                 state.stats['Conv_0']['conv']))

  @parameterized.parameters('average', 'chunks')
  def test_warm_start_is_the_mean_then_the_average_continues(
      self, dense_blocks):
    params = _params()
    warm = _random_grads(params, 3, seed=7)
    grads = _random_grads(params, 4)
    tx = fo.mini_block_fisher(0.1, dense_blocks=dense_blocks, **_KW)
    state = fo.mini_block_fisher_warm_start(tx.init(params), warm)
    inner = state[0]
    self.assertEqual(int(inner.num_stats), 3)
    rows = [np.concatenate([np.asarray(w['Dense_0']['kernel']),
                            np.asarray(w['Dense_0']['bias'])[None]], 0)
            for w in warm]
    if dense_blocks == 'chunks':
      rows = [np.ascontiguousarray(r.T).reshape(r.shape) for r in rows]
    want = sum(r.T @ r / r.shape[0] for r in rows) / 3
    assert_close(inner.stats['Dense_0'][dense_blocks][0], want, rtol=1e-5)
    got, _ = _run(tx, params, grads, state)
    ref = _reference(grads, **_ref_kw(dense_blocks=dense_blocks), warm=warm)
    for g, w in zip(got, ref):
      for path in w:
        assert_close(g[path], -0.1 * w[path], rtol=2e-4, scale_atol=1e-5,
                     scale=0.1 * tree_scale(w), err_msg=path)

  def test_warm_start_compiles_once_per_model(self):
    # A second warm start of the same model must not recompile: examples
    # compile it outside their wall-clock budget.
    params = _params()
    tx = fo.mini_block_fisher(0.1, **_KW)
    warm = _random_grads(params, 2, seed=3)
    fo.mini_block_fisher_warm_start(tx.init(params), warm)
    size = _mini_block_fisher._mean_statistics._cache_size()
    fo.mini_block_fisher_warm_start(tx.init(params), warm[::-1])
    self.assertEqual(_mini_block_fisher._mean_statistics._cache_size(), size)

  def test_warm_start_errors(self):
    params = _params()
    with self.assertRaisesRegex(ValueError, 'no ScaleByMiniBlockFisherState'):
      fo.mini_block_fisher_warm_start(optax.adam(1e-3).init(params),
                                      [params])
    state = fo.scale_by_mini_block_fisher(block_size=2).init(params)
    other = {'Dense_0': {'kernel': jnp.zeros((3, 3))}}
    with self.assertRaisesRegex(ValueError, "'Conv_0'"):
      fo.mini_block_fisher_warm_start(state, [other])

  @parameterized.parameters('average', 'chunks')
  def test_scan_stack(self, dense_blocks):
    class Model(nn.Module):

      @nn.compact
      def __call__(self, x):
        def body(mdl, c, _):
          return nn.tanh(nn.Dense(4)(c)), None
        scan = nn.scan(body, variable_axes={'params': 0,
                                            **fo.linen.capture_axes()},
                       split_rngs={'params': True}, length=3)
        x, _ = scan(self, x, None)
        return x

    model = Model()
    x = jax.random.normal(jax.random.key(0), (8, 4))
    params = model.init(jax.random.key(1), x)['params']
    loss = lambda p, x: jnp.mean(model.apply({'params': p}, x) ** 2)
    step_fn = jax.jit(fo.linen.value_grad_and_stats(loss))
    _, grads, stats = step_fn(params, x)
    (key, st), = stats.items()
    self.assertEqual(st.meta.stack_ndim, 1)
    layers = jax.eval_shape(step_fn, params, x)[2]
    tx = fo.scale_by_mini_block_fisher(**_KW, layers=layers,
                                       dense_blocks=dense_blocks)
    state = tx.init(params)
    self.assertEqual(state.stats[key][dense_blocks].shape, (3, 1, 4, 4))
    updates, _ = jax.jit(lambda g, s: tx.update(g, s, layer_stats=stats))(
        grads, state)
    # The stack is also read off the parameters (the bias is (3, 4)).
    guessed = fo.scale_by_mini_block_fisher(**_KW, dense_blocks=dense_blocks)
    chex.assert_trees_all_close(guessed.update(
        grads, guessed.init(params), layer_stats=stats)[0], updates)
    # Each stack slice is an independent dense layer.
    for layer in range(3):
      sliced = jax.tree.map(lambda a, i=layer: a[i], grads)
      want = _reference([sliced], **_ref_kw(dense_blocks=dense_blocks))[0]
      got = _flat(jax.tree.map(lambda a, i=layer: a[i], updates))
      for path in want:
        assert_close(got[path], want[path], rtol=1e-4, scale_atol=1e-5,
                     scale=tree_scale(want), err_msg=path)

  def test_captured_layer_kinds_are_checked(self):
    class Model(nn.Module):

      @nn.compact
      def __call__(self, x, use_bias=True):
        return nn.DenseGeneral((2, 3), axis=-1, use_bias=use_bias)(x)

    model = Model()
    x = jnp.ones((4, 5))
    # Without a bias the parameters cannot tell (5, 2, 3) from a conv
    # kernel: the captured kind is checked and layers= is asked for.
    params = model.init(jax.random.key(0), x, False)['params']
    loss = lambda p, x: jnp.mean(model.apply({'params': p}, x, False) ** 2)
    _, grads, stats = fo.linen.value_grad_and_stats(loss)(params, x)
    tx = fo.scale_by_mini_block_fisher(**_KW)
    with self.assertRaisesRegex(ValueError, 'DenseGeneral.*layers='):
      tx.update(grads, tx.init(params), layer_stats=stats)
    params = model.init(jax.random.key(0), x)['params']
    loss = lambda p, x: jnp.mean(model.apply({'params': p}, x) ** 2)
    step_fn = fo.linen.value_grad_and_stats(loss)
    _, grads, stats = step_fn(params, x)
    # With its (2, 3) bias the outputs are read off the parameters.
    guessed = fo.scale_by_mini_block_fisher(**_KW)
    guessed = guessed.update(grads, guessed.init(params),
                             layer_stats=stats)[0]
    tx = fo.scale_by_mini_block_fisher(
        **_KW, layers=jax.eval_shape(step_fn, params, x)[2])
    state = tx.init(params)
    (key,) = state.stats
    self.assertEqual(state.stats[key]['chunks'].shape, (1, 6, 6))
    updates, _ = tx.update(grads, state, layer_stats=stats)
    flat = {'kernel': grads['DenseGeneral_0']['kernel'].reshape(5, 6),
            'bias': grads['DenseGeneral_0']['bias'].reshape(6)}
    want = _reference([{'L': flat}], **_ref_kw())[0]
    assert_close(updates['DenseGeneral_0']['kernel'].reshape(5, 6),
                 want['L/kernel'], rtol=1e-4, scale_atol=1e-5)
    chex.assert_trees_all_close(guessed, updates)

  def test_bad_options_are_named(self):
    for kw, name in ((dict(block_size=0), 'block_size'),
                     (dict(dense_blocks='rows'), 'dense_blocks'),
                     (dict(fallback='sgd'), 'fallback'),
                     (dict(inverse_method='qr'), 'inverse_method'),
                     (dict(stats_every=0), 'stats_every')):
      with self.assertRaisesRegex(ValueError, name):
        fo.scale_by_mini_block_fisher(**kw)

  def test_inject_hyperparams_and_training(self):
    model = nn.Sequential([nn.Dense(16), nn.tanh, nn.Dense(2)])
    x = jax.random.normal(jax.random.key(0), (64, 4))
    y = jnp.stack([x.sum(1), x[:, 0] * x[:, 1]], 1)
    params = model.init(jax.random.key(1), x)['params']
    loss_fn = lambda p: jnp.mean((model.apply({'params': p}, x) - y) ** 2)
    tx = optax.inject_hyperparams(fo.mini_block_fisher, static_args=(
        'stats_every', 'inverse_every'))(
            learning_rate=0.03, damping=0.1, inverse_every=5)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state, loss

    first = None
    for _ in range(150):
      params, state, loss = step(params, state)
      first = loss if first is None else first
    self.assertLess(float(loss), 0.1 * float(first))


if __name__ == '__main__':
  absltest.main()
