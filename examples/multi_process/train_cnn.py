r"""Data-parallel K-FAC on MNIST across processes: the several-hosts recipe.

Every process runs this same program. It joins JAX's distributed runtime,
builds one mesh over all global devices, loads only its own slice of each
global batch, and trains the CNN of ``examples/mnist.py`` with
``fisher_optax.kfac``; with ``--checkpoint-dir`` it saves the parameters and
the optimizer state with Orbax (every process writes its part) and resumes
from the newest checkpoint there.

On one machine, 2 processes with 2 CPU devices each::

  python examples/multi_process/launch.py --processes 2 --local-devices 2 \
      -- python examples/multi_process/train_cnn.py --steps 100

On SLURM (one task per host or per GPU; ``jax.distributed.initialize()``
reads the job from SLURM's environment)::

  srun --nodes=2 --ntasks-per-node=4 --gpus-per-task=1 --kill-on-bad-exit=1 \
      python examples/multi_process/train_cnn.py --steps 1000

On a TPU pod slice (the same command on every host)::

  gcloud compute tpus tpu-vm ssh NAME --worker=all \
      --command='python train_cnn.py --steps 1000'
"""

import argparse
import functools
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import launch  # noqa: E402  pylint: disable=g-import-not-at-top

# Before anything touches a device: join the job.
launch.initialize()

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
from jax.sharding import NamedSharding  # noqa: E402  pylint: disable=g-import-not-at-top
from jax.sharding import PartitionSpec as P  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top
import optax  # noqa: E402  pylint: disable=g-import-not-at-top

import fisher_optax as fo  # noqa: E402  pylint: disable=g-import-not-at-top
from _mnist_data import load_mnist  # noqa: E402  pylint: disable=g-import-not-at-top
from mnist import CNN  # noqa: E402  pylint: disable=g-import-not-at-top
from mnist import make_loss_fn  # noqa: E402  pylint: disable=g-import-not-at-top


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--steps', type=int, default=100)
  parser.add_argument('--batch', type=int, default=128,
                      help='global batch: a multiple of the device count')
  parser.add_argument('--learning-rate', type=float, default=1e-3)
  parser.add_argument('--checkpoint-dir', default=None)
  parser.add_argument('--checkpoint-every', type=int, default=50)
  args = parser.parse_args()

  # One mesh over every device of every process. Auto axes: JAX cannot yet
  # differentiate a convolution whose batch is sharded in its type, which
  # jax.make_mesh's default (Explicit) axes would give it.
  mesh = jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  batch_sharding = NamedSharding(mesh, P('data'))
  replicated = NamedSharding(mesh, P())

  # Same seed everywhere: the same model and the same order of examples.
  images, labels = load_mnist()
  model = CNN()
  params = model.init(jax.random.key(0), images[:1])['params']
  tx = fo.kfac(args.learning_rate)
  step_fn = fo.linen.value_grad_and_stats(make_loss_fn(model))

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, x, y):
    loss, grads, stats = step_fn(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   layer_stats=stats)
    return optax.apply_updates(params, updates), opt_state, loss

  params = jax.device_put(params, replicated)
  opt_state = jax.device_put(tx.init(params), replicated)
  start_step = 0
  ckptr = None
  if args.checkpoint_dir:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    ckptr = ocp.CheckpointManager(os.path.abspath(args.checkpoint_dir))
    if ckptr.latest_step() is not None:
      start_step = ckptr.latest_step()
      # The restore target: shapes, dtypes and shardings of the state.
      target = jax.tree.map(
          lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
          {'params': params, 'opt_state': opt_state},
          {'params': jax.tree.map(lambda _: replicated, params),
           'opt_state': fo.state_shardings(opt_state, params)})
      restored = ckptr.restore(start_step, args=ocp.args.StandardRestore(
          target))
      params, opt_state = restored['params'], restored['opt_state']

  # Each process loads only its rows of every global batch.
  per_process = args.batch // jax.process_count()
  rng = np.random.default_rng(1)
  order = rng.permutation(len(images))
  start, loss = time.perf_counter(), float('nan')
  for step in range(start_step, args.steps):
    rows = order[(step * args.batch) % (len(images) - args.batch):][
        :args.batch]
    mine = rows[jax.process_index() * per_process:][:per_process]
    x = jax.make_array_from_process_local_data(batch_sharding, images[mine])
    y = jax.make_array_from_process_local_data(batch_sharding, labels[mine])
    params, opt_state, loss = train_step(params, opt_state, x, y)
    if step == start_step:
      # Once: every process fed its part of one batch and holds the same
      # state (a mistake here trains each process on its own data).
      fo.assert_replicated({'params': params, 'opt_state': opt_state})
    if ckptr is not None and (step + 1) % args.checkpoint_every == 0:
      ckptr.save(step + 1, args=ocp.args.StandardSave(
          {'params': params, 'opt_state': opt_state}))
    if jax.process_index() == 0 and (step + 1) % 10 == 0:
      print(f'step {step + 1}: loss {float(loss):.4f} '
            f'({time.perf_counter() - start:.1f} s)', flush=True)
  if ckptr is not None:
    ckptr.wait_until_finished()
  print(f'process {jax.process_index()} of {jax.process_count()}: done, '
        f'final loss {float(loss):.4f}', flush=True)


if __name__ == '__main__':
  main()
