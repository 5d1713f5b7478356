"""``benchmarks/sub_batch_model.py`` recomputes the adaptive step's model.

Its whole-batch terms are computed by hand (``task.outputs`` and
``task.outputs_loss``, not the capture step's linearization), so they are
checked against the library's own choice: on the first step there is no
previous update, and the learning rate is the 1-D minimiser
:math:`b / (C + \\lambda \\lVert\\Delta\\rVert^2)`. A "sub-batch" of the
whole batch must reproduce the whole batch's terms exactly.
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
    cls.rows, cls.losses, cls.learning_rates = sub_batch_model.trace(
        cls.task, 0, 3, cls.sizes)

  def test_first_step_is_the_libraries_model(self):
    damping, norm, b, c = self.rows[0, :4]
    np.testing.assert_allclose(self.learning_rates[0],
                               b / (c + damping * norm), rtol=1e-4)

  def test_the_whole_batch_as_a_sub_batch(self):
    np.testing.assert_allclose(self.rows[:, 4:6], self.rows[:, 2:4],
                               rtol=1e-6)
    table = sub_batch_model.summarise('regression', self.rows, self.losses,
                                      self.sizes, self.task.batch_size)
    whole = [row for row in table if row[1] == f'{self.sizes[0]}/'
             f'{self.task.batch_size}']
    self.assertLen(whole, 2)
    for row in whole:
      self.assertEqual(row[3], '1.00')  # median ratio
      self.assertEqual(row[5], '0%')  # > 2x

  def test_a_quarter_differs(self):
    self.assertFalse(np.allclose(self.rows[:, 6:8], self.rows[:, 2:4]))


if __name__ == '__main__':
  absltest.main()
