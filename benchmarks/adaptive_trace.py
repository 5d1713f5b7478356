r"""What the adaptive step chooses, step by step, beside a tuned fixed step.

Trains one task of the convergence study (``study/tasks.py``) with a
no-argument optimizer (``fo.kfac()`` by default, the one-keyword form) and
logs, every step, the training loss and the adaptive state: the damping
:math:`\lambda`, the learning rate :math:`\alpha`, the momentum :math:`\mu`,
the last reduction ratio :math:`\rho` and the rejected steps. Beside it, the
same preconditioner at a fixed learning rate and damping (the study's tuned
setting, ``--fixed lr,damping``) logs its training loss on the same batches.
Issue 33 asks why the adaptive step falls behind on the Transformer; this is
the evidence.

Usage::

  python benchmarks/adaptive_trace.py --task transformer [--seed 0]
      [--steps 200] [--fixed 1e-5,1e-5] [--out results/trace.json]
"""

import argparse
import json
import os
import sys

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fisher_optax as fo  # noqa: E402  pylint: disable=g-import-not-at-top
from study import tasks as tasks_lib  # noqa: E402  pylint: disable=g-import-not-at-top

LOGGED = ('damping', 'learning_rate', 'momentum', 'rho', 'rejected',
          'model_change')


def _train(task, tx, seed, steps, log_state):
  params = task.init(seed)
  step_fn = fo.linen.value_grad_and_stats(task.loss_fn)

  @jax.jit
  def step(params, opt_state, *batch):
    loss, grads, stats = step_fn(params, *batch)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   layer_stats=stats)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  rows = []
  for count, batch in zip(range(steps), task.batches(seed)):
    params, opt_state, loss = step(params, opt_state, *batch)
    row = {'step': count + 1, 'loss': float(loss)}
    if log_state:
      state = opt_state
      row.update({k: float(getattr(state, k)) for k in LOGGED})
    rows.append(row)
  return rows, task.evaluate(params, 'validation')


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--task', default='transformer')
  parser.add_argument('--optimizer', default='kfac')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--fixed', default='1e-5,1e-5',
                      help='lr,damping of the fixed-step run')
  parser.add_argument('--out', default=None)
  args = parser.parse_args(argv)
  task = tasks_lib.TASKS[args.task]('full')
  factory = getattr(fo, args.optimizer)
  batch = next(task.batches(0))
  layers = jax.eval_shape(
      lambda p: fo.linen.value_grad_and_stats(task.loss_fn)(p, *batch),
      task.init(0))[2]
  common = dict(layers=layers, loss_reduction=task.loss_reduction)
  adaptive, adaptive_eval = _train(task, factory(**common), args.seed,
                                   args.steps, True)
  lr, damping = (float(x) for x in args.fixed.split(','))
  fixed, fixed_eval = _train(task, factory(lr, damping=damping, **common),
                             args.seed, args.steps, False)
  print(f'{args.task}, {args.optimizer}, seed {args.seed}: validation loss '
        f'adaptive {adaptive_eval["loss"]:.4f}, fixed (lr {lr:g}, damping '
        f'{damping:g}) {fixed_eval["loss"]:.4f}\n')
  print('| step | loss, adaptive | loss, fixed | damping | learning rate '
        '| momentum | rho | rejected |')
  print('|---:|---:|---:|---:|---:|---:|---:|---:|')
  every = max(1, args.steps // 20)
  for a, f in zip(adaptive, fixed):
    if a['step'] % every == 0 or a['step'] == 1:
      window = slice(max(0, a['step'] - every), a['step'])
      mean = lambda rows, w=window: np.mean([r['loss'] for r in rows[w]])
      print(f'| {a["step"]} | {mean(adaptive):.4f} | {mean(fixed):.4f} | '
            f'{a["damping"]:.3g} | {a["learning_rate"]:.3g} | '
            f'{a["momentum"]:.3f} | {a["rho"]:.3f} | {int(a["rejected"])} |')
  if args.out:
    with open(args.out, 'w', encoding='utf-8') as f:
      json.dump({'task': args.task, 'optimizer': args.optimizer,
                 'seed': args.seed, 'fixed': [lr, damping],
                 'adaptive': adaptive, 'fixed_run': fixed,
                 'validation': {'adaptive': adaptive_eval['loss'],
                                'fixed': fixed_eval['loss']}}, f)


if __name__ == '__main__':
  main()
