r"""Step time and state memory of Mini-Block Fisher against Adam.

Models: the small CNN of ``examples/mnist.py`` (random MNIST-shaped batches
of 128, softmax cross-entropy) and the deep autoencoder of
``examples/mnist_autoencoder.py`` (784-1000-500-250-30 and mirror, batches of
1000, summed binary cross-entropy). For each, this times the jitted train
step of

* ``optax.adam`` on ``jax.value_and_grad`` (the baseline);
* ``fisher_optax.mini_block_fisher`` on the same gradients, with statistics /
  inverses every 1 / 20 steps and each ``inverse_method`` (``cholesky``,
  ``inv``, ``eigh``), and with the released code's periods for that model
  (CNN 10 / 100, autoencoder 2 / 25) and the default method (``inv``).

All steps run side by side in one process, interleaved: every repeat times
one block of ``--block`` contiguous steps of each optimizer in turn (the
order reversed on every other repeat). A block holds whole inverse periods
(the default 100 is a multiple of 20, 25 and 100), so its mean is the
amortised time per step, refreshes included. ``ms/step`` is the median over
repeats, ``ratio to adam`` the median of the per-repeat ratios.

A second table gives the size of each optimizer's state (every array in
``opt_state``) relative to Adam's and to the parameters.

Usage::

  python benchmarks/mini_block_fisher.py [--repeats 3] [--block 100]
      [--models cnn,autoencoder]
"""

import argparse
import os
import platform
import statistics
import time

import jax
import numpy as np
import optax

import _common
import fisher_optax as fo
from mnist_autoencoder import Autoencoder  # pylint: disable=g-bad-import-order
from mnist_autoencoder import reconstruction_loss

LEARNING_RATE = 1e-6  # Irrelevant to timing; small to keep values finite.
DAMPING = 1e-3
WARMUP = 3
METHODS = ('inv', 'cholesky', 'eigh')  # the first is the default
BATCH = {'cnn': 128, 'autoencoder': 1000}
# The released code's (stats_every, inverse_every) for each kind of model.
PRESET_PERIODS = {'cnn': (10, 100), 'autoencoder': (2, 25)}


def _problem(model_name):
  """``(model, loss_fn(params, *batch), batch)`` on random data."""
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(BATCH[model_name], 28, 28, 1)).astype(np.float32)
  if model_name == 'cnn':
    model = _common.CNN()
    y = rng.integers(0, 10, size=(len(x),)).astype(np.int32)
    return model, _common.make_loss_fn(model), (jax.device_put(x),
                                                 jax.device_put(y))
  model = Autoencoder()
  loss_fn = lambda p, x: reconstruction_loss(model.apply({'params': p}, x), x)
  return model, loss_fn, (jax.device_put(x),)


def _runner(label, periods, tx, loss_fn, params, batch):
  step = _common.make_gradient_step(tx, loss_fn, donate=True)
  return _common.optax_runner(label, periods, tx, step, params, batch)


def make_runners(model_name):
  model, loss_fn, batch = _problem(model_name)
  params = model.init(jax.random.key(0), batch[0])['params']
  runners = [_runner('adam', None, optax.adam(LEARNING_RATE), loss_fn,
                     params, batch)]
  configs = [((1, 20), m) for m in METHODS]
  configs.append((PRESET_PERIODS[model_name], METHODS[0]))
  for periods, method in configs:
    tx = fo.mini_block_fisher(LEARNING_RATE, damping=DAMPING,
                              stats_every=periods[0],
                              inverse_every=periods[1],
                              inverse_method=method)
    runners.append(_runner(f'mbf {method}', periods, tx, loss_fn, params,
                           batch))
  _common.warm_up(runners, WARMUP)
  return runners, params


def nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)
             if hasattr(x, 'dtype'))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--block', type=int, default=100,
                      help='timed steps per block and optimizer; keep it a '
                      'multiple of 20, 25 and 100')
  parser.add_argument('--models', default='cnn,autoencoder')
  args = parser.parse_args(argv)
  print(f'jax {jax.__version__}, optax {optax.__version__}, fisher_optax '
        f'{fo.__version__}, backend {jax.default_backend()}, '
        f'{os.cpu_count()} CPUs, python {platform.python_version()}')
  print(f'repeats {args.repeats}, steps/block {args.block}, damping '
        f'{DAMPING}, batch {BATCH}')
  rows, mem_rows = [], []
  start = time.perf_counter()
  for model_name in args.models.split(','):
    runners, params = make_runners(model_name)
    print(f'{model_name} compile + warm-up: ' + ', '.join(
        f'{r.label}{"" if r.periods is None else " %d/%d" % r.periods} '
        f'{r.setup_s:.1f}s' for r in runners))
    times = _common.interleaved(runners, args.repeats, args.block)
    for r, t in zip(runners, times):
      ratio = statistics.median(a / b for a, b in zip(t, times[0]))
      every = '-' if r.periods is None else '%d/%d' % r.periods
      rows.append((model_name, r.label, every,
                   f'{1e3 * statistics.median(t):.2f}', f'{ratio:.2f}'))
    adam_bytes = nbytes(runners[0].state())
    # Periods and inverse methods do not change the state: one MBF row.
    for r in runners[:2]:
      size = nbytes(r.state())
      mem_rows.append((model_name, r.label.split()[0],
                       f'{size / 2**20:.1f}', f'{size / adam_bytes:.2f}',
                       f'{size / nbytes(params):.2f}'))
    for r in runners[1:]:
      inner = [s for s in jax.tree.leaves(r.state(), is_leaf=lambda s: (
          isinstance(s, fo.ScaleByMiniBlockFisherState))) if isinstance(
              s, fo.ScaleByMiniBlockFisherState)]
      if int(inner[0].nonfinite):
        print(f'warning: {model_name} {r.label}: {int(inner[0].nonfinite)} '
              'non-finite refreshes')
    del runners
  print()
  _common.print_table(('model', 'optimizer', 'stats/inverse every',
                       'ms/step', 'ratio to adam'), rows)
  print()
  _common.print_table(('model', 'optimizer', 'state MiB', 'ratio to adam',
                       'ratio to params'), mem_rows)
  print(f'\ntotal {time.perf_counter() - start:.0f}s')


if __name__ == '__main__':
  main()
