"""Layouts guessed from the parameters against those the capture records.

``tx.init(params)`` guesses each kernel's stack, input and output axes from
the parameter tree alone (``_base.guess_kernels``). The reference is the
capture: for stock Flax layers, the guess must equal what
``value_grad_and_stats`` records (stack axes, contracted input axes, dense
or conv). Where the parameters cannot tell (a bias-less multi-output
``DenseGeneral``), the guess may differ and the first update asks for
``layers=``, tested in test_kronecker.py / test_mini_block_fisher.py.
"""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import fisher_optax as fo
from fisher_optax import _base


class Block(nn.Module):
  """A pre-LayerNorm Transformer block, as public Flax code writes it."""

  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(
        num_heads=2, use_bias=self.use_bias)(h, h)
    h = nn.Dense(16, use_bias=self.use_bias)(nn.LayerNorm()(x))
    return x + nn.Dense(8, use_bias=self.use_bias)(nn.gelu(h))


class ScanBlock(nn.Module):
  use_bias: bool = True

  @nn.compact
  def __call__(self, x, _):
    return Block(self.use_bias)(x), None


class Transformer(nn.Module):
  use_bias: bool = True
  scanned: bool = False

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(11, 8)(tokens)
    if self.scanned:
      x, _ = nn.scan(ScanBlock, variable_axes={'params': 0},
                     split_rngs={'params': True}, length=3)(
                         self.use_bias)(x, None)
    else:
      x = Block(self.use_bias)(x)
    return nn.Dense(11)(nn.LayerNorm()(x))


class Convs(nn.Module):

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(4, (3,))(x)  # 1-D: kernel (3, 2, 4), like a stacked dense
    y = nn.Conv(4, (3, 3))(y[..., None, :].repeat(3, -2))
    z = nn.DenseGeneral((2, 3))(x)  # kernel (2, 2, 3), bias (2, 3)
    z = nn.DenseGeneral(4, axis=(-2, -1))(z)  # kernel (2, 3, 4)
    return y.mean((1, 2)) + z.mean(1)


class NNXTransformer(nnx.Module):

  def __init__(self, rngs):
    @nnx.split_rngs(splits=2)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return NNXBlock(rngs)

    self.embed = nnx.Embed(11, 8, rngs=rngs)
    self.blocks = create(rngs)
    self.head = nnx.Linear(8, 11, rngs=rngs)

  def __call__(self, tokens):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)

    return self.head(body(self.embed(tokens), self.blocks))


class NNXBlock(nnx.Module):

  def __init__(self, rngs):
    self.norm = nnx.LayerNorm(8, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(
        num_heads=2, in_features=8, decode=False, rngs=rngs)
    self.mlp = nnx.Linear(8, 8, rngs=rngs)

  def __call__(self, x):
    h = self.norm(x)
    return x + self.mlp(self.attention(h, h))


def _captured(meta):
  """(n_stack, n_in, conv) of a captured dense or conv layer."""
  k = meta.stack_ndim
  kernel = meta.param_shape(meta.param_name('kernel'))
  if meta.kind == 'conv':
    return k, len(kernel) - k - 1, True
  return k, len(meta.cfg('in_axes') or (0,)), False


class GuessTest(parameterized.TestCase):

  def _assert_guess_matches_capture(self, params, stats, ambiguous=()):
    leaves = _base.flatten_with_paths(params)
    guesses = _base.guess_kernels(leaves)
    checked = 0
    for key, st in stats.items():
      if st.meta.kind not in ('dense', 'conv') or key in ambiguous:
        continue
      guess = guesses[key]
      self.assertEqual((guess.n_stack, guess.n_in, guess.conv),
                       _captured(st.meta), msg=key)
      checked += 1
    return checked

  @parameterized.named_parameters(
      ('bias', True, False), ('no_bias', False, False),
      ('scanned_bias', True, True), ('scanned_no_bias', False, True))
  def test_linen_transformer(self, use_bias, scanned):
    model = Transformer(use_bias, scanned)
    tokens = jnp.arange(10).reshape(2, 5) % 11
    params = model.init(jax.random.key(0), tokens)['params']
    loss = lambda p, t: jnp.mean(model.apply({'params': p}, t) ** 2)
    _, _, stats = jax.jit(fo.linen.value_grad_and_stats(loss))(params,
                                                                tokens)
    # 4 attention projections, 2 MLP layers, the head.
    self.assertEqual(self._assert_guess_matches_capture(params, stats), 7)

  def test_linen_convs_and_dense_general(self):
    model = Convs()
    x = np.random.default_rng(0).standard_normal((2, 5, 2)).astype(
        np.float32)
    params = model.init(jax.random.key(0), x)['params']
    loss = lambda p, x: jnp.mean(model.apply({'params': p}, x) ** 2)
    step_fn = fo.linen.value_grad_and_stats(loss)
    _, grads, stats = jax.jit(step_fn)(params, x)
    # DenseGeneral(4, axis=(-2, -1)) has the parameters of a 1-D conv
    # (kernel (2, 3, 4), bias (4,)) and is guessed as one: the Kronecker
    # factors of both have the same shapes, so K-FAC needs no layers=
    # (MBF's conv and dense blocks differ: it asks for layers=).
    self.assertEqual(self._assert_guess_matches_capture(
        params, stats, ambiguous=('DenseGeneral_1',)), 3)
    self.assertTrue(_base.guess_kernels(
        _base.flatten_with_paths(params))['DenseGeneral_1'].conv)
    layers = jax.eval_shape(step_fn, params, x)[2]
    got, want = (jax.jit(lambda g, s, tx=tx: tx.update(
        g, s, params, layer_stats=stats)[0])(grads, tx.init(params))
                 for tx in (fo.kfac(1e-3), fo.kfac(1e-3, layers=layers)))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(a, b)
    mbf = fo.scale_by_mini_block_fisher()
    with self.assertRaisesRegex(ValueError, 'DenseGeneral_1.*layers='):
      mbf.update(grads, mbf.init(params), layer_stats=stats)

  def test_nnx_scanned_attention(self):
    model = NNXTransformer(nnx.Rngs(0))
    tokens = jnp.arange(10).reshape(2, 5) % 11
    loss = lambda m, t: jnp.mean(m(t) ** 2)
    _, _, stats = nnx.jit(fo.nnx.value_grad_and_stats(loss))(model, tokens)
    params = nnx.state(model, nnx.Param)
    # 4 attention projections and the MLP per block, the head.
    self.assertEqual(self._assert_guess_matches_capture(params, stats), 6)

  def test_kfac_and_mbf_need_no_layers(self):
    """Reference: the same optimizers built with layers= from the capture."""
    model = Transformer(True, True)
    tokens = jnp.arange(10).reshape(2, 5) % 11
    params = model.init(jax.random.key(0), tokens)['params']
    loss = lambda p, t: jnp.mean(model.apply({'params': p}, t) ** 2)
    step_fn = fo.linen.value_grad_and_stats(loss)
    _, grads, stats = jax.jit(step_fn)(params, tokens)
    layers = jax.eval_shape(step_fn, params, tokens)[2]
    for factory in (fo.kfac, fo.mini_block_fisher):
      got, want = (jax.jit(lambda g, s, tx=tx: tx.update(
          g, s, params, layer_stats=stats)[0])(grads, tx.init(params))
                   for tx in (factory(1e-3), factory(1e-3, layers=layers)))
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


if __name__ == '__main__':
  absltest.main()
