"""Parity of ``fisher_optax.kfac`` with DeepMind's kfac-jax.

Skipped unless kfac-jax is installed (``pip install -e '.[kfac]'``); it is
imported through ``benchmarks/_kfac_jax.py``, which patches kfac-jax 0.0.8 to
run on JAX >= 0.9.2.

Both libraries are run on the same Flax linen models, parameters and batch
with softmax cross-entropy averaged over the batch, and kfac-jax in its
``'fisher_empirical'`` mode (true labels, as our capture). Conventions, with
batch size ``B`` and ``T`` output locations per example (1 for dense):

* Input factor: identical. Both use ``A = mean_r [a_r, 1][a_r, 1]^T`` over
  all ``B T`` rows with the bias as the *last* row and column (kfac-jax's
  ``DenseTwoKroneckerFactored`` concatenates the ones column after ``x``;
  ``Conv2DTwoKroneckerFactored`` builds patches in the same
  ``(kh, kw, c_in)`` = HWIO order as ours).
* Output factor: ``G_ours = B T G_kfac_jax``. ``T``: kfac-jax divides the
  conv cotangent moment by ``B T`` and puts ``T`` back as the block's
  ``fixed_scale()`` (so the curvature it uses is ``T A (x) G``), where we
  keep ``T`` inside ``G``. ``B``: in ``'fisher_empirical'`` mode kfac-jax
  takes the per-example loss gradients and divides them by ``sqrt(B)``
  before forming ``G = mean_r dy_r dy_r^T`` (block_diagonal.py: it
  normalises the empirical statistics by ``B**2``, not ``B``), while we use
  the per-example cotangents as they are (``G = mean_r g_r g_r^T``). Its
  other modes do not divide by ``B``: its ``'fisher_exact'`` ``G`` equals
  ``mean_i E_{c ~ p_i}[g_ic g_ic^T]`` built from our captured cotangents
  (tested below), so our empirical ``G`` has the normalisation of kfac-jax's
  true Fisher, and kfac-jax's empirical Fisher is ``B`` times smaller than
  its own Fisher.
* Factored damping: identical rule. kfac-jax's
  ``pi_adjusted_kronecker_factors`` (average-diagonal norms) gives
  ``(A + pi sqrt(lambda) I) (x) (G + sqrt(lambda) / pi I)`` with
  ``pi = sqrt((tr A / d_A) / (tr G / d_G))``, as ours. This rule is
  scale-covariant (``G -> c G`` and ``lambda -> c lambda`` scale the damped
  product by ``c``), so with ``F_ours = B F_kfac_jax`` the updates agree when
  kfac-jax gets ``damping / B``: ``P_ours(g) = P_kfac_jax(g) / B``, i.e. the
  preconditioned gradient of kfac-jax is ``B`` times ours.
* Moving average: different after the first refresh. Both take the first
  statistics as they are. kfac-jax then keeps a normalised weighted average
  (``w <- decay w + 1``, ``F <- (1 - 1/w) F + F_new / w``: after two
  refreshes ``(decay F_1 + F_2) / (1 + decay)``), we keep a plain EMA
  (``decay F_1 + (1 - decay) F_2``). The two converge as ``w -> 1 / (1 -
  decay)``, after a few ``1 / (1 - decay)`` refreshes.

Tolerances are float32 ones: factors agree to ~1e-7 relative, updates to
~1e-6 (MLP) and ~3e-4 (the CNN's 101-wide dense factor, nearly singular at
``B = 8`` with ``damping = 1e-3``).
"""

import functools
import os
import sys

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import fisher_optax as fo

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'benchmarks'))
import _kfac_jax  # noqa: E402  pylint: disable=g-import-not-at-top

kfac_jax = _kfac_jax.import_kfac_jax()

DAMPING = 1e-3
DECAY = 0.95


class MLP(nn.Module):
  """6-8-3 with tanh."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(jnp.tanh(nn.Dense(8)(x)))


class CNN(nn.Module):
  """A 3x3 SAME conv (T = 25 locations) and a dense layer."""

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(4, (3, 3))(x))
    return nn.Dense(3)(x.reshape((x.shape[0], -1)))


# name -> (model, input shape of one example, batch size)
PROBLEMS = {
    'mlp': (MLP, (6,), 16),
    'cnn': (CNN, (5, 5, 2), 8),
}


@functools.cache
def _problem(name, seed=0):
  """Model, parameters, a batch and the two libraries' loss functions.

  Parameters do not depend on ``seed``, the batch does.
  """
  cls, shape, batch = PROBLEMS[name]
  model = cls()
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(batch,) + shape), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=(batch,)), jnp.int32)
  params = model.init(jax.random.key(0), x)['params']

  def loss_fn(params, x, y):
    logits = model.apply({'params': params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def kfac_loss(params, batch):
    x, y = batch
    logits = model.apply({'params': params}, x)
    kfac_jax.register_softmax_cross_entropy_loss(logits, y)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return model, params, (x, y), loss_fn, kfac_loss


@functools.cache
def _ours(name, seeds=(0,), damping=DAMPING):
  """``fo.kfac`` (lr 1) after one update per batch, parameters unchanged.

  Args:
    name: the problem.
    seeds: one batch per seed, in order.
    damping: fo.kfac's damping.

  Returns:
    ``(updates of the last call, KroneckerState)``.
  """
  _, params, _, loss_fn, _ = _problem(name)
  step_fn = fo.linen.value_grad_and_stats(loss_fn)
  tx = fo.kfac(1.0, damping=damping, fisher_decay=DECAY, momentum=0.9,
               stats_every=1, inverse_every=1)

  @jax.jit
  def step(state, x, y):
    _, grads, layer_stats = step_fn(params, x, y)
    return tx.update(grads, state, params, layer_stats=layer_stats)

  state = tx.init(params)
  for seed in seeds:
    updates, state = step(state, *_problem(name, seed)[2])
  kfac_state, = [s for s in state if isinstance(s, fo.KroneckerState)]
  return updates, kfac_state


@functools.cache
def _theirs(name, seeds=(0,), damping=DAMPING, mode='fisher_empirical',
            inverse_update_period=1):
  """kfac-jax after one curvature update per batch, parameters unchanged.

  Args:
    name: the problem.
    seeds: one batch per seed, in order.
    damping: kfac-jax's damping.
    mode: kfac-jax's estimation mode.
    inverse_update_period: kfac-jax's inverse period.

  Returns:
    ``(preconditioner, its state)``.
  """
  _, params, batch, _, kfac_loss = _problem(name)
  pre = kfac_jax.OptaxPreconditioner(
      kfac_loss, damping=damping, estimation_mode=mode,
      curvature_ema=DECAY, inverse_update_period=inverse_update_period,
      use_exact_inverses=False, distributed_inverses=False,
      distributed_precon_apply=False)
  state = pre.init((params, batch), jax.random.key(1))
  update = jax.jit(lambda s, args: pre.increment_count(
      pre.maybe_update(s, args, jax.random.key(2))))
  for seed in seeds:
    state = update(state, (params, _problem(name, seed)[2]))
  return pre, state


def _their_factors(pre, state, layer):
  """``(A, G, fixed_scale)`` of kfac-jax's block for ``layer``."""
  i = pre.estimator.params_block_index[layer]['kernel']
  block = pre.estimator.blocks[i]
  a, g = state.estimator_state.blocks_states[i].factors
  return a.value, g.value, block.fixed_scale()


def _rel(got, want):
  return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


class KfacJaxParityTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    if kfac_jax is None:
      self.skipTest('kfac-jax is not installed (pip install -e ".[kfac]").')

  @parameterized.named_parameters(('mlp', 'mlp'), ('cnn', 'cnn'))
  def test_factors(self, name):
    """A is the same; G_ours = B T G_kfac_jax."""
    batch_size = _problem(name)[2][0].shape[0]
    _, ours = _ours(name)
    pre, theirs = _theirs(name)
    self.assertLen(pre.estimator.blocks, len(ours.stats))
    for layer, stats in ours.stats.items():
      with self.subTest(layer):
        a, g, locations = _their_factors(pre, theirs, layer)
        self.assertEqual(stats['A'].shape, (1, 1) + a.shape)
        self.assertEqual(stats['G'].shape, (1, 1) + g.shape)
        np.testing.assert_allclose(stats['A'][0, 0], a, rtol=1e-5,
                                   atol=1e-6 * float(jnp.max(jnp.abs(a))))
        want_g = batch_size * locations * g
        np.testing.assert_allclose(
            stats['G'][0, 0], want_g, rtol=1e-5,
            atol=1e-6 * float(jnp.max(jnp.abs(want_g))))
    self.assertEqual(int(ours.nonfinite), 0)

  def test_empirical_g_has_kfac_jax_fisher_normalisation(self):
    """kfac-jax's exact-Fisher G is not divided by B; its empirical G is.

    Our rows ``g_r`` (captured cotangents times ``B``) with labels ``c`` give
    ``mean_i sum_c p_ic g_ic g_ic^T``, the exact Fisher's output factor;
    kfac-jax's ``'fisher_exact'`` G equals it without a factor ``B``.
    """
    model, params, (x, _), loss_fn, _ = _problem('mlp')
    batch_size = x.shape[0]
    step_fn = jax.jit(fo.linen.value_grad_and_stats(loss_fn))
    probs = jax.nn.softmax(model.apply({'params': params}, x))
    want = {}
    for c in range(probs.shape[-1]):
      labels = jnp.full((batch_size,), c, jnp.int32)
      _, _, layer_stats = step_fn(params, x, labels)
      for layer, st in layer_stats.items():
        g = st.g.reshape(batch_size, -1) * batch_size
        term = jnp.einsum('i,ij,ik->jk', probs[:, c], g, g) / batch_size
        want[layer] = want.get(layer, 0.0) + term
    pre, theirs = _theirs('mlp', mode='fisher_exact')
    for layer, g_exact in want.items():
      with self.subTest(layer):
        _, g, _ = _their_factors(pre, theirs, layer)
        np.testing.assert_allclose(g, g_exact, rtol=1e-5,
                                   atol=1e-6 * float(jnp.max(g_exact)))

  @parameterized.named_parameters(
      ('mlp_inverse_when_applied', 'mlp', 1),
      ('mlp_cached_inverses', 'mlp', 5),
      ('cnn_inverse_when_applied', 'cnn', 1),
      ('cnn_cached_inverses', 'cnn', 5),
  )
  def test_preconditioned_update(self, name, inverse_update_period):
    """kfac-jax with damping / B preconditions to B times our direction.

    ``inverse_update_period=1`` inverts the pi-damped factors when applied,
    5 uses kfac-jax's cached inverses (refreshed on this first step).
    """
    _, params, batch, _, kfac_loss = _problem(name)
    batch_size = batch[0].shape[0]
    updates, ours = _ours(name)
    pre, theirs = _theirs(name, damping=DAMPING / batch_size,
                          inverse_update_period=inverse_update_period)
    # The optax face of kfac-jax: a stateless transform fed precond_state.
    tx = pre.as_gradient_transform()
    grads = jax.jit(jax.grad(kfac_loss))(params, batch)
    direction, _ = jax.jit(lambda g, p, ps: tx.update(
        g, tx.init(p), p, precond_state=ps))(grads, params, theirs)
    # fo.kfac with lr 1 and no momentum history returns -P(g).
    want = jax.tree.map(lambda d: -d / batch_size, direction)
    rtol = 1e-4 if name == 'mlp' else 2e-3
    errors = jax.tree.map(_rel, updates, want)
    for path, error in jax.tree_util.tree_leaves_with_path(errors):
      with self.subTest(jax.tree_util.keystr(path)):
        self.assertLess(error, rtol)
    self.assertEqual(int(ours.nonfinite), 0)

  def test_same_damping_differs(self):
    """Without the damping / B mapping the directions do not agree."""
    _, params, batch, _, kfac_loss = _problem('mlp')
    batch_size = batch[0].shape[0]
    updates, _ = _ours('mlp')
    pre, theirs = _theirs('mlp', damping=DAMPING)
    grads = jax.jit(jax.grad(kfac_loss))(params, batch)
    direction = jax.jit(pre.apply)(grads, theirs)
    got = updates['Dense_0']['kernel']
    want = -direction['Dense_0']['kernel'] / batch_size
    self.assertGreater(_rel(got, want), 1e-2)

  def test_moving_average_after_two_refreshes(self):
    """Same first refresh; then a plain EMA here, a normalised one there."""
    batch_size = _problem('mlp')[2][0].shape[0]
    _, one = _ours('mlp', seeds=(0,))
    _, two = _ours('mlp', seeds=(1,))
    _, both = _ours('mlp', seeds=(0, 1))
    pre, theirs = _theirs('mlp', seeds=(0, 1))
    for layer in both.stats:
      for name in ('A', 'G'):
        with self.subTest(f'{layer}/{name}'):
          f1 = one.stats[layer][name][0, 0]
          f2 = two.stats[layer][name][0, 0]
          scale = float(jnp.max(jnp.abs(f1)))
          np.testing.assert_allclose(
              both.stats[layer][name][0, 0], DECAY * f1 + (1 - DECAY) * f2,
              rtol=1e-5, atol=1e-6 * scale)
          a, g, _ = _their_factors(pre, theirs, layer)
          got = a if name == 'A' else batch_size * g
          np.testing.assert_allclose(got, (DECAY * f1 + f2) / (1 + DECAY),
                                     rtol=1e-5, atol=1e-6 * scale)


class PatchGateTest(absltest.TestCase):

  def test_needs_patch(self):
    self.assertTrue(_kfac_jax.needs_patch('0.10.2', '0.0.8'))
    self.assertTrue(_kfac_jax.needs_patch('0.9.2', '0.0.7'))
    self.assertFalse(_kfac_jax.needs_patch('0.9.1', '0.0.8'))
    self.assertFalse(_kfac_jax.needs_patch('0.10.2', '0.0.9'))
    self.assertFalse(_kfac_jax.needs_patch('0.10.2', '0.1.0'))
    self.assertTrue(_kfac_jax.needs_patch('0.10.0rc1', '0.0.8'))


if __name__ == '__main__':
  absltest.main()
