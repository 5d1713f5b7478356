r"""Why the quadratic model cannot be built on a sub-batch (issue 33, 2b).

The adaptive step's learning rate is the 1-D minimiser of its quadratic
model along the preconditioned gradient :math:`\Delta`
(the step is :math:`-\alpha\Delta`),
:math:`\alpha = b / (C + \lambda \lVert\Delta\rVert^2)` with
:math:`b = g^\top \Delta` and :math:`C = (J\Delta)^\top H (J\Delta)` the
Gauss-Newton curvature. Building the model on a sub-batch (Martens & Grosse
§8 use a quarter) would cut its two tangent passes by as much, but in the
study it diverged on the CNN. This trains ``fo.kfac()`` (no arguments) on a
task of the convergence study and, at every step, along the direction the
step actually took, compares the whole batch's :math:`\alpha` with two
sub-batch estimates on the batch's first ``n`` examples:

* ``b whole``: :math:`C` from the sub-batch, :math:`b` from the whole batch
  (what slicing the batch in ``outputs_fn``/``outputs_loss`` gives);
* ``b same``: both from the sub-batch, as Martens & Grosse advise.

It prints the quantiles of their ratio to the whole batch's :math:`\alpha`
(a ratio of 2 is a step whose predicted decrease, on the whole batch's
model, is zero), how often the ratio exceeds 2 and 4, and the sub-batch's
curvature over the whole batch's. Only public API: the direction is
recorded by a transformation around ``fo.scale_by_kfac`` inside
``fo.adaptive``, which is how ``fo.kfac()`` is built.

Usage::

  python benchmarks/sub_batch_model.py --tasks cnn,autoencoder
      [--fractions 4,2] [--seed 0] [--steps N]
"""

import argparse
import os
import platform
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  pylint: disable=g-import-not-at-top
import fisher_optax as fo  # noqa: E402  pylint: disable=g-import-not-at-top
from study import cache as cache_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from study import tasks as tasks_lib  # noqa: E402  pylint: disable=g-import-not-at-top


class _Recorded(NamedTuple):
  inner: optax.OptState
  direction: optax.Updates


def _recording(preconditioner):
  """``preconditioner``, keeping its last direction in its state."""

  def init_fn(params):
    return _Recorded(preconditioner.init(params),
                     jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None, **extra_args):
    direction, inner = preconditioner.update(updates, state.inner, params,
                                             **extra_args)
    return direction, _Recorded(inner, direction)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _model_terms(task, params, direction, batch):
  """``(b, C)`` along ``direction``: the loss's slope and GGN curvature."""
  outputs, jvp = jax.linearize(lambda p: task.outputs(p, *batch), params)
  tangent = jvp(direction)
  grad, curvature = jax.jvp(
      jax.grad(lambda z: task.outputs_loss(z, *batch)), (outputs,),
      (tangent,))
  dot = lambda a, b: sum(jnp.vdot(x, y) for x, y in zip(
      jax.tree.leaves(a), jax.tree.leaves(b)))
  return jnp.stack([dot(grad, tangent), dot(tangent, curvature)])


def trace(task, seed, steps, sizes):
  """``fo.kfac()`` on ``task``, and the model's terms along its directions.

  Returns:
    ``(rows, losses, learning_rates)``: per step, a row of the damping,
    :math:`\lVert\Delta\rVert^2`, then ``(b, C)`` of the whole batch and
    of each sub-batch size in ``sizes``; the training loss; the learning
    rate the step chose.
  """
  step_fn = fo.linen.value_grad_and_stats(task.loss_fn)
  batch = next(task.batches(seed))
  params = task.init(seed)
  layers = jax.eval_shape(lambda p: step_fn(p, *batch), params)[2]
  # fo.kfac() is this composition (fixed_or_adaptive in _adaptive.py).
  tx = fo.adaptive(
      _recording(fo.scale_by_kfac(damping=1e-2, momentum=0.0, layers=layers,
                                  loss_reduction=task.loss_reduction)),
      damping=1e-2, loss_reduction=task.loss_reduction)

  @jax.jit
  def step(params, opt_state, *batch):
    damping = opt_state.damping
    loss, grads, stats = step_fn(params, *batch)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   layer_stats=stats)
    direction = opt_state.inner.direction
    terms = [_model_terms(task, params, direction, batch)]
    terms += [_model_terms(task, params, direction,
                           tuple(b[:n] for b in batch)) for n in sizes]
    norm = sum(jnp.vdot(x, x) for x in jax.tree.leaves(direction))
    return (optax.apply_updates(params, updates), opt_state, loss,
            jnp.concatenate([jnp.stack([damping, norm])] + terms))

  opt_state = tx.init(params)
  rows, losses, learning_rates = [], [], []
  for _, batch in zip(range(steps), task.batches(seed)):
    params, opt_state, loss, row = step(params, opt_state, *batch)
    rows.append(np.asarray(row, np.float64))
    losses.append(float(loss))
    learning_rates.append(float(opt_state.learning_rate))
  return np.array(rows), np.array(losses), np.array(learning_rates)


def summarise(name, rows, losses, sizes, batch_size):
  """Table rows: the sub-batch alpha over the whole batch's."""
  damped = rows[:, 0] * rows[:, 1]
  b_whole, c_whole = rows[:, 2], rows[:, 3]
  alpha = b_whole / (c_whole + damped)
  # Steps whose whole-batch model predicts no decrease are not taken.
  ok = np.isfinite(alpha) & (alpha > 0)
  late = losses <= np.quantile(losses, 0.25)
  out = []
  for k, n in enumerate(sizes):
    b_sub, c_sub = rows[:, 4 + 2 * k], rows[:, 5 + 2 * k]
    ratio_c = c_sub[ok] / c_whole[ok]
    for label, b in (('b whole', b_whole), ('b same', b_sub)):
      q = (b / (c_sub + damped))[ok] / alpha[ok]
      q_late = (b / (c_sub + damped))[ok & late] / alpha[ok & late]
      out.append((
          name, f'{n}/{batch_size}', label,
          f'{np.median(q):.2f}',
          f'{np.quantile(q, 0.05):.2f}..{np.quantile(q, 0.95):.2f}',
          f'{100 * np.mean(q > 2):.0f}%', f'{100 * np.mean(q > 4):.0f}%',
          f'{100 * np.mean(q < 0):.0f}%',
          f'{np.quantile(q_late, 0.95):.1f}',
          f'{np.median(ratio_c):.2f} / {np.quantile(ratio_c, 0.05):.2f}'))
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--tasks', default='cnn,autoencoder')
  parser.add_argument('--fractions', default='4,2',
                      help='sub-batch sizes as divisors of the batch')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--steps', type=int, default=None,
                      help="steps per task (default: the study's)")
  args = parser.parse_args(argv)
  print(f'JAX {jax.__version__} on {jax.default_backend()} '
        f'({platform.processor() or platform.machine()}); seed {args.seed}; '
        'fo.kfac() with no arguments, its own trajectory\n')
  rows = []
  for name in args.tasks.split(','):
    task = tasks_lib.TASKS[name]('full')
    sizes = [task.batch_size // int(d) for d in args.fractions.split(',')]
    steps = args.steps or cache_lib.STEPS[name]
    trace_rows, losses, _ = trace(task, args.seed, steps, sizes)
    rows += summarise(name, trace_rows, losses, sizes, task.batch_size)
  _common.print_table(
      ('task', 'examples', 'linear term', 'median', '5-95%', '> 2x', '> 4x',
       '< 0', '95%, lowest-loss quarter', 'C_sub / C: median / 5%'), rows)


if __name__ == '__main__':
  main()
