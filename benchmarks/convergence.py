r"""Convergence study: each optimizer tuned on five tasks, per step and second.

For each task of ``study/tasks.py`` (``autoencoder``, ``cnn``,
``transformer``, ``regression``, ``resnet``) and each optimizer, the script

1. sweeps the learning rate over 5 half-decade values (1, 3, 10, ... around
   the task's centre for that optimizer's family) at damping 1e-3 and the
   optimizer's other defaults, widening the grid while the best value lies
   at an edge (up to 3 times per side, and below the grid while every value
   diverges);
2. for the curvature methods, tries ``damping`` 1e-2 and 1e-1 besides
   1e-3 (every method's default before this study; and 1e-4, 1e-5 while
   the smallest tried damping wins, 1, 10, 100 while the largest wins: a
   loss summed over outputs has a Fisher, and so a natural damping, that
   many times larger than a mean's), each with its own
   3-value learning-rate sweep (widened the same way) that starts half a
   decade of learning rate higher per decade of damping: on directions of
   low curvature the step scales like ``lr / damping``, so a fixed
   learning rate would bias the search towards 1e-3;
3. reruns the best setting with seeds 1 and 2 (seed 0 is the sweep's).

"Best" is the lowest validation loss at the end of the run; a run whose
training loss turns non-finite or exceeds 10x its first value stops and
counts as diverged. Every run trains from the seed's initial parameters on
the seed's batch order, so the optimizers of one seed see the same batches.
A run records its training loss (block means of at most 200 blocks) against
steps and against training seconds (evaluation and compilation excluded),
the validation loss at 10 points, and the final validation and test
metrics. Each run is cached as one JSON file under
``benchmarks/results/cache/<task>/``; a rerun loads what is there and only
trains what is missing, so a long study resumes where it stopped.

``--report`` writes, from the cache, ``benchmarks/results/<task>.md`` (the
best setting of each optimizer, the final metric with its spread over
seeds, steps and seconds to reach Adam's final training loss, the step-time
ratio to Adam) and the curves ``<task>_steps.png`` / ``<task>_seconds.png``,
and ``benchmarks/results/summary.md``.

An optimizer is named as in ``OPTIMIZERS`` (``study/optimizers.py``),
optionally with settings after colons,
``adafisher:mode=reference:stats_every=1``; besides the factory's keyword
arguments a spec may set ``fisher`` (``empirical`` or the task's sampled
Fisher, ``sampled``), ``warmup`` (linear learning-rate warm-up steps) and
``batch_size``. Such variants are how the investigation of
``docs/choosing.md`` was run.

Timings are for whatever machine runs the study. Runs record the seconds
they took, which other work on the machine inflates; ``--timing`` (on a quiet
machine) profiles every cached spec's best setting side by side, and the
report then uses those profiles for every run of the spec. ``--timing
--optimizers a,b`` profiles ``a`` and ``b`` beside Adam and scales their
profiles by the ratio of the saved Adam profile to the new one, so that the
specs profiled earlier keep their ratios to Adam. A profile is the
median step of each position in a period, which assumes a step's cost does
not depend on the data; ``--contiguous`` profiles instead the first
``period x repeats`` steps of seed 0's own run (blocks of ``period`` steps,
the optimizers taking turns), for a cost that does (the adaptive step's
``model_every``). The committed results were measured with one XLA
thread per run (``XLA_FLAGS=
'--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'``),
two runs at a time pinned to separate cores (``taskset``). Pin reruns too:
the same seed pinned and unpinned gave different floats here (XLA:CPU
compiles for the cores it may use), and on the regression a validation
loss of 0.0647 against 0.0612.

Usage::

  python benchmarks/convergence.py --task cnn [--optimizers adam,kfac]
      [--budget-steps 600] [--budget-seconds 0] [--seeds 3]
  python benchmarks/convergence.py --report
  python benchmarks/convergence.py --quick   # CI: every optimizer, tiny
  python benchmarks/convergence.py --quick --seeds 5   # the same, 5 seeds
"""

import argparse
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _kfac_jax  # noqa: E402  pylint: disable=g-import-not-at-top
from study import cache  # noqa: E402  pylint: disable=g-import-not-at-top
from study import optimizers as optimizers_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from study import runner  # noqa: E402  pylint: disable=g-import-not-at-top
from study import tasks as tasks_lib  # noqa: E402  pylint: disable=g-import-not-at-top


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--task', default=','.join(tasks_lib.TASKS),
                      help='comma-separated: ' + ','.join(tasks_lib.TASKS))
  parser.add_argument('--optimizers', default=None,
                      help='comma-separated specs (default: all)')
  parser.add_argument('--budget-steps', type=int, default=None,
                      help='steps per run (default: the task\'s)')
  parser.add_argument('--budget-seconds', type=float, default=0.0,
                      help='also stop a run after this much training time')
  parser.add_argument('--seeds', type=int, default=None,
                      help='seeds per setting (default 3; with --quick, '
                      'default 1: seed 0 alone)')
  parser.add_argument('--fixed', default=None,
                      help='lr[,damping]: run this setting only, no sweep')
  parser.add_argument('--quick', action='store_true',
                      help='CI: a few steps of every optimizer on every '
                      'task at a tiny size; fails unless each loss drops')
  parser.add_argument('--report', action='store_true',
                      help='write the tables and plots from the cache')
  parser.add_argument('--timing', action='store_true',
                      help='profile the step time of each optimizer\'s best '
                      'cached setting side by side (run on a quiet machine)')
  parser.add_argument('--period', type=int, default=40)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--contiguous', action='store_true',
                      help='with --timing: profiles of the runs\' own '
                      'steps, for costs that depend on the data')
  parser.add_argument('--cache', default=os.path.join(cache.RESULTS, 'cache'))
  args = parser.parse_args(argv)

  kfac_jax_names = ('kfac_jax', 'kfac_jax_adaptive')
  names = [n for n in optimizers_lib.OPTIMIZERS if n not in kfac_jax_names]
  if _kfac_jax.import_kfac_jax() is not None:
    names.extend(kfac_jax_names)
  optimizers = (args.optimizers.split(',') if args.optimizers else names)
  tasks = args.task.split(',')
  if args.quick and not args.optimizers:
    optimizers = [n for n in optimizers
                  if n not in optimizers_lib.QUICK_SKIP]
  if args.quick:
    failures = runner.quick(optimizers, tasks, range(args.seeds or 1))
    if failures:
      print('loss not reduced: ' + ', '.join(failures))
      return 1
    print('every optimizer reduced the loss on every task')
    return 0
  if args.report:
    # Imported where used, as before the package split.
    from study import report  # pylint: disable=g-import-not-at-top
    report.write_all(args.cache, cache.RESULTS,
                     os.path.join(cache.RESULTS, 'timing'))
    return 0
  if args.timing:
    for task_name in tasks:
      # Without --optimizers: every spec the cache has runs of.
      runner.timing(task_name, args.cache,
                    os.path.join(cache.RESULTS, 'timing'),
                    args.optimizers and optimizers, args.period,
                    args.repeats, args.contiguous)
    return 0
  print(f'JAX {jax.__version__} on {jax.default_backend()}, '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}', flush=True)
  for task_name in tasks:
    steps = args.budget_steps or cache.STEPS[task_name]
    study = runner.Study(task_name, 'full', steps, args.budget_seconds,
                         args.cache)
    for spec in optimizers:
      # The first run checks that the spec can run here. With --fixed it is
      # that setting's seed 0: the sweep's first setting would be cached as
      # one more seed-0 run, which the report could pick as the best.
      if args.fixed:
        lr, *rest = (float(v) for v in args.fixed.split(','))
        first = (lr, rest[0] if rest else None, 0)
      else:
        first = runner.first_setting(study, spec)
      try:
        study.run(spec, *first)
      except optimizers_lib.Skip as e:
        print(f'{task_name} {spec}: skipped ({e})')
        continue
      lr, damping = first[:2] if args.fixed else study.tune(spec)
      study.seeds(spec, lr, damping, args.seeds or 3)
      print(f'{task_name} {spec}: best lr={lr} damping={damping}',
            flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
