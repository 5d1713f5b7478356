"""Capture through recurrent cells and lifted transforms, with no model edit.

Reference: per-example gradients from ``jax.vmap(jax.grad)`` of each
example's loss. For a dense layer the per-example kernel gradient is the sum,
over the calls (time steps of an ``nn.RNN``, calls of a shared layer) and
positions of that example, of ``a g^T``; the captured ``a`` and ``g`` must
reproduce it for every example, which fixes the layout of the stack, call
and batch axes as well as the values.
"""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import fisher_optax as fo
from tests._tolerance import assert_close

B, T, D, H = 3, 4, 5, 6


def _normal(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(
      np.float32)


class RNNClassifier(nn.Module):
  cell: type = nn.LSTMCell

  @nn.compact
  def __call__(self, x):
    h = nn.RNN(self.cell(H))(x)
    return nn.Dense(3)(h[:, -1])


class ScannedRNN(nn.Module):
  """Two stacked RNN layers scanned over depth: a stack axis, then time."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(H)(x)

    class Layer(nn.Module):

      @nn.compact
      def __call__(self, h, _):
        return nn.RNN(nn.SimpleCell(H))(h), None

    x, _ = nn.scan(Layer, variable_axes={'params': 0},
                   split_rngs={'params': True}, length=2)()(x, None)
    return nn.Dense(3)(x[:, -1])


class Remat(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.remat(nn.Dense)(H)(x)
    return nn.Dense(3)(jnp.tanh(nn.checkpoint(nn.Dense)(H)(x)).mean(1))


class Jit(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(jnp.tanh(nn.jit(nn.Dense)(H)(x)).mean(1))


class MapVariables(nn.Module):
  """nn.map_variables reading params through a (here dtype) transform."""

  @nn.compact
  def __call__(self, x):
    dense = nn.map_variables(
        nn.Dense, 'params',
        trans_in_fn=lambda t: jax.tree.map(lambda v: v.astype(jnp.float32),
                                           t),
        init=self.is_initializing())(H)
    return nn.Dense(3)(jnp.tanh(dense(x)).mean(1))


class Ensemble(nn.Module):
  """nn.vmap with stacked params: a stack axis."""

  @nn.compact
  def __call__(self, x):
    members = nn.vmap(nn.Dense, variable_axes={'params': 0},
                      split_rngs={'params': True}, in_axes=None, out_axes=0,
                      axis_size=2)(H)
    return nn.Dense(3)(jnp.tanh(members(x)).mean((0, 2)))


class PerExample(nn.Module):
  """nn.vmap over the batch with broadcast params: the entries are examples.
  """

  @nn.compact
  def __call__(self, x):
    dense = nn.vmap(nn.Dense, variable_axes={'params': None},
                    split_rngs={'params': False}, in_axes=0, out_axes=0)(H)
    return nn.Dense(3)(jnp.tanh(dense(x)).mean(1))


class ScannedStack(nn.Module):
  """nn.scan over layers with no capture_axes(): a stack axis."""

  @nn.compact
  def __call__(self, x):

    class Block(nn.Module):

      @nn.compact
      def __call__(self, h, _):
        return jnp.tanh(nn.Dense(D)(h)), None

    x, _ = nn.scan(Block, variable_axes={'params': 0},
                   split_rngs={'params': True}, length=3)()(x, None)
    return nn.Dense(3)(x.mean(1))


def _per_example_grads(model, params, x, y):
  def loss_one(p, xi, yi):
    logits = model.apply({'params': p}, xi[None])[0]
    return -jax.nn.log_softmax(logits)[yi]
  return jax.vmap(jax.grad(loss_one), in_axes=(None, 0, 0))(params, x, y)


def _captured_per_example(st):
  """Per-example ``sum_{calls, positions} a g^T`` (and bias ``sum g``)."""
  k = st.meta.stack_ndim
  a = np.asarray(st.a, np.float64)
  g = np.asarray(st.g, np.float64)
  # (*stack, calls, batch, *positions, features) -> (*stack, batch, rows, f)
  a = np.moveaxis(a, k + 1, k).reshape(a.shape[:k] + (a.shape[k + 1], -1,
                                                      a.shape[-1]))
  g = np.moveaxis(g, k + 1, k).reshape(g.shape[:k] + (g.shape[k + 1], -1,
                                                      g.shape[-1]))
  kernel = np.einsum('...bri,...bro->b...io', a, g)
  bias = np.einsum('...bro->b...o', g)
  return kernel, bias


def _get(tree, path):
  for key in path.split('/'):
    tree = tree[key]
  return tree


class LiftedCaptureTest(parameterized.TestCase):

  def _check(self, model, x, min_layers):
    y = np.arange(B) % 3
    params = model.init(jax.random.key(0), x)['params']

    def loss_fn(p, x, y):
      logits = model.apply({'params': p}, x)
      # A summed loss: the captured g are then per-example cotangents.
      return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits),
                                          y[:, None], 1))

    _, grads, stats = jax.jit(fo.linen.value_grad_and_stats(loss_fn))(
        params, x, y)
    ref_grads = jax.jit(jax.grad(loss_fn))(params, x, y)
    per_example = jax.jit(_per_example_grads, static_argnums=0)(
        model, params, x, y)
    for ref, got in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(grads)):
      assert_close(got, ref)
    covered = 0
    for path, st in stats.items():
      if st.meta.kind != 'dense':
        continue
      kernel, bias = _captured_per_example(st)
      assert_close(kernel, _get(per_example, path)['kernel'],
                   err_msg=path)
      if st.meta.param_name('bias'):
        assert_close(bias, _get(per_example, path)['bias'], err_msg=path)
      covered += 1
    self.assertGreaterEqual(covered, min_layers)
    return stats

  @parameterized.named_parameters(
      ('lstm', nn.LSTMCell, 9), ('gru', nn.GRUCell, 7),
      ('simple', nn.SimpleCell, 3), ('optimized_lstm', nn.OptimizedLSTMCell,
                                     9))
  def test_rnn_cells(self, cell, layers):
    stats = self._check(RNNClassifier(cell), _normal(0, (B, T, D)), layers)
    # Time steps are calls of the cell's layers.
    cell_stats = [s for p, s in stats.items() if p != 'Dense_0']
    for st in cell_stats:
      self.assertEqual(st.meta.stack_ndim, 0)
      self.assertEqual(st.a.shape[:2], (T, B))

  def test_scanned_rnn_layers(self):
    stats = self._check(ScannedRNN(), _normal(1, (B, T, D)), 4)
    scanned = [s for s in stats.values() if s.meta.stack_ndim]
    self.assertLen(scanned, 2)  # the SimpleCell's i and h, per depth
    for st in scanned:
      self.assertEqual(st.a.shape[:3], (2, T, B))

  @parameterized.named_parameters(
      ('remat_checkpoint', Remat, 3), ('jit', Jit, 2),
      ('ensemble', Ensemble, 2), ('per_example_vmap', PerExample, 2),
      ('map_variables', MapVariables, 2),
      ('scan_without_capture_axes', ScannedStack, 2))
  def test_lifted_transforms(self, make, layers):
    self._check(make(), _normal(2, (B, T, D)), layers)

  def test_per_example_vmap_rows_are_the_batch(self):
    stats = self._check(PerExample(), _normal(3, (B, T, D)), 2)
    inner = next(s for p, s in stats.items() if p.startswith('Vmap'))
    # One call, a batch axis of B in front of each example's (T, D).
    self.assertEqual(inner.a.shape, (1, B, T, D))

  def test_optimized_lstm_loss_unchanged(self):
    model = RNNClassifier(nn.OptimizedLSTMCell)
    x = _normal(4, (B, T, D))
    params = model.init(jax.random.key(0), x)['params']
    loss_fn = lambda p, x: jnp.sum(model.apply({'params': p}, x) ** 2)
    value, grads, _ = jax.jit(fo.linen.value_grad_and_stats(loss_fn))(
        params, x)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(loss_fn))(params, x)
    assert_close(value, ref_value)
    for ref, got in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(grads)):
      assert_close(got, ref)


class NNXRNNClassifier(nnx.Module):

  def __init__(self, cell, rngs):
    self.rnn = nnx.RNN(cell(D, H, rngs=rngs))
    self.out = nnx.Linear(H, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(self.rnn(x)[:, -1])


class NNXCaptureTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('lstm', nnx.LSTMCell, 9), ('gru', nnx.GRUCell, 3),
      ('simple', nnx.SimpleCell, 3),
      ('optimized_lstm', nnx.OptimizedLSTMCell, 3))
  def test_rnn_cells(self, cell, layers):
    model = NNXRNNClassifier(cell, nnx.Rngs(0))
    x = _normal(5, (B, T, D))
    y = np.arange(B) % 3

    def loss_fn(m, x, y):
      return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(m(x)),
                                          y[:, None], 1))

    _, grads, stats = nnx.jit(fo.nnx.value_grad_and_stats(loss_fn))(
        model, x, y)
    _, ref_grads = nnx.jit(nnx.value_and_grad(loss_fn))(model, x, y)
    for ref, got in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(grads)):
      assert_close(got, ref)
    # One example at a time (the RNN's carry RNG stream is NNX state, so
    # nnx.grad rather than jax.vmap(jax.grad)).
    grad_one = nnx.jit(nnx.grad(loss_fn))
    grads_one = [nnx.to_pure_dict(grad_one(model, x[b:b + 1], y[b:b + 1]))
                 for b in range(B)]
    per_example = jax.tree.map(lambda *g: np.stack(g), *grads_one)
    self.assertLen(stats, layers)
    for path, st in stats.items():
      if path != 'out':
        self.assertEqual(st.a.shape[:2], (T, B))
      kernel, bias = _captured_per_example(st)
      assert_close(kernel, _get(per_example, path)['kernel'], err_msg=path)
      if st.meta.param_name('bias'):
        assert_close(bias, _get(per_example, path)['bias'], err_msg=path)


if __name__ == '__main__':
  absltest.main()
