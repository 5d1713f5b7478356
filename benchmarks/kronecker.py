r"""Step time of fisher_optax's K-FAC and TKFAC against Adam and kfac-jax.

For an MLP (784-512-512-10) and the small CNN of ``examples/mnist.py``, both
on random MNIST-shaped batches of 128, this times the jitted train step of

* ``optax.adam`` on ``jax.value_and_grad`` (the baseline), and
  ``optax.contrib.muon`` the same way;
* ``fisher_optax.kfac`` and ``fisher_optax.tkfac`` on
  ``fisher_optax.linen.value_grad_and_stats`` (capture included), with full
  factors and with ``block_size=128``, and on the CNN with
  ``weight_sharing='reduce'`` (``reduce`` rows) beside the default expand;
* DeepMind's kfac-jax (``kfac_jax.Optimizer``, if installed: ``pip install
  -e '.[kfac]'``) with fixed learning rate, momentum and damping (no
  adaptivity), ``num_burnin_steps=0``, ``multi_device=False``, its default
  pi-damped inverses, in ``estimation_mode='fisher_empirical'`` (true labels,
  the Fisher we estimate) and ``'fisher_gradients'`` (its default, sampled
  labels). Unlike its ``OptaxPreconditioner``, which requires
  ``curvature_update_period=1``, ``Optimizer`` accepts any period: it
  compiles one step with and one without the curvature update and picks one
  in Python from ``global_step_int``.

Each Fisher method runs with statistics / inverses refreshed every 1 / 20
and every 10 / 100 steps (``stats_every`` / ``inverse_every`` here,
``curvature_update_period`` / ``inverse_update_period`` in kfac-jax).

All steps run side by side in one process, interleaved: every repeat times
one block of ``--block`` contiguous steps of each optimizer in turn (the
order reversed on every other repeat), so that machine drift hits all of
them alike. A block holds whole inverse periods (the default 100 is a
multiple of both), so its mean is the amortised time per step, refresh
steps included. Compilation and warm-up steps (11: both of kfac-jax's step
variants for a period of 10) are not timed; every timed block ends with
``jax.block_until_ready``. Every optimizer owns its parameters and state and
donates them to its step (kfac-jax always donates); all see the same batch.

``ms/step`` is the median over repeats; ``ratio to adam`` and ``ratio to
kfac-jax`` are medians over repeats of the per-repeat ratio to Adam and to
kfac-jax in ``'fisher_empirical'`` mode with the same periods.

On jaxlib 0.10.0 to 0.11.0 two batched LAPACK calls running at once can
deadlock on CPU; ``fisher_optax._linalg.bucketed`` orders its per-block-size
calls to avoid it, so the timings include that ordering.

A second table gives the achieved GFLOP/s of the preconditioning products of
our K-FAC, ``A^-1 W G^-1`` for every layer with the cached inverses of the
timed ``fisher_optax.kfac`` state (``_kronecker.precondition``, one jitted
function), counting ``2 d_in^2 d_out + 2 d_in d_out^2`` FLOPs per layer
(block-diagonal factors: ``2 d_in b_in d_out + 2 d_in d_out b_out``, padding
included), beside plain ``jnp.matmul`` chains of the same shapes and one
square matmul of about the same FLOPs (the machine's practical limit).

Usage::

  python benchmarks/kronecker.py [--repeats 3] [--block 100]
      [--models mlp,cnn] [--quick]
"""

import argparse
import inspect
import math
import os
import platform
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import _common
import _kfac_jax
import fisher_optax as fo
from fisher_optax import _kronecker

BATCH = 128
LEARNING_RATE = 1e-4  # Irrelevant to timing; small to keep values finite.
MOMENTUM = 0.9
DAMPING = 1e-3
DECAY = 0.95
BLOCK_SIZE = 128
# (stats_every, inverse_every) pairs; the default block is their LCM.
PERIODS = ((1, 20), (10, 100))
WARMUP = 11
KFAC_JAX_MODES = ('fisher_empirical', 'fisher_gradients')
REFERENCE_MODE = 'fisher_empirical'


def _jit_step(step, donate: bool = True):
  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def _fisher_runner(model, label, periods, factory, params, batch, **kwargs):
  """``fo.kfac``/``fo.tkfac`` fed by the capturing step."""
  step_fn = fo.linen.value_grad_and_stats(_common.make_loss_fn(model))
  tx = factory(LEARNING_RATE, damping=DAMPING, fisher_decay=DECAY,
               momentum=MOMENTUM, stats_every=periods[0],
               inverse_every=periods[1], **kwargs)

  def train_step(params, opt_state, x, y):
    loss, grads, layer_stats = step_fn(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   layer_stats=layer_stats)
    return optax.apply_updates(params, updates), opt_state, loss

  return _common.optax_runner(label, periods, tx, _jit_step(train_step),
                              params, batch)


def _kfac_jax_runner(kfac_jax, model, mode, periods, params, batch
                     ) -> _common.Runner:
  """``kfac_jax.Optimizer`` with fixed hyper-parameters, no adaptivity."""

  def loss_fn(params, batch):
    x, y = batch
    logits = model.apply({'params': params}, x)
    kfac_jax.register_softmax_cross_entropy_loss(logits, y)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  opt = kfac_jax.Optimizer(
      value_and_grad_func=jax.value_and_grad(loss_fn),
      l2_reg=0.0,
      use_adaptive_learning_rate=False,
      use_adaptive_momentum=False,
      use_adaptive_damping=False,
      num_burnin_steps=0,
      estimation_mode=mode,
      curvature_ema=DECAY,
      curvature_update_period=periods[0],
      inverse_update_period=periods[1],
      use_exact_inverses=False,
      multi_device=False,
      distributed_inverses=False,
      distributed_precon_apply=False,
  )
  start = time.perf_counter()
  rng = jax.random.key(0)
  # kfac-jax donates params and state: it gets its own copy.
  holder = {'params': jax.tree.map(lambda p: p.copy(), params), 'count': 0,
            'stats': None}
  holder['state'] = opt.init(holder['params'], rng, batch)
  hyper = dict(learning_rate=jnp.asarray(LEARNING_RATE),
               momentum=jnp.asarray(MOMENTUM), damping=jnp.asarray(DAMPING))

  def run(n):
    for _ in range(n):
      holder['params'], holder['state'], holder['stats'] = opt.step(
          holder['params'], holder['state'], rng, batch=batch,
          global_step_int=holder['count'], **hyper)
      holder['count'] += 1

  def sync():
    jax.block_until_ready((holder['params'], holder['state'],
                           holder['stats']))

  runner = _common.Runner(f'kfac-jax {mode}', periods, run, sync,
                          lambda: None)
  runner.setup_s = time.perf_counter() - start  # init only; step compiles
  return runner                                  # in warm-up


def make_runners(model_name: str, kfac_jax, blocked: bool
                 ) -> tuple[list[_common.Runner], Any]:
  """Builds, compiles and warms up every optimizer for one model."""
  model = _common.MODELS[model_name]()
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(BATCH, 28, 28, 1)).astype(np.float32)
  y = rng.integers(0, 10, size=(BATCH,)).astype(np.int32)
  batch = (jax.device_put(x), jax.device_put(y))
  params = model.init(jax.random.key(0), batch[0])['params']

  tx, step = _common.make_adam_step(model, LEARNING_RATE, donate=True)
  runners = [_common.optax_runner('adam', None, tx, step, params, batch)]
  muon = optax.contrib.muon(LEARNING_RATE)
  runners.append(_common.optax_runner('muon', None, muon,
                                      _common.make_gradient_step(
                                          muon, _common.make_loss_fn(model),
                                          True), params, batch))
  # K-FAC-reduce changes only layers that share weights: the CNN's convs.
  sharing = ('expand', 'reduce') if model_name == 'cnn' else ('expand',)
  for periods in PERIODS:
    for name, factory in (('kfac', fo.kfac), ('tkfac', fo.tkfac)):
      for block_size in (None, BLOCK_SIZE) if blocked else (None,):
        for weight_sharing in sharing:
          label = f'fo.{name}' + ('' if block_size is None
                                  else f' b={block_size}') + (
                                      ' reduce' if weight_sharing == 'reduce'
                                      else '')
          runners.append(_fisher_runner(
              model, label, periods, factory, params, batch,
              block_size=block_size, weight_sharing=weight_sharing))
    if kfac_jax is not None:
      for mode in KFAC_JAX_MODES:
        runners.append(_kfac_jax_runner(kfac_jax, model, mode, periods,
                                        params, batch))
  _common.warm_up(runners, WARMUP)
  return runners, params


def measure(runners: list[_common.Runner], repeats: int, block: int
            ) -> list[tuple[float, float, float | None]]:
  """Interleaved amortised timings (:func:`_common.interleaved`).

  Returns:
    Per runner, ``(median s/step, median ratio to Adam, median ratio to
    kfac-jax fisher_empirical with the same periods or None)``; the first
    runner is Adam.
  """
  reference = {r.periods: i for i, r in enumerate(runners)
               if r.label == f'kfac-jax {REFERENCE_MODE}'}
  times = _common.interleaved(runners, repeats, block)
  out = []
  for r, t in zip(runners, times):
    ref = times[reference[r.periods]] if r.periods in reference else None
    out.append((statistics.median(t),
                statistics.median(a / b for a, b in zip(t, times[0])),
                None if ref is None else statistics.median(
                    a / b for a, b in zip(t, ref))))
  return out


def kronecker_state(opt_state) -> fo.KroneckerState | None:
  """The :class:`fisher_optax.KroneckerState` inside a chain's state."""
  states = [s for s in jax.tree.leaves(
      opt_state, is_leaf=lambda s: isinstance(s, fo.KroneckerState))
            if isinstance(s, fo.KroneckerState)]
  return states[0] if states else None


def _flops(layout, precond) -> int:
  """FLOPs of ``C_in^-1 W C_out^-1`` with (blocks of) explicit inverses."""
  nb_i, b_i = precond['in_inv'].shape[-3], precond['in_inv'].shape[-1]
  nb_o, b_o = precond['out_inv'].shape[-3], precond['out_inv'].shape[-1]
  groups = layout.lead[-1]
  return groups * (2 * nb_i * b_i * b_i * layout.d_out
                   + 2 * layout.d_in * nb_o * b_o * b_o)


def _time_fn(fn, args, min_s: float = 0.5) -> float:
  """Median seconds per call of a jitted ``fn`` over about ``min_s``."""
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  once = max(time.perf_counter() - start, 1e-6)
  calls = max(5, min(200, int(min_s / once)))
  samples = []
  for _ in range(calls):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    samples.append(time.perf_counter() - start)
  return statistics.median(samples)


def preconditioning_rate(model_name: str, label: str, params, opt_state
                         ) -> list[tuple[str, ...]]:
  """GFLOP/s of our preconditioning products and of plain matmuls."""
  state = kronecker_state(opt_state)
  layouts = _kronecker.infer_layouts(params)
  precond = {k: state.precond[k] for k in layouts}
  key = jax.random.key(1)
  ws = {k: jax.random.normal(jax.random.fold_in(key, i),
                             lay.lead + (lay.d_in, lay.d_out))
        for i, (k, lay) in enumerate(sorted(layouts.items()))}
  flops = sum(_flops(layouts[k], precond[k]) for k in layouts)

  kwargs = {'damping_mode': 'factored'}
  if 'damping' in inspect.signature(_kronecker.precondition).parameters:
    kwargs['damping'] = DAMPING  # older signature

  @jax.jit
  def ours(precond, ws):
    return {k: _kronecker.precondition(layouts[k], precond[k], ws[k],
                                       **kwargs) for k in layouts}

  rows = []
  sec = _time_fn(ours, (precond, ws))
  shapes = ', '.join(f'{lay.d_in}x{lay.d_out}' for _, lay in sorted(
      layouts.items()))
  rows.append((model_name, f'{label}: A^-1 W G^-1, all layers',
               f'{flops / 1e6:.0f}', f'{1e3 * sec:.3f}',
               f'{flops / sec / 1e9:.1f}'))
  if all(p['in_inv'].shape[-3] == 1 and p['out_inv'].shape[-3] == 1
         for p in precond.values()):
    mats = {k: (p['in_inv'][..., 0, :, :], p['out_inv'][..., 0, :, :])
            for k, p in precond.items()}

    @jax.jit
    def plain(mats, ws):
      return {k: jnp.matmul(jnp.matmul(a, ws[k]), g)
              for k, (a, g) in mats.items()}

    sec = _time_fn(plain, (mats, ws))
    rows.append((model_name, f'jnp.matmul, same shapes ({shapes})',
                 f'{flops / 1e6:.0f}', f'{1e3 * sec:.3f}',
                 f'{flops / sec / 1e9:.1f}'))
    n = round((flops / 2) ** (1 / 3))
    sq = jax.random.normal(key, (2, n, n))
    sec = _time_fn(jax.jit(lambda m: m[0] @ m[1]), (sq,))
    rows.append((model_name, f'jnp.matmul, square {n}x{n}x{n}',
                 f'{2 * n ** 3 / 1e6:.0f}', f'{1e3 * sec:.3f}',
                 f'{2 * n ** 3 / sec / 1e9:.1f}'))
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=None,
                      help='interleaved rounds; medians are over these '
                      '(default 3, 1 with --quick)')
  parser.add_argument('--block', type=int, default=math.lcm(
      *(p[1] for p in PERIODS)), help='timed steps per block and optimizer;'
                      ' keep it a multiple of every inverse period')
  parser.add_argument('--models', default=None,
                      help='comma-separated subset of mlp,cnn (default both,'
                      ' mlp with --quick)')
  parser.add_argument('--quick', action='store_true',
                      help='1 repeat, MLP only, no block_size=128 rows')
  args = parser.parse_args(argv)
  repeats = args.repeats or (1 if args.quick else 3)
  models = args.models or ('mlp' if args.quick else 'mlp,cnn')
  for _, inverse_every in PERIODS:
    if args.block % inverse_every:
      parser.error(f'--block {args.block} is not a multiple of the inverse '
                   f'period {inverse_every}')

  kfac_jax = _kfac_jax.import_kfac_jax()
  print(f'jax {jax.__version__}, optax {optax.__version__}, '
        f'fisher_optax {fo.__version__}, backend {jax.default_backend()}, '
        f'{os.cpu_count()} CPUs, python {platform.python_version()}')
  if kfac_jax is None:
    print('kfac-jax is not installed (pip install -e ".[kfac]"): skipping '
          'its rows and the ratio to it.')
  else:
    patched = _kfac_jax.needs_patch(jax.__version__, kfac_jax.__version__)
    print(f'kfac-jax {kfac_jax.__version__}'
          + (' (eval_jaxpr_eqn patched for this JAX)' if patched else ''))
  print(f'batch {BATCH}, repeats {repeats}, steps/block {args.block}, '
        f'warm-up {WARMUP}, damping {DAMPING}, decay {DECAY}')

  rows, rate_rows = [], []
  start = time.perf_counter()
  for model_name in models.split(','):
    runners, params = make_runners(model_name, kfac_jax, not args.quick)
    setup = ', '.join(
        f'{r.label}{"" if r.periods is None else " %d/%d" % r.periods} '
        f'{r.setup_s:.1f}s' for r in runners)
    print(f'{model_name} compile + warm-up: {setup}')
    results = measure(runners, repeats, args.block)
    for r, (sec, to_adam, to_kfac_jax) in zip(runners, results):
      every = '-' if r.periods is None else '%d/%d' % r.periods
      rows.append((model_name, r.label, every, f'{1e3 * sec:.2f}',
                   f'{to_adam:.2f}',
                   '-' if to_kfac_jax is None else f'{to_kfac_jax:.2f}'))
      state = kronecker_state(r.state())
      if state is not None and int(state.nonfinite):
        print(f'warning: {model_name} {r.label}: {int(state.nonfinite)} '
              'non-finite refreshes')
    for r in runners:
      if r.label in ('fo.kfac', f'fo.kfac b={BLOCK_SIZE}') and (
          r.periods == PERIODS[0]):
        rate_rows += preconditioning_rate(model_name, r.label, params,
                                          r.state())
    del runners
  print()
  _common.print_table(('model', 'optimizer', 'stats/inverse every', 'ms/step',
               'ratio to adam', 'ratio to kfac-jax'), rows)
  print()
  _common.print_table(('model', 'product', 'MFLOP', 'ms', 'GFLOP/s'), rate_rows)
  print(f'\ntotal {time.perf_counter() - start:.0f}s')


if __name__ == '__main__':
  main()
