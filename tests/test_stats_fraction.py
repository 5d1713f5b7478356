"""``stats_fraction``: Kronecker statistics of a sample of the examples.

The references are the float64 formulas of ``test_weight_sharing`` (written
from the definitions, with hand-derived cotangents) applied to the examples
that refresh ``k`` samples: ``k mod n, k mod n + n, ...`` of the batch, for
``stats_fraction = 1/n``. Each check uses averaging weights that tell the
sampled examples from the whole batch. An embedding's statistics are
checked against the library's on the sampled examples alone.
"""

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import fisher_optax as fo
from test_weight_sharing import (  # pylint: disable=g-bad-import-order
    _assert_close, _f64, _problem, _reference, problem_rows)

B = 4  # the examples of test_weight_sharing's problems


def _stats_after(name, params, loss, updates, **kw):
  """The optimizer's statistics after ``updates`` updates on one batch."""
  _, grads, stats = jax.jit(fo.linen.value_grad_and_stats(loss))(params)
  tx = getattr(fo, f'scale_by_{name}')(momentum=0.0, **kw)
  update = jax.jit(lambda s: tx.update(grads, s, params, layer_stats=stats))
  state = tx.init(params)
  for _ in range(updates):
    _, state = update(state)
  return jax.tree.map(_f64, state.stats), jax.tree.map(_f64, state.precond)


def _sampled(inputs, examples, weight_sharing):
  """The reference statistics of the given examples alone."""
  a, e = inputs
  return _reference(a[examples], e[examples])[weight_sharing]


def _inputs(kind):
  params, loss, name, a, e = problem_rows(kind)
  return params, loss, name, (a, e)


class SampledExamplesTest(parameterized.TestCase):

  @parameterized.product(kind=['conv', 'tokens'],
                         weight_sharing=['expand', 'reduce'])
  def test_kfac_factors_of_each_refresh(self, kind, weight_sharing):
    params, loss, name, inputs = _inputs(kind)
    # Refresh 0 takes examples 0, 2; refresh 1 examples 1, 3, averaged in
    # with weight 0.75 (fisher_decay 0.25), so neither is the whole batch's.
    first = _sampled(inputs, [0, 2], weight_sharing)
    second = _sampled(inputs, [1, 3], weight_sharing)
    for updates, want in ((1, first), (2, {
        f: 0.25 * first[f] + 0.75 * second[f] for f in ('A', 'G')})):
      stats, _ = _stats_after('kfac', params, loss, updates,
                              weight_sharing=weight_sharing,
                              stats_fraction=0.5, fisher_decay=0.25)
      for factor in ('A', 'G'):
        _assert_close(stats[name][factor][0, 0], want[factor])

  @parameterized.parameters('conv', 'tokens')
  def test_tkfac_statistics(self, kind):
    params, loss, name, inputs = _inputs(kind)
    stats, _ = _stats_after('tkfac', params, loss, 1,
                            weight_sharing='reduce', stats_fraction=0.5)
    want = _sampled(inputs, [0, 2], 'reduce')
    _assert_close(stats[name]['delta'][0], want['delta'])
    _assert_close(stats[name]['Phi'][0, 0], want['Phi'])
    _assert_close(stats[name]['Psi'][0, 0], want['Psi'])

  def test_refresh_index_counts_refreshes_not_steps(self):
    # stats_every=2: steps 0 and 2 refresh, with examples {0} then {1}
    # (1/3 of 4 examples: one each, the fourth never sampled).
    params, loss, name, inputs = _inputs('tokens')
    stats, _ = _stats_after('kfac', params, loss, 3, stats_every=2,
                            stats_fraction=1 / 3, fisher_decay=0.25)
    first = _sampled(inputs, [0], 'expand')
    second = _sampled(inputs, [1], 'expand')
    for factor in ('A', 'G'):
      _assert_close(stats[name][factor][0, 0],
                    0.25 * first[factor] + 0.75 * second[factor])

  def test_summed_loss_keeps_its_cotangents(self):
    # loss_reduction='sum' takes the captured cotangents as per-example
    # ones: the sample must not rescale them.
    params, loss, name, inputs = _inputs('conv')
    summed = lambda p: B * loss(p)
    stats, _ = _stats_after('kfac', params, summed, 1, stats_fraction=0.5,
                            loss_reduction='sum')
    want = _sampled(inputs, [0, 2], 'expand')
    for factor in ('A', 'G'):
      _assert_close(stats[name][factor][0, 0], want[factor])

  def test_embedding_statistics_of_the_sample(self):
    # The library on the sampled examples alone, with a mean loss over
    # them, has the same per-example cotangents: the same statistics.
    model = nn.Sequential([nn.Embed(10, 4), nn.Dense(3)])
    ids = jax.random.randint(jax.random.key(0), (B, 5), 0, 10)
    t = jax.random.normal(jax.random.key(1), (B, 5, 3))
    params = model.init(jax.random.key(2), ids)['params']

    def loss_of(ids, t):
      return lambda p: jnp.mean(jnp.sum(
          jnp.sin(model.apply({'params': p}, ids) * t), axis=(1, 2)))

    sampled, _ = _stats_after('kfac', params, loss_of(ids, t), 1,
                              stats_fraction=0.5)
    want, _ = _stats_after('kfac', params, loss_of(ids[::2], t[::2]), 1)
    for layer in want:
      for name in want[layer]:
        _assert_close(sampled[layer][name], want[layer][name])

  def test_batch_smaller_than_the_period_is_used_whole(self):
    params, loss, name, _ = _problem('conv')
    sampled, _ = _stats_after('kfac', params, loss, 1, stats_fraction=1 / 8)
    whole, _ = _stats_after('kfac', params, loss, 1)
    for factor in ('A', 'G'):
      _assert_close(sampled[name][factor], whole[name][factor])

  def test_eigen_scaling_is_measured_on_the_sample(self):
    params, loss, name, inputs = _inputs('tokens')
    _, precond = _stats_after('ekfac', params, loss, 1,
                              weight_sharing='reduce', stats_fraction=0.5)
    pre = precond[name]
    u_in, u_out = pre['in_vecs'][0, 0], pre['out_vecs'][0, 0]
    per_example = _sampled(inputs, [0, 2], 'reduce')['per_example']
    rotated = np.einsum('ia,nij,jb->nab', u_in, per_example, u_out)
    _assert_close(pre['scaling'][0], np.mean(rotated ** 2, axis=0),
                  rtol=1e-4)

  @parameterized.parameters(0.3, 0.0, -0.5, 1.5, 2, True, '1/4')
  def test_bad_fraction_is_named(self, value):
    for factory in (fo.kfac, fo.ekfac, fo.tkfac, fo.tekfac):
      with self.assertRaisesRegex(ValueError, 'stats_fraction'):
        factory(1e-3, stats_fraction=value)

  def test_traced_fraction_is_refused(self):
    with self.assertRaisesRegex(ValueError, 'static_args'):
      fo.kfac(1e-3, stats_fraction=jnp.asarray(0.5))

  def test_no_argument_optimizer_takes_it(self):
    params, loss, name, inputs = _inputs('tokens')
    step_fn = fo.linen.value_grad_and_stats(loss)
    tx = fo.kfac(stats_fraction=0.5)

    @jax.jit
    def train_step(params, opt_state):
      _, grads, layer_stats = step_fn(params)
      updates, opt_state = tx.update(grads, opt_state, params,
                                     layer_stats=layer_stats)
      return optax.apply_updates(params, updates), opt_state

    new_params, state = train_step(params, tx.init(params))
    self.assertTrue(all(np.all(np.isfinite(x))
                        for x in jax.tree.leaves(new_params)))
    kronecker, = [s for s in jax.tree.leaves(
        state, is_leaf=lambda s: isinstance(s, fo.KroneckerState))
                  if isinstance(s, fo.KroneckerState)]
    want = _sampled(inputs, [0, 2], 'expand')
    _assert_close(_f64(kronecker.stats[name]['A'][0, 0]), want['A'])


if __name__ == '__main__':
  absltest.main()
