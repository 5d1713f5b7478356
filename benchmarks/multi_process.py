r"""Step time of 2 processes x 2 devices against 1 process x 4 devices.

The same data-parallel CNN step (the CNN of ``examples/mnist.py``, a global
batch of MNIST-shaped images sharded over 4 CPU devices, parameters
replicated, ``jit``) runs in two layouts of the same 4 devices:

* ``1x4``: one process with 4 forced CPU devices, collectives in memory;
* ``2x2``: two processes of one ``jax.distributed`` job
  (``examples/multi_process/launch.py``), 2 forced CPU devices each, their
  collectives over gloo on 127.0.0.1.

Each layout times every optimizer side by side (interleaved blocks of
jitted, donated steps after warm-up, as ``benchmarks/step_time.py``), and
steps that only all-reduce an array of the gradient's size and of the
largest step's collective volume (K-FAC's factors), which isolate the
collectives' cost. In ``2x2`` the Adam and K-FAC steps also run with each
process alone on its own two devices and half of the batch, both processes
at once (``each process alone``): two runtimes sharing the machine with
nothing crossing between them. ``ratio`` is 2x2's time per
step over 1x4's; ``collective bytes`` are the result bytes of the
collectives in one compiled step (the same in both layouts).

On this benchmark's machine all processes share one CPU, so the numbers
measure the runtime's overheads, not a cluster's network.

Usage::

  python benchmarks/multi_process.py [--optimizers adam,muon,kfac,...]
      [--batch 128] [--repeats 5] [--block 5]
"""

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, 'examples', 'multi_process'))
import launch  # noqa: E402  pylint: disable=g-import-not-at-top

OPTIMIZERS = ('adam', 'muon', 'adafisher', 'kfac', 'ekfac', 'tkfac',
              'tekfac', 'mini_block_fisher')


def make(name):
  """The optimizer and whether it needs captured statistics."""
  import optax  # pylint: disable=g-import-not-at-top
  import fisher_optax as fo  # pylint: disable=g-import-not-at-top
  if name == 'adam':
    return optax.adam(1e-3), False
  if name == 'muon':
    return optax.contrib.muon(1e-3), False
  if name == 'adafisher':
    return fo.adafisher(1e-3), True
  return getattr(fo, name)(1e-3), True


def child(out_path, names, batch, repeats, block):
  """Runs in every process of a layout; process 0 writes the timings."""
  if 'FO_NUM_PROCESSES' in os.environ:
    launch.initialize()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import fisher_optax as fo  # pylint: disable=g-import-not-at-top
  import _common  # pylint: disable=g-import-not-at-top

  mesh = Mesh(np.array(jax.devices()), ('data',))
  rows = NamedSharding(mesh, P('data'))
  everywhere = NamedSharding(mesh, P())
  rng = np.random.default_rng(0)  # the same global batch in every process
  images = rng.normal(size=(batch, 28, 28, 1)).astype(np.float32)
  labels = rng.integers(0, 10, (batch,)).astype(np.int32)
  n = batch // jax.process_count()
  mine = slice(jax.process_index() * n, (jax.process_index() + 1) * n)
  data = tuple(jax.make_array_from_process_local_data(rows, a[mine])
               for a in (images, labels))
  model = _common.CNN()
  params = jax.device_put(
      model.init(jax.random.key(0), images[:1])['params'], everywhere)
  loss_fn = _common.make_loss_fn(model)
  capture = fo.linen.value_grad_and_stats(loss_fn)

  def fisher_step(tx, params, opt_state, *batch):
    loss, grads, stats = capture(params, *batch)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   layer_stats=stats)
    return optax.apply_updates(params, updates), opt_state, loss

  def make_step(name):
    tx, fisher = make(name)
    step = (jax.jit(functools.partial(fisher_step, tx), donate_argnums=(0, 1))
            if fisher else _common.make_gradient_step(tx, loss_fn, True))
    return tx, step

  runners, facts = [], {}
  for name in names:
    tx, step = make_step(name)
    state = jax.device_put(tx.init(params), everywhere)
    hlo = step.lower(params, state, *data).compile().as_text()
    facts[name] = _common.collectives(hlo)[1]
    runners.append(_common.optax_runner(name, None, tx, step, params, data))

  if jax.process_count() > 1:
    # Each process alone on its own devices and rows, at the same time as
    # the other: two runtimes sharing the machine, nothing crossing them.
    local = Mesh(np.array(jax.local_devices()), ('data',))
    local_data = tuple(jax.device_put(a[mine], NamedSharding(local, P('data')))
                       for a in (images, labels))
    local_params = jax.device_put(
        jax.tree.map(np.asarray, model.init(jax.random.key(0),
                                            images[:1])['params']),
        NamedSharding(local, P()))
    for name in ('adam', 'kfac'):
      if name in names:
        tx, step = make_step(name)
        runners.append(_common.optax_runner(
            f'{name} (each process alone)', None, tx, step, local_params,
            local_data))

  # The all-reduce alone, of the gradient's size and of the largest
  # collective volume of a step above: each device's row of a
  # (devices, size) array summed into one replicated vector.
  sizes = {'all-reduce (gradient)': sum(
      p.size for p in jax.tree.leaves(params))}
  largest = max(facts, key=facts.get)
  if facts[largest] // 4 > 2 * sizes['all-reduce (gradient)']:
    sizes[f'all-reduce ({largest})'] = facts[largest] // 4
  reduce = jax.jit(lambda y: jnp.sum(y, axis=0), out_shardings=everywhere)
  for label, size in sizes.items():
    stacked = jax.device_put(
        np.ones((jax.device_count(), size), np.float32), rows)
    facts[label] = _common.collectives(
        reduce.lower(stacked).compile().as_text())[1]
    holder = {'out': None}

    def run(k, stacked=stacked, holder=holder):
      for _ in range(k):
        holder['out'] = reduce(stacked)

    runners.append(_common.Runner(
        label, None, run,
        lambda holder=holder: jax.block_until_ready(holder['out']),
        lambda: None))
  _common.warm_up(runners, 2)
  times = _common.interleaved(runners, repeats, block)
  if jax.process_index() == 0:
    with open(out_path, 'w') as f:
      json.dump({'layout': f'{jax.process_count()}x{jax.local_device_count()}',
                 'ms': {r.label: 1e3 * statistics.median(t)
                        for r, t in zip(runners, times)},
                 'collective_bytes': facts}, f)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--optimizers', default=','.join(OPTIMIZERS))
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--block', type=int, default=5)
  parser.add_argument('--child', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  names = args.optimizers.split(',')
  if args.child:
    child(args.child, names, args.batch, args.repeats, args.block)
    return
  out = tempfile.mkdtemp(prefix='fo_multi_process_')
  command = [sys.executable, os.path.abspath(__file__), '--optimizers',
             args.optimizers, '--batch', str(args.batch), '--repeats',
             str(args.repeats), '--block', str(args.block), '--child']
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep
             + os.environ.get('PYTHONPATH', ''))
  one = os.path.join(out, '1x4.json')
  single_env = launch.child_env(0, 1, 0, 4, env)
  for key in ('FO_NUM_PROCESSES', 'FO_PROCESS_ID', 'JAX_COORDINATOR_ADDRESS'):
    del single_env[key]  # one plain process, no distributed runtime
  subprocess.run(command + [one], check=True, timeout=3600, env=single_env)
  two = os.path.join(out, '2x2.json')
  launch.launch(command + [two], processes=2, local_devices=2, timeout=3600,
                env=env, log_dir=out)
  with open(one) as f:
    single = json.load(f)
  with open(two) as f:
    double = json.load(f)
  import jax  # pylint: disable=g-import-not-at-top
  import _common  # pylint: disable=g-import-not-at-top
  print(f'JAX {jax.__version__}, {os.cpu_count()} CPU cores shared by all '
        f'devices, CNN of examples/mnist.py, global batch {args.batch}, '
        f'median of {args.repeats} blocks of {args.block} steps:\n')
  rows = []
  for name in double['ms']:
    b = double['ms'][name]
    if name in single['ms']:
      a = single['ms'][name]
      rows.append((name, f'{a:.1f}', f'{b:.1f}', f'{b / a:.2f}',
                   f'{single["collective_bytes"][name]:,}'))
    else:
      rows.append((name, '', f'{b:.1f}', '', '0'))
  _common.print_table(('step', '1x4 ms', '2x2 ms', 'ratio',
                       'collective bytes'), rows)


if __name__ == '__main__':
  main()
