"""Several processes of one JAX job equal one process on one device.

``examples/multi_process/launch.py`` starts two processes of JAX's
distributed runtime on this machine (2 forced CPU devices each, 4 global
devices, CPU collectives over 127.0.0.1), each running
``tests/_multi_process_worker.py``; the tests read what the processes saved.
The default selection checks K-FAC under every way of using the devices,
an Orbax checkpoint written by both processes, a dead process and data
that differ between the processes; ``-m slow`` runs every optimizer.

Tolerances are relative to each compared array's largest entry: the four
devices reduce the batch in another order than one device, and an inverse
amplifies that rounding by the factor's condition number (most for the
eigenvalue-corrected forms, through their division by the scaling).
"""

import importlib.util
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any
import unittest

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytest

import _fast_compile

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKER = pathlib.Path(__file__).resolve().parent / '_multi_process_worker.py'
_spec = importlib.util.spec_from_file_location(
    'multi_process_launch', ROOT / 'examples' / 'multi_process' / 'launch.py')
launch = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = launch  # dataclasses look their module up
_spec.loader.exec_module(launch)

ALL = ('adafisher', 'adafisherw', 'adafisher_reference', 'kfac', 'ekfac',
       'tkfac', 'tekfac', 'mini_block_fisher', 'kfac_adaptive_ggn')
SPREAD = ('kfac', 'ekfac', 'tkfac', 'tekfac', 'mini_block_fisher')
# Seen when written: at most 1.2e-5 of a leaf's largest entry (EKFAC's and
# TEKFAC's up to 6e-4, their momentum after the division by the scaling).
RTOL = {'ekfac': 1e-3, 'tekfac': 1e-3}
DEFAULT_RTOL = 1e-4
# Eigenbases are unique only up to rotations within repeated eigenvalues
# (the many zero ones of a factor of rank below its size), so they are
# compared through the parameters and the rest of the state, not entrywise.
NOT_UNIQUE = ('_vecs',)


def env(**extra: str) -> dict[str, str]:
  return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep
              + os.environ.get('PYTHONPATH', ''), **extra)


def run_job(group: str, names: str, out_dir: str, timeout: float = 900,
            extra_env: dict[str, str] | None = None,
            **kwargs) -> list[dict[str, np.ndarray]]:
  """Runs the worker as two processes; what each saved."""
  launch.launch([sys.executable, str(WORKER), group, out_dir, names],
                processes=2, local_devices=2, timeout=timeout,
                env=env(**(extra_env or {})), log_dir=out_dir, **kwargs)
  return [load(os.path.join(out_dir, f'{group}_{i}.npz')) for i in range(2)]


def load(path: str) -> dict[str, np.ndarray]:
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


def leaves(results: dict[str, np.ndarray], prefix: str) -> dict[str, Any]:
  return {k[len(prefix):]: v for k, v in results.items()
          if k.startswith(prefix)}


def assert_same(test, got, want, rtol, what):
  """Same keys; float leaves within rtol of each leaf's scale, ints exact."""
  test.assertEqual(sorted(got), sorted(want), what)
  test.assertNotEmpty(want)
  for key, ref in want.items():
    if any(s in key for s in NOT_UNIQUE):
      continue
    if ref.dtype.kind == 'f':
      scale = float(np.max(np.abs(ref))) if ref.size else 0.0
      np.testing.assert_allclose(got[key], ref, rtol=rtol,
                                 atol=rtol * scale, err_msg=f'{what} {key}')
    else:
      np.testing.assert_array_equal(got[key], ref, err_msg=f'{what} {key}')


class _EqualityTest(parameterized.TestCase):
  NAMES: tuple[str, ...] = ()
  results: list[dict[str, np.ndarray]] = []

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    if not cls.NAMES:
      raise unittest.SkipTest('the base class runs no job')
    cls.results = run_job('equality', ','.join(cls.NAMES), tempfile.mkdtemp())

  # One test method per class: pytest-xdist would start a job per method.
  def test_every_mode(self):
    first, second = self.results
    np.testing.assert_array_equal(first['facts/devices'], [2, 4, 2])
    for name in self.NAMES:
      modes = ['jit', 'typed', 'shard_map', 'fsdp']
      if name in SPREAD:
        modes += ['spread_jit', 'spread_shard_map']
      want = leaves(first, f'single/{name}/')
      for mode in modes:
        with self.subTest(mode, optimizer=name):
          # [0] are the parameters, [1] the optimizer state.
          assert_same(self, leaves(first, f'{mode}/{name}/'), want,
                      RTOL.get(name, DEFAULT_RTOL), f'{mode} {name}')
    with self.subTest('both processes hold the same values'):
      self.assertEqual(sorted(first), sorted(second))
      for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)


class EqualityTest(_EqualityTest):
  """K-FAC and AdaFisher's reference mode in every mode.

  Regression for the latter: under shard_map its output-side factors were
  pmean-ed from each replica's own mean loss, devices**2 times the whole
  batch's, and its parameters drifted 2.4% from one device's in 5 steps.
  """
  NAMES = ('kfac', 'adafisher_reference')


@pytest.mark.slow
class EqualityEveryOptimizerTest(_EqualityTest):
  """Every other optimizer, every mode."""
  NAMES = tuple(n for n in ALL if n not in EqualityTest.NAMES)


class CheckpointTest(parameterized.TestCase):
  """Orbax from both processes; restored onto fo.state_shardings targets."""
  NAMES = ('kfac',)

  def test_resume_is_bitwise_and_restores_on_one_process(self):
    out = tempfile.mkdtemp()
    first, _ = run_job('checkpoint', ','.join(self.NAMES), out)
    # 2 -> 1: one process, one device, restores the two processes' files.
    proc = subprocess.run(
        [sys.executable, str(WORKER), 'restore', out, ','.join(self.NAMES)],
        env=env(JAX_PLATFORMS='cpu',
                XLA_FLAGS=_fast_compile.xla_flags(base='')),
        capture_output=True, text=True, timeout=600, check=False)
    self.assertIn('WORKER OK', proc.stdout, proc.stdout[-2000:]
                  + proc.stderr[-4000:])
    one = load(os.path.join(out, 'restore_0.npz'))
    for name in self.NAMES:
      with self.subTest(optimizer=name):
        self.assertTrue(bool(first[f'facts/layout_kept/{name}']))
        straight = leaves(first, f'straight/{name}/')
        resumed = leaves(first, f'resumed/{name}/')
        self.assertEqual(sorted(straight), sorted(resumed))
        for key in straight:
          np.testing.assert_array_equal(resumed[key], straight[key],
                                        err_msg=f'resumed {name} {key}')
        assert_same(self, leaves(one, f'restored/{name}/'), straight,
                    RTOL.get(name, DEFAULT_RTOL), f'restored on 1 {name}')


@pytest.mark.slow
class CheckpointEveryOptimizerTest(CheckpointTest):
  NAMES = tuple(n for n in ALL if n != 'kfac')


class FaultTest(parameterized.TestCase):
  """A dead process, and data that differ between the processes."""

  def test_dead_process_ends_the_job(self):
    out = tempfile.mkdtemp()
    start = time.monotonic()
    with self.assertRaisesRegex(launch.JobFailed,
                                r'process 1 of 2 exited with code 17') as e:
      run_job('die', 'kfac', out, timeout=600)
    self.assertLess(time.monotonic() - start, 300)
    survivor = e.exception.results[0]
    self.assertIn('process 0: step 2 done', survivor.output())
    self.assertNotIn('WORKER OK', survivor.output())

  def test_survivor_fails_on_its_own(self):
    """Without the launcher's help JAX ends the survivor: no hang.

    The survivor waits in the step's collective until the coordination
    service misses the dead process's heartbeats, then JAX terminates it.
    """
    out = tempfile.mkdtemp()
    start = time.monotonic()
    with self.assertRaises(launch.JobFailed) as e:
      run_job('die', 'kfac', out, timeout=600, stop_on_failure=False,
              extra_env={'FO_HEARTBEAT_TIMEOUT': '10'})
    elapsed = time.monotonic() - start
    survivor = e.exception.results[0]
    self.assertIsNotNone(survivor.returncode, 'process 0 hung')
    self.assertNotEqual(survivor.returncode, 0)
    self.assertIn('Task 1 heartbeat timeout', survivor.output())
    self.assertIn('another task died', survivor.output())
    self.assertLess(elapsed, 120)

  def test_divergent_data_is_caught(self):
    first, second = run_job('divergent', 'kfac', tempfile.mkdtemp())
    for results in (first, second):
      # JAX itself refuses differing host data in device_put ...
      self.assertIn('not the same on each process',
                    str(results['facts/jax_device_put_error']))
      # ... but runs these; fo.assert_replicated names what drifted.
      for how in ('jit', 'local_data'):
        message = str(results[f'facts/divergent_error/{how}'])
        self.assertIn('assert_replicated', message)
        self.assertIn('processes 0 and 1', message)
        # The Kronecker factors and the parameters are named.
        self.assertRegex(message, r"\['A'\]|\['G'\]")
        self.assertIn("['params']['Dense_0']['kernel']", message)
        self.assertIn('make_array_from_process_local_data', message)
      message = str(results['facts/local_divergent_error'])
      self.assertRegex(message, r"\['w'\] \(devices \d+ and \d+: relative "
                       r'difference 1\)')


class RecipeTest(parameterized.TestCase):
  """docs/multi_device.md's several-hosts recipe, as a user would run it."""

  def test_train_resume(self):
    out = tempfile.mkdtemp()
    command = [sys.executable,
               str(ROOT / 'examples' / 'multi_process' / 'train_cnn.py'),
               '--batch', '64', '--checkpoint-dir', os.path.join(out, 'ckpt'),
               '--checkpoint-every', '2']
    first = launch.launch(command + ['--steps', '4'], log_dir=out,
                          timeout=600, env=env())
    # A second job resumes from the newest checkpoint (step 4).
    second = launch.launch(command + ['--steps', '6'], log_dir=out,
                           timeout=600, env=env())
    for results in (first, second):
      for r in results:
        self.assertIn(f'process {r.process_id} of 2: done', r.output())
    self.assertEqual(sorted(os.listdir(os.path.join(out, 'ckpt'))),
                     ['2', '4', '6'])
    losses = [r.output().rsplit('final loss ', 1)[1].split()[0]
              for r in second]
    self.assertEqual(losses[0], losses[1])
    self.assertTrue(np.isfinite(float(losses[0])))


def alive(pid: str) -> bool:
  """Whether a process runs (a zombie waiting for init to reap it: no)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except FileNotFoundError:
    return False


class LauncherTest(parameterized.TestCase):
  """The launcher's own guarantees, on plain Python children (no JAX)."""

  def test_environment(self):
    code = ('import os; print(os.environ["FO_PROCESS_ID"], '
            'os.environ["FO_NUM_PROCESSES"], '
            'os.environ["JAX_COORDINATOR_ADDRESS"], os.environ["XLA_FLAGS"])')
    results = launch.launch([sys.executable, '-c', code], processes=3,
                            local_devices=2, timeout=60)
    lines = [r.output().split() for r in results]
    self.assertEqual([line[:2] for line in lines],
                     [['0', '3'], ['1', '3'], ['2', '3']])
    self.assertEqual(len({line[2] for line in lines}), 1)
    self.assertTrue(lines[0][2].startswith('127.0.0.1:'))
    self.assertIn('--xla_force_host_platform_device_count=2',
                  ' '.join(lines[0][3:]))

  def test_failure_stops_the_others_and_their_children(self):
    # Process 0 starts a grandchild and sleeps; process 1 fails at once.
    code = ('import os, subprocess, sys, time\n'
            'if os.environ["FO_PROCESS_ID"] == "1": sys.exit(3)\n'
            'p = subprocess.Popen([sys.executable, "-c", '
            '"import time; time.sleep(120)"])\n'
            'print(p.pid, flush=True); time.sleep(120)\n')
    start = time.monotonic()
    with self.assertRaisesRegex(launch.JobFailed,
                                r'process 1 of 2 exited with code 3; '
                                r'stopped process\(es\) \[0\]') as e:
      launch.launch([sys.executable, '-c', code], processes=2,
                    local_devices=None, timeout=60, grace=2)
    self.assertLess(time.monotonic() - start, 30)
    pids = e.exception.results[0].output().split()
    time.sleep(0.5)
    for pid in pids:  # the grandchild is gone too (or never started)
      self.assertFalse(alive(pid), pid)

  def test_timeout_stops_everything(self):
    start = time.monotonic()
    with self.assertRaisesRegex(launch.JobFailed, 'time limit of 2 s'):
      launch.launch([sys.executable, '-c', 'import time; time.sleep(60)'],
                    processes=2, local_devices=None, timeout=2, grace=1)
    self.assertLess(time.monotonic() - start, 20)


if __name__ == '__main__':
  absltest.main()
