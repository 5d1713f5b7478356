"""K-FAC and TKFAC against exact Fisher blocks and dense references."""

import itertools

from absl.testing import absltest
from absl.testing import parameterized
import chex
import flax.linen as nn
import jax

import jax.numpy as jnp
import numpy as np
import optax

import fisher_optax as fo
from fisher_optax import _kfac
from fisher_optax import _kronecker
from fisher_optax import _stats
from fisher_optax import _tkfac

from _tolerance import assert_close
from _tolerance import assert_trees_close


def _dense_stats(key=0, batch=16, d_in=5, d_out=3, correlated=True):
  """A Dense layer, a per-example loss, captured stats, exact Fisher."""
  model = nn.Dense(d_out)
  x = jax.random.normal(jax.random.key(key), (batch, d_in))
  if correlated:  # per-example norms correlated with the other factor
    x = x * (1 + jnp.arange(batch)[:, None] / 4)
  t = jax.random.normal(jax.random.key(key + 1), (batch, d_out))
  params = model.init(jax.random.key(key + 2), x)['params']
  per_example = lambda p, xi, ti: jnp.sum(
      jnp.sin(model.apply({'params': p}, xi) * ti))
  loss = lambda p, x, t: jnp.mean(jax.vmap(
      per_example, (None, 0, 0))(p, x, t)) if False else jnp.mean(
          jnp.sum(jnp.sin(model.apply({'params': p}, x) * t), -1))
  _, _, stats = jax.jit(fo.linen.value_grad_and_stats(loss))(params, x, t)
  grads = jax.vmap(jax.grad(per_example), (None, 0, 0))(params, x, t)
  # Per-example gradient of the bias-augmented (d_in + 1, d_out) matrix.
  w = np.concatenate([np.asarray(grads['kernel'], np.float64),
                      np.asarray(grads['bias'], np.float64)[:, None]], 1)
  vec = w.reshape(batch, -1)
  fisher = vec.T @ vec / batch
  return stats[''], fisher, params


def _factors(algorithm, st, block_size=None):
  """``(statistics, layout)`` of one layer; the statistics under jit."""
  layout = _kronecker.layout_from_meta('', st.meta)
  stats = jax.jit(lambda s: algorithm.statistics(
      _stats.kronecker_rows(s), layout, block_size))(st)
  return stats, layout


class FactorTest(parameterized.TestCase):

  def test_kfac_dense_closed_form(self):
    st, _, _ = _dense_stats()
    stats, _ = _factors(_kfac.KFAC, st)
    a = np.asarray(st.a[0], np.float64)
    a = np.concatenate([a, np.ones((len(a), 1))], 1)
    g = np.asarray(st.g[0], np.float64) * len(a)  # per-example cotangents
    assert_close(stats['A'][0, 0], a.T @ a / len(a), rtol=1e-5)
    assert_close(stats['G'][0, 0], g.T @ g / len(a), rtol=1e-5)

  @parameterized.named_parameters(
      ('same', dict(padding='SAME')),
      ('strided_dilated', dict(padding='VALID', strides=2,
                               kernel_dilation=(1, 2))),
      ('groups', dict(padding='SAME', feature_group_count=2)),
  )
  def test_kfac_conv_closed_form(self, kw):
    """Factors from a loop im2col: A = mean a a^T, G = T mean g g^T."""
    conv = nn.Conv(4, (3, 2), **kw)
    x = jax.random.normal(jax.random.key(3), (2, 6, 7, 4))
    params = conv.init(jax.random.key(0), x)['params']
    loss = lambda p, x: jnp.mean(jnp.sum(jnp.sin(conv.apply(
        {'params': p}, x)), (1, 2, 3)))
    _, _, stats = jax.jit(fo.linen.value_grad_and_stats(loss))(params, x)
    st = stats['']
    got, layout = _factors(_kfac.KFAC, st)
    cfg = dict(st.meta.config)
    groups = cfg['groups']
    kh, kw_ = cfg['kernel_size']
    sh, sw = cfg['strides']
    dh, dw = cfg['rhs_dilation']
    pad = cfg['padding']
    if isinstance(pad, str):
      pad = jax.lax.padtype_to_pads((6, 7), ((kh - 1) * dh + 1,
                                             (kw_ - 1) * dw + 1), (sh, sw),
                                    pad)
    xs = np.pad(np.asarray(x, np.float64),
                ((0, 0), tuple(pad[0]), tuple(pad[1]), (0, 0)))
    g = np.asarray(st.g[0], np.float64) * 2  # batch-mean loss, B = 2
    oh, ow = g.shape[1:3]
    cg, og = 4 // groups, 4 // groups
    for grp in range(groups):
      rows_a, rows_g = [], []
      for b, i, j in itertools.product(range(2), range(oh), range(ow)):
        patch = [xs[b, i * sh + p * dh, j * sw + q * dw,
                    grp * cg + c] for p in range(kh) for q in range(kw_)
                 for c in range(cg)]
        rows_a.append(patch + [1.0])
        rows_g.append(g[b, i, j, grp * og:(grp + 1) * og])
      ra, rg = np.array(rows_a), np.array(rows_g)
      positions = oh * ow
      assert_close(got['A'][grp, 0], ra.T @ ra / len(ra), rtol=1e-5)
      assert_close(got['G'][grp, 0], positions * rg.T @ rg / len(rg),
                   rtol=1e-5)
    self.assertEqual(layout.lead, (groups,))

  def test_tkfac_trace_identity(self):
    """tr(delta Phi (x) Psi) == tr(F) for the exact vmap(grad) Fisher."""
    with jax.enable_x64(True):
      st, fisher, _ = _dense_stats()
      st = jax.tree.map(lambda v: v.astype(jnp.float64), st)
      stats, _ = _factors(_tkfac.TKFAC, st)
      delta = float(stats['delta'][0])
      phi = np.asarray(stats['Phi'][0, 0]) / delta
      psi = np.asarray(stats['Psi'][0, 0]) / delta
      np.testing.assert_allclose(np.trace(phi), 1.0, rtol=1e-12)
      np.testing.assert_allclose(np.trace(psi), 1.0, rtol=1e-12)
      np.testing.assert_allclose(delta * np.trace(np.kron(phi, psi)),
                                 np.trace(fisher), rtol=1e-6)

  def test_tkfac_equals_kfac_for_constant_norms(self):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(1, 32, 4))  # (groups, rows, features)
    g = rng.normal(size=(1, 32, 3))
    a /= np.linalg.norm(a, axis=-1, keepdims=True)
    g *= 2 / np.linalg.norm(g, axis=-1, keepdims=True)
    layout = _kronecker.Layout('', 'kron', 'kernel', None, (1,), 0, 1, 4, 3)
    with jax.enable_x64(True):
      rows = _stats.KroneckerRows(jnp.asarray(a), jnp.asarray(g), 1)
      t = _tkfac.TKFAC.statistics(rows, layout, None)
      k = _kfac.KFAC.statistics(rows, layout, None)
      tk = float(t['delta'][0]) * np.kron(t['Phi'][0, 0] / t['delta'][0],
                                          t['Psi'][0, 0] / t['delta'][0])
      np.testing.assert_allclose(tk, np.kron(k['A'][0, 0], k['G'][0, 0]),
                                 rtol=1e-10, atol=1e-12)

  def test_tkfac_recovers_kronecker_fisher(self):
    """Identical inputs on every row make F = a a^T (x) E[g g^T] exactly."""
    rng = np.random.default_rng(1)
    a = np.broadcast_to(rng.normal(size=4), (1, 16, 4))
    g = rng.normal(size=(1, 16, 3)) * rng.uniform(0.5, 2, (1, 16, 1))
    fisher = np.mean([np.kron(np.outer(ai, ai), np.outer(gi, gi))
                      for ai, gi in zip(a[0], g[0])], 0)
    layout = _kronecker.Layout('', 'kron', 'kernel', None, (1,), 0, 1, 4, 3)
    with jax.enable_x64(True):
      rows = _stats.KroneckerRows(jnp.asarray(a), jnp.asarray(g), 1)
      t = _tkfac.TKFAC.statistics(rows, layout, None)
      d = float(t['delta'][0])
      approx = d * np.kron(t['Phi'][0, 0] / d, t['Psi'][0, 0] / d)
    np.testing.assert_allclose(approx, fisher, rtol=1e-9, atol=1e-12)


def _one_update(tx, params, grads, stats):
  state = tx.init(params)
  return jax.jit(lambda s: tx.update(grads, s, params,
                                     layer_stats=stats))(state)


def _patches_by_convolution(x, meta):
  """The patches as ``lax.conv_general_dilated_patches`` forms them (a
  convolution with a one-hot kernel), in the kernel's feature order."""
  cfg = dict(meta.config)
  ks = cfg['kernel_size']
  if cfg['pre_pad'] is not None:
    mode, pads = cfg['pre_pad']
    x = jnp.pad(x, ((0, 0),) + tuple(pads) + ((0, 0),), mode=mode)
  spatial = 'DHW'[-len(ks):]
  c_in, groups = x.shape[-1], cfg['groups']
  dn = jax.lax.conv_dimension_numbers(
      x.shape, ks + (c_in, c_in), ('N' + spatial + 'C', spatial + 'IO',
                                   'N' + spatial + 'C'))
  p = jax.lax.conv_general_dilated_patches(
      x, ks, cfg['strides'], cfg['padding'], cfg['lhs_dilation'],
      cfg['rhs_dilation'], dn, precision=jax.lax.Precision.HIGHEST)
  # Features come out (C_in, *kernel_size): reorder to (*kernel, C_in)
  # within each group.
  p = p.reshape((-1, groups, c_in // groups, int(np.prod(ks))))
  p = jnp.swapaxes(p, -1, -2).reshape((-1, groups, p.shape[-1] * p.shape[-2]))
  return jnp.swapaxes(p, 0, 1)


class ConvPatchesTest(parameterized.TestCase):
  """``conv_patches`` (strided slices) against a convolution that forms
  the same patches, for every padding, stride, dilation and group form
  that capture accepts."""

  @parameterized.named_parameters(
      ('same', (3, 3), dict(padding='SAME')),
      ('same_strided_even_kernel', (2, 4), dict(padding='SAME', strides=2)),
      ('valid_strided_dilated', (3, 2),
       dict(padding='VALID', strides=(2, 1), kernel_dilation=(1, 2))),
      ('explicit', (3, 3), dict(padding=((2, 0), (1, 3)))),
      ('negative_pad', (3, 3), dict(padding=((-1, 2), (1, -1)))),
      ('groups', (3, 3), dict(padding='SAME', feature_group_count=2)),
      ('circular', (3, 3), dict(padding='CIRCULAR')),
      ('input_dilation', (3, 3), dict(padding=((1, 1), (2, 1)),
                                      input_dilation=2)),
      ('causal_1d', (3,), dict(padding='CAUSAL', kernel_dilation=2)),
      ('conv_3d', (2, 3, 2), dict(padding='SAME', strides=(1, 2, 1))),
  )
  def test_equals_the_convolution_patches(self, kernel_size, kw):
    conv = nn.Conv(6, kernel_size, **kw)
    spatial = (7, 9, 5)[:len(kernel_size)] if len(kernel_size) > 1 else (11,)
    x = jax.random.normal(jax.random.key(0), (3,) + spatial + (4,))
    params = conv.init(jax.random.key(1), x)['params']
    loss = lambda p, x: jnp.mean(jnp.sin(conv.apply({'params': p}, x)))
    _, _, stats = jax.jit(fo.linen.value_grad_and_stats(loss))(params, x)
    st = stats['']
    got = jax.jit(lambda a: _stats.conv_patches(a, st.meta))(st.a[0])
    want = _patches_by_convolution(st.a[0], st.meta)
    self.assertEqual(got.shape, want.shape)
    # As many rows as the layer's output has positions.
    out = conv.apply({'params': params}, x)
    self.assertEqual(got.shape[1], int(np.prod(out.shape[:-1])))
    assert_close(got, want)


class PreconditionTest(parameterized.TestCase):
  """The first preconditioned update against a dense numpy solve."""

  @parameterized.parameters(itertools.product(
      ('kfac', 'tkfac'), ('factored', 'eigen'), (None, 2)))
  def test_update_matches_dense_solve(self, name, mode, block_size):
    st, _, params = _dense_stats(key=4, batch=32, d_in=4, d_out=3)
    grads = jax.tree.map(lambda p: jax.random.normal(
        jax.random.key(9), p.shape), params)
    stats = {'': st}
    lam = 0.05
    factory = {'kfac': fo.scale_by_kfac, 'tkfac': fo.scale_by_tkfac}[name]
    tx = factory(damping=lam, momentum=0.0, damping_mode=mode,
                 block_size=block_size)
    updates, state = _one_update(tx, params, grads, stats)
    algorithm = {'kfac': _kfac.KFAC, 'tkfac': _tkfac.TKFAC}[name]
    raw, layout = _factors(algorithm, st)  # full (unblocked) statistics
    c_in, c_out, damp_in, damp_out, _ = algorithm.factors(raw, layout, lam)
    c_in, c_out = np.asarray(c_in[0, 0], np.float64), np.asarray(
        c_out[0, 0], np.float64)
    split = 'pi' if name == 'kfac' else 'sqrt'
    del damp_in, damp_out  # the reference recomputes them

    def blockdiag(m, b):
      if b is None:
        return m
      out = np.zeros_like(m)
      for s in range(0, len(m), b):
        out[s:s + b, s:s + b] = m[s:s + b, s:s + b]
      return out

    c_in, c_out = blockdiag(c_in, block_size), blockdiag(c_out, block_size)
    d_in, d_out = len(c_in), len(c_out)
    if mode == 'eigen':
      curvature = np.kron(c_in, c_out) + lam * np.eye(d_in * d_out)
    else:
      if split == 'pi':
        pi = np.sqrt((np.trace(c_in) / d_in) / (np.trace(c_out) / d_out))
        di, do = pi * np.sqrt(lam), np.sqrt(lam) / pi
      else:
        di = do = np.sqrt(lam)
      curvature = np.kron(c_in + di * np.eye(d_in), c_out + do * np.eye(d_out))
    w = np.concatenate([np.asarray(grads['kernel']),
                        np.asarray(grads['bias'])[None]], 0)
    want = np.linalg.solve(curvature, w.reshape(-1)).reshape(w.shape)
    # Both leaves against the scale of the whole update.
    scale = np.max(np.abs(want))
    np.testing.assert_allclose(updates['kernel'], want[:-1], rtol=2e-4,
                               atol=1e-5 * scale)
    np.testing.assert_allclose(updates['bias'], want[-1], rtol=2e-4,
                               atol=1e-5 * scale)
    self.assertEqual(int(state.nonfinite), 0)


class EigenCorrectedTest(parameterized.TestCase):

  def _state_after_one_step(self, factory, st, params, lam=0.05, **kw):
    grads = jax.tree.map(lambda p: jax.random.normal(
        jax.random.key(5), p.shape), params)
    tx = factory(damping=lam, momentum=0.0, **kw)
    updates, state = _one_update(tx, params, grads, {'': st})
    return grads, updates, state

  def test_tekfac_closer_to_fisher_than_tkfac(self):
    """||F - F_TEKFAC||_F <= ||F - F_TKFAC||_F for the exact vmap Fisher."""
    st, fisher, params = _dense_stats(key=6, batch=24, d_in=4, d_out=3)
    _, _, state = self._state_after_one_step(fo.scale_by_tekfac, st, params)
    pre = jax.tree.map(lambda v: np.asarray(v, np.float64),
                       state.precond[''])
    u_in, u_out = pre['in_vecs'][0, 0], pre['out_vecs'][0, 0]
    basis = np.kron(u_in, u_out)
    f_tekfac = basis @ np.diag(pre['scaling'][0].reshape(-1)) @ basis.T
    raw, _ = _factors(_tkfac.TKFAC, st)
    d = float(raw['delta'][0])
    f_tkfac = d * np.kron(np.asarray(raw['Phi'][0, 0]) / d,
                          np.asarray(raw['Psi'][0, 0]) / d)
    err_tekfac = np.linalg.norm(fisher - f_tekfac)
    err_tkfac = np.linalg.norm(fisher - f_tkfac)
    self.assertLess(err_tekfac, err_tkfac)
    # The scaling is exactly the diagonal of F in the eigenbasis.
    assert_close(pre['scaling'][0].reshape(-1),
                 np.diag(basis.T @ fisher @ basis), rtol=1e-4,
                 scale_atol=1e-5)

  @parameterized.parameters((None,), (2,))
  def test_ekfac_update_matches_dense_solve(self, block_size):
    """(U diag(S + lambda) U^T)^-1 vec(W), U = blockdiag eigenbasis."""
    st, fisher, params = _dense_stats(key=7, batch=24, d_in=4, d_out=3)
    grads, updates, state = self._state_after_one_step(
        fo.scale_by_ekfac, st, params, block_size=block_size)
    pre = jax.tree.map(lambda v: np.asarray(v, np.float64),
                       state.precond[''])

    def blockdiag(vecs):
      n = vecs.shape[0] * vecs.shape[1]
      out = np.zeros((n, n))
      for i, blk in enumerate(vecs):
        b = blk.shape[0]
        out[i * b:(i + 1) * b, i * b:(i + 1) * b] = blk
      return out

    u = np.kron(blockdiag(pre['in_vecs'][0]), blockdiag(pre['out_vecs'][0]))
    p_in, p_out = pre['scaling'].shape[-2:]
    # Padded rows/columns are zero in W; the dense solve lives in the
    # padded space and is sliced back.
    w = np.zeros((p_in, p_out))
    w[:5, :3] = np.concatenate([np.asarray(grads['kernel']),
                                np.asarray(grads['bias'])[None]], 0)
    s = pre['scaling'][0].reshape(-1)
    want = (u @ ((u.T @ w.reshape(-1)) / (s + 0.05))).reshape(p_in, p_out)
    scale = np.max(np.abs(want))
    np.testing.assert_allclose(updates['kernel'], want[:4, :3], rtol=2e-4,
                               atol=1e-5 * scale)
    np.testing.assert_allclose(updates['bias'], want[4, :3], rtol=2e-4,
                               atol=1e-5 * scale)
    # With full blocks S is the diagonal of the exact Fisher in the basis.
    if block_size is None:
      assert_close(s, np.diag(u.T @ fisher @ u), rtol=1e-4, scale_atol=1e-5)


def _pi_solve(c_in, c_out, w, lam):
  """Dense ((C_in + pi sqrt(lam)) (x) (C_out + sqrt(lam)/pi))^-1 vec(w)."""
  d_in, d_out = len(c_in), len(c_out)
  pi = np.sqrt((np.trace(c_in) / d_in) / (np.trace(c_out) / d_out))
  curvature = np.kron(c_in + pi * np.sqrt(lam) * np.eye(d_in),
                      c_out + np.sqrt(lam) / pi * np.eye(d_out))
  return np.linalg.solve(curvature, w.reshape(-1)).reshape(w.shape)


class EngineTest(parameterized.TestCase):

  @parameterized.parameters(1, 2)
  def test_conv_update_matches_dense_solve(self, groups):
    conv = nn.Conv(4, (3, 3), padding='SAME', feature_group_count=groups)
    x = jax.random.normal(jax.random.key(11), (2, 5, 5, 4))
    params = conv.init(jax.random.key(0), x)['params']
    loss = lambda p, x: jnp.mean(jnp.sin(conv.apply({'params': p}, x)))
    step_fn = fo.linen.value_grad_and_stats(loss)
    _, grads, stats = jax.jit(step_fn)(params, x)
    layers = jax.eval_shape(step_fn, params, x)[2]
    tx = fo.scale_by_kfac(damping=0.1, momentum=0.0, layers=layers)
    updates, state = _one_update(tx, params, grads, stats)
    a = np.asarray(state.stats['']['A'], np.float64)  # (groups, 1, b, b)
    g = np.asarray(state.stats['']['G'], np.float64)
    kernel = np.asarray(grads['kernel'])  # (3, 3, 4/groups, 4)
    bias = np.asarray(grads['bias'])
    per = 4 // groups
    for grp in range(groups):
      cols = slice(grp * per, (grp + 1) * per)
      w = np.concatenate([kernel[..., cols].reshape(-1, per),
                          bias[None, cols]], 0)
      want = _pi_solve(a[grp, 0], g[grp, 0], w, 0.1)
      scale = np.max(np.abs(want))
      np.testing.assert_allclose(
          updates['kernel'][..., cols].reshape(-1, per), want[:-1],
          rtol=2e-4, atol=1e-5 * scale)
      np.testing.assert_allclose(updates['bias'][cols], want[-1],
                                 rtol=2e-4, atol=1e-5 * scale)

  @parameterized.parameters('factored', 'eigen')
  def test_tkfac_adaptive_conv_damping(self, mode):
    """lambda_l = max(delta / dim F, lambda), against a dense solve."""
    conv = nn.Conv(3, (2, 2), padding='VALID')
    x = jax.random.normal(jax.random.key(16), (4, 4, 4, 2))
    params = conv.init(jax.random.key(0), x)['params']
    loss = lambda p, x: jnp.mean(jnp.sin(3 * conv.apply({'params': p}, x)))
    _, grads, stats = jax.jit(fo.linen.value_grad_and_stats(loss))(params, x)
    lam = 1e-6  # below the mean eigenvalue: the adaptive value is used
    tx = fo.scale_by_tkfac(damping=lam, momentum=0.0, damping_mode=mode,
                           conv_damping='adaptive')
    updates, state = _one_update(tx, params, grads, stats)
    st = {k: np.asarray(v[0], np.float64) for k, v in
          state.stats[''].items()}
    d_in, d_out = 9, 3
    delta = float(st['delta'])
    lam_l = max(delta / (d_in * d_out), lam)
    self.assertGreater(lam_l, 10 * lam)
    phi, psi = st['Phi'][0] / delta, st['Psi'][0] / delta
    if mode == 'eigen':
      curvature = delta * np.kron(phi, psi) + lam_l * np.eye(d_in * d_out)
    else:
      root = np.sqrt(delta)
      curvature = np.kron(root * phi + np.sqrt(lam_l) * np.eye(d_in),
                          root * psi + np.sqrt(lam_l) * np.eye(d_out))
    w = np.concatenate([np.asarray(grads['kernel']).reshape(-1, d_out),
                        np.asarray(grads['bias'])[None]], 0)
    want = np.linalg.solve(curvature, w.reshape(-1)).reshape(w.shape)
    assert_close(updates['kernel'].reshape(-1, d_out), want[:-1], rtol=2e-4,
                 scale_atol=1e-5)

  def test_grouped_conv_without_layers_names_the_fix(self):
    conv = nn.Conv(4, (3, 3), feature_group_count=2)
    x = jax.random.normal(jax.random.key(12), (2, 5, 5, 4))
    params = conv.init(jax.random.key(0), x)['params']
    loss = lambda p, x: jnp.mean(conv.apply({'params': p}, x) ** 2)
    _, grads, stats = jax.jit(fo.linen.value_grad_and_stats(loss))(params, x)
    tx = fo.scale_by_kfac()
    with self.assertRaisesRegex(ValueError, "layer '' .*layers=jax.eval"):
      tx.update(grads, tx.init(params), params, layer_stats=stats)

  def test_scan_stack_matches_per_layer(self):
    class Block(nn.Module):

      @nn.compact
      def __call__(self, x, _):
        return jnp.tanh(nn.Dense(3)(x)), None

    class Model(nn.Module):

      @nn.compact
      def __call__(self, x):
        stack = nn.scan(Block, variable_axes={
            'params': 0, **fo.linen.capture_axes()},
                        split_rngs={'params': True}, length=2)
        return stack()(x, None)[0]

    model = Model()
    x = jax.random.normal(jax.random.key(13), (8, 3))
    params = model.init(jax.random.key(0), x)['params']
    loss = lambda p, x: jnp.mean(model.apply({'params': p}, x) ** 2)
    step_fn = fo.linen.value_grad_and_stats(loss)
    _, grads, stats = jax.jit(step_fn)(params, x)
    layers = jax.eval_shape(step_fn, params, x)[2]
    tx = fo.scale_by_kfac(damping=0.1, momentum=0.0, layers=layers)
    updates, state = _one_update(tx, params, grads, stats)
    # The stack is also read off the parameters (the bias is (2, 3)).
    guessed, _ = _one_update(fo.scale_by_kfac(damping=0.1, momentum=0.0),
                             params, grads, stats)
    chex.assert_trees_all_close(guessed, updates)
    key = 'ScanBlock_0/Dense_0' if 'ScanBlock_0' in params else (
        list(stats)[0])
    st = stats[key]
    for layer in range(2):
      a = np.asarray(st.a[layer], np.float64).reshape(-1, 3)
      a = np.concatenate([a, np.ones((len(a), 1))], 1)
      g = np.asarray(st.g[layer], np.float64).reshape(-1, 3) * 8
      a_fac = a.T @ a / len(a)
      g_fac = g.T @ g / len(g)
      assert_close(state.stats[key]['A'][layer, 0, 0], a_fac, rtol=1e-5)
      sub = jax.tree.map(lambda v, layer=layer: v[layer], _get(grads, key))
      w = np.concatenate([np.asarray(sub['kernel']),
                          np.asarray(sub['bias'])[None]], 0)
      want = _pi_solve(a_fac, g_fac, w, 0.1)
      got = jax.tree.map(lambda v, layer=layer: v[layer],
                         _get(updates, key))
      assert_close(got['kernel'], want[:-1], rtol=2e-4, scale_atol=1e-5)

  def test_embedding_uses_diagonal_input_factor(self):
    embed = nn.Embed(6, 3)
    ids = jnp.array([[0, 2, 2, 5], [1, 2, 0, 0]])
    params = embed.init(jax.random.key(0), ids)['params']
    loss = lambda p, i: jnp.mean(jnp.sin(embed.apply({'params': p}, i)))
    _, grads, stats = jax.jit(fo.linen.value_grad_and_stats(loss))(params,
                                                                    ids)
    tx = fo.scale_by_kfac(damping=0.1, momentum=0.0)
    updates, state = _one_update(tx, params, grads, stats)
    counts = np.bincount(np.asarray(ids).ravel(), minlength=6) / ids.size
    assert_close(state.stats['']['A'][0], counts, rtol=1e-6, scale_atol=1e-7)
    want = _pi_solve(np.diag(counts), np.asarray(
        state.stats['']['G'][0, 0], np.float64),
                     np.asarray(grads['embedding']), 0.1)
    assert_close(updates['embedding'], want, rtol=2e-4, scale_atol=1e-5)

  @parameterized.parameters(fo.kfac, fo.tkfac, fo.ekfac, fo.tekfac)
  def test_periods_no_retrace_and_every_parameter_moves(self, factory):
    class Net(nn.Module):

      @nn.compact
      def __call__(self, x):
        cls = self.param('cls', nn.initializers.normal(1.0), (3,))
        x = nn.LayerNorm()(nn.Dense(5)(x) + jnp.sum(cls))
        return nn.Dense(2)(jnp.tanh(x))

    model = Net()
    x = jax.random.normal(jax.random.key(14), (8, 3))
    params = model.init(jax.random.key(0), x)['params']
    traces = []

    def loss(p, x):
      traces.append(1)
      return jnp.mean(model.apply({'params': p}, x) ** 2)

    step_fn = fo.linen.value_grad_and_stats(loss)
    tx = factory(0.01, damping=0.1, stats_every=2, inverse_every=4)

    @jax.jit
    def step(p, state, x):
      _, grads, stats = step_fn(p, x)
      updates, state = tx.update(grads, state, p, layer_stats=stats)
      return optax.apply_updates(p, updates), state

    state = tx.init(params)
    p, state = step(params, state, x)
    n = len(traces)
    history = [state]
    for t in range(1, 6):
      p, state = step(p, state, x * (1 + t))
      history.append(state)
    self.assertLen(traces, n)
    same = lambda a, b: all(jax.tree.leaves(jax.tree.map(
        lambda u, v: bool(jnp.all(u == v)), a, b)))
    ks = [s[1].stats for s in history]
    ps = [s[1].precond for s in history]
    self.assertTrue(same(ks[0], ks[1]))  # statistics refresh at t = 0, 2, 4
    self.assertFalse(same(ks[1], ks[2]))
    self.assertTrue(same(ps[2], ps[3]))  # inverses refresh at t = 0, 4
    self.assertFalse(same(ps[3], ps[4]))
    for path, leaf in fo._base.flatten_with_paths(p).items():  # pylint: disable=protected-access
      old = fo._base.flatten_with_paths(params)[path]  # pylint: disable=protected-access
      self.assertFalse(np.allclose(old, leaf), path)
    self.assertEqual(int(state[1].nonfinite), 0)

  def test_inject_hyperparams(self):
    st, _, params = _dense_stats(key=15)
    grads = jax.tree.map(jnp.ones_like, params)
    plain = fo.kfac(0.1, damping=0.03, inverse_every=3)
    injected = optax.inject_hyperparams(
        fo.kfac, static_args=('stats_every', 'inverse_every'))(
            learning_rate=0.1, damping=0.03, inverse_every=3)
    u1, _ = plain.update(grads, plain.init(params), params,
                         layer_stats={'': st})
    u2, _ = jax.jit(lambda s: injected.update(
        grads, s, params, layer_stats={'': st}))(injected.init(params))
    assert_trees_close(u1, u2, rtol=1e-5)


def _get(tree, path):
  for k in path.split('/'):
    tree = tree[k]
  return tree


if __name__ == '__main__':
  absltest.main()
