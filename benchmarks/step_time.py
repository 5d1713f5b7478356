r"""Time of AdaFisher's jitted train step relative to Adam's.

For an MLP (784-512-512-10) and the small CNN of ``examples/mnist.py``, both
on random MNIST-shaped batches of 128, this times the jitted train step of

* ``optax.adam`` on ``jax.value_and_grad`` (the baseline),
* ``fisher_optax.adafisher`` on ``fisher_optax.linen.value_grad_and_stats``
  (capture included) in ``'paper'`` mode with ``stats_every`` 10 and 1, and
  in ``'reference'`` mode with ``stats_every`` 10,
* with ``--profile``, Adam fed by the capturing step (statistics computed and
  returned but unused): the cost of the capture alone.

All steps run side by side in one process, interleaved: every repeat times
one block of steps of each optimizer in turn (the order reversed on every
other repeat), so that machine drift hits all of them alike. Steps are timed
with ``jax.block_until_ready`` after warm-up and compilation. Each optimizer
keeps its own parameters and state, and always sees the same batch.

Two timings are reported:

* ``step``: only steps on which AdaFisher does not refresh its statistics
  (``count % 10 != 0``): each block runs ``--steps-per-block`` such steps, in
  segments that stop before every refresh step, which runs untimed. Adam and
  the capture-only step are timed with the same segments.
* ``amortised``: contiguous blocks of a multiple of 10 steps (at least
  ``--steps-per-block``), so each block holds whole statistics periods,
  refresh steps included. With ``stats_every=1`` every step refreshes.

``ratio`` is the median over repeats of the time per step divided by Adam's
in the same repeat and timing; ``ms/step`` is the median time per step.

Usage::

  python benchmarks/step_time.py [--repeats 10] [--steps-per-block 10]
      [--models mlp,cnn] [--no-donate] [--profile]
"""

import argparse
import dataclasses
import math
import platform
import statistics
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
import optax

import _common

BATCH = 128
LEARNING_RATE = 1e-4  # Irrelevant to timing; small to keep values finite.
PERIOD = 10  # Default stats_every; the 'step' timing skips these refreshes.


@dataclasses.dataclass
class Runner:
  """One optimizer's jitted step, with its own parameters and state."""

  label: str
  stats_every: int | None
  step: Callable[..., Any]
  params: Any
  opt_state: Any
  batch: tuple[np.ndarray, np.ndarray]
  count: int = 0
  out: Any = None
  compile_s: float = 0.0

  def run(self, n: int) -> None:
    for _ in range(n):
      self.params, self.opt_state, self.out = self.step(
          self.params, self.opt_state, *self.batch)
      self.count += 1

  def sync(self) -> None:
    jax.block_until_ready((self.params, self.opt_state, self.out))


def make_runners(model_name: str, donate: bool, profile: bool
                 ) -> list[Runner]:
  """Builds, compiles and warms up the steps timed for one model."""
  model = _common.MODELS[model_name]()
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(BATCH, 28, 28, 1)).astype(np.float32)
  y = rng.integers(0, 10, size=(BATCH,)).astype(np.int32)
  x, y = jax.device_put(x), jax.device_put(y)
  params = model.init(jax.random.key(0), x)['params']

  configs = [('adam', None, _common.make_adam_step, {})]
  if profile:
    configs.append(('adam + capture', None, _common.make_capture_adam_step,
                    {}))
  for mode, stats_every in (('paper', 10), ('paper', 1), ('reference', 10)):
    configs.append((f'adafisher {mode}', stats_every,
                    _common.make_adafisher_step,
                    dict(damping=1e-3, fisher_decay=0.8,
                         stats_every=stats_every, mode=mode)))

  runners = []
  for label, stats_every, make, kwargs in configs:
    tx, step = make(model, LEARNING_RATE, donate=donate, **kwargs)
    # Each runner owns a copy: with donation, buffers must not be shared.
    own = jax.tree.map(lambda p: p.copy(), params)
    opt_state = tx.init(own)
    start = time.perf_counter()
    compiled = step.lower(own, opt_state, x, y).compile()
    runner = Runner(label, stats_every, compiled, own, opt_state, (x, y))
    runner.compile_s = time.perf_counter() - start
    # Warm-up: two full periods, so both branches of the refresh have run.
    runner.run(2 * PERIOD)
    runner.sync()
    runners.append(runner)
  return runners


def timed_block(runner: Runner, n: int, period: int | None) -> float:
  """Seconds per step over ``n`` timed steps.

  Args:
    runner: the optimizer to step.
    n: number of timed steps.
    period: if set, steps with ``count % period == 0`` are run untimed, and
      the timed steps come in segments that end before them; if ``None``,
      the ``n`` steps run back to back.

  Returns:
    Mean wall time of one timed step.
  """
  runner.sync()
  total, done = 0.0, 0
  while done < n:
    if period is not None and runner.count % period == 0:
      runner.run(1)
      runner.sync()
      continue
    seg = n - done
    if period is not None:
      seg = min(seg, period - runner.count % period)
    start = time.perf_counter()
    runner.run(seg)
    runner.sync()
    total += time.perf_counter() - start
    done += seg
  return total / n


def measure(runners: list[Runner], repeats: int, steps_per_block: int
            ) -> dict[tuple[str, int | None, str], tuple[float, float]]:
  """Interleaved timings.

  Args:
    runners: the optimizers; the first one is the Adam baseline.
    repeats: number of rounds; each times one block of every optimizer.
    steps_per_block: timed steps per block (rounded up to a multiple of
      ``PERIOD`` for the amortised timing).

  Returns:
    ``{(label, stats_every, timing): (median s/step, median ratio)}``.
  """
  amortised_steps = PERIOD * math.ceil(steps_per_block / PERIOD)
  # (timing, runners it applies to, block length, untimed period)
  plans = [
      ('step', [r for r in runners if r.stats_every != 1], steps_per_block,
       PERIOD),
      ('amortised', runners, amortised_steps, None),
  ]
  times = {(timing, i): [] for timing, rs, _, _ in plans
           for i, r in enumerate(runners) if r in rs}
  ratios = {key: [] for key in times}
  for rep in range(repeats):
    for timing, rs, n, period in plans:
      order = list(enumerate(runners))
      if rep % 2:
        order.reverse()
      this = {}
      for i, r in order:
        if r in rs:
          this[i] = timed_block(r, n, period)
      for i, t in this.items():
        times[(timing, i)].append(t)
        ratios[(timing, i)].append(t / this[0])
  out = {}
  for timing, i in times:
    r = runners[i]
    out[(r.label, r.stats_every, timing)] = (
        statistics.median(times[(timing, i)]),
        statistics.median(ratios[(timing, i)]))
  return out


HEADER = ('model', 'optimizer', 'stats_every', 'timing', 'ms/step',
          'ratio to adam')


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=10,
                      help='interleaved rounds; medians are over these')
  parser.add_argument('--steps-per-block', type=int, default=10,
                      help='timed steps per block and optimizer')
  parser.add_argument('--models', default='mlp,cnn',
                      help='comma-separated subset of mlp,cnn')
  # Donated by default, like benchmarks/kronecker.py and a real training
  # loop: without donation every step allocates new parameter and state
  # buffers, which slowed the Adam baseline more than the others.
  parser.add_argument('--donate', action=argparse.BooleanOptionalAction,
                      default=True,
                      help='donate params and opt_state (all optimizers)')
  parser.add_argument('--profile', action='store_true',
                      help='also time Adam fed by the capturing step')
  args = parser.parse_args(argv)

  print(f'jax {jax.__version__}, optax {optax.__version__}, '
        f'backend {jax.default_backend()}, devices {jax.devices()}, '
        f'python {platform.python_version()}')
  print(f'batch {BATCH}, repeats {args.repeats}, steps/block '
        f'{args.steps_per_block}, donate {args.donate}')
  rows = []
  start = time.perf_counter()
  for model_name in args.models.split(','):
    runners = make_runners(model_name, args.donate, args.profile)
    compile_s = ', '.join(
        f'{r.label}{"" if r.stats_every is None else f" T={r.stats_every}"} '
        f'{r.compile_s:.1f}s' for r in runners)
    print(f'{model_name} compile: {compile_s}')
    results = measure(runners, args.repeats, args.steps_per_block)
    for r in runners:
      for timing in ('step', 'amortised'):
        key = (r.label, r.stats_every, timing)
        if key not in results:
          continue
        sec, ratio = results[key]
        se = '-' if r.stats_every is None else str(r.stats_every)
        rows.append((model_name, r.label, se, timing, f'{1e3 * sec:.2f}',
                     f'{ratio:.2f}'))
      nonfinite = getattr(r.opt_state[1], 'nonfinite', None)
      if nonfinite is not None and int(nonfinite):
        print(f'warning: {model_name} {r.label}: {int(nonfinite)} '
              'non-finite refreshes', file=sys.stderr)
  print()
  _common.print_table(HEADER, rows)
  print(f'\ntotal {time.perf_counter() - start:.0f}s')


if __name__ == '__main__':
  main()
