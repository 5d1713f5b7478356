"""Block linear algebra against dense and loop-based numpy references."""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from fisher_optax import _linalg

from _tolerance import assert_close


def _np(x):
  return np.asarray(x, np.float64)


def _normal(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _psd(seed, shape, rank=None):
  """Random PSD blocks of shape (..., b, b), rank-deficient if rank < b."""
  b = shape[-1]
  f = _normal(seed, shape[:-1] + (rank or b,))
  return (f @ np.swapaxes(f, -1, -2) / (rank or b)).astype(np.float32)


def _block_outer_loop(x, b, weights=None):
  """(N, n) -> (nb, b, b) by summing per-row outer products block by block."""
  num_rows, n = x.shape
  nb = -(-n // b)
  out = np.zeros((nb, b, b))
  for k in range(nb):
    cols = range(k * b, min((k + 1) * b, n))
    for r in range(num_rows):
      w = 1.0 if weights is None else weights[r]
      for i, ci in enumerate(cols):
        for j, cj in enumerate(cols):
          out[k, i, j] += w * x[r, ci] * x[r, cj] / num_rows
    for i in range(len(cols), b):
      out[k, i, i] = 1.0
  return out


def _blockdiag(blocks):
  """(nb, b, b) -> dense (nb * b, nb * b)."""
  nb, b, _ = blocks.shape
  dense = np.zeros((nb * b, nb * b))
  for k in range(nb):
    dense[k * b:(k + 1) * b, k * b:(k + 1) * b] = blocks[k]
  return dense


def _avals(jaxpr):
  """Every intermediate's abstract value, including nested jaxprs."""
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      yield var.aval
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, 'jaxpr', sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, 'eqns'):
          yield from _avals(sub)


class BlockOuterTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('divisible', 6, 3, False, ()),
      ('padded', 7, 3, False, ()),
      ('padded_last_single', 7, 2, False, ()),
      ('one_block', 5, None, False, ()),
      ('block_larger_than_n', 4, 16, False, ()),
      ('weighted_padded', 7, 3, True, ()),
      ('stacked_weighted_padded', 7, 4, True, (2, 3)),
      ('stacked_divisible', 6, 2, False, (2,)),
      # More blocks than block_outer unrolls on CPU: one batched einsum.
      ('many_blocks_weighted_padded', 39, 2, True, (2,)),
  )
  def test_against_loop(self, n, block_size, weighted, stack):
    num_rows = 5
    x = _normal(0, stack + (num_rows, n))
    w = np.abs(_normal(1, stack + (num_rows,))) if weighted else None
    out = jax.jit(functools.partial(
        _linalg.block_outer, block_size=block_size))(x, weights=w)
    b = n if block_size is None else min(block_size, n)
    nb = -(-n // b)
    self.assertEqual(out.shape, stack + (nb, b, b))
    self.assertEqual(out.dtype, jnp.float32)
    for idx in np.ndindex(*stack):
      ref = _block_outer_loop(_np(x[idx]), b,
                              None if w is None else _np(w[idx]))
      assert_close(out[idx], ref, rtol=1e-5)

  def test_weights_broadcast_over_stack(self):
    x = _normal(2, (3, 6, 5))
    w = np.abs(_normal(3, (6,)))
    f = jax.jit(functools.partial(_linalg.block_outer, block_size=2))
    out = f(x, weights=w)
    assert_close(out, f(x, weights=np.broadcast_to(w, (3, 6))), rtol=1e-6,
                 scale_atol=1e-7)
    assert_close(out[1], _block_outer_loop(_np(x[1]), 2, _np(w)), rtol=1e-5)

  def test_never_forms_full_matrix(self):
    n, b = 7, 3
    x = jnp.zeros((2, 5, n))
    jaxpr = jax.make_jaxpr(
        functools.partial(_linalg.block_outer, block_size=b))(x).jaxpr
    big = {n, 9}  # n and the padded width nb * b
    for aval in _avals(jaxpr):
      shape = getattr(aval, 'shape', ())
      self.assertFalse(len(shape) >= 2 and set(shape[-2:]) <= big, shape)

  def test_bfloat16_input_is_computed_in_float32(self):
    x = _normal(4, (8, 5))
    out = jax.jit(functools.partial(_linalg.block_outer, block_size=2))(
        jnp.asarray(x, jnp.bfloat16))
    self.assertEqual(out.dtype, jnp.float32)
    ref = _block_outer_loop(_np(jnp.asarray(x, jnp.bfloat16)), 2)
    assert_close(out, ref, rtol=1e-5)


class BlockApplyTest(parameterized.TestCase):

  @parameterized.product(
      side=['left', 'right'],
      case=[
          dict(nb=3, b=3, n=7, block_stack=(), v_stack=()),
          dict(nb=3, b=3, n=9, block_stack=(), v_stack=()),
          dict(nb=2, b=4, n=5, block_stack=(2,), v_stack=()),
          dict(nb=2, b=4, n=5, block_stack=(), v_stack=(3,)),
          dict(nb=3, b=2, n=6, block_stack=(2, 1), v_stack=(3,)),
          # More blocks than block_apply unrolls on CPU: one batched dot.
          dict(nb=20, b=2, n=39, block_stack=(2,), v_stack=()),
          dict(nb=1, b=5, n=4, block_stack=(2,), v_stack=()),
      ],
  )
  def test_against_dense(self, side, case):
    nb, b, n, m = case['nb'], case['b'], case['n'], 3
    blocks = _normal(0, case['block_stack'] + (nb, b, b))
    v_shape = (n, m) if side == 'left' else (m, n)
    v = _normal(1, case['v_stack'] + v_shape)
    out = jax.jit(functools.partial(_linalg.block_apply, side=side))(
        blocks, v)
    stack = np.broadcast_shapes(case['block_stack'], case['v_stack'])
    self.assertEqual(out.shape, stack + v_shape)
    blocks_b = np.broadcast_to(blocks, stack + blocks.shape[-3:])
    v_b = np.broadcast_to(v, stack + v_shape)
    for idx in np.ndindex(*stack):
      dense = _blockdiag(_np(blocks_b[idx]))[:n, :n]
      ref = dense @ _np(v_b[idx]) if side == 'left' else _np(v_b[idx]) @ dense
      # Entries that cancel are off by float32 rounding of the whole sum.
      assert_close(out[idx], ref, rtol=1e-5, scale_atol=2e-6)

  def test_rejects_bad_arguments(self):
    blocks = jnp.zeros((2, 3, 3))
    with self.assertRaisesRegex(ValueError, 'side'):
      _linalg.block_apply(blocks, jnp.zeros((6, 1)), side='top')
    with self.assertRaisesRegex(ValueError, 'more than'):
      _linalg.block_apply(blocks, jnp.zeros((7, 1)))


class DampedInverseTest(parameterized.TestCase):

  @parameterized.product(
      method=['cholesky', 'inv', 'eigh'],
      per_block=[False, True],
  )
  def test_against_numpy_inv(self, method, per_block):
    stack, b = (2, 3), 4
    blocks = _psd(0, stack + (b, b), rank=2)  # singular: damping matters
    # An antisymmetric perturbation must be ignored (symmetrised away).
    skew = _normal(1, stack + (b, b))
    asym = blocks + 0.3 * (skew - np.swapaxes(skew, -1, -2))
    damping = (np.linspace(0.05, 0.5, 6).reshape(stack).astype(np.float32)
               if per_block else np.float32(0.1))
    out = jax.jit(functools.partial(_linalg.damped_inverse, method=method))(
        asym, damping)
    self.assertEqual(out.shape, stack + (b, b))
    damping_b = np.broadcast_to(damping, stack)
    for idx in np.ndindex(*stack):
      ref = np.linalg.inv(_np(blocks[idx]) + damping_b[idx] * np.eye(b))
      assert_close(out[idx], ref, rtol=1e-4, scale_atol=1e-5)
    np.testing.assert_array_equal(out, np.swapaxes(out, -1, -2))

  def test_eigh_clips_negative_eigenvalues(self):
    v = np.linalg.qr(_normal(2, (3, 3)))[0]
    blocks = (v * np.array([-0.05, 1.0, 2.0])) @ v.T
    out = jax.jit(functools.partial(_linalg.damped_inverse, method='eigh'))(
        blocks.astype(np.float32), 0.05)
    ref = (v / np.array([0.05, 1.05, 2.05])) @ v.T
    assert_close(out, ref, rtol=1e-4, scale_atol=1e-5)

  def test_vmap_matches_batched(self):
    x = _normal(3, (4, 6, 7))
    v = _normal(4, (4, 7, 2))
    damping = np.array([0.1, 0.2, 0.3, 0.4], np.float32)

    def f(x, v, d):
      inv = _linalg.damped_inverse(_linalg.block_outer(x, 3), d[..., None])
      return _linalg.block_apply(inv, v)

    assert_close(jax.jit(jax.vmap(f))(x, v, damping),
                 jax.jit(f)(x, v, damping), rtol=1e-5)

  def test_rejects_unknown_method(self):
    with self.assertRaisesRegex(ValueError, 'method'):
      _linalg.damped_inverse(jnp.eye(2), 0.1, method='svd')


class SafeEighTest(absltest.TestCase):

  def test_reconstructs_clipped_psd(self):
    stack, b = (2, 2), 4
    q = np.linalg.qr(_normal(0, stack + (b, b)))[0]
    w = np.array([[-0.3, 0.0, 0.5, 2.0], [-1e-3, 0.2, 1.0, 3.0],
                  [0.1, 0.4, 0.9, 1.5], [-2.0, -1.0, 0.5, 0.7]])
    w = w.reshape(stack + (b,))
    blocks = ((q * w[..., None, :]) @ np.swapaxes(q, -1, -2))
    skew = _normal(1, stack + (b, b))
    asym = blocks + 0.2 * (skew - np.swapaxes(skew, -1, -2))
    evals, evecs = jax.jit(_linalg.safe_eigh)(asym.astype(np.float32))
    assert_close(evals, np.maximum(np.sort(w, -1), 0.0), rtol=1e-5,
                 scale_atol=5e-6)
    self.assertTrue(np.all(np.asarray(evals) >= 0.0))
    recon = (_np(evecs) * _np(evals)[..., None, :]) @ np.swapaxes(
        _np(evecs), -1, -2)
    ref_w = np.maximum(w, 0.0)
    ref = (q * ref_w[..., None, :]) @ np.swapaxes(q, -1, -2)
    assert_close(recon, ref, rtol=1e-5, scale_atol=5e-6)


class KeepFiniteTest(absltest.TestCase):

  def test_counts_and_keeps_blocks(self):
    new = _normal(0, (2, 3, 2, 2))
    old = _normal(1, (2, 3, 2, 2))
    new[0, 1, 1, 0] = np.nan
    new[1, 2, 0, 0] = np.inf
    new[1, 2, 1, 1] = -np.inf  # second bad entry in the same block
    out, num_bad = jax.jit(_linalg.keep_finite)(new, old)
    self.assertEqual(num_bad.dtype, jnp.int32)
    self.assertEqual(int(num_bad), 2)
    ref = new.copy()
    ref[0, 1] = old[0, 1]
    ref[1, 2] = old[1, 2]
    np.testing.assert_array_equal(out, ref)

  def test_block_ndim_one(self):
    new = _normal(2, (3, 4))
    old = _normal(3, (3, 4))
    new[1, 3] = np.nan
    out, num_bad = jax.jit(functools.partial(
        _linalg.keep_finite, block_ndim=1))(new, old)
    self.assertEqual(int(num_bad), 1)
    np.testing.assert_array_equal(out, np.stack([new[0], old[1], new[2]]))

  def test_tree_sums_counts(self):
    new = {'a': _normal(4, (3, 2, 2)), 'b': (_normal(5, (2, 3, 3)),)}
    old = {'a': _normal(6, (3, 2, 2)), 'b': (_normal(7, (2, 3, 3)),)}
    new['a'][0, 0, 0] = np.nan
    new['a'][2, 1, 1] = np.nan
    new['b'][0][1, 2, 0] = np.inf
    out, num_bad = jax.jit(_linalg.keep_finite_tree)(new, old)
    self.assertEqual(int(num_bad), 3)
    np.testing.assert_array_equal(
        out['a'], np.stack([old['a'][0], new['a'][1], old['a'][2]]))
    np.testing.assert_array_equal(
        out['b'][0], np.stack([new['b'][0][0], old['b'][0][1]]))


class BucketedTest(absltest.TestCase):

  def _blocks(self):
    return {
        'dense': _psd(0, (2, 3, 3)),
        'scalar_lead': _psd(1, (3, 3)),
        'stacked': _psd(2, (2, 2, 3, 3)),
        'wide': _psd(3, (3, 5, 5)),
    }

  def test_one_call_per_block_size_with_extra(self):
    blocks = self._blocks()
    damping = {'dense': np.array([0.1, 0.2], np.float32),
               'scalar_lead': np.float32(0.3),
               'stacked': np.float32(0.05),  # broadcast to the lead shape
               'wide': np.array([0.1, 0.4, 0.7], np.float32)}
    seen = []

    def fn(stack, extra):
      seen.append((stack.shape, extra.shape))  # runs at trace time only
      return _linalg.damped_inverse(stack, extra)

    out = jax.jit(lambda b, d: _linalg.bucketed(fn, b, d))(blocks, damping)
    self.assertCountEqual(seen, [((7, 3, 3), (7,)), ((3, 5, 5), (3,))])
    self.assertEqual(list(out), list(blocks))
    for key, value in blocks.items():
      self.assertEqual(out[key].shape, value.shape)
      lead = value.shape[:-2]
      d = np.broadcast_to(damping[key], lead)
      for idx in np.ndindex(*lead):
        b = value.shape[-1]
        ref = np.linalg.inv(_np(value[idx]) + d[idx] * np.eye(b))
        assert_close(out[key][idx], ref, rtol=1e-4, scale_atol=1e-5)

  def test_tuple_output(self):
    blocks = self._blocks()
    calls = [0]

    def fn(stack):
      calls[0] += 1
      return _linalg.safe_eigh(stack)

    out = jax.jit(lambda b: _linalg.bucketed(fn, b))(blocks)
    self.assertEqual(calls[0], 2)
    for key, value in blocks.items():
      evals, evecs = out[key]
      lead, b = value.shape[:-2], value.shape[-1]
      self.assertEqual(evals.shape, lead + (b,))
      self.assertEqual(evecs.shape, lead + (b, b))
      for idx in np.ndindex(*lead):
        assert_close(evals[idx], np.linalg.eigvalsh(_np(value[idx])),
                     rtol=1e-5, scale_atol=5e-6)
        recon = (_np(evecs[idx]) * _np(evals[idx])) @ _np(evecs[idx]).T
        assert_close(recon, value[idx], rtol=1e-5, scale_atol=5e-6)


class OneAtATimeTest(absltest.TestCase):
  """The serial form used where batched LAPACK calls can deadlock."""

  def test_equals_the_batched_call(self):
    stack = _psd(4, (5, 4, 4))
    damping = np.array([0.1, 0.2, 0.3, 0.4, 0.5], np.float32)
    inverse = lambda s, d: _linalg.damped_inverse(s, d)
    for fn, args in ((inverse, (stack, damping)),
                     (_linalg.safe_eigh, (stack,))):
      want = jax.jit(fn)(*args)
      got = jax.jit(_linalg._one_at_a_time(fn))(*args)
      for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        self.assertEqual(g.shape, w.shape)
        # Eigenvectors may flip sign between calls; compare |v|.
        assert_close(np.abs(g), np.abs(w), rtol=1e-5, scale_atol=1e-6)
    # Each call sees one block.
    shapes = []
    jax.jit(_linalg._one_at_a_time(
        lambda s: shapes.append(s.shape) or s))(stack)
    self.assertEqual(shapes, [(1, 4, 4)])

  def test_only_with_several_cpu_devices(self):
    self.assertEqual(_linalg._lapack_may_deadlock(),
                     jax.default_backend() == 'cpu'
                     and jax.device_count() > 1)


class PiDampingTest(absltest.TestCase):

  def test_closed_form(self):
    a = np.array([0.5, 2.0, 3.0], np.float32)
    g = np.array([2.0, 0.5, 3e-4], np.float32)
    lam = np.float32(1e-2)
    a_d, g_d = jax.jit(_linalg.pi_damping)(a, g, lam)
    pi = np.sqrt(_np(a) / _np(g))
    # Entry by entry (no sums), so atol stays far below rtol.
    assert_close(a_d, np.sqrt(lam) * pi, rtol=1e-6, scale_atol=1e-7)
    assert_close(g_d, np.sqrt(lam) / pi, rtol=1e-6, scale_atol=1e-7)
    # pi = 1/2 and 2 for the first two entries, by hand.
    assert_close(a_d[:2], [0.05, 0.2], rtol=1e-6, scale_atol=1e-7)
    assert_close(g_d[:2], [0.2, 0.05], rtol=1e-6, scale_atol=1e-7)
    assert_close(_np(a_d) * _np(g_d), lam, rtol=1e-5)

  def test_zero_traces_stay_finite(self):
    a_d, g_d = jax.jit(_linalg.pi_damping)(
        np.array([0.0, 0.0, 1.0], np.float32),
        np.array([0.0, 1.0, 0.0], np.float32), 4.0)
    self.assertTrue(np.all(np.isfinite(a_d)) and np.all(np.isfinite(g_d)))
    self.assertTrue(np.all(np.asarray(a_d) > 0) and np.all(
        np.asarray(g_d) > 0))
    assert_close(a_d[0], 2.0, rtol=1e-6, scale_atol=1e-7)
    assert_close(g_d[0], 2.0, rtol=1e-6, scale_atol=1e-7)
    assert_close(_np(a_d) * _np(g_d), 4.0, rtol=1e-5)

  def test_block_trace_mean_skips_padding(self):
    x = _normal(0, (2, 6, 7))
    blocks = _linalg.block_outer(x, 3)
    out = jax.jit(functools.partial(_linalg.block_trace_mean, n=7))(blocks)
    ref = np.mean(_np(x) ** 2, axis=(-2, -1))
    assert_close(out, ref, rtol=1e-5)


class KfacReferenceTest(parameterized.TestCase):
  """Block-diagonal damped inverse applied to a vector, end to end."""

  @parameterized.product(
      method=['cholesky', 'inv', 'eigh'], side=['left', 'right'])
  def test_against_dense(self, method, side):
    num_rows, n, b, m, lam = 4, 7, 3, 2, 0.05  # N < n: singular moment
    x = _normal(0, (num_rows, n))
    v = _normal(1, (n, m) if side == 'left' else (m, n))

    @jax.jit
    def f(x, v):
      inv = _linalg.damped_inverse(_linalg.block_outer(x, b), lam, method)
      return _linalg.block_apply(inv, v, side)

    out = f(x, v)
    moment = _np(x).T @ _np(x) / num_rows
    mask = np.zeros((n, n), bool)
    for k in range(0, n, b):
      mask[k:k + b, k:k + b] = True
    ref_inv = np.linalg.inv(np.where(mask, moment, 0.0) + lam * np.eye(n))
    ref = ref_inv @ _np(v) if side == 'left' else _np(v) @ ref_inv
    assert_close(out, ref, rtol=1e-4, scale_atol=1e-5)


if __name__ == '__main__':
  absltest.main()
