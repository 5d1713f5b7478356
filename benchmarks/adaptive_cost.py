r"""Step time of the adaptive step (``fo.adaptive``) against fixed K-FAC.

On models of the convergence study (``study/tasks.py``: the MNIST
CNN, the ResNet with BatchNorm, the character Transformer) with their real
batches, this times the jitted train step (capture included) of

* ``optax.adam`` and ``optax.contrib.muon`` on ``jax.value_and_grad``;
* ``fo.kfac`` with a fixed learning rate and damping;
* the same K-FAC grafted onto Adam's step sizes (``kfac graft``: the
  study's ``kfac_graft``, ``fo.graft``);
* ``fo.kfac()`` with no learning rate (the adaptive step), its quadratic
  model from the exact Gauss-Newton products of the capture step's own
  linearization (``one pass``: ``tx.update(..., layer_stats=stats)``, the
  recommended form), from the captured statistics (``captured``), from the
  Gauss-Newton products by hand (``ggn``: ``outputs_fn=``/``outputs_loss=``,
  a second ``jax.linearize`` of the model, so a second primal pass, per
  step), or from those of the first quarter of the batch (``ggn, 1/4
  batch``: the user slices the batch in ``outputs_fn``/``outputs_loss``),

each K-FAC at ``(stats_every, inverse_every)`` of ``(1, 20)`` and
``(10, 100)``. The adaptive step evaluates the loss after the step every
``adapt_every`` = 5 steps (a forward pass under ``lax.cond``).

Where kfac-jax runs the task (the CNN; ``pip install -e '.[kfac]'``), its
``Optimizer`` is timed the same way with and without its adaptive learning
rate, momentum and damping (the study's configuration, at the same
periods), so its overhead for the same machinery stands beside ours.

All steps run side by side in one process, interleaved
(``_common.interleaved``): every repeat times one block of ``--block``
contiguous steps of each optimizer in turn, order reversed on every other
repeat. A block of 100 holds whole periods of every refresh, so its mean is
the amortised time per step. ``overhead`` is the median over repeats of the
per-repeat ratio of an adaptive step to the fixed step of its own library
(``kfac``, or ``kfac_jax`` without its adaptive options) with the same
periods, minus one. ``temp MiB`` is the compiled step's temporary
buffers (XLA's ``memory_analysis``), the part of its peak memory that the
optimizer's own work changes; ``page faults/step`` counts the minor page
faults of the timed blocks: XLA:CPU allocates the temporaries on every
call, and under glibc's defaults above 32 MiB that is a fresh mapping whose
every touched page faults (run with ``GLIBC_TUNABLES`` or tcmalloc, see
docs/getting_started.md, to time the steps without that tax).

Usage::

  python benchmarks/adaptive_cost.py [--tasks cnn,resnet,transformer]
      [--repeats 3] [--block 100] [--periods 1,20/10,100]
      [--optimizers adam,kfac,"kfac adaptive one pass",...]
"""

import argparse
import os
import platform
import statistics
import sys

import jax
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  pylint: disable=g-import-not-at-top
import _kfac_jax  # noqa: E402  pylint: disable=g-import-not-at-top
import fisher_optax as fo  # noqa: E402  pylint: disable=g-import-not-at-top
from study import optimizers as optimizers_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from study import tasks as tasks_lib  # noqa: E402  pylint: disable=g-import-not-at-top

PERIODS = ((1, 20), (10, 100))
LEARNING_RATE = 1e-4  # Irrelevant to timing; small to keep values finite.
WARMUP = 10


def _jit(step):
  return jax.jit(step, donate_argnums=(0, 1))


def make_runners(task: tasks_lib.Task, periods_list=PERIODS,
                 labels=None) -> list[_common.Runner]:
  """The optimizers on ``task``'s first batch, compiled and warmed up.

  ``labels``: the runners to build (all when None).
  """
  wanted = lambda label: labels is None or label in labels
  batch = next(task.batches(0))
  params = task.init(0)
  step_fn = fo.linen.value_grad_and_stats(task.loss_fn)
  layers = jax.eval_shape(lambda p: step_fn(p, *batch), params)[2]
  runners = []
  for name, tx in (('adam', optax.adam(LEARNING_RATE)),
                   ('muon', optax.contrib.muon(LEARNING_RATE))):
    if not wanted(name):
      continue
    runners.append(_common.optax_runner(
        name, None, tx, _common.make_gradient_step(tx, task.loss_fn, True),
        params, batch))
  for periods in periods_list:
    common = dict(stats_every=periods[0], inverse_every=periods[1],
                  layers=layers, loss_reduction=task.loss_reduction)
    for label, curvature, tx in (
        ('kfac', None, fo.kfac(LEARNING_RATE, damping=1e-3, **common)),
        ('kfac graft', None, optimizers_lib.kfac_graft(
            LEARNING_RATE, 1e-3, **common)),
        ('kfac adaptive one pass', 'linearized', fo.kfac(**common)),
        ('kfac adaptive captured', 'captured', fo.kfac(**common)),
        ('kfac adaptive ggn', 'ggn', fo.kfac(**common)),
        ('kfac adaptive ggn, 1/4 batch', 'ggn/4', fo.kfac(**common))):
      if not wanted(label):
        continue

      def train_step(params, opt_state, *batch, tx=tx, curvature=curvature):
        loss, grads, stats = step_fn(params, *batch)
        extra = {}
        if curvature not in (None, 'linearized'):
          extra = dict(value=loss,
                       value_fn=lambda p: task.loss_fn(p, *batch))
        if curvature in ('ggn', 'ggn/4'):
          # 'ggn/4': the curvature products on a quarter of the batch.
          part = batch if curvature == 'ggn' else tuple(
              b[:task.batch_size // 4] for b in batch)
          extra.update(
              outputs_fn=lambda p: task.outputs(p, *part),
              outputs_loss=lambda z: task.outputs_loss(z, *part))
        updates, opt_state = tx.update(grads, opt_state, params,
                                       layer_stats=stats, **extra)
        return optax.apply_updates(params, updates), opt_state, loss

      runners.append(_common.optax_runner(label, periods, tx,
                                          _jit(train_step), params, batch))
  if wanted('kfac_jax') or wanted('kfac_jax adaptive'):
    runners.extend(kfac_jax_runners(task, params, batch, periods_list))
  _common.warm_up(runners, WARMUP)
  return runners


def kfac_jax_runners(task, params, batch, periods_list=PERIODS
                     ) -> list[_common.Runner]:
  """kfac-jax fixed and adaptive at each period, where it runs ``task``."""
  if task.kfac_jax_loss is None or _kfac_jax.import_kfac_jax() is None:
    return []
  runners = []
  for periods in periods_list:
    kwargs = dict(stats_every=periods[0], inverse_every=periods[1])
    for label, adaptive in (('kfac_jax', False),
                            ('kfac_jax adaptive', True)):
      if adaptive:
        kwargs = dict(curvature_update_period=periods[0],
                      inverse_update_period=periods[1])
      compiled = optimizers_lib._build_kfac_jax(task, kwargs, 0, adaptive)  # pylint: disable=protected-access
      runners.append(_stepper_runner(label, periods, compiled, params, batch))
  return runners


def _stepper_runner(label, periods, compiled, params, batch):
  """A ``study.optimizers.Compiled`` step (it counts steps on the host)."""
  holder = {'params': jax.tree.map(lambda p: p.copy(), params), 'count': 0}
  holder['opt_state'] = compiled.init(holder['params'], LEARNING_RATE, 1e-3)
  holder['out'] = None

  def run(n):
    for _ in range(n):
      holder['params'], holder['opt_state'], holder['out'] = compiled.step(
          holder['params'], holder['opt_state'], holder['count'], *batch)
      holder['count'] += 1

  def sync():
    jax.block_until_ready((holder['params'], holder['opt_state'],
                           holder['out']))

  return _common.Runner(label, periods, run, sync, lambda: None)


def _temp_mib(runner) -> str:
  compiled = getattr(runner, 'compiled', None)
  memory = None if compiled is None else compiled.memory_analysis()
  if memory is None:
    return ''
  return f'{memory.temp_size_in_bytes / 2**20:.1f}'


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--tasks', default='cnn,resnet,transformer')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--block', type=int, default=100)
  parser.add_argument('--periods', default='1,20/10,100',
                      help='(stats_every, inverse_every) pairs, /-separated')
  parser.add_argument('--optimizers', default=None,
                      help='comma-separated runner labels (default: all)')
  args = parser.parse_args(argv)
  periods_list = tuple(tuple(int(n) for n in p.split(','))
                       for p in args.periods.split('/'))
  labels = None if args.optimizers is None else set(
      args.optimizers.split(','))
  print(f'JAX {jax.__version__} on {jax.default_backend()} '
        f'({platform.processor() or platform.machine()}, '
        f'{os.cpu_count()} CPUs), XLA_FLAGS='
        f'{os.environ.get("XLA_FLAGS", "")!r}, {_common.allocator()}; '
        f'median of {args.repeats} repeats of {args.block}-step blocks\n')
  for name in args.tasks.split(','):
    task = tasks_lib.TASKS[name]('full')
    runners = make_runners(task, periods_list, labels)
    times = _common.interleaved(runners, args.repeats, args.block)
    # Each adaptive step against the fixed step of its own library.
    fixed = {(r.label, r.periods): i for i, r in enumerate(runners)
             if r.label in ('kfac', 'kfac_jax')}
    rows = []
    for r, t in zip(runners, times):
      ratio = lambda ref, t=t: statistics.median(
          a / b for a, b in zip(t, ref))
      base = r.label.split(' ')[0]
      over = ('' if r.periods is None or r.label == base else
              f'{100 * (ratio(times[fixed[base, r.periods]]) - 1):+.0f}%')
      rows.append((r.label, '' if r.periods is None else str(r.periods),
                   f'{1e3 * statistics.median(t):.1f}',
                   f'{ratio(times[0]):.2f}', over, _temp_mib(r),
                   f'{statistics.median(r.faults):.0f}'))
    print(f'### {name} (batch {task.batch_size})\n')
    _common.print_table(('optimizer', '(stats, inverse)', 'ms/step',
                         'ratio to adam', 'overhead vs fixed', 'temp MiB',
                         'page faults/step'), rows)
    print()


if __name__ == '__main__':
  main()
