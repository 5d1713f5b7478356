"""Training runs of the convergence study: one run, the sweep, the timings.

:func:`run_one` trains one setting and returns its record; :class:`Study`
runs the protocol of ``convergence.py``'s docstring on one task (the
learning-rate sweep, the damping search, the seeds), loading what the cache
has and caching what it trains. :func:`timing` profiles the step time of
each spec's best cached setting side by side, and :func:`quick` is the CI
check.
"""

from collections.abc import Sequence
import json
import math
import os
import platform
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import fisher_optax as fo
from study import cache
from study import optimizers as optimizers_lib
from study import tasks as tasks_lib

QUICK_STEPS = 20
MIN_DECREASE = 1e-3
DAMPINGS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
DEFAULT_DAMPING = 1e-3
MAX_WIDEN = 3
MAX_BLOCKS = 200
EVAL_POINTS = 10
DIVERGED = 10.0  # a training loss above DIVERGED x the first one


# ---------------------------------------------------------------------------
# One run.


def run_one(task: tasks_lib.Task, compiled: optimizers_lib.Compiled,
            lr: float, damping: float | None, seed: int, steps: int,
            budget_seconds: float, eval_points: int = EVAL_POINTS,
            final_splits: tuple[str, ...] = ('validation', 'test')
            ) -> dict[str, Any]:
  """Trains one setting; returns the run's record (without its config)."""
  params = task.init(seed)
  opt_state = compiled.init(params, lr, damping)
  batches = task.batches(seed)
  first = next(batches)
  compile_s = 0.0
  if not compiled.compiled:
    start = time.perf_counter()
    # On copies: kfac-jax donates its arguments.
    jax.block_until_ready(compiled.step(
        *jax.tree.map(jnp.copy, (params, opt_state)), 0, *first))
    compile_s = time.perf_counter() - start
    compiled.compiled = True
  eval_every = max(1, steps // eval_points)
  evals = {'step': [0], 'seconds': [0.0],
           'loss': [task.evaluate(params, 'validation')['loss']]}
  # The last validation metrics and their step: the final ones when the run
  # ends on an evaluation step (an evaluation of a big model is not cheap).
  last_validation = (0, {})
  losses, times, elapsed, diverged = [], [], 0.0, False
  batch = first
  for count in range(steps):
    start = time.perf_counter()
    params, opt_state, loss = compiled.step(params, opt_state, count, *batch)
    loss = float(loss)
    elapsed += time.perf_counter() - start
    losses.append(loss)
    times.append(elapsed)
    if not math.isfinite(loss) or loss > DIVERGED * max(losses[0], 1e-8):
      diverged = True
      break
    if (count + 1) % eval_every == 0 or count + 1 == steps:
      evals['step'].append(count + 1)
      evals['seconds'].append(elapsed)
      last_validation = (count + 1, task.evaluate(
          compiled.evaluated(params, opt_state), 'validation'))
      evals['loss'].append(last_validation[1]['loss'])
    if budget_seconds and elapsed >= budget_seconds:
      break
    batch = next(batches)
  finals = {}
  for split in final_splits:
    if diverged:
      got = {}
    elif split == 'validation' and last_validation[0] == len(losses):
      got = last_validation[1]
    else:
      got = task.evaluate(compiled.evaluated(params, opt_state), split)
    finals[split] = {k: (v if math.isfinite(v) else math.inf)
                     for k, v in got.items()} or {'loss': math.inf}
  if not math.isfinite(finals['validation']['loss']):
    diverged = True
  block = max(1, math.ceil(len(losses) / MAX_BLOCKS))
  curve = {'step': [], 'loss': [], 'seconds': []}
  for start in range(0, len(losses), block):
    end = min(start + block, len(losses))
    curve['step'].append(end)
    curve['loss'].append(float(f'{np.mean(losses[start:end]):.6g}'))
    curve['seconds'].append(round(times[end - 1], 4))
  step_s = np.diff([0.0] + times)
  adaptive = [x for x in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, fo.AdaptiveState))
              if isinstance(x, fo.AdaptiveState)]
  extra = {}
  if adaptive:  # how many steps paid for the exact quadratic model
    extra['exact_models'] = int(adaptive[0].exact_models)
  return {
      **extra,
      'steps_done': len(losses), 'diverged': diverged,
      'curve': curve, 'eval': evals, 'final': finals,
      'step_seconds_median': float(np.median(step_s)),
      'step_seconds_mean': float(np.mean(step_s)),
      'compile_seconds': round(compile_s, 2),
  }


# ---------------------------------------------------------------------------
# The sweep.


class Study:
  """Runs (or loads from the cache) the settings of one task."""

  def __init__(self, task_name: str, size: str, steps: int,
               budget_seconds: float, cache_dir: str | None,
               verbose: bool = True, quick: bool = False):
    self.task = tasks_lib.TASKS[task_name](size)
    # The quick check reads the first and the last validation loss only.
    self._evaluation = (dict(eval_points=1, final_splits=('validation',))
                        if quick else {})
    self.size = size
    self.steps = steps
    self.budget_seconds = budget_seconds
    self.cache_dir = cache_dir
    self.verbose = verbose
    self._compiled: dict[str, optimizers_lib.Compiled] = {}
    self._tasks: dict[int, tasks_lib.Task] = {}

  def _task_for(self, settings):
    batch_size = settings.get('batch_size')
    if batch_size is None:
      return self.task
    if batch_size not in self._tasks:
      self._tasks[batch_size] = tasks_lib.TASKS[self.task.name](
          self.size, batch_size=int(batch_size))
    return self._tasks[batch_size]

  def run(self, spec: str, lr: float, damping: float | None, seed: int
          ) -> dict[str, Any]:
    config = cache.config_of(self.task.name, spec, lr, damping, seed,
                             self.steps, self.budget_seconds, self.size)
    path = (cache.cache_path(self.cache_dir, config) if self.cache_dir
            else None)
    defaults = optimizers_lib.resolved_defaults(spec)
    if path and os.path.exists(path):
      cached = cache.read_record(path)
      if optimizers_lib.same_defaults(cached.get('defaults', defaults),
                                      defaults):
        return cached
    name, settings = optimizers_lib.parse_spec(spec)
    task = self._task_for(settings)
    if spec not in self._compiled:
      self._compiled[spec] = optimizers_lib.build(task, name, settings)
    start = time.perf_counter()
    record = dict(config, **run_one(task, self._compiled[spec], lr, damping,
                                    seed, self.steps, self.budget_seconds,
                                    **self._evaluation))
    record.update(
        defaults=defaults, jax=jax.__version__, backend=jax.default_backend(),
        machine=platform.processor() or platform.machine(),
        xla_flags=os.environ.get('XLA_FLAGS', ''),
        batch_size=task.batch_size,
        date=time.strftime('%Y-%m-%d'))
    if self.verbose:
      print(f'  {self.task.name} {spec} lr={lr} damping={damping} '
            f'seed={seed}: validation loss {cache.score(record):.4g} '
            f'({record["steps_done"]} steps, '
            f'{time.perf_counter() - start:.0f} s)', flush=True)
    if path:
      cache.write_record(path, record)
    return record

  def sweep_lr(self, spec, centre, damping, size: int = 5) -> float:
    """Best learning rate of a ``size``-value grid, widened off the edges."""
    grid = optimizers_lib.lr_grid(centre, size)
    widened = {True: 0, False: 0}
    while True:
      scores = {lr: cache.score(self.run(spec, lr, damping, 0))
                for lr in grid}
      best = min(grid, key=lambda lr: (scores[lr], lr))
      # All diverged: look below the grid.
      up = (False if not math.isfinite(scores[best])
            else {grid[0]: False, grid[-1]: True}.get(best))
      if up is None or widened[up] >= MAX_WIDEN:
        return best
      widened[up] += 1
      grid = (grid + [optimizers_lib.half_decade(grid[-1], True)] if up
              else [optimizers_lib.half_decade(grid[0], False)] + grid)

  def tune(self, spec: str) -> tuple[float, float | None]:
    """The best (lr, damping) of ``spec`` by the protocol of the docstring."""
    name, settings = optimizers_lib.parse_spec(spec)
    opt = optimizers_lib.OPTIMIZERS[name]
    if opt.adaptive:
      return None, None
    centre = self.task.lr_centre[opt.family]
    if not opt.curvature:
      return self.sweep_lr(spec, centre, None), None
    lr = self.sweep_lr(spec, centre, DEFAULT_DAMPING)
    found = {DEFAULT_DAMPING: lr}
    tried = {DEFAULT_DAMPING: cache.score(
        self.run(spec, lr, DEFAULT_DAMPING, 0))}
    queue = [d for d in DAMPINGS if DEFAULT_DAMPING < d < 1.0]
    while queue:
      damping = queue.pop(0)
      # Low-curvature directions move like lr / damping: start half a
      # decade of learning rate higher per decade of damping.
      decades = round(math.log10(damping / DEFAULT_DAMPING))
      start = lr
      for _ in range(abs(decades)):
        start = optimizers_lib.half_decade(start, up=decades > 0)
      found[damping] = self.sweep_lr(spec, start, damping, size=3)
      tried[damping] = cache.score(
          self.run(spec, found[damping], damping, 0))
      # Go on past the edge while an edge wins.
      winner = min(tried, key=tried.get)
      lower = [d for d in DAMPINGS if d < min(tried)]
      higher = [d for d in DAMPINGS if d > max(tried)]
      if not queue and lower and winner == min(tried):
        queue.append(lower[-1])
      elif not queue and higher and winner == max(tried):
        queue.append(higher[0])
    damping = min(tried, key=lambda d: (tried[d], -d))
    return found[damping], damping

  def seeds(self, spec: str, lr, damping, seeds: int) -> list[dict]:
    return [self.run(spec, lr, damping, seed) for seed in range(seeds)]


def first_setting(study, spec):
  """The sweep's first run: (lr, damping, seed), to check it can run."""
  opt = optimizers_lib.OPTIMIZERS[optimizers_lib.parse_spec(spec)[0]]
  if opt.adaptive:
    return None, None, 0
  return (optimizers_lib.lr_grid(study.task.lr_centre[opt.family])[0],
          DEFAULT_DAMPING if opt.curvature else None, 0)


# ---------------------------------------------------------------------------
# Step-time profiles.


def time_steps(task: tasks_lib.Task, settings: dict[str, tuple],
               period: int, repeats: int, contiguous: bool = False
               ) -> dict[str, list[float]]:
  """Seconds of each step of a ``period``, every optimizer side by side.

  A step's cost does not depend on the data or on the learning rate, only
  on where it falls in the optimizer's statistics and inverse periods, so
  one profile of ``period`` steps (a multiple of every period) gives the
  time of any run of the optimizer. The optimizers take turns, a block of
  ``period`` steps each, in an order reversed on every other repeat, so
  that drift of the machine hits them alike; each step's time is the median
  over the repeats.

  With ``contiguous``, the warm-up runs on a copy and the profile is the
  blocks one after another: the time of each of the run's first ``period
  x repeats`` steps, for a step whose cost depends on the data (the
  adaptive step's carried quadratic models, ``model_every``).

  Args:
    task: the task.
    settings: spec -> ``(lr, damping)``.
    period: steps per block; a multiple of every statistics and inverse
      period of the specs.
    repeats: blocks per optimizer.
    contiguous: see above.

  Returns:
    spec -> ``period`` seconds, the median time of each step of a block
    (``contiguous``: ``period x repeats`` seconds).
  """
  states = {}
  for spec, (lr, damping) in settings.items():
    name, opts = optimizers_lib.parse_spec(spec)
    spec_task = (task if 'batch_size' not in opts else tasks_lib.TASKS[
        task.name]('full', batch_size=int(opts['batch_size'])))
    compiled = optimizers_lib.build(spec_task, name, opts)
    params = spec_task.init(0)
    opt_state = compiled.init(params, lr, damping)
    states[spec] = [compiled, params, opt_state, spec_task.batches(0), 0]
    warm = states[spec]
    if contiguous:  # kfac-jax donates its arguments: copies
      warm = [compiled, *jax.tree.map(jnp.copy, (params, opt_state)),
              spec_task.batches(0), 0]
    _time_block(warm, period)  # compiles and warms up
  times = {spec: [] for spec in settings}
  for rep in range(repeats):
    order = list(settings)[::-1 if rep % 2 else 1]
    for spec in order:
      times[spec].append(_time_block(states[spec], period))
  if contiguous:
    return {spec: [x for block in t for x in block]
            for spec, t in times.items()}
  return {spec: [float(np.median(col)) for col in zip(*t)]
          for spec, t in times.items()}


def _time_block(state, period: int) -> list[float]:
  compiled, params, opt_state, batches, count = state
  out = []
  for _ in range(period):
    batch = next(batches)
    start = time.perf_counter()
    params, opt_state, loss = compiled.step(params, opt_state, count, *batch)
    float(loss)
    out.append(time.perf_counter() - start)
    count += 1
  state[1:] = [params, opt_state, batches, count]
  return out


def merge_profiles(saved: dict, settings: dict, profiles: dict,
                   run: dict | None = None) -> dict:
  """Adds new step-time profiles to the saved ones of a task.

  When the saved file keeps specs that were not profiled again, the new
  profiles are scaled by the ratio of the saved baseline profile's mean to
  the new one's (the baseline is then not replaced): each new spec keeps
  the ratio to the baseline measured side by side in its run, and the
  older specs keep theirs.

  Args:
    saved: the task's saved ``settings``, ``profiles``, (optionally)
      ``rescaled`` (spec -> factor) and ``rescaled_runs`` (spec -> run),
      and the ``run`` keys of the run that profiled its baseline.
    settings: spec -> ``(lr, damping)`` of the new profiles.
    profiles: spec -> seconds of each step, from one ``time_steps`` run
      that includes the baseline whenever ``saved`` has a baseline.
    run: this run's ``period``, ``repeats``, ``xla_flags``, ``jax`` and
      ``date``, or None to leave them out of the result.

  Returns:
    the merged ``settings``, ``profiles``, ``rescaled`` and
    ``rescaled_runs``; with ``run``, also the keys of the run that the
    baseline profile comes from (the saved one's when this run's specs were
    scaled to it).
  """
  baseline = optimizers_lib.BASELINE
  rescaled = {s: f for s, f in saved.get('rescaled', {}).items()
              if s not in profiles}
  header = run or {}
  if (baseline in saved['profiles']
      and set(saved['profiles']) - set(profiles)):
    if baseline not in profiles:
      raise ValueError(f'profile {baseline!r} beside the new specs: the '
                       'saved profiles are relative to it')
    factor = float(np.mean(saved['profiles'][baseline])
                   / np.mean(profiles[baseline]))
    profiles = {s: [t * factor for t in p] for s, p in profiles.items()
                if s != baseline}
    settings = {s: v for s, v in settings.items() if s != baseline}
    rescaled.update({s: factor for s in profiles})
    if run is not None:
      header = {k: saved[k] for k in run if k in saved}
  runs = {s: r for s, r in saved.get('rescaled_runs', {}).items()
          if s in rescaled}
  if run is not None:
    runs.update({s: run for s in profiles if s in rescaled})
  return {**header,
          'settings': {**saved['settings'], **settings},
          'profiles': {**saved['profiles'], **profiles},
          'rescaled': rescaled, 'rescaled_runs': runs}


def timing(task_name: str, cache_dir: str, out_dir: str, specs, period: int,
           repeats: int, contiguous: bool = False) -> str:
  """Profiles each spec's best cached setting; writes ``<task>.json``."""
  records = cache.load_records(os.path.join(cache_dir, task_name))
  kept, _, _ = cache.select_budget(task_name, records)
  settings = {}
  for spec in specs or sorted({r['optimizer'] for r in kept}):
    mine = [r for r in kept if r['optimizer'] == spec]
    if mine:
      best, _ = cache.best_setting(mine)
      settings[spec] = (best['lr'], best['damping'])
  path = os.path.join(out_dir, f'{task_name}.json')
  saved = {'settings': {}, 'profiles': {}}
  if os.path.exists(path):  # profiles of other specs stay
    with open(path) as f:
      saved = json.load(f)
  baseline = optimizers_lib.BASELINE
  if baseline in saved['profiles'] and baseline not in settings:
    settings[baseline] = tuple(saved['settings'][baseline])
  task = tasks_lib.TASKS[task_name]('full')
  profiles = time_steps(task, settings, period, repeats, contiguous)
  run = {'period': period, 'repeats': repeats, 'contiguous': contiguous,
         'xla_flags': os.environ.get('XLA_FLAGS', ''),
         'jax': jax.__version__, 'date': time.strftime('%Y-%m-%d')}
  merged = merge_profiles(saved, settings, profiles, run)
  os.makedirs(out_dir, exist_ok=True)
  with open(path, 'w') as f:
    json.dump({'task': task_name, **merged}, f, indent=1)
  for spec, prof in profiles.items():
    print(f'  {task_name} {spec}: {np.mean(prof) * 1e3:.2f} ms per step '
          f'(median step {np.median(prof) * 1e3:.2f} ms)', flush=True)
  return path


# ---------------------------------------------------------------------------
# The CI check.


def quick(optimizers: list[str], tasks: list[str],
          seeds: Sequence[int] = (0,)) -> list[str]:
  """One short run of each optimizer on each task at a tiny size.

  Returns:
    the failures: every (task, optimizer) that diverged or whose validation
    loss did not drop by at least ``MIN_DECREASE`` (relative), on any of
    ``seeds`` (named ``task/optimizer`` for seed 0, with ``@seed``
    appended for the others).
  """
  failures = []
  for task_name in tasks:
    study = Study(task_name, 'quick', QUICK_STEPS, 0.0, None, verbose=False,
                  quick=True)
    for spec in optimizers:
      name, _ = optimizers_lib.parse_spec(spec)
      opt = optimizers_lib.OPTIMIZERS[name]
      if opt.adaptive:
        lr, damping = None, None
      else:
        lr, damping = study.task.quick.get(
            opt.family, (study.task.lr_centre[opt.family], DEFAULT_DAMPING))
      for seed in seeds:
        try:
          record = study.run(spec, lr, damping if opt.curvature else None,
                             seed)
        except optimizers_lib.Skip as e:
          print(f'  {task_name} {spec}: skipped ({e})')
          break
        before = record['eval']['loss'][0]
        after = record['final']['validation']['loss']
        ok = not record['diverged'] and after < (1 - MIN_DECREASE) * before
        name = spec if seed == 0 else f'{spec}@{seed}'
        print(f'  {task_name:12s} {name:14s} validation loss {before:.4g} '
              f'-> {after:.4g} {"ok" if ok else "NOT REDUCED"}', flush=True)
        if not ok:
          failures.append(f'{task_name}/{name}')
  return failures
