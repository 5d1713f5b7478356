r"""Convergence study: each optimizer tuned on five tasks, per step and second.

For each task of ``_convergence_tasks.py`` (``autoencoder``, ``cnn``,
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

An optimizer is named as in ``OPTIMIZERS``, optionally with settings after
colons, ``adafisher:mode=reference:stats_every=1``; besides the factory's
keyword arguments a spec may set ``fisher`` (``empirical`` or the task's
sampled Fisher, ``sampled``), ``warmup`` (linear learning-rate warm-up
steps) and ``batch_size``. Such variants are how the investigation of
``docs/choosing.md`` was run.

Timings are for whatever machine runs the study. Runs record the seconds
they took, which other work on the machine inflates; ``--timing`` (on a quiet
machine) profiles every cached spec's best setting side by side, and the
report then uses those profiles for every run of the spec. ``--timing
--optimizers a,b`` profiles ``a`` and ``b`` beside Adam and scales their
profiles by the ratio of the saved Adam profile to the new one, so that the
specs profiled earlier keep their ratios to Adam. The committed
results were measured with one XLA thread per run (``XLA_FLAGS=
'--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'``),
two runs at a time pinned to separate cores.

Usage::

  python benchmarks/convergence.py --task cnn [--optimizers adam,kfac]
      [--budget-steps 600] [--budget-seconds 0] [--seeds 3]
  python benchmarks/convergence.py --report
  python benchmarks/convergence.py --quick   # CI: every optimizer, tiny
"""

import argparse
from collections.abc import Callable
import dataclasses
import functools
import hashlib
import inspect
import json
import math
import os
import platform
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _convergence_tasks as tasks_lib  # noqa: E402  pylint: disable=g-import-not-at-top
import _kfac_jax  # noqa: E402  pylint: disable=g-import-not-at-top
import fisher_optax as fo  # noqa: E402  pylint: disable=g-import-not-at-top

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
STEPS = {'autoencoder': 300, 'cnn': 400, 'transformer': 200,
         'regression': 1000, 'resnet': 200}
QUICK_STEPS = 20
MIN_DECREASE = 1e-3
DAMPINGS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
DEFAULT_DAMPING = 1e-3
MAX_WIDEN = 3
MAX_BLOCKS = 200
EVAL_POINTS = 10
DIVERGED = 10.0  # a training loss above DIVERGED x the first one


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """How to build one optimizer of the study.

  Attributes:
    family: key of the task's ``lr_centre``.
    factory: ``factory(learning_rate, **kwargs)`` (or, for curvature
      methods, with ``damping=``) returning an optax transformation.
    curvature: whether it takes ``layer_stats`` and ``damping``.
    layers_hint: whether it takes ``layers=`` (the Kronecker family and
      MBF need it for attention layers).
    adaptive: whether it chooses its own learning rate (and damping):
      ``fo.adaptive``, kfac-jax's adaptive mode, the tuning-free
      first-order optimizers of ``optax.contrib``. Run at its defaults, no
      sweep.
    eval_params: ``(params, opt_state) -> params`` to evaluate (the
      schedule-free average); None: ``params``.
  """

  family: str
  factory: Callable[..., Any] | None
  curvature: bool
  layers_hint: bool = False
  adaptive: bool = False
  eval_params: Callable[[Any, Any], Any] | None = None


def _sgd_nesterov(learning_rate):
  return optax.sgd(learning_rate, momentum=0.9, nesterov=True)


# The optimizer every other is measured against, in steps and in seconds.
BASELINE = 'adam'

OPTIMIZERS = {
    'adam': Optimizer('adam', optax.adam, False),
    'adamw': Optimizer('adam', optax.adamw, False),
    'sgd_nesterov': Optimizer('sgd', _sgd_nesterov, False),
    # The one-line use: one learning rate for the orthogonalised 2-D
    # weights and for the Adam-updated rest (conv kernels, biases, norms).
    'muon': Optimizer('muon', optax.contrib.muon, False),
    # The paper's arithmetic, the library's default until issue 25 and the
    # mode of every AdaFisher run cached before it; the default since, the
    # official code's, is 'adafisher:mode=reference'.
    'adafisher': Optimizer(
        'adafisher', functools.partial(fo.adafisher, mode='paper'), True),
    'adafisherw': Optimizer(
        'adafisher', functools.partial(fo.adafisherw, mode='paper'), True),
    'kfac': Optimizer('kronecker', fo.kfac, True, True),
    'ekfac': Optimizer('kronecker', fo.ekfac, True, True),
    'tkfac': Optimizer('kronecker', fo.tkfac, True, True),
    'tekfac': Optimizer('kronecker', fo.tekfac, True, True),
    'mbf': Optimizer('mbf', fo.mini_block_fisher, True, True),
    'kfac_jax': Optimizer('kronecker', None, True),
    # No arguments: learning rate, momentum and damping from the quadratic
    # model (fo.adaptive), no sweep.
    'kfac_adaptive': Optimizer('kronecker', fo.kfac, True, True, True),
    'ekfac_adaptive': Optimizer('kronecker', fo.ekfac, True, True, True),
    'tkfac_adaptive': Optimizer('kronecker', fo.tkfac, True, True, True),
    'tekfac_adaptive': Optimizer('kronecker', fo.tekfac, True, True, True),
    'mbf_adaptive': Optimizer(
        'mbf', functools.partial(fo.mini_block_fisher, None), True, True,
        True),
    # AdaFisher's direction (no momentum) in the quadratic model: item 4 of
    # issue 25 asks whether it helps. AdaFisher keeps its own damping (the
    # normalised Fisher's); only the model's damping adapts.
    'adafisher_adaptive': Optimizer(
        'adafisher', lambda **kw: fo.adaptive(
            fo.scale_by_adafisher(b1=0.0, mode='paper', damping=0.1, **kw)),
        True, False, True),
    # kfac-jax's adaptive mode as its MNIST examples configure it.
    'kfac_jax_adaptive': Optimizer('kronecker', None, True, False, True),
    # What a user who will not tune reaches for today: optax.contrib's
    # tuning-free first-order optimizers at their defaults, no sweep.
    'prodigy': Optimizer('tuning_free', optax.contrib.prodigy, False,
                         adaptive=True),
    'dadapt_adamw': Optimizer('tuning_free', optax.contrib.dadapt_adamw,
                              False, adaptive=True),
    'dog': Optimizer('tuning_free', optax.contrib.dog, False,
                     adaptive=True),
    # Evaluated at its averaged iterate x, as the paper and optax's docs do;
    # its training loss is the one at y, where it takes its gradients.
    'schedule_free_adamw': Optimizer(
        'tuning_free', optax.contrib.schedule_free_adamw, False,
        adaptive=True,
        eval_params=lambda params, state: (
            optax.contrib.schedule_free_eval_params(state, params))),
}
# Left out of the CI check (--quick without --optimizers): the adaptive
# step around the other preconditioners runs kfac_adaptive's code, and
# each preconditioner is in the check as a fixed-step optimizer.
# optax.contrib's tuning-free optimizers are optax's code; schedule-free
# stays in the check for the study's path of optimizers at their defaults
# (DoG's first steps are tiny by design: 20 of them move no loss).
QUICK_SKIP = ('ekfac_adaptive', 'tkfac_adaptive', 'tekfac_adaptive',
              'mbf_adaptive', 'adafisher_adaptive', 'prodigy',
              'dadapt_adamw', 'dog')
# Spec keys that are not the factory's arguments. ``curvature=ggn`` gives
# an adaptive optimizer the task's outputs_fn / outputs_loss (exact
# Gauss-Newton products); the default is the captured statistics.
# ``curvature_batch=n`` computes those products on the batch's first n
# examples only (the gradient and the loss stay the whole batch's), as a
# user would by slicing the batch in outputs_fn / outputs_loss.
_RUN_KEYS = ('fisher', 'warmup', 'batch_size', 'curvature',
             'curvature_batch')


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
  """``'kfac:stats_every=10:fisher=sampled'`` -> name and settings."""
  name, *pairs = spec.split(':')
  if name not in OPTIMIZERS:
    raise ValueError(f'unknown optimizer {name!r}; known: '
                     f'{", ".join(OPTIMIZERS)}.')
  settings = {}
  for pair in pairs:
    key, _, value = pair.partition('=')
    for cast in (int, float):
      try:
        value = cast(value)
        break
      except ValueError:
        pass
    else:
      value = {'True': True, 'False': False, 'None': None}.get(value, value)
    settings[key] = value
  return name, settings


def resolved_defaults(spec: str) -> dict[str, str]:
  """The factory's defaults that ``spec`` leaves unset, as text.

  A cached run stores them; a run cached under other defaults (the library
  changed one since) is stale and trained again.
  """
  name, settings = parse_spec(spec)
  opt = OPTIMIZERS[name]
  if opt.factory is None:
    return {}
  skip = {'learning_rate', 'damping', 'layers', 'loss_reduction', 'mask',
          'axis_name'}
  factories = [opt.factory]
  if opt.adaptive and opt.curvature:
    # The initial damping is a default of the run, and so are the
    # adaptive step's own.
    skip.discard('damping')
    factories.append(fo.adaptive)
  out = {}
  for factory in factories:
    prefix = '' if factory is opt.factory else 'adaptive.'
    out.update({prefix + k: repr(p.default)
                for k, p in inspect.signature(factory).parameters.items()
                if k not in skip and k not in settings
                and p.default is not inspect.Parameter.empty})
  return out


def same_defaults(cached: dict[str, str], current: dict[str, str]) -> bool:
  """Whether a run cached under ``cached`` defaults is still current.

  A default that both know must be unchanged. An option the library added
  after the run was cached is taken to keep the old behaviour by default
  (options are added that way), so it does not make the run stale.
  """
  return all(current[k] == v for k, v in cached.items() if k in current)


def half_decade(lr: float, up: bool) -> float:
  """The next value of the ..., 1, 3, 10, 30, ... grid above or below.

  Rounded to 3 significant digits, so that a value reached by several
  paths is the same float (it is part of a cached run's key).
  """
  exponent = math.floor(math.log10(lr) + 1e-9)
  mantissa = lr / 10 ** exponent
  if up:
    return float(f'{(3.0 if mantissa < 2 else 10.0) * 10 ** exponent:.3g}')
  return float(f'{(1.0 if mantissa > 2 else 0.3) * 10 ** exponent:.3g}')


def lr_grid(centre: float, size: int = 5) -> list[float]:
  """``size`` half-decade values around ``centre`` (which is one of them)."""
  grid = [centre]
  while len(grid) < size:
    grid = ([half_decade(grid[0], up=False)] + grid
            if len(grid) % 2 else grid + [half_decade(grid[-1], up=True)])
  return grid


# ---------------------------------------------------------------------------
# One run.


@dataclasses.dataclass
class Compiled:
  """A jitted step for one (task, optimizer, settings) without lr/damping."""

  init: Callable[[Any, float, float | None], Any]
  step: Callable[..., Any]
  compiled: bool = False
  eval_params: Callable[[Any, Any], Any] | None = None

  def evaluated(self, params, opt_state):
    """The parameters to evaluate after a step."""
    if self.eval_params is None:
      return params
    return self.eval_params(params, opt_state)


def _schedule_warmup(tx, warmup: int):
  if not warmup:
    return tx
  ramp = lambda count: jnp.minimum(1.0, (count + 1) / warmup)
  return optax.chain(tx, optax.scale_by_schedule(ramp))


def build(task: tasks_lib.Task, name: str, settings: dict[str, Any]
          ) -> Compiled:
  """The optimizer with lr (and damping) injected, and its jitted step."""
  opt = OPTIMIZERS[name]
  kwargs = {k: v for k, v in settings.items() if k not in _RUN_KEYS}
  fisher = settings.get('fisher', 'empirical')
  if fisher == 'sampled':
    if task.sampled_fisher is None:
      raise ValueError(f'{task.name} has no sampled Fisher.')
    fisher = task.sampled_fisher
  warmup = int(settings.get('warmup', 0))
  if name in ('kfac_jax', 'kfac_jax_adaptive'):
    return _build_kfac_jax(task, kwargs, warmup, opt.adaptive)
  if opt.adaptive and not opt.curvature:
    return _build_defaults(opt, task, kwargs)
  if opt.adaptive:
    return _build_adaptive(task, opt, kwargs, fisher,
                           settings.get('curvature', 'captured'),
                           settings.get('curvature_batch'))
  if opt.curvature:
    step_fn = fo.linen.value_grad_and_stats(task.loss_fn, fisher=fisher)
    if opt.layers_hint:
      batch = next(task.batches(0))
      kwargs['layers'] = jax.eval_shape(
          lambda p: step_fn(p, *batch, **_fisher_key(fisher, 0)),
          task.init(0))[2]
      if name != 'mbf':
        kwargs.setdefault('loss_reduction', task.loss_reduction)

    def make(learning_rate, damping):
      return _schedule_warmup(
          opt.factory(learning_rate, damping=damping, **kwargs), warmup)
  else:
    grad_fn = jax.value_and_grad(task.loss_fn)
    step_fn = lambda p, *b, **_: (*grad_fn(p, *b), None)

    def make(learning_rate):
      return _schedule_warmup(opt.factory(learning_rate, **kwargs), warmup)

  tx = optax.inject_hyperparams(make)

  def init(params, lr, damping):
    hyper = {'learning_rate': lr}
    if opt.curvature:
      hyper['damping'] = damping
    return tx(**hyper).init(params)

  @jax.jit
  def step(params, opt_state, count, *batch):
    loss, grads, stats = step_fn(params, *batch,
                                 **_fisher_key(fisher, count))
    extra = {} if stats is None else {'layer_stats': stats}
    # The hyperparameters live in opt_state; any values build the update.
    updates, opt_state = tx(learning_rate=0.0, **(
        {'damping': 1.0} if opt.curvature else {})).update(
            grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state, loss

  return Compiled(init, step)


def _build_defaults(opt, task, kwargs) -> Compiled:
  """A first-order optimizer at its defaults (a tuning-free one)."""
  tx = opt.factory(**kwargs)
  grad_fn = jax.value_and_grad(task.loss_fn)

  def init(params, lr, damping):
    del lr, damping
    return tx.init(params)

  @jax.jit
  def step(params, opt_state, count, *batch):
    del count
    loss, grads = grad_fn(params, *batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return Compiled(init, step, eval_params=opt.eval_params)


def _build_adaptive(task, opt, kwargs, fisher, curvature,
                    curvature_batch=None) -> Compiled:
  """An optimizer that takes no learning rate, at its defaults."""
  if curvature not in ('captured', 'ggn'):
    raise ValueError(f'curvature={curvature!r}: captured or ggn')
  if curvature_batch is not None and curvature != 'ggn':
    raise ValueError('curvature_batch needs curvature=ggn')
  step_fn = fo.linen.value_grad_and_stats(task.loss_fn, fisher=fisher)
  batch = next(task.batches(0))
  kwargs = dict(kwargs)
  if opt.layers_hint:
    kwargs['layers'] = jax.eval_shape(
        lambda p: step_fn(p, *batch, **_fisher_key(fisher, 0)),
        task.init(0))[2]
  if opt.family == 'kronecker':
    kwargs.setdefault('loss_reduction', task.loss_reduction)
  tx = opt.factory(**kwargs)

  def init(params, lr, damping):
    del lr, damping
    return tx.init(params)

  @jax.jit
  def step(params, opt_state, count, *batch):
    loss, grads, stats = step_fn(params, *batch,
                                 **_fisher_key(fisher, count))
    extra = {}
    if curvature == 'ggn':
      part = (batch if curvature_batch is None else
              tuple(b[:int(curvature_batch)] for b in batch))
      extra = dict(outputs_fn=lambda p: task.outputs(p, *part),
                   outputs_loss=lambda z: task.outputs_loss(z, *part))
    updates, opt_state = tx.update(
        grads, opt_state, params, layer_stats=stats, value=loss,
        value_fn=lambda p: task.loss_fn(p, *batch), **extra)
    return optax.apply_updates(params, updates), opt_state, loss

  return Compiled(init, step)


def _fisher_key(fisher: str, count) -> dict[str, Any]:
  if fisher == 'empirical':
    return {}
  return {'fisher_key': jax.random.fold_in(jax.random.key(17), count)}


class Skip(Exception):
  """An optimizer that cannot run a task here (said, then left out)."""


def _build_kfac_jax(task, kwargs, warmup, adaptive=False) -> Compiled:
  kfac_jax = _kfac_jax.import_kfac_jax()
  if kfac_jax is None:
    raise Skip("kfac_jax needs the kfac extra: pip install -e '.[kfac]'")
  if task.kfac_jax_loss is None:
    raise Skip(f'kfac_jax does not run {task.name}')
  if warmup:
    raise ValueError('kfac_jax runs take no warmup.')
  loss = task.kfac_jax_loss(kfac_jax)
  if adaptive:
    # kfac-jax's examples/{autoencoder,classifier}_mnist/pipeline.py, with
    # no burn-in (it needs a data iterator) and no L2 (the other
    # optimizers of the study have none).
    config = dict(
        use_adaptive_learning_rate=True, use_adaptive_momentum=True,
        use_adaptive_damping=True, damping_adaptation_interval=5,
        damping_adaptation_decay=0.95, initial_damping=150.0,
        min_damping=1e-5, max_damping=1000.0, inverse_update_period=5,
        curvature_update_period=1)
    config.update(kwargs)
  else:
    config = dict(
        use_adaptive_learning_rate=False, use_adaptive_momentum=False,
        use_adaptive_damping=False,
        curvature_update_period=kwargs.get('stats_every', 1),
        inverse_update_period=kwargs.get('inverse_every', 20))
  opt = kfac_jax.Optimizer(
      value_and_grad_func=jax.value_and_grad(loss), l2_reg=0.0,
      num_burnin_steps=0, curvature_ema=kwargs.get('fisher_decay', 0.95),
      multi_device=False, **config)
  rng = jax.random.key(0)
  momentum = jnp.asarray(kwargs.get('momentum', 0.9))

  def init(params, lr, damping):
    batch = next(task.batches(0))
    state = opt.init(jax.tree.map(jnp.array, params), rng, batch)
    if adaptive:
      return {'kfac': state}
    return {'kfac': state, 'lr': jnp.asarray(lr),
            'damping': jnp.asarray(damping)}

  def step(params, opt_state, count, *batch):
    fixed = {} if adaptive else dict(
        learning_rate=opt_state['lr'], momentum=momentum,
        damping=opt_state['damping'])
    params, state, stats = opt.step(
        jax.tree.map(jnp.array, params), opt_state['kfac'], rng,
        batch=batch, global_step_int=count, **fixed)
    return params, dict(opt_state, kfac=state), stats['loss']

  return Compiled(init, step)


def run_one(task: tasks_lib.Task, compiled: Compiled, lr: float,
            damping: float | None, seed: int, steps: int,
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
# The cache and the sweep.


def config_of(task: str, spec: str, lr: float, damping: float | None,
              seed: int, steps: int, budget_seconds: float, size: str
              ) -> dict[str, Any]:
  return {'task': task, 'size': size, 'optimizer': spec, 'lr': lr,
          'damping': damping, 'seed': seed, 'steps': steps,
          'budget_seconds': budget_seconds}


def cache_path(cache_dir: str, config: dict[str, Any]) -> str:
  key = json.dumps(config, sort_keys=True)
  digest = hashlib.sha1(key.encode()).hexdigest()[:12]
  safe = config['optimizer'].replace(':', '+').replace('=', '-')
  return os.path.join(cache_dir, config['task'], f'{safe}__{digest}.json')


def score(record: dict[str, Any]) -> float:
  """The sweep's criterion: final validation loss (inf when diverged)."""
  if record['diverged']:
    return math.inf
  return record['final']['validation']['loss']


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
    self._compiled: dict[str, Compiled] = {}
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
    config = config_of(self.task.name, spec, lr, damping, seed, self.steps,
                       self.budget_seconds, self.size)
    path = cache_path(self.cache_dir, config) if self.cache_dir else None
    defaults = resolved_defaults(spec)
    if path and os.path.exists(path):
      with open(path) as f:
        cached = json.load(f)
      if same_defaults(cached.get('defaults', defaults), defaults):
        return cached
    name, settings = parse_spec(spec)
    task = self._task_for(settings)
    if spec not in self._compiled:
      self._compiled[spec] = build(task, name, settings)
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
            f'seed={seed}: validation loss {score(record):.4g} '
            f'({record["steps_done"]} steps, '
            f'{time.perf_counter() - start:.0f} s)', flush=True)
    if path:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path + '.tmp', 'w') as f:
        json.dump(record, f)
      os.replace(path + '.tmp', path)
    return record

  def sweep_lr(self, spec, centre, damping, size: int = 5) -> float:
    """Best learning rate of a ``size``-value grid, widened off the edges."""
    grid = lr_grid(centre, size)
    widened = {True: 0, False: 0}
    while True:
      scores = {lr: score(self.run(spec, lr, damping, 0)) for lr in grid}
      best = min(grid, key=lambda lr: (scores[lr], lr))
      # All diverged: look below the grid.
      up = (False if not math.isfinite(scores[best])
            else {grid[0]: False, grid[-1]: True}.get(best))
      if up is None or widened[up] >= MAX_WIDEN:
        return best
      widened[up] += 1
      grid = (grid + [half_decade(grid[-1], True)] if up
              else [half_decade(grid[0], False)] + grid)

  def tune(self, spec: str) -> tuple[float, float | None]:
    """The best (lr, damping) of ``spec`` by the protocol of the docstring."""
    name, settings = parse_spec(spec)
    opt = OPTIMIZERS[name]
    if opt.adaptive:
      return None, None
    centre = self.task.lr_centre[opt.family]
    if not opt.curvature:
      return self.sweep_lr(spec, centre, None), None
    lr = self.sweep_lr(spec, centre, DEFAULT_DAMPING)
    found = {DEFAULT_DAMPING: lr}
    tried = {DEFAULT_DAMPING: score(self.run(spec, lr, DEFAULT_DAMPING, 0))}
    queue = [d for d in DAMPINGS if DEFAULT_DAMPING < d < 1.0]
    while queue:
      damping = queue.pop(0)
      # Low-curvature directions move like lr / damping: start half a
      # decade of learning rate higher per decade of damping.
      decades = round(math.log10(damping / DEFAULT_DAMPING))
      start = lr
      for _ in range(abs(decades)):
        start = half_decade(start, up=decades > 0)
      found[damping] = self.sweep_lr(spec, start, damping, size=3)
      tried[damping] = score(self.run(spec, found[damping], damping, 0))
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
    name, opts = parse_spec(spec)
    spec_task = (task if 'batch_size' not in opts else tasks_lib.TASKS[
        task.name]('full', batch_size=int(opts['batch_size'])))
    compiled = build(spec_task, name, opts)
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
  rescaled = {s: f for s, f in saved.get('rescaled', {}).items()
              if s not in profiles}
  header = run or {}
  if (BASELINE in saved['profiles']
      and set(saved['profiles']) - set(profiles)):
    if BASELINE not in profiles:
      raise ValueError(f'profile {BASELINE!r} beside the new specs: the '
                       'saved profiles are relative to it')
    factor = float(np.mean(saved['profiles'][BASELINE])
                   / np.mean(profiles[BASELINE]))
    profiles = {s: [t * factor for t in p] for s, p in profiles.items()
                if s != BASELINE}
    settings = {s: v for s, v in settings.items() if s != BASELINE}
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
  import _convergence_report  # pylint: disable=g-import-not-at-top
  records = _convergence_report.load_records(os.path.join(cache_dir,
                                                          task_name))
  kept, _, _ = _convergence_report.select_budget(task_name, records)
  settings = {}
  for spec in specs or sorted({r['optimizer'] for r in kept}):
    mine = [r for r in kept if r['optimizer'] == spec]
    if mine:
      best, _ = _convergence_report.best_setting(mine)
      settings[spec] = (best['lr'], best['damping'])
  path = os.path.join(out_dir, f'{task_name}.json')
  saved = {'settings': {}, 'profiles': {}}
  if os.path.exists(path):  # profiles of other specs stay
    with open(path) as f:
      saved = json.load(f)
  if BASELINE in saved['profiles'] and BASELINE not in settings:
    settings[BASELINE] = tuple(saved['settings'][BASELINE])
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
# Entry points.


def _first_setting(study, spec):
  """The sweep's first run: (lr, damping, seed), to check it can run."""
  opt = OPTIMIZERS[parse_spec(spec)[0]]
  if opt.adaptive:
    return None, None, 0
  return (lr_grid(study.task.lr_centre[opt.family])[0],
          DEFAULT_DAMPING if opt.curvature else None, 0)


def quick(optimizers: list[str], tasks: list[str]) -> list[str]:
  """One short run of each optimizer on each task at a tiny size.

  Returns:
    the failures: every (task, optimizer) that diverged or whose validation
    loss did not drop by at least ``MIN_DECREASE`` (relative).
  """
  failures = []
  for task_name in tasks:
    study = Study(task_name, 'quick', QUICK_STEPS, 0.0, None, verbose=False,
                  quick=True)
    for spec in optimizers:
      name, _ = parse_spec(spec)
      opt = OPTIMIZERS[name]
      if opt.adaptive:
        lr, damping = None, None
      else:
        lr, damping = study.task.quick.get(
            opt.family, (study.task.lr_centre[opt.family], DEFAULT_DAMPING))
      try:
        record = study.run(spec, lr, damping if opt.curvature else None, 0)
      except Skip as e:
        print(f'  {task_name} {spec}: skipped ({e})')
        continue
      before = record['eval']['loss'][0]
      after = record['final']['validation']['loss']
      ok = not record['diverged'] and after < (1 - MIN_DECREASE) * before
      print(f'  {task_name:12s} {spec:14s} validation loss {before:.4g} -> '
            f'{after:.4g} {"ok" if ok else "NOT REDUCED"}', flush=True)
      if not ok:
        failures.append(f'{task_name}/{spec}')
  return failures


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
  parser.add_argument('--seeds', type=int, default=3)
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
  parser.add_argument('--cache', default=os.path.join(RESULTS, 'cache'))
  args = parser.parse_args(argv)

  kfac_jax_names = ('kfac_jax', 'kfac_jax_adaptive')
  names = [n for n in OPTIMIZERS if n not in kfac_jax_names]
  if _kfac_jax.import_kfac_jax() is not None:
    names.extend(kfac_jax_names)
  optimizers = (args.optimizers.split(',') if args.optimizers else names)
  tasks = args.task.split(',')
  if args.quick and not args.optimizers:
    optimizers = [n for n in optimizers if n not in QUICK_SKIP]
  if args.quick:
    failures = quick(optimizers, tasks)
    if failures:
      print('loss not reduced: ' + ', '.join(failures))
      return 1
    print('every optimizer reduced the loss on every task')
    return 0
  if args.report:
    import _convergence_report  # pylint: disable=g-import-not-at-top
    _convergence_report.write_all(args.cache, RESULTS,
                                  os.path.join(RESULTS, 'timing'))
    return 0
  if args.timing:
    for task_name in tasks:
      # Without --optimizers: every spec the cache has runs of.
      timing(task_name, args.cache, os.path.join(RESULTS, 'timing'),
             args.optimizers and optimizers, args.period, args.repeats,
             args.contiguous)
    return 0
  print(f'JAX {jax.__version__} on {jax.default_backend()}, '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}', flush=True)
  for task_name in tasks:
    steps = args.budget_steps or STEPS[task_name]
    study = Study(task_name, 'full', steps, args.budget_seconds, args.cache)
    for spec in optimizers:
      # The first run checks that the spec can run here. With --fixed it is
      # that setting's seed 0: the sweep's first setting would be cached as
      # one more seed-0 run, which the report could pick as the best.
      if args.fixed:
        lr, *rest = (float(v) for v in args.fixed.split(','))
        first = (lr, rest[0] if rest else None, 0)
      else:
        first = _first_setting(study, spec)
      try:
        study.run(spec, *first)
      except Skip as e:
        print(f'{task_name} {spec}: skipped ({e})')
        continue
      lr, damping = first[:2] if args.fixed else study.tune(spec)
      study.seeds(spec, lr, damping, args.seeds)
      print(f'{task_name} {spec}: best lr={lr} damping={damping}',
            flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
