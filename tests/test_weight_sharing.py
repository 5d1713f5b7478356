"""K-FAC-expand and K-FAC-reduce (Eschenhagen et al., NeurIPS 2023).

Float64 references written from the paper's definitions, independent of the
library's capture and patch extraction:

* the explicit formulas on a small convolution and a dense layer applied
  over tokens, with the output cotangents of a loss whose derivative is
  written by hand: reduce's ``A = mean_n abar_n abar_n^T`` (``abar_n`` the
  mean of example ``n``'s bias-augmented inputs over its shared rows) and
  ``G = mean_n ghat_n ghat_n^T`` (``ghat_n`` the sum of its per-example
  cotangents), TKFAC's ``delta``, ``Phi``, ``Psi`` on the same per-example
  rows, and expand's location-expanded factors;
* exactness in the reduce setting: a deep linear network whose loss sees
  the mean over tokens of two weight-shared layers' outputs; for one
  example its empirical Fisher block of each shared layer is exactly
  reduce's ``A (x) G`` (from ``vmap(grad)``), and expand's is not.
"""

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import fisher_optax as fo
from fisher_optax import _stats

B, T = 4, 5  # examples, shared rows (tokens) per example


def _f64(x):
  return np.asarray(x, np.float64)


def _stats_after_one_step(name, params, loss, weight_sharing):
  """The optimizer's statistics after its first refresh (no averaging)."""
  _, grads, stats = jax.jit(fo.linen.value_grad_and_stats(loss))(params)
  tx = getattr(fo, f'scale_by_{name}')(weight_sharing=weight_sharing)
  _, state = jax.jit(lambda s: tx.update(grads, s, params,
                                         layer_stats=stats))(tx.init(params))
  return jax.tree.map(_f64, state.stats)


def _patches(x, k):
  """(B, H, W, C) -> (B, H*W, k*k*C) 'SAME' windows in (kh, kw, C) order."""
  pad = k // 2
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  b, h, w, _ = x.shape
  return np.stack([xp[:, i:i + k, j:j + k, :].reshape(b, -1)
                   for i in range(h) for j in range(w)], axis=1)


def _reference(a, e):
  """Expand and reduce factors of rows ``a`` (B, R, d_in) (no bias column
  yet) and per-example output cotangents ``e`` (B, R, d_out)."""
  a = np.concatenate([a, np.ones(a.shape[:-1] + (1,))], -1)
  n, r = a.shape[:2]
  ra, re = a.reshape(n * r, -1), e.reshape(n * r, -1)
  abar, ghat = a.mean(1), e.sum(1)
  sq_a, sq_g = np.sum(abar ** 2, -1), np.sum(ghat ** 2, -1)
  return {
      'expand': {'A': ra.T @ ra / (n * r), 'G': r * re.T @ re / (n * r)},
      'reduce': {'A': abar.T @ abar / n, 'G': ghat.T @ ghat / n,
                 'delta': np.mean(sq_a * sq_g),
                 'Phi': (abar * sq_g[:, None]).T @ abar / n,
                 'Psi': (ghat * sq_a[:, None]).T @ ghat / n,
                 # Each example's (d_in + 1, d_out) gradient, ghat abar^T.
                 'per_example': np.einsum('ni,nj->nij', abar, ghat)},
  }


class _Conv(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Conv(3, (3, 3), padding='SAME')(x)


class _Tokens(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(x)


def _problem(kind):
  """Params, a mean loss ``sum sin(y * t)`` per example, and references."""
  params, loss, name, a, e = problem_rows(kind)
  return params, loss, name, _reference(a, e)


def problem_rows(kind):
  """:func:`_problem` with its reference's inputs: each example's rows
  ``a`` (no bias column) and per-example output cotangents ``e``."""
  rng = np.random.default_rng(0)
  if kind == 'conv':
    model, x = _Conv(), rng.normal(size=(B, 3, 3, 2))
  else:
    model, x = _Tokens(), rng.normal(size=(B, T, 4))
  x = x + 0.5  # a mean far from zero: expand and reduce differ most
  params = model.init(jax.random.key(0), jnp.asarray(x, jnp.float32))
  params = params['params']
  y_shape = jax.eval_shape(lambda p: model.apply({'params': p}, x),
                           params).shape
  t = rng.normal(size=y_shape)
  loss = lambda p: jnp.mean(jnp.sum(
      jnp.sin(model.apply({'params': p}, jnp.asarray(x, jnp.float32)) * t),
      axis=tuple(range(1, len(y_shape)))))
  name = 'Conv_0' if kind == 'conv' else 'Dense_0'
  w = np.concatenate([_f64(params[name]['kernel']).reshape(-1, 3),
                      _f64(params[name]['bias'])[None]], 0)
  a = _patches(x, 3) if kind == 'conv' else x
  y = np.concatenate([a, np.ones(a.shape[:-1] + (1,))], -1) @ w
  # The per-example cotangent of sum(sin(y * t)), by hand.
  e = np.cos(y * t.reshape(y.shape)) * t.reshape(y.shape)
  return params, loss, name, a, e


def _assert_close(got, want, rtol=2e-5):
  np.testing.assert_allclose(got, want, rtol=rtol,
                             atol=rtol * np.max(np.abs(want)))


class ExplicitFormulaTest(parameterized.TestCase):

  @parameterized.product(kind=['conv', 'tokens'],
                         weight_sharing=['expand', 'reduce'])
  def test_kfac_factors(self, kind, weight_sharing):
    params, loss, name, ref = _problem(kind)
    stats = _stats_after_one_step('kfac', params, loss, weight_sharing)
    for factor in ('A', 'G'):
      _assert_close(stats[name][factor][0, 0], ref[weight_sharing][factor])

  @parameterized.parameters(('conv', 'reduce'), ('tokens', 'expand'))
  def test_auto_reduces_convs_and_expands_dense_layers(self, kind, want):
    params, loss, name, ref = _problem(kind)
    stats = _stats_after_one_step('kfac', params, loss, 'auto')
    for factor in ('A', 'G'):
      _assert_close(stats[name][factor][0, 0], ref[want][factor])

  @parameterized.parameters('conv', 'tokens')
  def test_tkfac_statistics_per_example(self, kind):
    params, loss, name, ref = _problem(kind)
    stats = _stats_after_one_step('tkfac', params, loss, 'reduce')
    _assert_close(stats[name]['delta'][0], ref['reduce']['delta'])
    _assert_close(stats[name]['Phi'][0, 0], ref['reduce']['Phi'])
    _assert_close(stats[name]['Psi'][0, 0], ref['reduce']['Psi'])

  @parameterized.parameters('ekfac', 'tekfac')
  def test_eigen_scaling_is_per_example(self, name):
    """EKFAC's scaling: the second moment of ghat_n abar_n^T in the basis."""
    params, loss, layer, ref = _problem('tokens')
    _, grads, stats = jax.jit(fo.linen.value_grad_and_stats(loss))(params)
    tx = getattr(fo, f'scale_by_{name}')(weight_sharing='reduce',
                                         momentum=0.0)
    _, state = jax.jit(lambda s: tx.update(grads, s, params,
                                           layer_stats=stats))(
                                               tx.init(params))
    pre = jax.tree.map(_f64, state.precond[layer])
    u_in, u_out = pre['in_vecs'][0, 0], pre['out_vecs'][0, 0]
    rotated = np.einsum('ia,nij,jb->nab', u_in, ref['reduce']['per_example'],
                        u_out)
    _assert_close(pre['scaling'][0], np.mean(rotated ** 2, axis=0),
                  rtol=1e-4)

  def test_option_is_checked(self):
    for factory in (fo.kfac, fo.ekfac, fo.tkfac, fo.tekfac):
      with self.assertRaisesRegex(ValueError, 'weight_sharing'):
        factory(1e-3, weight_sharing='mean')


class ConvPatchMeansTest(parameterized.TestCase):
  """Reduce's conv inputs, computed without forming the patches."""

  @parameterized.named_parameters(
      ('same', dict(padding='SAME')),
      ('strided_dilated', dict(padding='VALID', strides=2,
                               kernel_dilation=(1, 2))),
      ('groups', dict(padding='SAME', feature_group_count=2)),
      ('circular', dict(padding='CIRCULAR')),
      ('explicit_uneven', dict(padding=((2, 0), (-1, 3)), strides=(2, 3))),
      ('input_dilation', dict(padding=((1, 1), (0, 2)), input_dilation=2)),
      ('one_d_causal', dict(padding='CAUSAL', kernel_size=(3,),
                            kernel_dilation=2)),
      ('three_d', dict(padding='SAME', kernel_size=(2, 3, 2), strides=2)),
  )
  def test_equal_to_the_mean_of_the_patches(self, kw):
    kw = dict(kw)
    ks = kw.pop('kernel_size', (3, 2))
    conv = nn.Conv(4, ks, **kw)
    spatial = (6, 7, 5)[:len(ks)] if len(ks) != 1 else (9,)
    x = jax.random.normal(jax.random.key(3),
                          (2, 3) + spatial + (4,))  # (calls, B, ...)
    params = conv.init(jax.random.key(0), x[0])['params']
    loss = lambda p: jnp.mean(sum(jnp.sum(jnp.sin(conv.apply(
        {'params': p}, xi))) for xi in x))
    _, _, stats = jax.jit(fo.linen.value_grad_and_stats(loss))(params)
    meta, a = stats[''].meta, stats[''].a
    patches = _stats.conv_patches(a, meta)  # (groups, rows * positions, d)
    want = patches.reshape(patches.shape[0], 2 * 3, -1,
                           patches.shape[-1]).mean(axis=2)
    _assert_close(_f64(_stats.conv_patch_means(a, meta)), _f64(want))


class _DeepLinear(nn.Module):
  """Two dense layers over tokens, the mean over tokens, a linear head."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(4)(nn.Dense(3)(x))
    return nn.Dense(2)(jnp.mean(h, axis=1))


class _Twice(nn.Module):
  """One Dense applied twice, over tokens: calls and positions to reduce."""

  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(4)
    return dense(jnp.tanh(dense(x)))


class _Cell(nn.Module):

  @nn.compact
  def __call__(self, h, x):
    h = jnp.tanh(nn.Dense(4)(h) + x)
    return h, h


class _Recurrent(nn.Module):
  """A recurrence over T steps (``nn.scan``, one set of weights)."""

  @nn.compact
  def __call__(self, x):
    scan = nn.scan(_Cell, variable_broadcast='params',
                   split_rngs={'params': False}, in_axes=1, out_axes=1)
    _, hs = scan()(jnp.zeros(x.shape[:1] + (4,)), x)
    return hs


def _loop(kind, w, b, x, bumps):
  """The model by hand, with ``bumps`` added to each call's output."""
  if kind == 'twice':
    z1 = x @ w + b + bumps[0]
    return [x, jnp.tanh(z1)], jnp.tanh(z1) @ w + b + bumps[1]
  h, inputs, outs = jnp.zeros(x.shape[:1] + (4,)), [], []
  for t in range(x.shape[1]):
    inputs.append(h)
    h = jnp.tanh(h @ w + b + bumps[t] + x[:, t])
    outs.append(h)
  return inputs, jnp.stack(outs, 1)


class SharedCallsTest(parameterized.TestCase):
  """Reduce over the calls of a layer (applied twice, or in a recurrence).

  The reference builds each call's inputs and output cotangents by hand
  (the cotangents as gradients of zero perturbations of each call's
  output), not from the capture: per example, ``abar`` averages the
  bias-augmented inputs over calls and tokens, ``ghat`` sums the
  per-example cotangents over them.
  """

  @parameterized.parameters('twice', 'scan')
  def test_reduce_factors(self, kind):
    model = _Twice() if kind == 'twice' else _Recurrent()
    rng = np.random.default_rng(1)
    width = 4
    x = jnp.asarray(rng.normal(size=(B, T, width)) + 0.5, jnp.float32)
    t = jnp.asarray(rng.normal(size=(B, T, 4)), jnp.float32)
    params = model.init(jax.random.key(0), x)['params']
    loss = lambda p: jnp.mean(jnp.sum(
        jnp.sin(model.apply({'params': p}, x) * t), axis=(1, 2)))
    name = next(iter(params))
    layer = params[name] if kind == 'twice' else params[name]['Dense_0']
    w, b = layer['kernel'], layer['bias']
    calls = 2 if kind == 'twice' else T
    shape = (B, T, 4) if kind == 'twice' else (B, 4)
    out_loss = lambda bumps: jnp.mean(jnp.sum(jnp.sin(
        _loop(kind, w, b, x, bumps)[1] * t), axis=(1, 2)))
    bumps = [jnp.zeros(shape)] * calls
    inputs, out = _loop(kind, w, b, x, bumps)
    np.testing.assert_allclose(out, model.apply({'params': params}, x),
                               rtol=1e-5, atol=1e-6)
    cot = jax.grad(out_loss)(bumps)
    # (B, calls * rows, d): every call's rows of each example.
    per = lambda xs: np.concatenate([_f64(v).reshape(B, -1, v.shape[-1])
                                     for v in xs], 1)
    a, e = per(inputs), per(cot) * B  # per-example: the loss is a mean
    a = np.concatenate([a, np.ones(a.shape[:-1] + (1,))], -1)
    abar, ghat = a.mean(1), e.sum(1)
    stats = _stats_after_one_step('kfac', params, loss, 'reduce')
    got = stats[name] if kind == 'twice' else stats[f'{name}/Dense_0']
    _assert_close(got['A'][0, 0], abar.T @ abar / B, rtol=1e-4)
    _assert_close(got['G'][0, 0], ghat.T @ ghat / B, rtol=1e-4)


class ReduceSettingTest(parameterized.TestCase):
  """For one example in the reduce setting, reduce's A (x) G is its Fisher."""

  def test_exact_for_one_example(self):
    with jax.enable_x64(True):
      model = _DeepLinear()
      x = jax.random.normal(jax.random.key(0), (1, T, 5), jnp.float64) + 1.0
      y = jax.random.normal(jax.random.key(1), (1, 2), jnp.float64)
      params = model.init(jax.random.key(2), x)['params']
      loss = lambda p: 0.5 * jnp.sum((model.apply({'params': p}, x) - y) ** 2)
      grads = jax.grad(loss)(params)
      for name in ('Dense_0', 'Dense_1'):
        flat = np.concatenate([_f64(grads[name]['kernel']),
                               _f64(grads[name]['bias'])[None]], 0)
        fisher = np.outer(flat.reshape(-1), flat.reshape(-1))
        for weight_sharing in ('reduce', 'expand'):
          stats = _stats_after_one_step('kfac', params, loss, weight_sharing)
          approx = np.kron(stats[name]['A'][0, 0], stats[name]['G'][0, 0])
          if weight_sharing == 'reduce':
            # Exact up to the optimizer's float32 statistics.
            np.testing.assert_allclose(approx, fisher, rtol=1e-6,
                                       atol=1e-6 * np.max(np.abs(fisher)))
          else:
            self.assertGreater(np.max(np.abs(approx - fisher)),
                               1e-2 * np.max(np.abs(fisher)))


if __name__ == '__main__':
  absltest.main()
