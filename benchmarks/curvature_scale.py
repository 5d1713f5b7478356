r"""How large each task's curvature is, against the damping the study chose.

The convergence study's best K-FAC damping spans four decades across its
tasks (1e-5 on the Transformer, 0.1 on the regression and the autoencoder).
A damping expressed relative to the curvature would transfer between tasks
if the best dampings were a fixed multiple of it. This script measures, for
each task at its initial parameters (seed 0), the mean eigenvalue of each
layer's Kronecker block ``A (x) G``,

.. math::

  s_\ell = \frac{\operatorname{tr} A_\ell}{d_A}\,
           \frac{\operatorname{tr} G_\ell}{d_G},

from the empirical-Fisher factors K-FAC averages over its first
``--steps`` batches (learning rate 0, so the parameters stay at the
initial point), and prints the median over layers next to the best damping
of each Kronecker method in the study's cache and their ratio.

Run ``python benchmarks/curvature_scale.py`` (after the study);
``--write`` also writes ``benchmarks/results/curvature_scale.md``.
"""

import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fisher_optax as fo  # noqa: E402  pylint: disable=g-import-not-at-top
from study import cache  # noqa: E402  pylint: disable=g-import-not-at-top
from study import optimizers as optimizers_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from study import tasks as tasks_lib  # noqa: E402  pylint: disable=g-import-not-at-top

METHODS = ('kfac', 'tkfac', 'ekfac', 'tekfac')


def factor_scales(task, steps: int) -> dict[str, tuple[float, float]]:
  """``{layer: (tr A / d_A, tr G / d_G)}`` of K-FAC's averaged factors."""
  compiled = optimizers_lib.build(task, 'kfac', {})
  params = task.init(0)
  opt_state = compiled.init(params, 0.0, 1e-3)
  batches = task.batches(0)
  for count in range(steps):
    params, opt_state, _ = compiled.step(params, opt_state, count,
                                         *next(batches))
  state, = [s for s in jax.tree.leaves(
      opt_state, is_leaf=lambda s: isinstance(s, fo.KroneckerState))
            if isinstance(s, fo.KroneckerState)]

  def mean_eigenvalue(blocks):
    # Blocks (*lead, nb, b, b) of one factor: a block-diagonal matrix whose
    # trace is the blocks' traces summed. An embedding's input side is its
    # diagonal, (*lead, V) (blocks are square).
    blocks = np.asarray(blocks, np.float64)
    if blocks.ndim < 3 or blocks.shape[-1] != blocks.shape[-2]:
      return float(blocks.mean())
    size = blocks.shape[-1] * blocks.shape[-3]
    lead = int(np.prod(blocks.shape[:-3]))
    return float(np.trace(blocks, axis1=-2, axis2=-1).sum() / (size * lead))

  return {layer: (mean_eigenvalue(s['A']), mean_eigenvalue(s['G']))
          for layer, s in state.stats.items()}


def best_dampings(task_name: str, cache_dir: str) -> dict[str, float]:
  """Each Kronecker method's chosen damping in the study's cache."""
  records = cache.load_records(os.path.join(cache_dir, task_name))
  kept, _, _ = cache.select_budget(task_name, records)
  found = {}
  for method in METHODS:
    mine = [r for r in kept if r['optimizer'] == method]
    if mine:
      best, _ = cache.best_setting(mine)
      found[method] = best['damping']
  return found


def table(rows) -> str:
  lines = ['| task | layers | median s | min s | max s | '
           + ' | '.join(f'{m} damping (/ median s)' for m in METHODS) + ' |',
           '|---|---:|---:|---:|---:|' + '---:|' * len(METHODS)]
  for name, scales, dampings in rows:
    s = np.array([a * g for a, g in scales.values()])
    median = float(np.median(s))
    cells = [f'{dampings[m]:g} ({dampings[m] / median:.3g})'
             if m in dampings else '—' for m in METHODS]
    lines.append(f'| {name} | {len(s)} | {median:.3g} | {s.min():.3g} | '
                 f'{s.max():.3g} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--tasks', default=','.join(tasks_lib.TASKS))
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--cache', default=os.path.join(cache.RESULTS, 'cache'))
  parser.add_argument('--write', action='store_true')
  args = parser.parse_args(argv)
  rows = []
  for name in args.tasks.split(','):
    task = tasks_lib.TASKS[name]('full')
    rows.append((name, factor_scales(task, args.steps),
                 best_dampings(name, args.cache)))
    print(f'{name}: done', flush=True)
  text = table(rows)
  print(text)
  if args.write:
    with open(os.path.join(cache.RESULTS, 'curvature_scale.md'),
              'w') as f:
      f.write('# Curvature scale against the chosen damping\n\n'
              'Written by `python benchmarks/curvature_scale.py --write` '
              f'({args.steps} statistics steps at the initial parameters of '
              'seed 0, empirical Fisher). *s*: the mean eigenvalue of a '
              "layer's Kronecker block, `tr A / d_A * tr G / d_G`; the "
              "dampings are each method's best in the convergence study's "
              'cache.\n\n' + text + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
