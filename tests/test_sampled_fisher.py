"""Monte-Carlo (sampled-label) Fisher capture against closed forms."""

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import fisher_optax as fo

from _tolerance import assert_close
from _tolerance import assert_trees_close


class Mlp(nn.Module):

  @nn.compact
  def __call__(self, x):
    hidden = nn.tanh(nn.Dense(6, name='hidden')(x))
    return nn.Dense(4, name='out')(hidden)


def _setup(batch=8):
  model = Mlp()
  x = jax.random.normal(jax.random.key(0), (batch, 3))
  y = jax.random.randint(jax.random.key(1), (batch,), 0, 4)
  params = model.init(jax.random.key(2), x)['params']

  def loss(p, x, y):
    logits = model.apply({'params': p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return model, x, y, params, loss


def _mean_last_factor(fisher, seed, batch=16, keys=400):
  """Output-side factor ``B * sum g g^T`` averaged over ``keys`` samples."""
  model, x, y, params, loss = _setup(batch=batch)
  step = fo.linen.value_grad_and_stats(loss, fisher=fisher)

  def last_factor(key):
    g = step(params, x, y, fisher_key=key)[2]['out'].g[0] * batch
    return g.T @ g / batch

  keys = jax.random.split(jax.random.key(seed), keys)
  got = jnp.mean(jax.jit(jax.vmap(last_factor))(keys), 0)
  return got, model.apply({'params': params}, x)


class SampledFisherTest(parameterized.TestCase):

  @parameterized.parameters('softmax', 'gaussian', 'bernoulli')
  def test_cotangents_are_those_of_the_sampled_loss(self, fisher):
    """g equals the VJP of the model at the sampled loss's output grad."""
    model, x, y, params, loss = _setup()
    key = jax.random.key(3)
    step = jax.jit(fo.linen.value_grad_and_stats(loss, fisher=fisher))
    value, grads, stats = step(params, x, y, fisher_key=key)
    want_value, want_grads = jax.value_and_grad(loss)(params, x, y)
    assert_close(value, want_value, rtol=1e-6, scale_atol=1e-7)
    assert_trees_close(grads, want_grads, rtol=1e-5)
    logits = model.apply({'params': params}, x)
    if fisher == 'softmax':
      labels = jax.random.categorical(key, logits, axis=-1)
      cot = (jax.nn.softmax(logits) - jax.nn.one_hot(labels, 4)) / 8
    elif fisher == 'bernoulli':
      probs = jax.nn.sigmoid(logits)
      cot = (probs - jax.random.bernoulli(key, probs)) / 8
    else:
      cot = -jax.random.normal(key, logits.shape) / 8
    assert_close(stats['out'].g[0], cot, rtol=1e-5)
    # First layer: back through Dense_1 and tanh by hand.
    pre = x @ params['hidden']['kernel'] + params['hidden']['bias']
    g0 = (cot @ params['out']['kernel'].T) * (1 - jnp.tanh(pre) ** 2)
    assert_close(stats['hidden'].g[0], g0, rtol=1e-5)
    # Inputs are the same as for the empirical Fisher.
    np.testing.assert_allclose(stats['hidden'].a[0], x)

  def test_softmax_sampled_factor_matches_true_fisher_in_expectation(self):
    """mean over keys of B * sum g g^T -> mean_n diag(p_n) - p_n p_n^T."""
    got, logits = _mean_last_factor('softmax', seed=4)
    p = jax.nn.softmax(logits)
    want = jnp.mean(jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(p), 0)
    # 6400 samples: the Monte-Carlo error is ~1/80 of the entries' scale.
    np.testing.assert_allclose(got, want, atol=0.02)

  def test_bernoulli_sampled_factor_matches_true_fisher_in_expectation(self):
    """mean over keys of B * sum g g^T -> mean_n diag(p_n (1 - p_n))."""
    got, logits = _mean_last_factor('bernoulli', seed=5)
    p = jax.nn.sigmoid(logits)
    want = jnp.diag(jnp.mean(p * (1 - p), 0))
    # 6400 samples of entries of variance <= 1/16: error ~0.003 at most.
    np.testing.assert_allclose(got, want, atol=0.02)
    # An empirical-style factor (labels fixed at 0) is far from it.
    self.assertGreater(float(jnp.max(jnp.abs(jnp.mean(p ** 2, 0)
                                             - jnp.diag(want)))), 0.02)

  def test_needs_a_key_and_a_known_fisher(self):
    _, x, y, params, loss = _setup()
    step = fo.linen.value_grad_and_stats(loss, fisher='softmax')
    with self.assertRaisesRegex(ValueError, 'fisher_key'):
      step(params, x, y)
    with self.assertRaisesRegex(ValueError, 'fisher must be'):
      fo.linen.value_grad_and_stats(loss, fisher='true')

  def test_kfac_trains_with_sampled_fisher(self):
    _, x, _, params, loss = _setup(batch=32)
    y = jnp.argmax(x @ jax.random.normal(jax.random.key(6), (3, 4)), -1)
    step_fn = fo.linen.value_grad_and_stats(loss, fisher='softmax')
    tx = fo.kfac(0.1, damping=0.1, inverse_every=5)

    @jax.jit
    def step(p, state, key):
      value, grads, stats = step_fn(p, x, y, fisher_key=key)
      updates, state = tx.update(grads, state, p, layer_stats=stats)
      return optax.apply_updates(p, updates), state, value

    state = tx.init(params)
    p = params
    losses = []
    for key in jax.random.split(jax.random.key(5), 40):
      p, state, value = step(p, state, key)
      losses.append(float(value))
    self.assertLess(losses[-1], 0.5 * losses[0])


if __name__ == '__main__':
  absltest.main()


class NnxSampledFisherTest(absltest.TestCase):

  def test_matches_linen_construction_and_updates_state_once(self):
    from flax import nnx  # pylint: disable=g-import-not-at-top

    class Net(nnx.Module):

      def __init__(self, rngs):
        self.hidden = nnx.Linear(3, 6, rngs=rngs)
        self.norm = nnx.BatchNorm(6, rngs=rngs)
        self.out = nnx.Linear(6, 4, rngs=rngs)

      def __call__(self, x):
        return self.out(jnp.tanh(self.norm(self.hidden(x))))

    x = jax.random.normal(jax.random.key(0), (8, 3))
    y = jax.random.randint(jax.random.key(1), (8,), 0, 4)
    loss = lambda m, x, y: optax.softmax_cross_entropy_with_integer_labels(
        m(x), y).mean()
    model = Net(nnx.Rngs(0))
    ref = nnx.clone(model)
    key = jax.random.key(2)
    step = fo.nnx.value_grad_and_stats(loss, fisher='softmax')
    value, grads, stats = nnx.jit(
        lambda m, x, y, k: step(m, x, y, fisher_key=k))(model, x, y, key)
    want_value, want_grads = nnx.value_and_grad(loss)(ref, x, y)
    assert_close(value, want_value, rtol=1e-6, scale_atol=1e-7)
    assert_trees_close(nnx.to_pure_dict(grads), nnx.to_pure_dict(want_grads),
                       rtol=1e-5)
    # BatchNorm running statistics advanced exactly once, as in `ref`.
    assert_close(model.norm.mean[...], ref.norm.mean[...], rtol=1e-6,
                 scale_atol=1e-7)
    logits = ref(x)  # ref is in train mode; same batch statistics
    labels = jax.random.categorical(key, logits, axis=-1)
    cot = (jax.nn.softmax(logits) - jax.nn.one_hot(labels, 4)) / 8
    assert_close(stats['out'].g[0], cot, rtol=1e-4, scale_atol=1e-5)
