r"""When the quadratic model can be built on a sub-batch (issue 33, 2b).

The adaptive step's learning rate is the 1-D minimiser of its quadratic
model along the preconditioned gradient :math:`\Delta`
(the step is :math:`-\alpha\Delta`),
:math:`\alpha = b / (C + \lambda \lVert\Delta\rVert^2)` with
:math:`b = g^\top \Delta` and :math:`C = (J\Delta)^\top H (J\Delta)` the
Gauss-Newton curvature. Building the model on a sub-batch (Martens & Grosse
§8 use a quarter) would cut its two tangent passes by as much, but in the
study it diverged on the CNN. This trains ``fo.kfac()`` (no arguments) on a
task of the convergence study and, at every step, along that step's
:math:`\Delta`, compares the whole batch's :math:`\alpha` with two
sub-batch estimates on the batch's first ``n`` examples:

* ``b whole``: :math:`C` from the sub-batch, :math:`b` from the whole batch
  (what slicing the batch in ``outputs_fn``/``outputs_loss`` gives);
* ``b same``: both from the sub-batch, as Martens & Grosse advise.

It prints the quantiles of their ratio to the whole batch's :math:`\alpha`
(a ratio of 2 is a step whose predicted decrease, on the whole batch's
model, is zero), how often the ratio exceeds 2 and 4, and the sub-batch's
curvature over the whole batch's. A second table tries a gate: the
whole batch's per-example shares of :math:`b` and :math:`C` predict the
error of a sub-batch's :math:`\alpha` (``predicted_error``), and the
sub-batch model is counted only on the steps after one whose prediction
is within ``--threshold``. Only public API: the direction is recorded by
a transformation around ``fo.scale_by_kfac`` inside ``fo.adaptive``,
which is how ``fo.kfac()`` is built.

Usage::

  python benchmarks/sub_batch_model.py --tasks cnn,autoencoder
      [--fractions 4,2] [--threshold 0.1] [--seed 0] [--steps N]
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


def recording(preconditioner):
  """``preconditioner``, keeping its last direction in its state."""

  def init_fn(params):
    return _Recorded(preconditioner.init(params),
                     jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None, **extra_args):
    direction, inner = preconditioner.update(updates, state.inner, params,
                                             **extra_args)
    return direction, _Recorded(inner, direction)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def recorded_kfac(task, seed):
  """``fo.kfac()`` on ``task``, recording its direction.

  Returns:
    ``(step_fn, tx, params)``: the capture step, ``fo.kfac()`` as its
    composition (``fixed_or_adaptive`` in ``_adaptive.py``) with the
    preconditioner's last direction in ``state.inner.direction``, and the
    task's initial parameters.
  """
  step_fn = fo.linen.value_grad_and_stats(task.loss_fn)
  batch = next(task.batches(seed))
  params = task.init(seed)
  layers = jax.eval_shape(lambda p: step_fn(p, *batch), params)[2]
  tx = fo.adaptive(
      recording(fo.scale_by_kfac(damping=1e-2, momentum=0.0, layers=layers,
                                  loss_reduction=task.loss_reduction)),
      damping=1e-2, loss_reduction=task.loss_reduction)
  return step_fn, tx, params


def model_terms(task, params, direction, batch):
  """``(b_n, C_n)`` along ``direction``, per example: the loss's slope and
  Gauss-Newton curvature, shape ``(2, examples)``.

  The study's losses are means of per-example terms, so their Hessian in
  the outputs is block-diagonal over the examples and each example's
  share is its block's (the leading axis of every output).
  """
  outputs, jvp = jax.linearize(lambda p: task.outputs(p, *batch), params)
  tangent = jvp(direction)
  grad, curvature = jax.jvp(
      jax.grad(lambda z: task.outputs_loss(z, *batch)), (outputs,),
      (tangent,))
  per_example = lambda a, b: sum(
      jnp.sum((x * y).reshape(x.shape[0], -1), axis=1)
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  return jnp.stack([per_example(grad, tangent),
                    per_example(tangent, curvature)])


def predicted_error(b_n, c_n, damped, size):
  r"""The same-examples learning rate's relative error on ``size`` examples.

  With :math:`\alpha = \bar b / (\bar c + \lambda D / B)` over the
  batch's :math:`B` examples, a sub-batch's estimate has, to first order,
  the relative error of the mean over the sub-batch of
  :math:`r_n = b_n / \bar b - c_n / (\bar c + \lambda D / B)`; drawn
  without replacement its standard deviation is
  :math:`\sqrt{(1 - m/B)\, \operatorname{var}(r) / m}`. The whole batch's
  exact model has every term, so this costs nothing where the whole batch's
  model is computed anyway.
  """
  batch = b_n.shape[-1]
  r = (b_n / b_n.mean(-1, keepdims=True)
       - c_n / (c_n.mean(-1, keepdims=True) + damped[..., None] / batch))
  return np.sqrt((1 - size / batch) * r.var(-1, ddof=1) / size)


def trace(task, seed, steps, sizes):
  r"""``fo.kfac()`` on ``task``, and the model's terms along its directions.

  Returns:
    ``(rows, losses, learning_rates, per_example)``: per step, a row of
    the damping, :math:`\lVert\Delta\rVert^2`, then ``(b, C)`` of the
    whole batch and of each sub-batch size in ``sizes``; the training
    loss; the learning rate the step chose; the whole batch's
    ``(b_n, C_n)`` per example, shape ``(steps, 2, examples)``.
  """
  step_fn, tx, params = recorded_kfac(task, seed)

  @jax.jit
  def step(params, opt_state, *batch):
    damping = opt_state.damping
    loss, grads, stats = step_fn(params, *batch)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   layer_stats=stats)
    direction = opt_state.inner.direction
    per_example = model_terms(task, params, direction, batch)
    terms = [per_example.sum(1)] + [
        model_terms(task, params, direction,
                     tuple(b[:n] for b in batch)).sum(1) for n in sizes]
    norm = sum(jnp.vdot(x, x) for x in jax.tree.leaves(direction))
    return (optax.apply_updates(params, updates), opt_state, loss,
            jnp.concatenate([jnp.stack([damping, norm])] + terms),
            per_example)

  opt_state = tx.init(params)
  rows, losses, learning_rates, per_example = [], [], [], []
  for _, batch in zip(range(steps), task.batches(seed)):
    params, opt_state, loss, row, terms = step(params, opt_state, *batch)
    rows.append(np.asarray(row, np.float64))
    per_example.append(np.asarray(terms, np.float64))
    losses.append(float(loss))
    learning_rates.append(float(opt_state.learning_rate))
  return (np.array(rows), np.array(losses), np.array(learning_rates),
          np.array(per_example))


def _ratios(rows, k):
  """Sub-batch ``k``'s learning rates over the whole batch's, per step.

  Returns:
    ``(ok, whole, same, curvature)``: the steps whose whole-batch model
    predicts a decrease (the others are not taken); the ratio with
    :math:`b` from the whole batch and with :math:`b` from the same
    examples; the sub-batch's :math:`C` over the whole batch's.
  """
  damped = rows[:, 0] * rows[:, 1]
  b_whole, c_whole = rows[:, 2], rows[:, 3]
  b_sub, c_sub = rows[:, 4 + 2 * k], rows[:, 5 + 2 * k]
  alpha = b_whole / (c_whole + damped)
  ok = np.isfinite(alpha) & (alpha > 0)
  return (ok, b_whole / (c_sub + damped) / alpha,
          b_sub / (c_sub + damped) / alpha, c_sub / c_whole)


def gated(rows, per_example, sizes, threshold):
  """Per sub-batch size: the steps whose previous step's whole-batch model
  predicts a same-examples learning rate within ``threshold`` (relative
  standard deviation), and the ratios to the whole batch's on them."""
  damped = rows[:, 0] * rows[:, 1]
  out = []
  for k, n in enumerate(sizes):
    error = predicted_error(per_example[:, 0], per_example[:, 1], damped, n)
    # The decision is taken on one exact model and used on the next step.
    take = np.zeros_like(error, bool)
    take[1:] = error[:-1] <= threshold
    ok, _, ratio, _ = _ratios(rows, k)
    out.append((error, take & ok & np.isfinite(ratio), ratio))
  return out


def summarise(name, rows, losses, sizes, batch_size):
  """Table rows: the sub-batch alpha over the whole batch's."""
  late = losses <= np.quantile(losses, 0.25)
  out = []
  for k, n in enumerate(sizes):
    ok, whole, same, curvature = _ratios(rows, k)
    for label, ratio in (('b whole', whole), ('b same', same)):
      q, q_late = ratio[ok], ratio[ok & late]
      out.append((
          name, f'{n}/{batch_size}', label,
          f'{np.median(q):.2f}',
          f'{np.quantile(q, 0.05):.2f}..{np.quantile(q, 0.95):.2f}',
          f'{100 * np.mean(q > 2):.0f}%', f'{100 * np.mean(q > 4):.0f}%',
          f'{100 * np.mean(q < 0):.0f}%',
          f'{np.quantile(q_late, 0.95):.1f}',
          f'{np.median(curvature[ok]):.2f} / '
          f'{np.quantile(curvature[ok], 0.05):.2f}'))
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--tasks', default='cnn,autoencoder')
  parser.add_argument('--fractions', default='4,2',
                      help='sub-batch sizes as divisors of the batch')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--threshold', type=float, default=0.1,
                      help='the gate\'s largest predicted relative error')
  parser.add_argument('--steps', type=int, default=None,
                      help="steps per task (default: the study's)")
  args = parser.parse_args(argv)
  print(f'JAX {jax.__version__} on {jax.default_backend()} '
        f'({platform.processor() or platform.machine()}); seed {args.seed}; '
        'fo.kfac() with no arguments, its own trajectory\n')
  rows, gate_rows = [], []
  for name in args.tasks.split(','):
    task = tasks_lib.TASKS[name]('full')
    sizes = [task.batch_size // int(d) for d in args.fractions.split(',')]
    steps = args.steps or cache_lib.STEPS[name]
    trace_rows, losses, _, per_example = trace(task, args.seed, steps, sizes)
    rows += summarise(name, trace_rows, losses, sizes, task.batch_size)
    for n, (error, take, ratio) in zip(
        sizes, gated(trace_rows, per_example, sizes, args.threshold)):
      kept = ratio[take]
      spread = (f'{np.quantile(kept, 0.05):.2f}..'
                f'{np.quantile(kept, 0.95):.2f}' if kept.size else '-')
      gate_rows.append((
          name, f'{n}/{task.batch_size}', f'{np.median(error):.2f}',
          f'{100 * np.mean(take):.0f}%', spread,
          f'{100 * np.mean(kept > 2):.0f}%' if kept.size else '-'))
  _common.print_table(
      ('task', 'examples', 'linear term', 'median', '5-95%', '> 2x', '> 4x',
       '< 0', '95%, lowest-loss quarter', 'C_sub / C: median / 5%'), rows)
  print(f'\nA gate: the sub-batch model (b from the same examples) on the '
        f'steps after one whose whole-batch model predicts its learning rate '
        f'within {args.threshold:.0%} (relative standard deviation)\n')
  _common.print_table(
      ('task', 'examples', 'predicted error: median', 'steps gated in',
       'ratio on them: 5-95%', '> 2x'), gate_rows)


if __name__ == '__main__':
  main()
