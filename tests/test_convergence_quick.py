"""CI run of ``benchmarks/convergence.py --quick``.

Every optimizer of the study (kfac-jax too when the ``kfac`` extra is
installed) takes 20 steps on every task at the quick size; the script fails
unless each one's validation loss goes down. There is no timing
assertion.
"""

import math
import os
import sys
import tempfile
import types
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'benchmarks'))
import convergence  # noqa: E402  pylint: disable=g-import-not-at-top
from study import optimizers as optimizers_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from study import runner  # noqa: E402  pylint: disable=g-import-not-at-top
from study import tasks as tasks_lib  # noqa: E402  pylint: disable=g-import-not-at-top


class ConvergenceQuickTest(parameterized.TestCase):

  # One test per task, so that pytest-xdist spreads them over the workers.
  @parameterized.parameters(*tasks_lib.TASKS)
  def test_every_optimizer_reduces_the_loss(self, task):
    self.assertEqual(convergence.main(['--quick', '--task', task]), 0)

  def test_an_optimizer_that_does_not_train_fails(self):
    # Adam with a huge eps barely moves: the check must say so.
    failures = runner.quick(['adam:eps=1e30'], ['regression'])
    self.assertEqual(failures, ['regression/adam:eps=1e30'])

  def test_every_seed_is_checked(self):
    failures = runner.quick(['adam:eps=1e30', 'adam'], ['regression'],
                            seeds=(0, 2))
    self.assertEqual(failures, ['regression/adam:eps=1e30',
                                'regression/adam:eps=1e30@2'])


class CacheTest(absltest.TestCase):

  def test_a_changed_default_makes_a_cached_run_stale(self):
    self.assertFalse(optimizers_lib.same_defaults(
        {'b1': '0.9', 'stats_every': '10'},
        {'b1': '0.9', 'stats_every': '1'}))

  def test_an_added_or_removed_option_does_not(self):
    self.assertTrue(optimizers_lib.same_defaults(
        {'b1': '0.9', 'gone': "'x'"}, {'b1': '0.9', 'new_option': 'None'}))

  def test_every_spec_records_its_factory_defaults(self):
    got = optimizers_lib.resolved_defaults('adafisher:mode=reference')
    self.assertNotIn('mode', got)
    self.assertNotIn('damping', got)
    self.assertEqual(got['stats_every'], '10')


class MergeProfilesTest(absltest.TestCase):

  SAVED = {'settings': {'adam': [1e-3, None], 'kfac': [1e-3, 1e-2]},
           'profiles': {'adam': [1.0, 3.0], 'kfac': [4.0, 8.0]}}

  def test_a_later_profile_keeps_its_ratio_and_the_older_ones(self):
    # This run's machine is twice as fast: Adam 1 s a step, EKFAC 5 s.
    merged = runner.merge_profiles(
        self.SAVED, {'adam': (1e-3, None), 'ekfac': (1e-2, 1e-1)},
        {'adam': [0.5, 1.5], 'ekfac': [4.0, 6.0]})
    self.assertEqual(merged['profiles']['adam'], [1.0, 3.0])
    self.assertEqual(merged['profiles']['kfac'], [4.0, 8.0])
    self.assertEqual(merged['profiles']['ekfac'], [8.0, 12.0])
    self.assertEqual(merged['rescaled'], {'ekfac': 2.0})
    self.assertEqual(merged['settings']['ekfac'], (1e-2, 1e-1))

  def test_profiling_every_spec_again_replaces_them_all(self):
    merged = runner.merge_profiles(
        {**self.SAVED, 'rescaled': {'kfac': 2.0}},
        {'adam': (1e-3, None), 'kfac': (1e-3, 1e-2)},
        {'adam': [0.5, 1.5], 'kfac': [4.0, 6.0]})
    self.assertEqual(merged['profiles']['adam'], [0.5, 1.5])
    self.assertEqual(merged['profiles']['kfac'], [4.0, 6.0])
    self.assertEqual(merged['rescaled'], {})

  def test_the_file_describes_its_baseline_run_and_each_later_one(self):
    first = {'period': 100, 'repeats': 2, 'date': '2026-01-01'}
    later = {'period': 40, 'repeats': 3, 'date': '2026-02-01'}
    saved = runner.merge_profiles(
        {'settings': {}, 'profiles': {}}, dict(self.SAVED['settings']),
        dict(self.SAVED['profiles']), first)
    self.assertEqual(saved['period'], 100)
    merged = runner.merge_profiles(
        saved, {'adam': (1e-3, None), 'ekfac': (1e-2, 1e-1)},
        {'adam': [0.5, 1.5], 'ekfac': [4.0, 6.0]}, later)
    # The baseline (and kfac) were profiled in the first run.
    self.assertEqual((merged['period'], merged['repeats']), (100, 2))
    self.assertEqual(merged['rescaled_runs'], {'ekfac': later})
    # Profiling everything again makes this run the file's run.
    again = runner.merge_profiles(
        merged, {'adam': (1e-3, None), 'kfac': (1e-3, 1e-2),
                 'ekfac': (1e-2, 1e-1)},
        {'adam': [1.0], 'kfac': [2.0], 'ekfac': [3.0]}, later)
    self.assertEqual(again['period'], 40)
    self.assertEqual(again['rescaled_runs'], {})

  def test_a_later_profile_needs_the_baseline(self):
    with self.assertRaisesRegex(ValueError, "'adam'"):
      runner.merge_profiles(self.SAVED, {'ekfac': (1e-2, 1e-1)},
                            {'ekfac': [4.0, 6.0]})


class FixedTest(absltest.TestCase):

  def test_fixed_runs_only_its_own_setting(self):
    runs = []

    class FakeStudy(runner.Study):

      def run(self, spec, lr, damping, seed):
        runs.append((spec, lr, damping, seed))
        return {}

    with (mock.patch.object(runner, 'Study', FakeStudy),
          tempfile.TemporaryDirectory() as cache):
      convergence.main(['--task', 'regression', '--optimizers', 'kfac',
                        '--fixed', '0.1,0.01', '--seeds', '2',
                        '--cache', cache])
    self.assertEqual(set(runs), {('kfac', 0.1, 0.01, 0),
                                 ('kfac', 0.1, 0.01, 1)})


class TuneTest(parameterized.TestCase):
  """The sweep protocol on a made-up validation loss, without training."""

  def _tune(self, best_damping):
    # A bowl in (log lr, log damping) whose best learning rate grows with
    # the damping (lr / damping fixed, as for a curvature method's flat
    # directions); twice that learning rate diverges.
    def run(spec, lr, damping, seed):
      del spec, seed
      best_lr = 1e-2 * damping
      loss = (1 + (math.log10(damping / best_damping)) ** 2
              + 0.1 * math.log10(lr / best_lr) ** 2)
      tried.append((lr, damping))
      return {'diverged': lr > 2 * best_lr,
              'final': {'validation': {'loss': loss}}}
    tried = []
    study = object.__new__(runner.Study)
    study.task = types.SimpleNamespace(lr_centre={'kronecker': 1e-4})
    study.run = run
    return study.tune('kfac'), tried

  @parameterized.parameters(1e-4, 1e-2, 10.0)
  def test_finds_an_interior_best(self, best_damping):
    (lr, damping), tried = self._tune(best_damping)
    self.assertEqual(damping, best_damping)
    self.assertAlmostEqual(lr, 1e-2 * best_damping)
    dampings = sorted({d for _, d in tried})
    self.assertLess(dampings[0], best_damping)
    self.assertGreater(dampings[-1], best_damping)

  def test_stops_at_the_largest_damping(self):
    # Summed losses want dampings far above a mean's: the search goes on
    # to 100 while the largest wins, and no further.
    (_, damping), tried = self._tune(1e4)
    self.assertEqual(damping, 100.0)
    self.assertEqual(max(d for _, d in tried), 100.0)


if __name__ == '__main__':
  absltest.main()
