"""``benchmarks/curvature_scale.py`` against factors computed by hand."""

import os
import sys

from absl.testing import absltest
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'benchmarks'))
import curvature_scale  # noqa: E402  pylint: disable=g-import-not-at-top
from study import tasks as tasks_lib  # noqa: E402  pylint: disable=g-import-not-at-top


class FactorScalesTest(absltest.TestCase):

  def test_regression_against_closed_forms(self):
    # The quick regression: y = MLP(x), loss mean (pred - y)^2. At learning
    # rate 0 the parameters stay put, so K-FAC's average over 3 batches
    # (weight 1, then 1 - 0.95) of the first layer's A = E[[x, 1][x, 1]^T]
    # and of the output layer's G = E[(d loss_n / d pred_n)^2] =
    # E[4 (pred - y)^2] has closed forms.
    task = tasks_lib.TASKS['regression']('quick')
    steps = 3
    got = curvature_scale.factor_scales(task, steps)
    params = task.init(0)
    batches = task.batches(0)
    a_mean = g_mean = 0.0
    for count in range(steps):
      xb, yb = next(batches)
      xb, yb = np.asarray(xb, np.float64), np.asarray(yb, np.float64)
      pred = np.asarray(task.model.apply({'params': params}, xb), np.float64)
      a = (np.mean(np.sum(xb ** 2, axis=1)) + 1.0) / (xb.shape[1] + 1)
      g = np.mean(4.0 * (pred - yb) ** 2)
      weight = 1.0 if count == 0 else 0.05
      a_mean = (1 - weight) * a_mean + weight * a
      g_mean = (1 - weight) * g_mean + weight * g
    layers = sorted(got)
    np.testing.assert_allclose(got[layers[0]][0], a_mean, rtol=1e-4)
    np.testing.assert_allclose(got[layers[-1]][1], g_mean, rtol=1e-4)

  def test_table_ratio(self):
    text = curvature_scale.table(
        [('toy', {'a': (2.0, 0.5), 'b': (1.0, 3.0), 'c': (1.0, 0.1)},
          {'kfac': 0.2})])
    # Layer scales 1, 3, 0.1: median 1, so the ratio is the damping.
    self.assertIn('| toy | 3 | 1 | 0.1 | 3 | 0.2 (0.2) | — |', text)


if __name__ == '__main__':
  absltest.main()
