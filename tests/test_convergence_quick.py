"""CI run of ``benchmarks/convergence.py --quick``.

Every optimizer of the study (kfac-jax too when the ``kfac`` extra is
installed) takes 20 steps on every task at the quick size; the script fails
unless each one's validation loss goes down. There is no timing
assertion.
"""

import os
import sys

from absl.testing import absltest
from absl.testing import parameterized

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'benchmarks'))
import convergence  # noqa: E402  pylint: disable=g-import-not-at-top


class ConvergenceQuickTest(parameterized.TestCase):

  # One test per task, so that pytest-xdist spreads them over the workers.
  @parameterized.parameters(*convergence.tasks_lib.TASKS)
  def test_every_optimizer_reduces_the_loss(self, task):
    self.assertEqual(convergence.main(['--quick', '--task', task]), 0)

  def test_an_optimizer_that_does_not_train_fails(self):
    # Adam with a huge eps barely moves: the check must say so.
    failures = convergence.quick(['adam:eps=1e30'], ['regression'])
    self.assertEqual(failures, ['regression/adam:eps=1e30'])


class CacheTest(absltest.TestCase):

  def test_a_changed_default_makes_a_cached_run_stale(self):
    self.assertFalse(convergence.same_defaults(
        {'b1': '0.9', 'stats_every': '10'},
        {'b1': '0.9', 'stats_every': '1'}))

  def test_an_added_or_removed_option_does_not(self):
    self.assertTrue(convergence.same_defaults(
        {'b1': '0.9', 'gone': "'x'"}, {'b1': '0.9', 'new_option': 'None'}))

  def test_every_spec_records_its_factory_defaults(self):
    got = convergence.resolved_defaults('adafisher:mode=reference')
    self.assertNotIn('mode', got)
    self.assertNotIn('damping', got)
    self.assertEqual(got['stats_every'], '10')


if __name__ == '__main__':
  absltest.main()
