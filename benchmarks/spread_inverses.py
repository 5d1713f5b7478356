"""Refresh-step cost of ``spread_inverses`` against replicated inverses.

On N devices, every device normally factorises every block on an inverse
step. With ``spread_inverses='data'`` each device factorises about 1/N of
the blocks and the results are gathered. This script compiles one update
step that refreshes the inverses (``inverse_every=1``) both ways, under
``jit`` with the batch sharded and under ``shard_map``, and prints:

* the step time (median of repeats; on forced host devices all "devices"
  share this machine's cores, so expect no speed-up here: the point of the
  option is real accelerators, where each chip has its own);
* the collectives in the compiled HLO (all-gather, all-reduce, ...) and the
  bytes their results hold, per device;
* the blocks one device factorises on an inverse step, from the state's
  inverses (with several CPU devices the library factorises them one per
  call, so the HLO's batch sizes do not show it).

Usage (8 forced CPU devices are set up by the script itself):

  python benchmarks/spread_inverses.py [--optimizers kfac,ekfac,mbf]
      [--repeats 20] [--quick]
"""

import argparse
import functools
import os
import statistics
import time

os.environ.setdefault(
    'XLA_FLAGS', '--xla_force_host_platform_device_count=8 '
    '--xla_cpu_collective_call_terminate_timeout_seconds=900')

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import fisher_optax as fo  # noqa: E402

import _common  # noqa: E402  pylint: disable=g-import-not-at-top


def blocks_per_device(state, n: int, spread: bool) -> int:
  """Blocks one device factorises on an inverse step.

  Counted from the state's inverses (Kronecker ``*_inv``/``*_vecs``, MBF
  ``inverses``): all blocks of one size form one stack, and spreading gives
  each device ``ceil(N_b / n)`` of a stack of ``N_b``.
  """
  stacks = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    key = jax.tree_util.keystr(path)
    if (leaf.ndim >= 2 and leaf.shape[-1] == leaf.shape[-2] > 1
        and ('_inv' in key or '_vecs' in key or '.inverses' in key)):
      b = leaf.shape[-1]
      stacks[b] = stacks.get(b, 0) + int(np.prod(leaf.shape[:-2]))
  return sum(-(-count // n) if spread else count
             for count in stacks.values())


class Net(nn.Module):
  """Convs and a wide dense layer: many mini-blocks and Kronecker blocks."""
  width: int = 64

  @nn.compact
  def __call__(self, x):
    for features in (self.width, self.width):
      x = nn.relu(nn.Conv(features, (3, 3))(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(256)(x))
    return nn.Dense(10)(x)


def make(name: str, **kwargs):
  if name == 'mbf':
    return fo.mini_block_fisher(1e-4, inverse_every=1, **kwargs)
  # block_size splits the factors into many equal blocks, the case the
  # option is for (hundreds of blocks of one size).
  return getattr(fo, name)(1e-3, inverse_every=1, block_size=64, **kwargs)


def time_it(fn, args, repeats: int) -> float:
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--optimizers', default='kfac,ekfac,tkfac,mbf')
  parser.add_argument('--repeats', type=int, default=20)
  parser.add_argument('--quick', action='store_true',
                      help='a narrow model and 3 repeats (CI smoke run)')
  args = parser.parse_args()
  width, repeats = (8, 3) if args.quick else (64, args.repeats)
  n = jax.device_count()
  mesh = Mesh(np.array(jax.devices()), ('data',))
  model = Net(width)
  x = jax.random.normal(jax.random.key(0), (8 * n, 8, 8, 3))
  y = jax.random.randint(jax.random.key(1), (8 * n,), 0, 10)
  params = model.init(jax.random.key(2), x)['params']

  def loss_fn(p, x, y):
    logits = model.apply({'params': p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  step_fn = fo.linen.value_grad_and_stats(loss_fn)

  def step(tx, p, s, x, y, axis=None):
    _, g, st = step_fn(p, x, y)
    if axis is not None:
      g = jax.lax.pmean(g, axis)
    u, s = tx.update(g, s, p, layer_stats=st)
    return optax.apply_updates(p, u), s

  batch = NamedSharding(mesh, P('data'))
  xs, ys = jax.device_put(x, batch), jax.device_put(y, batch)
  print(f'JAX {jax.__version__}, {n} {jax.devices()[0].platform} devices, '
        f'conv width {width}, batch {x.shape[0]}, one inverse step\n')
  print('| optimizer | mode | inverses | step ms | blocks per device | '
        'collectives | collective bytes |')
  print('|---|---|---|---:|---:|---|---:|')
  for name in args.optimizers.split(','):
    for mode in ('jit', 'shard_map'):
      for spread in (None, 'data'):
        axis = 'data' if mode == 'shard_map' else None
        tx = make(name, spread_inverses=spread, axis_name=axis)
        with jax.set_mesh(mesh):
          state = tx.init(params)
          if mode == 'jit':
            fn = jax.jit(functools.partial(step, tx))
            call = (params, state, xs, ys)
          else:
            fn = jax.jit(jax.shard_map(
                functools.partial(step, tx, axis='data'), mesh=mesh,
                in_specs=(P(), P(), P('data'), P('data')),
                out_specs=(P(), P()), check_vma=False))
            call = (params, state, x, y)
          hlo = fn.lower(*call).compile().as_text()
          seconds = time_it(fn, call, repeats)
        counts, total = _common.collectives(hlo)
        text = ', '.join(f'{v} {k}' for k, v in sorted(counts.items()))
        print(f'| {name} | {mode} | '
              f'{"spread" if spread else "replicated"} | '
              f'{seconds * 1e3:.1f} | '
              f'{blocks_per_device(state, n, spread is not None)} | '
              f'{text or "none"} | {total:,} |', flush=True)


if __name__ == '__main__':
  main()
