"""benchmarks/study/report.py on synthetic run records.

The records' training curves are step functions (``hi`` up to step
``drop``, ``lo`` after it) in blocks of 2 steps over 200 steps, so the
trailing window is 5 blocks, the final loss is the mean over the last 10
blocks, and the step where a run reaches a target is worked out by hand:
with ``j`` blocks of ``lo`` in the window its mean is
``((5 - j) * hi + j * lo) / 5``.
"""

import json
import math
import os
import sys
import tempfile

from absl.testing import absltest
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'benchmarks'))
from study import report  # noqa: E402  pylint: disable=g-import-not-at-top

STEPS = 200
BLOCK = 2


def record(task='cnn', optimizer='adam', lr=1e-3, damping=None, seed=0,
           steps=STEPS, hi=1.0, lo=0.4, drop=100, step_s=0.01, val=1.0,
           acc=0.96, diverged=False):
  """A run whose block-mean training loss is ``hi`` to ``drop``, then lo."""
  done = 20 if diverged else steps
  step = list(range(BLOCK, done + 1, BLOCK))
  loss = [hi if s <= drop else lo for s in step]
  if diverged:
    loss[-1] = 1e9
  return {
      'task': task, 'size': 'full', 'optimizer': optimizer, 'lr': lr,
      'damping': damping, 'seed': seed, 'steps': steps,
      'budget_seconds': 0.0, 'steps_done': done, 'diverged': diverged,
      'curve': {'step': step, 'loss': loss,
                'seconds': [round(step_s * s, 4) for s in step]},
      'eval': {'step': [0, done], 'seconds': [0.0, step_s * done],
               'loss': [2.0, math.inf if diverged else val]},
      'final': {
          'validation': {'loss': math.inf if diverged else val},
          'test': ({'loss': math.inf} if diverged
                   else {'loss': val + 0.1, 'accuracy': acc}),
      },
      'step_seconds_median': step_s, 'step_seconds_mean': step_s,
      'compile_seconds': 1.0, 'jax': '0.test', 'backend': 'cpu',
      'machine': 'x86_64', 'xla_flags': '', 'batch_size': 64,
      'date': '2025-01-01',
  }


def cnn_records():
  """Adam, a faster K-FAC, a partly reaching MBF, a never, a diverged."""
  rs = []
  # Adam's best (validation 1.0). Final losses 0.4, 0.4, 0.7: target 0.5.
  # Seeds 0 and 1 need all 5 blocks of 0.4 in the window (4 give 0.52):
  # steps 110 and 130 (mean 120), seconds 1.1 and 1.3 (mean 1.2); seed 2
  # never gets below 0.7.
  rs.append(record(seed=0, drop=100))
  rs.append(record(seed=1, drop=120))
  rs.append(record(seed=2, drop=100, lo=0.7))
  # Lower training loss but higher validation loss: not chosen.
  rs.append(record(lr=1e-2, val=2.0, lo=0.1, drop=10))
  rs.append(record(lr=3e-3, diverged=True))
  # The best validation loss, but of seed 1: the sweep is seed 0's.
  rs.append(record(lr=3e-4, seed=1, val=0.5, lo=0.1, drop=10))
  # K-FAC: 4 blocks of 0.3 give 0.44 <= 0.5 (3 give 0.58): step 48, 0.96 s.
  kfac = dict(optimizer='kfac', lr=1e-2, damping=1e-3, drop=40, lo=0.3,
              step_s=0.02, val=0.8)
  for seed, acc in enumerate((0.97, 0.98, 0.99)):
    rs.append(record(seed=seed, acc=acc, **kfac))
  # Tie on validation loss with the chosen one: the smaller lr wins.
  rs.append(record(**dict(kfac, lr=3e-2, lo=0.05)))
  rs.append(record(**dict(kfac, damping=1e-1, val=0.9, lo=0.05)))
  # MBF: seeds reach at 70 and 90 (mean 80), seed 2 never.
  mbf = dict(optimizer='mbf', lr=1e-3, damping=1e-3, val=0.9, acc=0.95)
  rs.append(record(seed=0, drop=60, **mbf))
  rs.append(record(seed=1, drop=80, **mbf))
  rs.append(record(seed=2, drop=60, **dict(mbf, lo=0.6)))
  for seed in range(3):
    rs.append(record(optimizer='sgd_nesterov', lr=1e-2, seed=seed, lo=0.8,
                     val=1.5, acc=0.9))
  rs.append(record(optimizer='adafisher', damping=1e-3, diverged=True))
  # A variant: reaches at 28.
  rs.append(record(optimizer='kfac:stats_every=1', lr=1e-2, damping=1e-3,
                   drop=20, lo=0.3, val=0.85))
  # Another budget, which would win the sweep: ignored.
  rs.append(record(steps=50, val=0.1, lo=0.01, drop=2))
  return rs


def resnet_records():
  """Adam, tuned K-FAC, and K-FAC with no learning rate (fo.adaptive)."""
  rs = [record(task='resnet', seed=s) for s in range(3)]  # reach at 110
  rs += [record(task='resnet', optimizer='kfac', lr=1e-2, damping=1e-3,
                seed=s, val=0.8) for s in range(3)]
  # Reaches at 30 on every seed; validation 0.4 against K-FAC's 0.8.
  rs += [record(task='resnet', optimizer='kfac_adaptive', lr=None, seed=s,
                drop=20, lo=0.3, val=0.4) for s in range(3)]
  # Tuned MBF at 0.5; MBF with no learning rate at 0.6, never reaching.
  rs += [record(task='resnet', optimizer='mbf', lr=1e-3, damping=1e-4,
                seed=s, val=0.5) for s in range(3)]
  rs += [record(task='resnet', optimizer='mbf_adaptive', lr=None, seed=s,
                lo=0.9, val=0.6) for s in range(3)]
  return rs


def write(cache, records):
  for i, r in enumerate(records):
    folder = os.path.join(cache, r['task'])
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f'{i:03d}.json'), 'w') as f:
      json.dump(r, f)


class ConvergenceReportTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cache = os.path.join(cls.tmp, 'cache')
    cls.out = os.path.join(cls.tmp, 'results')
    regression = [record(task='regression', optimizer='kfac', lr=1e-2,
                         damping=1e-3, seed=s) for s in range(2)]
    write(cache, cnn_records() + regression + resnet_records())
    cls.summary = report.write_all(cache, cls.out)
    with open(os.path.join(cls.out, 'cnn.md')) as f:
      cls.cnn_md = f.read()
    with open(os.path.join(cls.out, 'summary.md')) as f:
      cls.summary_md = f.read()

  def test_adam_target_and_steps(self):
    adam = self.summary['cnn']['adam']
    self.assertEqual((adam['lr'], adam['damping']), (1e-3, None))
    self.assertAlmostEqual(adam['target'], 0.5, places=12)
    self.assertEqual((adam['reached'], adam['seeds']), (2, 3))
    self.assertAlmostEqual(adam['steps'], 120.0)
    self.assertAlmostEqual(adam['seconds'], 1.2, places=9)
    self.assertAlmostEqual(adam['steps_ratio'], 1.0)

  def test_faster_method_ratios(self):
    kfac = self.summary['cnn']['kfac']
    self.assertEqual((kfac['lr'], kfac['damping']), (1e-2, 1e-3))
    self.assertEqual((kfac['reached'], kfac['seeds']), (3, 3))
    self.assertAlmostEqual(kfac['steps'], 48.0)
    self.assertAlmostEqual(kfac['steps_ratio'], 0.4, places=12)
    self.assertAlmostEqual(kfac['seconds_ratio'], 0.8, places=9)
    self.assertAlmostEqual(kfac['step_time_ratio'], 2.0, places=12)
    self.assertAlmostEqual(kfac['metric_mean'], 98.0, places=9)
    self.assertAlmostEqual(kfac['metric_std'], 1.0, places=9)
    self.assertAlmostEqual(kfac['final_train_loss'], 0.3, places=12)
    self.assertIn('| kfac | 0.01 | 0.001 | 98.00 ± 1.0 | 0.9000 | 0.3000 | '
                  '48 (0.40) | 0.960 (0.80) | 2.00 | 3 |', self.cnn_md)

  def test_some_seeds_and_never(self):
    mbf = self.summary['cnn']['mbf']
    self.assertEqual((mbf['reached'], mbf['seeds']), (2, 3))
    self.assertAlmostEqual(mbf['steps'], 80.0)
    self.assertAlmostEqual(mbf['steps_ratio'], 80 / 120, places=12)
    self.assertIn('80 (0.67) 2/3', self.cnn_md)
    sgd = self.summary['cnn']['sgd_nesterov']
    self.assertEqual(sgd['reached'], 0)
    self.assertIsNone(sgd['steps_ratio'])
    self.assertIn('| sgd_nesterov | 0.01 | — | 90.00 ± 0.0 | 1.600 | '
                  '0.8000 | never | never |', self.cnn_md)

  def test_diverged_best(self):
    self.assertTrue(self.summary['cnn']['adafisher']['diverged'])
    self.assertIn('| adafisher | 0.001 | 0.001 | diverged | diverged | '
                  'diverged | diverged | diverged |', self.cnn_md)

  def test_main_table_sorted_by_metric(self):
    base = self.cnn_md.split('## Base optimizers')[1].split('## ')[0]
    order = [line.split('|')[1].strip() for line in base.splitlines()
             if line.startswith('| ') and '---' not in line][1:]
    self.assertEqual(order, ['kfac', 'adam', 'mbf', 'sgd_nesterov',
                             'adafisher'])

  def test_no_argument_table(self):
    row = self.summary['resnet']['kfac_adaptive']
    self.assertIsNone(row['lr'])
    self.assertAlmostEqual(row['steps'], 30)
    self.assertIn('## Optimizers without a learning rate', self.summary_md)
    # Columns cnn, regression, resnet: steps 30 / Adam's 110, seconds the
    # same ratio; validation 0.4 / tuned K-FAC's 0.8.
    self.assertIn('| kfac_adaptive | — | — | 0.27 / 0.27; 0.50 |',
                  self.summary_md)
    # Against tuned K-FAC (0.6 / 0.8) and against tuned MBF (0.6 / 0.5).
    self.assertIn('| mbf_adaptive | — | — | never; 0.75 (own 1.20) |',
                  self.summary_md)

  def test_variants_table(self):
    variants = self.cnn_md.split('## Variants')[1].split('## ')[0]
    self.assertIn('| kfac:stats_every=1 | 0.01 | 0.001 |', variants)
    self.assertIn('28 (0.23)', variants)
    base = self.cnn_md.split('## Base optimizers')[1].split('## ')[0]
    self.assertNotIn('stats_every', base)

  def test_other_budget_ignored(self):
    self.assertIn('1 cached runs of another budget', self.cnn_md)
    self.assertIn('19 runs of 200 steps', self.cnn_md)

  def test_sweep_table(self):
    sweep = self.cnn_md.split('## Sweep')[1]
    self.assertIn('| adam | 0.001 | — | 1.000 | * |', sweep)
    self.assertIn('| adam | 0.003 | — | diverged |  |', sweep)
    self.assertIn('| adam | 0.01 | — | 2.000 |  |', sweep)
    self.assertIn('| kfac | 0.01 | 0.001 | 0.8000 | * |', sweep)
    self.assertIn('| kfac | 0.03 | 0.001 | 0.8000 |  |', sweep)
    rows = [line for line in sweep.splitlines() if line.startswith('| kfac ')]
    self.assertEqual([r.split('|')[2:4] for r in rows],
                     [[' 0.01 ', ' 0.001 '], [' 0.03 ', ' 0.001 '],
                      [' 0.01 ', ' 0.1 ']])

  def test_task_without_adam(self):
    kfac = self.summary['regression']['kfac']
    self.assertIsNone(kfac['target'])
    self.assertIsNone(kfac['steps_ratio'])
    self.assertIn('| kfac | 0.40 / 0.80 | — |', self.summary_md)
    self.assertIn('| mbf | 0.67 / 0.67 (2/3) | — |', self.summary_md)
    self.assertIn('| sgd_nesterov | never | — |', self.summary_md)
    self.assertIn('| adafisher | diverged | — |', self.summary_md)
    self.assertIn('* regression: no Adam runs', self.summary_md)
    self.assertIn("* cnn: Adam's target 0.5 (final training loss), "
                  'reached in 120 steps, 1.20 s (2/3 seeds).',
                  self.summary_md)
    self.assertNotIn('stats_every', self.summary_md)

  def test_files(self):
    for name in ('cnn.md', 'cnn_steps.png', 'cnn_seconds.png',
                 'regression.md', 'regression_steps.png',
                 'regression_seconds.png', 'summary.md'):
      path = os.path.join(self.out, name)
      self.assertTrue(os.path.exists(path), name)
      if name.endswith('.png'):
        with open(path, 'rb') as f:
          self.assertEqual(f.read(8), b'\x89PNG\r\n\x1a\n')
        self.assertGreater(os.path.getsize(path), 5000)
    self.assertIn('](cnn_steps.png)', self.cnn_md)
    self.assertIn('python benchmarks/convergence.py --task cnn', self.cnn_md)


class CurveTest(absltest.TestCase):

  def test_trailing_mean_against_loop(self):
    r = record()
    r['curve']['loss'] = [float(v) for v in
                          np.random.default_rng(0).random(STEPS // BLOCK)]
    got = report.trailing_loss(r)
    loss = r['curve']['loss']
    window = 5  # 5% of 200 steps in blocks of 2.
    want = [np.mean(loss[max(0, i - window + 1):i + 1])
            for i in range(len(loss))]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)

  def test_final_loss_is_last_tenth(self):
    r = record()
    r['curve']['loss'] = [float(i) for i in range(STEPS // BLOCK)]
    # Blocks ending at 182..200 are indices 90..99.
    self.assertAlmostEqual(report.final_train_loss(r), 94.5)

  def test_profile_seconds_against_loop(self):
    profile = [0.5, 0.1, 0.1, 2.0]  # a refresh every 4 steps
    r = record()
    other = record(optimizer='kfac')
    report.apply_timing([r, other], {'adam': profile})
    for k, got in zip(r['curve']['step'], r['curve']['seconds']):
      want = sum(profile[i % len(profile)] for i in range(k))
      self.assertAlmostEqual(got, want, places=9)
    self.assertAlmostEqual(r['step_seconds_mean'], 0.675)
    self.assertNotIn('timing', other)  # no profile: keeps its seconds

  def test_damping_table_against_hand_values(self):
    runs = [record(optimizer='kfac', lr=1e-3, damping=1e-3, val=0.5),
            record(optimizer='kfac', lr=3e-3, damping=1e-3, val=0.4),
            record(optimizer='kfac', lr=1e-2, damping=1e-2, val=0.2),
            record(optimizer='kfac', lr=1e-2, damping=1e-2, val=0.1,
                   seed=1)]  # other seeds are not part of the sweep
    self.assertEqual(report.by_damping(runs),
                     {1e-3: (3e-3, 0.4), 1e-2: (1e-2, 0.2)})
    self.assertEqual(report.library_damping('kfac:stats_every=5'), 1e-2)
    self.assertIsNone(report.library_damping('adam'))
    table = report._damping_table(runs)  # pylint: disable=protected-access
    self.assertEqual(table[-1], '| kfac | 0.4000 @ 0.003 | '
                     '0.2000 @ 0.01 (default) | +0.0% |')
    # With the default's best above the tuned one, the gap is positive.
    runs[2]['final']['validation']['loss'] = 0.5
    table = report._damping_table(runs)  # pylint: disable=protected-access
    self.assertEqual(table[-1], '| kfac | 0.4000 @ 0.003 | '
                     '0.5000 @ 0.01 (default) | +25.0% |')


if __name__ == '__main__':
  absltest.main()
