"""``benchmarks/sub_batch_model.py`` recomputes the adaptive step's model.

Its whole-batch terms are computed by hand (``task.outputs`` and
``task.outputs_loss``, not the capture step's linearization), so they are
checked against the library's own choice: on the first step there is no
previous update, and the learning rate is the 1-D minimiser
:math:`b / (C + \\lambda \\lVert\\Delta\\rVert^2)`. A "sub-batch" of the
whole batch must reproduce the whole batch's terms exactly; the per-example
shares must add up to a sub-batch's own model; and the predicted error of
a sub-batch's learning rate must match random sub-batches.
"""

import os
import sys

from absl.testing import absltest
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'benchmarks'))
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


if __name__ == '__main__':
  absltest.main()
