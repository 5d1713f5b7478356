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

With ``--next-batch`` it instead trains ``fo.kfac()`` alone and, along each
step's preconditioned gradient :math:`\Delta`, compares the model's terms
on the step's own batch with those on the next batch (which the step has
not seen): the linear term :math:`b = g^\top \Delta`, the curvature
:math:`C = \Delta^\top G \Delta`, the 1-D learning rate
:math:`b / (C + \lambda \lVert\Delta\rVert^2)`, and the loss change
that the step taken makes on each batch.

Usage::

  python benchmarks/adaptive_trace.py --task transformer [--seed 0]
      [--steps 200] [--fixed 1e-5,1e-5] [--out results/trace.json]
      [--next-batch]
"""

import argparse
import json
import os
import sys

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  pylint: disable=g-import-not-at-top
import fisher_optax as fo  # noqa: E402  pylint: disable=g-import-not-at-top
from study import tasks as tasks_lib  # noqa: E402  pylint: disable=g-import-not-at-top
import sub_batch_model  # noqa: E402  pylint: disable=g-import-not-at-top

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


def next_batch(task, seed, steps):
  r"""``fo.kfac()`` on ``task``; per step, its model on its own batch and on
  the next one, along its own :math:`\Delta`.

  Returns:
    An array ``(steps, 8)``: the training loss, the damping,
    :math:`\lVert\Delta\rVert^2`, :math:`(b, C)` on the own batch and
    on the next, and the loss change of the step taken on the next batch
    and on its own.
  """
  step_fn, tx, params = sub_batch_model.recorded_kfac(task, seed)
  batches = task.batches(seed)
  batch = next(batches)

  @jax.jit
  def step(params, opt_state, batch, following):
    damping = opt_state.damping
    loss, grads, stats = step_fn(params, *batch)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   layer_stats=stats)
    direction = opt_state.inner.direction
    terms = [sub_batch_model.model_terms(task, params, direction, b).sum(1)
             for b in (batch, following)]
    new = optax.apply_updates(params, updates)
    changes = [task.loss_fn(new, *b) - task.loss_fn(params, *b)
               for b in (following, batch)]
    norm = sum(jax.numpy.vdot(x, x) for x in jax.tree.leaves(direction))
    return new, opt_state, jax.numpy.stack(
        [loss, damping, norm, *terms[0], *terms[1], *changes])

  opt_state = tx.init(params)
  rows = []
  for _ in range(steps):
    following = next(batches)
    params, opt_state, row = step(params, opt_state, batch, following)
    rows.append(np.asarray(row, np.float64))
    batch = following
  return np.array(rows)


def next_batch_table(rows, edges=(0, 10, 30, 60, 100, 150, 200, 300, 400)):
  """Table rows over step ranges: medians of the next batch's terms over
  the own batch's, and mean loss changes."""
  loss, damping, norm, b, c, b_next, c_next, next_change, own_change = (
      rows.T)
  damped = damping * norm
  ratio = (b_next / (c_next + damped)) / (b / (c + damped))
  out = []
  for lo, hi in zip(edges, edges[1:]):
    window = slice(lo, min(hi, len(rows)))
    if lo >= len(rows):
      break
    out.append((f'{lo + 1}-{min(hi, len(rows))}',
                f'{loss[window].mean():.3f}',
                f'{np.median(damping[window]):.2g}',
                f'{np.median(b_next[window] / b[window]):.2f}',
                f'{np.median(c_next[window] / c[window]):.2f}',
                f'{np.median(ratio[window]):.2f} '
                f'({np.quantile(ratio[window], 0.25):.2f}-'
                f'{np.quantile(ratio[window], 0.75):.2f})',
                f'{own_change[window].mean():+.4f}',
                f'{next_change[window].mean():+.4f}'))
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--task', default='transformer')
  parser.add_argument('--optimizer', default='kfac')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--fixed', default='1e-5,1e-5',
                      help='lr,damping of the fixed-step run')
  parser.add_argument('--out', default=None)
  parser.add_argument('--next-batch', action='store_true',
                      help="fo.kfac()'s model on the next batch instead")
  args = parser.parse_args(argv)
  task = tasks_lib.TASKS[args.task]('full')
  if args.next_batch:
    print(f'{args.task}, fo.kfac(), seed {args.seed}: along each step\'s '
          'Delta, the next batch over the own batch\n')
    _common.print_table(
        ('steps', 'loss', 'damping', 'b', 'C', 'learning rate (25-75%)',
         'loss change, own batch', 'next batch'),
        next_batch_table(next_batch(task, args.seed, args.steps)))
    return
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
