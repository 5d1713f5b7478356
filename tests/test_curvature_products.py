"""Curvature quadratic forms ``v_i^T C v_j`` against dense float64 references.

* ``captured_products``: the empirical Fisher of the captured statistics.
  The reference takes every example's gradient with
  ``jax.vmap(jax.grad(...))`` of its own loss, keeps the leaves of the
  covered parameters, forms ``F = (1/B) sum_n g_n g_n^T`` (``sum_n`` for a
  summed loss) as a dense matrix and reads off ``v_i^T F v_j``. With
  ``fisher='softmax'`` the same reference at the labels the capture sampled.
* ``ggn_products``: the Gauss-Newton matrix ``J^T H J`` with ``J`` from
  ``jax.jacfwd`` on the raveled parameters and ``H`` from ``jax.hessian`` of
  the loss in output space.

Everything runs in float64, so the references agree to rounding (``~1e-9``
of the largest entry) and a missing or extra term of any size fails.
"""

from typing import Any, Callable, NamedTuple

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax

import fisher_optax as fo
from fisher_optax import _curvature_products

B, T = 6, 5  # examples, tokens per example
K = 3  # directions v_i
CLASSES = 3
TOL = 1e-9  # float64: relative to the largest entry of the reference


class _Mlp(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = nn.tanh(nn.Dense(5)(x))
    return nn.Dense(CLASSES)(h)


class _Cnn(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(4, (3, 3), strides=2)(x))
    return nn.Dense(CLASSES)(h.reshape(h.shape[0], -1))


class _ConvGeometry(nn.Module):
  """One conv of the given geometry, applied ``calls`` times, then Dense."""

  conv: dict
  calls: int = 1

  @nn.compact
  def __call__(self, x):
    conv = nn.Conv(4, **self.conv)
    h = x
    for _ in range(self.calls):  # weight sharing across calls
      h = nn.tanh(conv(h))
    return nn.Dense(CLASSES)(h.reshape(h.shape[0], -1))


# Geometries the conv path must reproduce (the patches of K-FAC cover the
# same list in test_kronecker): strides with explicit uneven padding,
# kernel dilation, channel groups, 1-D causal, input dilation.
_CONVS = {
    'conv_padded': (dict(kernel_size=(3, 3), strides=(2, 1),
                         padding=((1, 2), (0, 1))), (B, 7, 6, 4), 1),
    'conv_dilated': (dict(kernel_size=(2, 3), kernel_dilation=(2, 1)),
                     (B, 7, 6, 4), 1),
    'conv_groups': (dict(kernel_size=(3, 3), feature_group_count=2),
                    (B, 5, 5, 4), 1),
    'conv_1d_causal': (dict(kernel_size=(3,), padding='CAUSAL'),
                       (B, 9, 4), 1),
    'conv_input_dilation': (dict(kernel_size=(2, 2), input_dilation=2,
                                 padding=((1, 1), (0, 2))),
                            (B, 4, 4, 4), 1),
    'conv_twice': (dict(kernel_size=(3, 3), padding='SAME'), (B, 5, 5, 4),
                   2),
}


class _EmbedNorm(nn.Module):
  """Embed, LayerNorm, Dense, and a bare temperature no layer owns."""

  @nn.compact
  def __call__(self, tokens):
    h = nn.LayerNorm()(nn.Embed(7, 4)(tokens))
    logits = nn.Dense(CLASSES)(h)
    # Seen by the loss and the gradient, but not by the captured Fisher.
    return logits * self.param('temperature', nn.initializers.ones, ())


def _ce(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _dense_paths(*layers):
  return frozenset(f'{layer}/{name}' for layer in layers
                   for name in ('kernel', 'bias'))


class _Problem(NamedTuple):
  model: nn.Module
  params: Any
  x: jax.Array
  y: jax.Array
  losses: Callable[..., jax.Array]  # (params, x, y) -> (batch,) losses
  reduction: str  # how the training loss reduces ``losses``: mean or sum
  owned: frozenset[str]  # the parameter paths of the captured layers


def _problem(name, seed=0) -> _Problem:
  """A small model, a batch, per-example losses; call under x64."""
  rng = np.random.default_rng(seed)
  labels = lambda *shape: jnp.asarray(rng.integers(0, CLASSES, shape))
  apply = lambda m: lambda p, x: m.apply({'params': p}, x)
  if name in ('mlp', 'sum'):
    model, x, y = _Mlp(), rng.normal(size=(B, 4)), labels(B)
    losses = lambda p, x, y: _ce(apply(model)(p, x), y)
    owned = _dense_paths('Dense_0', 'Dense_1')
  elif name == 'tokens':
    # Weight sharing over T positions: an example's loss is the sum over its
    # tokens, the training loss the mean of that over the batch.
    model, x, y = _Mlp(), rng.normal(size=(B, T, 4)), labels(B, T)
    losses = lambda p, x, y: jnp.sum(_ce(apply(model)(p, x), y), -1)
    owned = _dense_paths('Dense_0', 'Dense_1')
  elif name == 'cnn':
    model, x, y = _Cnn(), rng.normal(size=(B, 7, 7, 2)), labels(B)
    losses = lambda p, x, y: _ce(apply(model)(p, x), y)
    owned = _dense_paths('Conv_0', 'Dense_0')
  elif name in _CONVS:
    conv, shape, calls = _CONVS[name]
    model, x, y = _ConvGeometry(conv, calls), rng.normal(size=shape), labels(B)
    losses = lambda p, x, y: _ce(apply(model)(p, x), y)
    owned = _dense_paths('Conv_0', 'Dense_0')
  elif name == 'embed':
    # Mean over the batch and the tokens: an example's loss is the mean
    # over its tokens. Ids repeat within an example (7 ids, 5 tokens).
    model = _EmbedNorm()
    x, y = jnp.asarray(rng.integers(0, 7, (B, T))), labels(B, T)
    losses = lambda p, x, y: jnp.mean(_ce(apply(model)(p, x), y), -1)
    owned = _dense_paths('Dense_0') | {
        'Embed_0/embedding', 'LayerNorm_0/scale', 'LayerNorm_0/bias'}
  else:
    raise ValueError(name)
  x = jnp.asarray(x)
  params = model.init(jax.random.key(seed), x)['params']
  # Perturbed: zero biases and unit norm scales would hide terms.
  params = jax.tree.map(lambda p: jnp.asarray(
      p + 0.3 * rng.normal(size=p.shape), jnp.float64), params)
  return _Problem(model, params, x, y, losses,
                  'sum' if name == 'sum' else 'mean', frozenset(owned))


def _directions(params, seed=1):
  rng = np.random.default_rng(seed)
  return [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)),
                       params) for _ in range(K)]


def _by_path(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(k.key for k in path): leaf for path, leaf in flat}


def _flat(tree, paths, lead=()):
  """The leaves at ``paths`` (in that order) as one vector per ``lead``."""
  leaves = _by_path(tree)
  return np.concatenate([np.asarray(leaves[p], np.float64).reshape(
      lead + (-1,)) for p in paths], -1)


def _captured(problem, vectors, fisher='empirical', key=None):
  """``captured_products`` under jit, after a capture under jit."""
  reduce = jnp.mean if problem.reduction == 'mean' else jnp.sum
  loss = lambda p, x, y: reduce(problem.losses(p, x, y))
  step = fo.linen.value_grad_and_stats(loss, fisher=fisher)
  kwargs = {} if key is None else {'fisher_key': key}
  _, _, stats = jax.jit(step)(problem.params, problem.x, problem.y, **kwargs)
  covered = []

  def products(s, v):
    c, paths = _curvature_products.captured_products(
        s, v, problem.reduction, None, 'test')
    covered.append(paths)  # a static frozenset: not a valid jit output
    return c

  c = jax.jit(products)(stats, vectors)
  return np.asarray(c), covered[0]


def _reference(problem, vectors, paths, block_diagonal=False):
  """``v_i^T F v_j`` of the dense empirical Fisher over ``paths``."""
  per_example = lambda p, xn, yn: problem.losses(p, xn[None], yn[None])[0]
  grads = jax.jit(jax.vmap(jax.grad(per_example), (None, 0, 0)))(
      problem.params, problem.x, problem.y)
  paths = sorted(paths)
  g = _flat(grads, paths, lead=(B,))  # (B, P)
  fisher = g.T @ g / (B if problem.reduction == 'mean' else 1)
  if block_diagonal:
    # Drop every cross-layer block: what a sum of per-layer terms gives.
    sizes = {p: np.size(leaf) for p, leaf in _by_path(problem.params).items()}
    layer = np.concatenate([np.full(sizes[p], p.rsplit('/', 1)[0])
                            for p in paths])
    fisher = fisher * (layer[:, None] == layer[None, :])
  v = np.stack([_flat(u, paths) for u in vectors])  # (K, P)
  return v @ fisher @ v.T


def _assert_close(got, want):
  np.testing.assert_allclose(got, want, rtol=TOL,
                             atol=TOL * np.max(np.abs(want)))


class CapturedProductsTest(parameterized.TestCase):
  """``captured_products`` equals the dense per-example-gradient Fisher.

  Each model owns parameters of two or more captured layers, so that the
  cross-layer terms of ``C`` are exercised; the embedding model also has
  a bare parameter that no captured layer owns and ``C`` must leave out.
  """

  def setUp(self):
    super().setUp()
    self.enter_context(jax.enable_x64(True))

  @parameterized.named_parameters(
      ('mlp', 'mlp'), ('tokens', 'tokens'), ('cnn', 'cnn'),
      ('embed_layernorm', 'embed'), ('sum_reduction', 'sum'),
      *((name, name) for name in _CONVS))
  def test_equals_empirical_fisher(self, name):
    problem = _problem(name)
    vectors = _directions(problem.params)
    got, covered = _captured(problem, vectors)
    self.assertEqual(covered, problem.owned)
    self.assertEqual(got.dtype, np.float64)
    want = _reference(problem, vectors, problem.owned)
    _assert_close(got, want)
    # A wrong answer fails: without the cross-layer terms the result is off
    # by far more than the tolerance.
    block = _reference(problem, vectors, problem.owned, block_diagonal=True)
    self.assertGreater(np.max(np.abs(block - want)),
                       1e-2 * np.max(np.abs(want)))

  def test_sum_is_batch_times_mean(self):
    """The 'sum' reduction of a summed loss is B times the mean one's."""
    mean, summed = _problem('mlp'), _problem('sum')
    vectors = _directions(mean.params)
    _assert_close(_captured(summed, vectors)[0],
                  B * _captured(mean, vectors)[0])

  def test_masked_leaf_is_not_covered(self):
    """A frozen (MaskedNode) bias leaves its layer's kernel covered."""
    problem = _problem('mlp')
    vectors = [dict(v, Dense_0=dict(v['Dense_0'], bias=optax.MaskedNode()))
               for v in _directions(problem.params)]
    got, covered = _captured(problem, vectors)
    owned = problem.owned - {'Dense_0/bias'}
    self.assertEqual(covered, owned)
    _assert_close(got, _reference(problem, vectors, owned))


class GgnProductsTest(parameterized.TestCase):
  """``ggn_products`` equals ``(J v_i)^T H (J v_j)`` from dense J and H."""

  def setUp(self):
    super().setUp()
    self.enter_context(jax.enable_x64(True))

  def _setup(self, loss):
    problem = _problem('mlp')
    outputs_fn = lambda p: problem.model.apply({'params': p}, problem.x)
    if loss == 'softmax':
      outputs_loss = lambda out: jnp.mean(_ce(out, problem.y))
    else:
      targets = jnp.asarray(np.random.default_rng(2).normal(
          size=(B, CLASSES)))
      outputs_loss = lambda out: 0.5 * jnp.mean(
          jnp.sum((out - targets) ** 2, -1))
    return problem.params, outputs_fn, outputs_loss

  def _dense(self, params, outputs_fn, outputs_loss, vectors):
    flat, unravel = ravel_pytree(params)
    out = outputs_fn(params)
    jac = jax.jacfwd(lambda f: outputs_fn(unravel(f)).reshape(-1))(flat)
    hess = jax.hessian(lambda o: outputs_loss(o.reshape(out.shape)))(
        out.reshape(-1))
    jv = np.asarray(jac) @ np.stack([ravel_pytree(v)[0] for v in vectors]).T
    return jv.T @ np.asarray(hess) @ jv

  def _ggn(self, params, outputs_fn, outputs_loss, vectors):
    return np.asarray(jax.jit(lambda p, v: _curvature_products.ggn_products(
        outputs_fn, outputs_loss, p, v, None))(params, vectors))

  @parameterized.named_parameters(('softmax', 'softmax'),
                                  ('squared_error', 'squared'))
  def test_equals_dense_gauss_newton(self, loss):
    params, outputs_fn, outputs_loss = self._setup(loss)
    vectors = _directions(params)
    got = self._ggn(params, outputs_fn, outputs_loss, vectors)
    self.assertEqual(got.dtype, np.float64)
    _assert_close(got, self._dense(params, outputs_fn, outputs_loss,
                                   vectors))

  def test_masked_leaf_is_zero(self):
    params, outputs_fn, outputs_loss = self._setup('softmax')
    vectors = _directions(params)
    # A different leaf in each direction: each is zeroed on its own.
    masked = [('Dense_1', 'bias'), ('Dense_0', 'kernel'), ('Dense_1', 'bias')]
    frozen, zeroed = [], []
    for v, (layer, name) in zip(vectors, masked):
      frozen.append(dict(v, **{layer: dict(v[layer],
                                           **{name: optax.MaskedNode()})}))
      zeroed.append(dict(v, **{layer: dict(
          v[layer], **{name: jnp.zeros_like(v[layer][name])})}))
    got = self._ggn(params, outputs_fn, outputs_loss, frozen)
    _assert_close(got, self._dense(params, outputs_fn, outputs_loss, zeroed))


class SampledFisherProductsTest(absltest.TestCase):
  """With ``fisher='softmax'`` the products are the sampled labels' Fisher.

  The capture draws ``jax.random.categorical(key, logits)`` from its float32
  logits (``sampled_cotangent`` casts them), so the labels are recovered
  here from the same key; the reference is the empirical-Fisher reference
  at those labels.
  """

  def setUp(self):
    super().setUp()
    self.enter_context(jax.enable_x64(True))

  def test_equals_fisher_of_sampled_labels(self):
    problem = _problem('mlp')
    vectors = _directions(problem.params)
    logits = problem.model.apply({'params': problem.params}, problem.x)
    for seed in (3, 4):
      key = jax.random.key(seed)
      got, covered = _captured(problem, vectors, fisher='softmax', key=key)
      self.assertEqual(covered, problem.owned)
      labels = jax.random.categorical(key, logits.astype(jnp.float32), -1)
      # Else the data labels' Fisher would pass as well.
      self.assertFalse(np.array_equal(labels, problem.y))
      want = _reference(problem._replace(y=labels), vectors, problem.owned)
      # sampled_cotangent computes (softmax - onehot) / B in float32 even
      # under x64, so the cotangents carry float32 rounding (~6e-8): a
      # relative 1e-6 still fails any wrong label (an O(1) change).
      np.testing.assert_allclose(got, want, rtol=1e-6,
                                 atol=1e-6 * np.max(np.abs(want)))
      empirical = _reference(problem, vectors, problem.owned)
      self.assertGreater(np.max(np.abs(got - empirical)),
                         1e-2 * np.max(np.abs(want)))


if __name__ == '__main__':
  absltest.main()
