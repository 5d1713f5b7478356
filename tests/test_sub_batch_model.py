"""``benchmarks/sub_batch_model.py`` recomputes the adaptive step's model.

Its whole-batch terms are computed by hand (``task.outputs`` and
``task.outputs_loss``, not the capture step's linearization), so they are
checked against the library's own choice: on the first step there is no
previous update, and the learning rate is the 1-D minimiser
:math:`b / (C + \\lambda \\lVert\\Delta\\rVert^2)`. A "sub-batch" of the
whole batch must reproduce the whole batch's terms exactly; the per-example
shares must add up to a sub-batch's own model; and the predicted error of
a sub-batch's learning rate must match random sub-batches.

``adaptive_trace.py --next-batch`` uses the same terms on the next batch;
its rows are checked against ``fo.kfac()`` itself and ``jax.grad``.
"""

import os
import sys

from absl.testing import absltest
import jax
import numpy as np
import optax

import fisher_optax as fo

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'benchmarks'))
import adaptive_trace  # noqa: E402  pylint: disable=g-import-not-at-top
import sub_batch_model  # noqa: E402  pylint: disable=g-import-not-at-top
from study import tasks  # noqa: E402  pylint: disable=g-import-not-at-top


class SubBatchModelTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.task = tasks.TASKS['regression']('quick')
    n = cls.task.batch_size
    cls.sizes = [n, n // 4]
    (cls.rows, cls.losses, cls.learning_rates,
     cls.per_example) = sub_batch_model.trace(cls.task, 0, 3, cls.sizes)

  def test_first_step_is_the_libraries_model(self):
    damping, norm, b, c = self.rows[0, :4]
    np.testing.assert_allclose(self.learning_rates[0],
                               b / (c + damping * norm), rtol=1e-4)

  def test_the_whole_batch_as_a_sub_batch(self):
    # Two computations of the same model: equal up to rounding, at the
    # scale of each column.
    scale = np.abs(self.rows[:, 2:4]).max(axis=0)
    np.testing.assert_allclose(self.rows[:, 4:6] / scale,
                               self.rows[:, 2:4] / scale, atol=1e-5)
    table = sub_batch_model.summarise('regression', self.rows, self.losses,
                                      self.sizes, self.task.batch_size)
    whole = [row for row in table if row[1] == f'{self.sizes[0]}/'
             f'{self.task.batch_size}']
    self.assertLen(whole, 2)
    for row in whole:
      self.assertEqual(row[3], '1.00')  # median ratio
      self.assertEqual(row[5], '0%')  # > 2x

  def test_per_example_terms_are_the_sub_batches(self):
    """The whole batch's per-example shares, summed over the first ``m``
    examples and rescaled to a mean over ``m``, are the sub-batch's own
    model (its own forward pass): the loss is separable over examples."""
    batch, m = self.task.batch_size, self.sizes[1]
    want = self.per_example[:, :, :m].sum(-1) * batch / m
    scale = np.abs(want).max(axis=0)
    np.testing.assert_allclose(self.rows[:, 6:8] / scale, want / scale,
                               atol=1e-5)
    np.testing.assert_allclose(self.per_example.sum(-1), self.rows[:, 2:4],
                               rtol=1e-5)

  def test_predicted_error_against_sampling(self):
    """The first-order prediction against random half-batches, drawn
    without replacement, of one step's per-example terms. At a half the
    finite-population factor is 0.5: leaving it out is 41% off."""
    b_n, c_n = self.per_example[1]
    damped = self.rows[1, 0] * self.rows[1, 1]
    batch = b_n.size
    m = batch // 2
    rng = np.random.default_rng(0)
    picks = np.argsort(rng.random((20000, batch)), axis=1)[:, :m]
    alpha = b_n.sum() / (c_n.sum() + damped)
    sub = b_n[picks].sum(1) / (c_n[picks].sum(1) + damped * m / batch)
    sampled = np.std(sub / alpha)
    predicted = sub_batch_model.predicted_error(b_n, c_n, np.asarray(damped),
                                                m)
    self.assertGreater(sampled, 1e-3)
    np.testing.assert_allclose(predicted, sampled, rtol=0.1)

  def test_a_quarter_differs(self):
    self.assertFalse(np.allclose(self.rows[:, 6:8], self.rows[:, 2:4]))


class NextBatchTest(absltest.TestCase):

  def test_rows_against_fo_kfac_and_jax_grad(self):
    """The first two steps' terms on the own and the next batch: the slope
    along Delta from ``jax.grad``, Delta from ``fo.kfac()``'s own update
    (``-update / alpha`` on the first step, with no previous update; then
    ``(mu delta - update) / alpha``), and the loss changes."""
    task = tasks.TASKS['regression']('quick')
    rows = adaptive_trace.next_batch(task, 0, 2)
    step_fn = fo.linen.value_grad_and_stats(task.loss_fn)
    batches = [b for _, b in zip(range(3), task.batches(0))]
    params = task.init(0)
    layers = jax.eval_shape(lambda p: step_fn(p, *batches[0]), params)[2]
    tx = fo.kfac(layers=layers, loss_reduction=task.loss_reduction)
    state = tx.init(params)
    delta = None
    vdot = lambda u, v: sum(float(np.vdot(a, b)) for a, b in zip(
        jax.tree.leaves(u), jax.tree.leaves(v)))

    @jax.jit
    def step(params, state, *batch):
      _, grads, stats = step_fn(params, *batch)
      return tx.update(grads, state, params, layer_stats=stats)

    for t in range(2):
      update, state = step(params, state, *batches[t])
      alpha, mu = float(state.learning_rate), float(state.momentum)
      direction = jax.tree.map(
          lambda u, d, a=alpha, m=mu: (m * d - u) / a, update,
          delta if delta is not None else jax.tree.map(np.zeros_like, update))
      new = optax.apply_updates(params, update)
      want = []
      for b in (batches[t], batches[t + 1]):
        want.append(vdot(jax.grad(task.loss_fn)(params, *b), direction))
      want += [float(task.loss_fn(new, *batches[t + 1])
                     - task.loss_fn(params, *batches[t + 1])),
               float(task.loss_fn(new, *batches[t])
                     - task.loss_fn(params, *batches[t]))]
      got = rows[t, [3, 5, 7, 8]]
      np.testing.assert_allclose(got, want, rtol=1e-3,
                                 atol=1e-4 * np.max(np.abs(want)))
      params, delta = new, update


if __name__ == '__main__':
  absltest.main()
