r"""Every stage of a Kronecker step against its FLOP floor, and memory.

On the convergence study's ResNet and Transformer (``--models resnet,
transformer``, their batches of 128 images and 16 x 128 tokens) and the
784-512-512-10 MLP (a batch of 128 MNIST-shaped inputs), this prints three
tables.

**Stages.** Each stage of K-FAC and TEKFAC (``--methods``: any of K-FAC,
TKFAC, EKFAC and TEKFAC), with ``weight_sharing='expand'`` and
``'reduce'`` where a layer shares weights (``block_size=128`` on the MLP),
runs as its own jitted function on the arrays of a real step (the state
after two steps):

* ``forward+backward``: ``jax.value_and_grad`` of the loss (what Adam pays);
* ``capture``: ``value_grad_and_stats`` minus the above (the hooks and the
  captured arrays), the two timed in alternation;
* ``statistics``: the fresh factors of every layer (and EKFAC/TEKFAC's
  measured scaling), ``_kronecker.layer_rows`` then ``algorithm.statistics``;
* ``average``: the moving average of the statistics with its finite check;
* ``inverses``: ``_kronecker.refresh_inverses`` (Cholesky inverses, or
  eigenbases and the scaling measured afresh in them);
* ``precondition``: ``_kronecker.precondition_layers``;
* ``fallback``: the norm layers' and the Adam fallback's directions
  (``_kronecker.other_directions``);
* ``momentum``: ``first_moment`` and ``heavy_ball``.

``GFLOP`` and ``MB`` are XLA's cost analysis of each compiled stage (FLOPs
and bytes accessed); XLA does not count LAPACK calls, so ``inverses`` adds
``7/3 b^3`` per block for a Cholesky factor and two triangular solves with
``b`` right-hand sides, and ``9 b^3`` per eigendecomposition (Golub and Van
Loan's count for symmetric QR with vectors). ``floor ms`` is ``max(GFLOP /
matmul rate, MB / bandwidth)`` with the machine's rates measured in the same
run: a 1024 x 1024 float32 matmul and a 16 MB ``2 x + 1``. ``x floor`` is
the measured time over the floor. ``per step`` weighs each stage by how
often it runs at ``(stats_every, inverse_every) = (1, 20)``, and ``share``
is that as a fraction of the sum of the stages.

**Memory.** For every optimizer (Adam, Muon, AdaFisher, MBF and each
Kronecker method and flavour): the optimizer state's bytes and the compiled
train step's peak memory (XLA's memory analysis of the jitted, donated step:
arguments + outputs + temporaries - aliased), each as a ratio to Adam's.

**Steps.** The same jitted, donated train steps (capture included) at
``(1, 20)``, timed side by side: ``interleaved`` blocks of 20 steps, the
ratio to Adam's step the median over repeats. ``adam, not donated`` is
Adam's step without donation, which allocates new buffers for the
parameters and the state on every step.

Usage::

  python benchmarks/stages.py [--models mlp,resnet,transformer]
      [--methods kfac,tekfac] [--repeats 5] [--quick]
"""

import argparse
import dataclasses
import functools
import inspect
import platform
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import _common
import fisher_optax as fo
from fisher_optax import _base
from fisher_optax import _kfac
from fisher_optax import _kronecker
from fisher_optax import _tkfac
from study import tasks as tasks_lib

PERIODS = (1, 20)  # (stats_every, inverse_every) of every Kronecker method
LEARNING_RATE = 1e-4  # irrelevant to timing; small to keep values finite
DAMPING = 1e-3
# Adam's step without donating params and state (benchmarks/step_time.py's
# default until this benchmark found it 6-10% slower than the donated one
# on the MLP, with 1.45x the peak memory).
NOT_DONATED = 'adam, not donated'


# ---------------------------------------------------------------------------
# Models: a loss, its parameters, one batch.


def _mlp(quick: bool):
  model = _common.MLP()
  rng = np.random.default_rng(0)
  batch = 16 if quick else 128
  x = jnp.asarray(rng.uniform(size=(batch, 28, 28, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, size=(batch,)), jnp.int32)
  params = model.init(jax.random.key(0), x)['params']
  return _common.make_loss_fn(model), params, (x, y), False


def _task(name: str, quick: bool):
  task = tasks_lib.TASKS[name]('quick' if quick else 'full')
  batch = tuple(jnp.asarray(b) for b in next(task.batches(0)))
  return task.loss_fn, task.init(0), batch, True


MODELS = {'mlp': _mlp, 'resnet': functools.partial(_task, 'resnet'),
          'transformer': functools.partial(_task, 'transformer')}


# method -> (scale_by_ transform, alias, base scale_by_ of its signature).
METHODS = {
    'kfac': (fo.scale_by_kfac, fo.kfac, fo.scale_by_kfac),
    'tkfac': (fo.scale_by_tkfac, fo.tkfac, fo.scale_by_tkfac),
    'ekfac': (fo.scale_by_ekfac, fo.ekfac, fo.scale_by_kfac),
    'tekfac': (fo.scale_by_tekfac, fo.tekfac, fo.scale_by_tkfac),
}


def configs(shares: bool, methods=tuple(METHODS)
            ) -> dict[str, tuple[str, dict[str, Any]]]:
  """label -> (method, keyword arguments)."""
  out = {}
  for name in methods:
    out[name] = (name, {})
    if shares:
      out[f'{name} reduce'] = (name, {'weight_sharing': 'reduce'})
    elif name in ('kfac', 'tkfac'):
      out[f'{name} b=128'] = (name, {'block_size': 128})
  return out


# ---------------------------------------------------------------------------
# The stages, each a function of arrays.


def options(method: str, kwargs) -> tuple[_kronecker.Algorithm,
                                          _kronecker.Options]:
  """The engine's algorithm and options for ``method`` with ``kwargs``."""
  base = METHODS[method][2]
  defaults = {k: p.default for k, p in inspect.signature(
      base).parameters.items() if p.default is not inspect.Parameter.empty}
  kw = {**defaults, **kwargs, 'damping': DAMPING,
        'stats_every': PERIODS[0], 'inverse_every': PERIODS[1]}
  kw['eigen_correction'] = method in ('ekfac', 'tekfac')
  if kw['eigen_correction']:
    kw['damping_mode'] = 'eigen'
  algorithm = (_kfac.KFAC if base is fo.scale_by_kfac else
               _tkfac._algorithm(kw['conv_damping']))  # pylint: disable=protected-access
  kw.setdefault('dense_damping', 'beta')
  fields = {f.name for f in dataclasses.fields(_kronecker.Options)}
  return algorithm, _kronecker.Options(where=method, **{
      k: v for k, v in kw.items() if k in fields and k != 'where'})


def stage_functions(algorithm, opts, layouts, norms_of, updates):
  """``{stage: fn(layer_stats, state, grads)}`` for one method."""
  paths, _, treedef = _base.flatten_leaves(updates)
  index = {p: i for i, p in enumerate(paths)}

  def rows_and_stats(layer_stats, state):
    fresh = {}
    for key, layout in layouts.items():
      dtype = next(iter(state.stats[key].values())).dtype
      rows = _kronecker.layer_rows(opts, layer_stats[key], layout, dtype,
                                   state.count // opts.stats_every)
      fresh[key] = algorithm.statistics(rows, layout, opts.block_size)
      if opts.eigen_correction:
        fresh[key]['scaling'] = _kronecker.measure_scaling(
            layout, rows, state.precond[key],
            opts.conv_scaling == 'per_example')
    return fresh

  def statistics_(layer_stats, state, grads):
    del grads
    return rows_and_stats(layer_stats, state)

  def average(layer_stats, state, grads):
    # The same arithmetic as refresh_statistics on fresh values (here the
    # old ones, which only changes the numbers).
    del layer_stats, grads
    weight = _kronecker.average_weight(opts, state.count)
    out = {}
    for key, old in state.stats.items():
      finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                                  for x in old.values()]))
      out[key] = {n: jnp.where(finite, (1 - weight) * o + weight * o * 0.5,
                               o) for n, o in old.items()}
    return out

  def inverses(layer_stats, state, grads):
    del grads
    return _kronecker.refresh_inverses(algorithm, opts, layouts, layer_stats,
                                       state.stats, state.precond,
                                       state.count)

  def sources(state, grads):
    return _kronecker.first_moment(
        opts, treedef.flatten_up_to(grads), treedef.flatten_up_to(state.mu),
        optax.safe_increment(state.count))

  def precondition(layer_stats, state, grads):
    del layer_stats
    source, _ = sources(state, grads)
    damping = _kronecker.eigen_damping(algorithm, opts, layouts,
                                       state.precond)
    return _kronecker.precondition_layers(opts, layouts, state.precond,
                                          damping, source, index)

  norm_paths = {_base.join_path(key, name) for key, st in norms_of.items()
                for _, name in st.meta.params}
  done_leaves = {index[_base.join_path(key, name)]
                 for key, layout in layouts.items()
                 for name in (layout.kernel, layout.bias) if name}

  def fallback(layer_stats, state, grads):
    del layer_stats
    source = treedef.flatten_up_to(grads)
    # Kronecker leaves pass through: the stage is the other leaves' work.
    done = {i: source[i] for i in done_leaves}
    return _kronecker.other_directions(
        opts, paths, source, done, treedef.flatten_up_to(state.nu),
        norm_paths, state.count)

  def momentum(layer_stats, state, grads):
    del layer_stats
    source, mu = sources(state, grads)
    return _kronecker.heavy_ball(opts, source, mu)

  return {'statistics': statistics_, 'average': average,
          'inverses': inverses, 'precondition': precondition,
          'fallback': fallback, 'momentum': momentum}


# How often each stage runs per step at PERIODS.
WEIGHT = {'forward+backward': 1.0, 'capture': 1.0,
          'statistics': 1 / PERIODS[0], 'average': 1 / PERIODS[0],
          'inverses': 1 / PERIODS[1], 'precondition': 1.0, 'fallback': 1.0,
          'momentum': 1.0}


def linalg_gflop(opts, layouts) -> float:
  """LAPACK FLOPs of one inverse refresh (XLA does not count them)."""
  total = 0.0
  for layout in layouts.values():
    lead = int(np.prod(layout.lead))
    sides = [layout.d_out] + ([] if layout.kind == 'embed' else
                              [layout.d_in])
    for d in sides:
      nb, b = _kronecker.block_shape(d, opts.block_size)
      per = 9.0 * b ** 3 if opts.damping_mode == 'eigen' else 7 / 3 * b ** 3
      total += lead * nb * per
  return total / 1e9


# ---------------------------------------------------------------------------
# Timing.


def timed(compiled, args, repeats: int, min_seconds: float = 0.05
          ) -> float:
  """Median seconds per call over ``repeats`` blocks of calls."""
  jax.block_until_ready(compiled(*args))
  start = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  once = time.perf_counter() - start
  calls = max(1, int(min_seconds / max(once, 1e-6)))
  out = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      res = compiled(*args)
    jax.block_until_ready(res)
    out.append((time.perf_counter() - start) / calls)
  return statistics.median(out)


def cost(compiled) -> tuple[float, float]:
  """(GFLOP, MB accessed) from XLA's cost analysis."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list):
    analysis = analysis[0] if analysis else {}
  analysis = analysis or {}
  return (float(analysis.get('flops', 0.0)) / 1e9,
          float(analysis.get('bytes accessed', 0.0)) / 1e6)


def machine_rates(repeats: int) -> tuple[float, float, float]:
  """(matmul GFLOP/s, memory GB/s, seconds of an empty jitted call)."""
  n = 1024
  a = jax.random.normal(jax.random.key(0), (n, n))
  matmul = jax.jit(jnp.matmul).lower(a, a).compile()
  gflops = 2 * n ** 3 / 1e9 / timed(matmul, (a, a), repeats)
  # 16 MB: the size of the larger statistics, not a DRAM-only stream.
  x = jnp.ones((4 * 2 ** 20,), jnp.float32)
  axpy = jax.jit(lambda v: 2 * v + 1).lower(x).compile()
  gbs = 2 * x.nbytes / 1e9 / timed(axpy, (x,), repeats)
  one = jnp.ones(())
  call = timed(jax.jit(lambda v: v + 1).lower(one).compile(), (one,),
               repeats)
  return gflops, gbs, call


def compile_fn(fn, *args):
  return jax.jit(fn).lower(*args).compile()


# ---------------------------------------------------------------------------
# Full train steps.


def train_step(tx, step_fn, curvature: bool, donate: bool = True):
  def step(params, opt_state, *batch):
    loss, grads, stats = step_fn(params, *batch)
    extra = {'layer_stats': stats} if curvature else {}
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state, loss
  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def all_optimizers(shares: bool, layers, loss_reduction):
  """label -> (optax transformation, takes layer_stats)."""
  kron = dict(layers=layers, loss_reduction=loss_reduction, damping=DAMPING,
              stats_every=PERIODS[0], inverse_every=PERIODS[1])
  out = {'adam': (optax.adam(LEARNING_RATE), False),
         NOT_DONATED: (optax.adam(LEARNING_RATE), False),
         'muon': (optax.contrib.muon(LEARNING_RATE), False),
         'adafisher': (fo.adafisher(LEARNING_RATE), True),
         'mbf': (fo.mini_block_fisher(LEARNING_RATE, layers=layers), True)}
  for label, (method, kw) in configs(shares).items():
    out[label] = (METHODS[method][1](LEARNING_RATE, **kron, **kw), True)
  return out


def tree_bytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, 'nbytes'))


def peak_bytes(compiled) -> int:
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes
          + m.temp_size_in_bytes - m.alias_size_in_bytes)


# ---------------------------------------------------------------------------
# One model.


def profile_model(name: str, repeats: int, quick: bool, rates, methods):
  loss_fn, params, batch, shares = MODELS[name](quick)
  step_fn = fo.linen.value_grad_and_stats(loss_fn)
  grad_fn = jax.value_and_grad(loss_fn)
  layers = jax.eval_shape(lambda p: step_fn(p, *batch), params)[2]
  _, grads, layer_stats = jax.jit(step_fn)(params, *batch)
  loss_reduction = 'mean'
  gflops, gbs, _ = rates

  rows = []

  def add(method, stage, compiled, args, extra_gflop=0.0):
    seconds = timed(compiled, args, repeats)
    flop, mb = cost(compiled)
    flop += extra_gflop
    floor = max(flop / gflops, mb / 1e3 / gbs)
    rows.append(dict(model=name, method=method, stage=stage,
                     ms=seconds * 1e3, gflop=flop, mb=mb,
                     floor_ms=floor * 1e3))

  # Alternated, so that the capture's cost is not a difference of two
  # measurements taken at different times.
  fwd = compile_fn(grad_fn, params, *batch)
  cap = compile_fn(step_fn, params, *batch)
  pairs = [(timed(fwd, (params, *batch), 1), timed(cap, (params, *batch), 1))
           for _ in range(repeats)]
  for stage, compiled, seconds in (
      ('forward+backward', fwd, statistics.median(p[0] for p in pairs)),
      ('value_grad_and_stats', cap, statistics.median(p[1] for p in pairs))):
    flop, mb = cost(compiled)
    rows.append(dict(model=name, method='all', stage=stage,
                     ms=seconds * 1e3, gflop=flop, mb=mb,
                     floor_ms=max(flop / gflops, mb / 1e3 / gbs) * 1e3))

  for label, (method, kw) in configs(shares, methods).items():
    tx = METHODS[method][0](**kw, layers=layers, loss_reduction=loss_reduction,
                 damping=DAMPING, stats_every=PERIODS[0],
                 inverse_every=PERIODS[1])
    state = tx.init(params)
    update = jax.jit(lambda g, s, st, tx=tx: tx.update(g, s, params,
                                                       layer_stats=st))
    for _ in range(2):
      _, state = update(grads, state, layer_stats)
    algorithm, opts = options(method, {**kw, 'loss_reduction':
                                       loss_reduction})
    assignments = fo._pairing.pair(grads, layer_stats, 'stages')  # pylint: disable=protected-access
    layouts, norms = _kronecker._check_layouts(  # pylint: disable=protected-access
        algorithm, opts, grads, layer_stats, state, assignments)
    fns = stage_functions(algorithm, opts, layouts, norms, grads)
    for stage, fn in fns.items():
      compiled = compile_fn(fn, layer_stats, state, grads)
      extra = linalg_gflop(opts, layouts) if stage == 'inverses' else 0.0
      add(label, stage, compiled, (layer_stats, state, grads), extra)
  return rows, (params, batch, step_fn, grad_fn, layers, loss_reduction,
                shares)


def step_table(name, context, repeats: int, quick: bool):
  params, batch, step_fn, grad_fn, layers, loss_reduction, shares = context
  plain = lambda p, *b: (*grad_fn(p, *b), None)
  runners, memory = [], []
  for label, (tx, curvature) in all_optimizers(
      shares, layers, loss_reduction).items():
    donate = label != NOT_DONATED
    step = train_step(tx, step_fn if curvature else plain, curvature,
                      donate)
    runner = _common.optax_runner(label, PERIODS, tx, step, params, batch)
    memory.append((label, tree_bytes(runner.state()),
                   peak_bytes(runner.compiled)))
    runners.append(runner)
  block = 2 if quick else PERIODS[1]
  _common.warm_up(runners, block)
  times = _common.interleaved(runners, repeats, block)
  adam = times[0]
  out = []
  for (label, state_b, peak_b), t in zip(memory, times):
    out.append(dict(model=name, optimizer=label,
                    ms=statistics.median(t) * 1e3,
                    ratio=statistics.median(x / a for x, a in zip(t, adam)),
                    state_mb=state_b / 1e6,
                    state_ratio=state_b / max(memory[0][1], 1),
                    peak_mb=peak_b / 1e6,
                    peak_ratio=peak_b / memory[0][2]))
  return out


def print_stages(rows):
  fixed = {}
  for r in rows:
    if r['method'] == 'all':
      fixed[(r['model'], r['stage'])] = r
  header = ['model', 'method', 'stage', 'ms', 'GFLOP', 'MB', 'floor ms',
            'x floor', 'per step ms', 'share']
  table = []
  for r in rows:
    if r['method'] == 'all':
      continue
    model, method = r['model'], r['method']
    if not table or table[-1][1] != method or table[-1][0] != model:
      base = fixed[(model, 'forward+backward')]
      cap = fixed[(model, 'value_grad_and_stats')]
      stages = [dict(base, stage='forward+backward'),
                dict(cap, stage='capture', ms=cap['ms'] - base['ms'],
                     gflop=cap['gflop'] - base['gflop'],
                     mb=cap['mb'] - base['mb'],
                     floor_ms=max(cap['floor_ms'] - base['floor_ms'], 0.0))]
      mine = [s for s in rows if s['model'] == model
              and s['method'] == method]
      stages += mine
      total = sum(s['ms'] * WEIGHT[s['stage']] for s in stages)
      for s in stages:
        per = s['ms'] * WEIGHT[s['stage']]
        # The capture's cost is a difference; within the noise it can be
        # below zero.
        ratio = (f'{s["ms"] / s["floor_ms"]:.1f}'
                 if s['floor_ms'] > 0 and s['ms'] > 0 else '—')
        table.append([model, method, s['stage'], f'{s["ms"]:.3f}',
                      f'{s["gflop"]:.3f}', f'{s["mb"]:.1f}',
                      f'{s["floor_ms"]:.3f}', ratio,
                      f'{per:.3f}', f'{per / total:.0%}'])
  _common.print_table(header, table)


def print_steps(rows):
  header = ['model', 'optimizer', 'ms/step', 'step / adam', 'state MB',
            'state / adam', 'peak MB', 'peak / adam']
  _common.print_table(header, [
      [r['model'], r['optimizer'], f'{r["ms"]:.2f}', f'{r["ratio"]:.2f}',
       f'{r["state_mb"]:.2f}', f'{r["state_ratio"]:.2f}',
       f'{r["peak_mb"]:.1f}', f'{r["peak_ratio"]:.2f}'] for r in rows])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='mlp,resnet,transformer')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--methods', default='kfac,tekfac',
                      help='methods whose stages are timed (the steps table '
                      'has all): ' + ','.join(METHODS))
  parser.add_argument('--quick', action='store_true',
                      help='tiny models and few repeats (a smoke test)')
  args = parser.parse_args(argv)
  repeats = 2 if args.quick else args.repeats
  print(f'JAX {jax.__version__}, {jax.default_backend()}, '
        f'{platform.processor() or platform.machine()}, '
        f'{jax.local_device_count()} device(s)', flush=True)
  rates = machine_rates(repeats)
  print(f'matmul {rates[0]:.1f} GFLOP/s, memory {rates[1]:.1f} GB/s '
        f'(float32, this run); an empty jitted call takes '
        f'{rates[2] * 1e3:.3f} ms (in every stage\'s ms, not in a fused '
        'step)\n', flush=True)
  for name in args.models.split(','):
    start = time.perf_counter()
    rows, context = profile_model(name, repeats, args.quick, rates,
                                  args.methods.split(','))
    print(f'{name}: stages of one step, each jitted alone (ms: median '
          'per call):\n')
    print_stages(rows)
    print(f'\n{name}: train steps at (stats_every, inverse_every) = '
          f'{PERIODS}, jitted:\n', flush=True)
    print_steps(step_table(name, context, repeats, args.quick))
    print(f'\n({name}: {time.perf_counter() - start:.0f} s)\n', flush=True)


if __name__ == '__main__':
  main()
