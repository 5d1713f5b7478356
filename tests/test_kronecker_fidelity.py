"""Kronecker methods against float64 numpy references written from the papers.

* EKFAC / TEKFAC on convolutions (George et al., 2018, and their released
  code): the eigenbasis scaling is the second moment of per-example
  gradients rotated into the basis, squared after summing over positions.
* TEKFAC's adaptive damping (Gao et al., Eq. 3.5): per conv layer
  ``max(tr Theta, vartheta) / dim Theta`` from the current Theta, with
  ``vartheta = lambda dim Theta``, and the dense layers of a CNN damped by
  ``beta``, the largest conv value.
* K-FAC (Martens & Grosse, 2015, Section 5): decay ``min(1 - 1/k, eps)``
  and the L2 strength added to the damping.
"""

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import fisher_optax as fo


def _f64(x):
  return np.asarray(x, np.float64)


class _Conv(nn.Module):
  """A conv layer (called twice when ``shared``) and a sum readout."""

  shared: bool = False

  @nn.compact
  def __call__(self, x):
    conv = nn.Conv(3, (3, 3), padding='SAME')
    y = jnp.tanh(conv(x))
    if self.shared:
      y = y + jnp.tanh(conv(x[:, ::-1] * 0.5))
    return y


def _conv_problem(shared):
  model = _Conv(shared)
  # Spatially correlated inputs: the case where the two forms differ most.
  x = jax.random.normal(jax.random.key(0), (5, 5, 5, 2))
  x = x + jnp.cumsum(x, axis=1) * 0.3
  t = jax.random.normal(jax.random.key(1), (5, 5, 5, 3))
  params = model.init(jax.random.key(2), x)['params']
  per_example = lambda p, xi, ti: jnp.sum(
      jnp.sin(model.apply({'params': p}, xi[None]) * ti[None]))
  loss = lambda p: jnp.mean(jnp.sum(
      jnp.sin(model.apply({'params': p}, x) * t), (1, 2, 3)))
  _, grads, stats = jax.jit(fo.linen.value_grad_and_stats(loss))(params)
  per = jax.vmap(jax.grad(per_example), (None, 0, 0))(params, x, t)
  name = 'Conv_0'
  # Per-example bias-augmented (d_in + 1, d_out) gradient matrices.
  w = np.concatenate([_f64(per[name]['kernel']).reshape(5, -1, 3),
                      _f64(per[name]['bias'])[:, None]], 1)
  return params, grads, stats, w


class EigenbasisScalingTest(parameterized.TestCase):

  @parameterized.product(factory=['ekfac', 'tekfac'], shared=[False, True])
  def test_conv_scaling_is_per_example(self, factory, shared):
    params, grads, stats, w = _conv_problem(shared)
    tx = getattr(fo, f'scale_by_{factory}')(damping=0.1, momentum=0.0)
    _, state = jax.jit(lambda s: tx.update(grads, s, params,
                                           layer_stats=stats))(
                                               tx.init(params))
    pre = jax.tree.map(_f64, state.precond['Conv_0'])
    u_in, u_out = pre['in_vecs'][0, 0], pre['out_vecs'][0, 0]
    # The basis is the factors' eigenbasis (checked independently).
    a = _f64(state.stats['Conv_0']['A' if factory == 'ekfac' else 'Phi'])
    rot = u_in.T @ a[0, 0] @ u_in
    np.testing.assert_allclose(rot - np.diag(np.diag(rot)), 0,
                               atol=1e-5 * np.max(np.abs(rot)))
    rotated = np.einsum('ia,nij,jb->nab', u_in, w, u_out)
    want = np.mean(rotated ** 2, axis=0)
    got = pre['scaling'][0]
    np.testing.assert_allclose(got, want, rtol=1e-4,
                               atol=1e-5 * np.max(want))
    # The location-expanded form drops the cross-position terms.
    with self.assertRaises(AssertionError):
      tx = getattr(fo, f'scale_by_{factory}')(
          damping=0.1, momentum=0.0, conv_scaling='per_position')
      _, state = jax.jit(lambda s: tx.update(grads, s, params,
                                             layer_stats=stats))(
                                                 tx.init(params))
      np.testing.assert_allclose(state.precond['Conv_0']['scaling'][0],
                                 want, rtol=1e-2)

  def test_conv_scaling_option_is_checked(self):
    with self.assertRaisesRegex(ValueError, 'conv_scaling'):
      fo.ekfac(0.1, conv_scaling='bogus')


class _CNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(3, (2, 2), padding='VALID')(x))
    x = jnp.tanh(nn.Conv(2, (2, 2), padding='VALID')(x))
    return nn.Dense(2)(x.reshape(x.shape[0], -1))


class TekfacDampingTest(parameterized.TestCase):

  def _run(self, lam, steps, inverse_every, **kw):
    model = _CNN()
    xs = [jax.random.normal(jax.random.key(10 + i), (6, 4, 4, 2)) * (1 + i)
          for i in range(steps)]
    params = model.init(jax.random.key(3), xs[0])['params']
    loss = lambda p, x: jnp.mean(jnp.sin(3 * model.apply({'params': p}, x)))
    step_fn = fo.linen.value_grad_and_stats(loss)
    tx = fo.scale_by_tekfac(damping=lam, momentum=0.0,
                            inverse_every=inverse_every,
                            conv_damping='adaptive', **kw)
    state = tx.init(params)
    update = jax.jit(lambda g, s, st: tx.update(g, s, params,
                                                layer_stats=st))
    for x in xs:
      _, grads, stats = jax.jit(step_fn)(params, x)
      updates, state = update(grads, state, stats)
    return grads, updates, state

  @parameterized.parameters(('beta', 1), ('beta', 3), ('fixed', 3))
  def test_eq_3_5_with_current_theta(self, dense_damping, steps):
    lam = 1e-7
    grads, updates, state = self._run(lam, steps, inverse_every=100,
                                      dense_damping=dense_damping)
    damp = {}
    for key in ('Conv_0', 'Conv_1'):
      s = _f64(state.precond[key]['scaling'][0])
      n = s.size  # dim Theta: (d_in + 1) d_out, no padding here
      damp[key] = max(np.sum(s), lam * n) / n
      self.assertGreater(damp[key], 10 * lam)
    beta = max(damp.values())
    damp['Dense_0'] = beta if dense_damping == 'beta' else lam
    for key, lam_l in damp.items():
      pre = jax.tree.map(_f64, state.precond[key])
      u_in, u_out = pre['in_vecs'][0, 0], pre['out_vecs'][0, 0]
      kernel = _f64(grads[key]['kernel'])
      d_out = kernel.shape[-1]
      w = np.concatenate([kernel.reshape(-1, d_out),
                          _f64(grads[key]['bias'])[None]], 0)
      rotated = u_in.T @ w @ u_out
      want = u_in @ (rotated / (pre['scaling'][0] + lam_l)) @ u_out.T
      got = _f64(updates[key]['kernel']).reshape(-1, d_out)
      np.testing.assert_allclose(got, want[:-1], rtol=1e-3,
                                 atol=1e-4 * np.max(np.abs(want)),
                                 err_msg=key)


def _dense_rows(x, y, params):
  """K-FAC factors of one Dense layer by hand (float64)."""
  a = np.concatenate([_f64(x), np.ones((len(x), 1))], 1)
  out = _f64(x) @ _f64(params['kernel']) + _f64(params['bias'])
  # loss = mean_n sum (out - y)^2 / 2: per-example cotangent out - y.
  g = out - _f64(y)
  return a.T @ a / len(a), g.T @ g / len(g)


def _pi_solve(c_in, c_out, w, lam):
  d_in, d_out = len(c_in), len(c_out)
  pi = np.sqrt((np.trace(c_in) / d_in) / (np.trace(c_out) / d_out))
  curvature = np.kron(c_in + pi * np.sqrt(lam) * np.eye(d_in),
                      c_out + np.sqrt(lam) / pi * np.eye(d_out))
  return np.linalg.solve(curvature, w.reshape(-1)).reshape(w.shape)


class KfacOptionsTest(parameterized.TestCase):

  def _setup(self, steps):
    model = nn.Dense(3)
    xs = [jax.random.normal(jax.random.key(20 + i), (16, 4)) * (1 + i)
          for i in range(steps)]
    ys = [jax.random.normal(jax.random.key(40 + i), (16, 3))
          for i in range(steps)]
    params = model.init(jax.random.key(4), xs[0])['params']
    loss = lambda p, x, y: jnp.mean(jnp.sum(
        (model.apply({'params': p}, x) - y) ** 2, -1) / 2)
    return fo.linen.value_grad_and_stats(loss), params, xs, ys

  @parameterized.parameters(1, 2)
  def test_martens_decay_schedule(self, stats_every):
    steps = 3 * stats_every
    step_fn, params, xs, ys = self._setup(steps)
    eps = 0.9
    tx = fo.scale_by_kfac(damping=0.1, fisher_decay=eps, momentum=0.0,
                          stats_every=stats_every,
                          decay_schedule='martens')
    state = tx.init(params)
    update = jax.jit(lambda g, s, st: tx.update(g, s, params,
                                                layer_stats=st))
    want_a = want_g = None
    for i, (x, y) in enumerate(zip(xs, ys)):
      _, grads, stats = jax.jit(step_fn)(params, x, y)
      _, state = update(grads, state, stats)
      if i % stats_every:
        continue
      k = i // stats_every + 1
      decay = min(1 - 1 / k, eps)
      a, g = _dense_rows(x, y, params)
      want_a = a if want_a is None else decay * want_a + (1 - decay) * a
      want_g = g if want_g is None else decay * want_g + (1 - decay) * g
    # k <= 10 refreshes: min(1 - 1/k, 0.9) = 1 - 1/k, the running mean.
    np.testing.assert_allclose(state.stats['']['A'][0, 0], want_a,
                               rtol=1e-5, atol=1e-6 * np.max(want_a))
    np.testing.assert_allclose(state.stats['']['G'][0, 0], want_g,
                               rtol=1e-5, atol=1e-6 * np.max(want_g))

  def test_decay_schedule_option_is_checked(self):
    with self.assertRaisesRegex(ValueError, 'decay_schedule'):
      fo.kfac(0.1, decay_schedule='bogus')

  def test_l2_in_damping(self):
    step_fn, params, xs, ys = self._setup(1)
    lam, eta, lr = 0.05, 0.02, 0.3
    tx = fo.kfac(lr, damping=lam, weight_decay=eta, momentum=0.0,
                 l2_in_damping=True)
    _, grads, stats = jax.jit(step_fn)(params, xs[0], ys[0])
    updates, _ = jax.jit(lambda s: tx.update(
        grads, s, params, layer_stats=stats))(tx.init(params))
    a, g = _dense_rows(xs[0], ys[0], params)
    w = np.concatenate([_f64(grads['kernel']) + eta * _f64(params['kernel']),
                        (_f64(grads['bias']) + eta * _f64(
                            params['bias']))[None]], 0)
    want = -lr * _pi_solve(a, g, w, lam + eta)
    got = np.concatenate([_f64(updates['kernel']),
                          _f64(updates['bias'])[None]], 0)
    np.testing.assert_allclose(got, want, rtol=1e-4,
                               atol=1e-5 * np.max(np.abs(want)))
    # Off by default: the damping is lambda alone.
    plain, _ = jax.jit(lambda s: fo.kfac(
        lr, damping=lam, weight_decay=eta, momentum=0.0).update(
            grads, s, params, layer_stats=stats))(
                fo.kfac(lr, damping=lam, weight_decay=eta,
                        momentum=0.0).init(params))
    want = -lr * _pi_solve(a, g, w, lam)
    np.testing.assert_allclose(plain['kernel'], want[:-1], rtol=1e-4,
                               atol=1e-5 * np.max(np.abs(want)))


if __name__ == '__main__':
  absltest.main()
