"""The optimizers of the convergence study and how a run builds them.

:data:`OPTIMIZERS` names every optimizer of the study; a spec is such a
name with settings after colons (:func:`parse_spec`). :func:`build` turns a
spec into a jitted step for one task whose learning rate and damping are
set when its state is initialised, so that one compilation serves a whole
sweep. The half-decade learning-rate grid of the sweep is here too.
"""

from collections.abc import Callable
import dataclasses
import functools
import inspect
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

import _kfac_jax
import fisher_optax as fo
from study import tasks as tasks_lib


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


def kfac_graft(learning_rate, damping=1e-3, *, momentum=0.9, b2=0.999,
                stats_every=10, inverse_every=100, **kwargs):
  """K-FAC's directions at Adam's per-leaf step sizes (``fo.graft``)."""
  return optax.chain(
      fo.graft(fo.scale_by_kfac(damping, momentum=momentum,
                                momentum_style='adam',
                                stats_every=stats_every,
                                inverse_every=inverse_every, **kwargs),
               optax.scale_by_adam(b1=momentum, b2=b2)),
      optax.scale_by_learning_rate(learning_rate))


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
    # Adam's learning rate and step sizes, K-FAC's directions: swept on
    # Adam's grid.
    'kfac_graft': Optimizer('adam', kfac_graft, True, True),
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
# Building a step.


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
