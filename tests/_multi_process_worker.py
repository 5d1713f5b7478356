"""One process of the multi-process checks of test_multi_process.py.

``examples/multi_process/launch.py`` starts two copies of this script (two
processes of one JAX job, 2 forced CPU devices each, 4 in all, CPU
collectives over 127.0.0.1). Usage, in each process::

  python tests/_multi_process_worker.py GROUP OUT_DIR OPTIMIZERS

OPTIMIZERS is a comma-separated list. GROUP is one of:

* ``equality``: for each optimizer, five steps of a small CNN under each way
  of using the 4 devices (``jit`` with the batch sharded, on an Auto mesh
  and, ``typed``, on an Explicit one known only from the arrays' types,
  ``shard_map`` with ``axis_name``, ``spread_inverses`` over the axis that
  crosses the processes, FSDP-sharded kernels with ``fo.state_shardings``),
  and five steps on one local device with the whole batch. Every process
  saves the parameters and the optimizer state of each (gathered whole) to
  ``OUT_DIR/<group>_<process>.npz``.
* ``checkpoint``: FSDP, two steps, an Orbax checkpoint written by both
  processes, then (a) three more steps, and (b) the checkpoint restored
  onto ``fo.state_shardings`` targets and three more steps: (a) and (b)
  must agree bitwise.
* ``restore``: in a single process on one device, restores the checkpoint
  that ``checkpoint`` wrote and takes the same three steps.
* ``die``: ``jit`` data parallel; process 1 exits with code 17 before
  step 3 (a fault); the other must not hang.
* ``divergent``: each process feeds its own data as if it were the whole
  replicated batch (host arrays straight into ``jit``, or
  ``jax.make_array_from_process_local_data`` with ``P()``); JAX runs both,
  and ``fo.assert_replicated`` must name what differs across the processes.

The last line a process prints is ``WORKER OK`` when it finished.
"""

import functools
import os
import pathlib
import sys

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'examples' / 'multi_process'))
import launch  # noqa: E402  (the examples' launcher: initialize())

import fisher_optax as fo  # noqa: E402

import _worker_common  # noqa: E402

if 'FO_NUM_PROCESSES' in os.environ:  # started by the launcher
  # Before anything below touches a device. A dead peer is noticed after
  # the heartbeat timeout (JAX's default: 100 s).
  launch.initialize(heartbeat_timeout_seconds=int(
      os.environ.get('FO_HEARTBEAT_TIMEOUT', '100')))

STEPS = 5
CHECKPOINT_AT = 2
BATCH = 64
SPREAD = ('kfac', 'ekfac', 'tkfac', 'tekfac', 'mini_block_fisher')


class Net(nn.Module):
  """A conv, two dense layers and a LayerNorm: every kind of statistic."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.LayerNorm()(nn.tanh(nn.Dense(16)(x)))
    return nn.Dense(4)(x)


MODEL = Net()
# The same seeds in every process: the same global batch and parameters.
X = np.asarray(jax.random.normal(jax.random.key(0), (BATCH, 6, 6, 2)))
Y = np.asarray(jax.random.randint(jax.random.key(1), (BATCH,), 0, 4))
PARAMS = jax.tree.map(np.asarray, MODEL.init(jax.random.key(2), X)['params'])


STEP_FN = _worker_common.capture(MODEL)
make = _worker_common.make
step = functools.partial(_worker_common.step, step_fn=STEP_FN)


train = _worker_common.train


def local_rows(a):
  """This process's consecutive slice of the global batch."""
  n = a.shape[0] // jax.process_count()
  return a[jax.process_index() * n:(jax.process_index() + 1) * n]


def global_batch(mesh):
  sharding = NamedSharding(mesh, P('data'))
  return tuple(jax.make_array_from_process_local_data(sharding, local_rows(a))
               for a in (X, Y))


def gathered(tree):
  """Every leaf whole, as NumPy, in every process."""
  def whole(x):
    if x.is_fully_addressable:  # the one-device reference
      return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(whole, tree)


def single(name):
  """Five steps on one local device with the whole batch: the reference."""
  tx = make(name)
  device = jax.local_devices()[0]
  params = jax.device_put(PARAMS, device)
  state = jax.device_put(tx.init(PARAMS), device)
  x, y = jax.device_put((X, Y), device)
  return train(jax.jit(functools.partial(step, tx)), params, state, x, y,
               STEPS)


def replicated(mesh, tree):
  return jax.device_put(tree, NamedSharding(mesh, P()))


def data_parallel(mesh, name, steps=STEPS, **kwargs):
  tx = make(name, **kwargs)
  x, y = global_batch(mesh)
  return train(jax.jit(functools.partial(step, tx)),
               replicated(mesh, PARAMS), replicated(mesh, tx.init(PARAMS)),
               x, y, steps)


def typed(name):
  """``jax.make_mesh``'s Explicit axes, the mesh only in the arrays' types.

  No ``jax.set_mesh``: the global batch from
  ``jax.make_array_from_process_local_data`` and the replicated parameters
  name the mesh, and the update must find it there.
  """
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  assert mesh.axis_types == (jax.sharding.AxisType.Explicit,)
  return data_parallel(mesh, name)


def spread_jit(mesh, name):
  with jax.set_mesh(mesh):
    return data_parallel(mesh, name, spread_inverses='data')


def shard_mapped(mesh, name, **kwargs):
  """Each device its slice; statistics pmean-ed; gradients summed (vma)."""
  tx = make(name, axis_name='data', **kwargs)
  body = functools.partial(step, tx, grad_scale=1.0 / jax.device_count())
  fn = jax.jit(jax.shard_map(
      body, mesh=mesh, in_specs=(P(), P(), P('data'), P('data')),
      out_specs=(P(), P())))
  x, y = global_batch(mesh)
  return train(fn, replicated(mesh, PARAMS),
               replicated(mesh, tx.init(PARAMS)), x, y, STEPS)


def fsdp_spec(leaf, devices):
  """Shards a kernel's output features over the mesh (FSDP-style)."""
  if leaf.ndim >= 2 and leaf.shape[-1] % devices == 0:
    return P(*([None] * (leaf.ndim - 1) + ['data']))
  return P()


def fsdp_setup(mesh, name):
  """The FSDP step, its parameters, and the state's shardings."""
  tx = make(name)
  param_sh = jax.tree.map(
      lambda p: NamedSharding(mesh, fsdp_spec(p, mesh.size)), PARAMS)
  params = jax.device_put(PARAMS, param_sh)
  state_sh = fo.state_shardings(jax.eval_shape(tx.init, params), params)
  batch = NamedSharding(mesh, P('data'))
  fn = jax.jit(functools.partial(step, tx),
               in_shardings=(param_sh, state_sh, batch, batch),
               out_shardings=(param_sh, state_sh))
  return tx, fn, params, param_sh, state_sh


def fsdp(mesh, name):
  tx, fn, params, _, state_sh = fsdp_setup(mesh, name)
  state = jax.device_put(tx.init(PARAMS), state_sh)
  return train(fn, params, state, *global_batch(mesh), STEPS)


def targets(tree, shardings):
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)


def checkpoint(mesh, name, out_dir, arrays):
  """Orbax save from both processes, restore onto state_shardings."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  tx, fn, params, param_sh, state_sh = fsdp_setup(mesh, name)
  state = jax.device_put(tx.init(PARAMS), state_sh)
  x, y = global_batch(mesh)
  params, state = train(fn, params, state, x, y, CHECKPOINT_AT)
  path = pathlib.Path(out_dir) / f'ckpt_{name}'
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, {'params': params, 'opt_state': state})
    ckptr.wait_until_finished()
  straight = train(fn, params, state, x, y, STEPS - CHECKPOINT_AT)
  abstract = jax.eval_shape(lambda: {'params': PARAMS,
                                     'opt_state': tx.init(PARAMS)})
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(path, targets(
        abstract, {'params': param_sh, 'opt_state': state_sh}))
  layout_kept = all(
      r.sharding == s for r, s in zip(
          jax.tree.leaves(restored['opt_state']), jax.tree.leaves(state_sh)))
  resumed = train(fn, restored['params'], restored['opt_state'], x, y,
                  STEPS - CHECKPOINT_AT)
  add(arrays, f'straight/{name}', straight)
  add(arrays, f'resumed/{name}', resumed)
  arrays[f'facts/layout_kept/{name}'] = np.array(layout_kept)


def restore(name, out_dir, arrays):
  """The two-process checkpoint restored in one process, on one device."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mesh = Mesh(np.array(jax.devices()[:1]), ('data',))
  tx, fn, _, param_sh, state_sh = fsdp_setup(mesh, name)
  abstract = jax.eval_shape(lambda: {'params': PARAMS,
                                     'opt_state': tx.init(PARAMS)})
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(
        pathlib.Path(out_dir) / f'ckpt_{name}',
        targets(abstract, {'params': param_sh, 'opt_state': state_sh}))
  x, y = (jax.device_put(a, NamedSharding(mesh, P('data'))) for a in (X, Y))
  add(arrays, f'restored/{name}', train(
      fn, restored['params'], restored['opt_state'], x, y,
      STEPS - CHECKPOINT_AT))


def die(mesh, name):
  """Process 1 exits before step 3; process 0 steps on into a collective."""
  tx = make(name)
  fn = jax.jit(functools.partial(step, tx))
  x, y = global_batch(mesh)
  params, state = replicated(mesh, PARAMS), replicated(mesh, tx.init(PARAMS))
  for i in range(STEPS):
    if i == 2 and jax.process_index() == 1:
      print('process 1: exiting with code 17 before step 3', flush=True)
      os._exit(17)
    params, state = jax.block_until_ready(fn(params, state, x, y))
    print(f'process {jax.process_index()}: step {i + 1} done', flush=True)


def divergent(mesh, name, arrays):
  """Each process's own rows fed as if they were the replicated batch."""
  tx = make(name)
  fn = jax.jit(functools.partial(step, tx))
  params, state = replicated(mesh, PARAMS), replicated(mesh, tx.init(PARAMS))
  mine = (local_rows(X), local_rows(Y))
  # JAX compares host arrays that device_put places on the devices of
  # several processes, and raises when they differ.
  try:
    replicated(mesh, mine)
    arrays['facts/jax_device_put_error'] = np.array('none')
  except Exception as e:  # pylint: disable=broad-except
    arrays['facts/jax_device_put_error'] = np.array(str(e)[:300])
  # It trusts host arrays passed to jit, and a global array built from
  # per-process data with the replicated sharding P() instead of the
  # batch's P('data'): both run, each process on its own data.
  fed = {
      'jit': mine,
      'local_data': tuple(jax.make_array_from_process_local_data(
          NamedSharding(mesh, P()), a) for a in mine)}
  for how, (x, y) in fed.items():
    out = jax.block_until_ready(fn(params, state, x, y))
    try:
      fo.assert_replicated({'params': out[0], 'opt_state': out[1]})
      arrays[f'facts/divergent_error/{how}'] = np.array('none')
    except ValueError as e:
      arrays[f'facts/divergent_error/{how}'] = np.array(str(e))
  # The correct feed passes the same check.
  params, state = data_parallel(mesh, name, steps=1)
  fo.assert_replicated({'params': params, 'opt_state': state})
  # Within a process: copies on its two devices that differ.
  local = Mesh(np.array(jax.local_devices()), ('data',))
  w = jax.make_array_from_single_device_arrays(
      (3,), NamedSharding(local, P()),
      [jax.device_put(np.full(3, i, np.float32), d)
       for i, d in enumerate(jax.local_devices())])
  try:
    fo.assert_replicated({'w': w})
    arrays['facts/local_divergent_error'] = np.array('none')
  except ValueError as e:
    arrays['facts/local_divergent_error'] = np.array(str(e))


def add(arrays, prefix, tree):
  for path, leaf in jax.tree_util.tree_leaves_with_path(gathered(tree)):
    arrays[f'{prefix}/{jax.tree_util.keystr(path)}'] = np.asarray(leaf)


def main(group, out_dir, names):
  arrays = {}
  mesh = Mesh(np.array(jax.devices()), ('data',))
  for name in names.split(','):
    if group == 'equality':
      add(arrays, f'single/{name}', single(name))
      add(arrays, f'jit/{name}', data_parallel(mesh, name))
      add(arrays, f'typed/{name}', typed(name))
      add(arrays, f'shard_map/{name}', shard_mapped(mesh, name))
      add(arrays, f'fsdp/{name}', fsdp(mesh, name))
      if name in SPREAD:
        add(arrays, f'spread_jit/{name}', spread_jit(mesh, name))
        add(arrays, f'spread_shard_map/{name}', shard_mapped(
            mesh, name, spread_inverses='data'))
    elif group == 'checkpoint':
      checkpoint(mesh, name, out_dir, arrays)
    elif group == 'restore':
      restore(name, out_dir, arrays)
    elif group == 'die':
      die(mesh, name)
    elif group == 'divergent':
      divergent(mesh, name, arrays)
    else:
      raise ValueError(f'unknown group {group!r}')
    print(f'process {jax.process_index()}: {name} done', flush=True)
  arrays['facts/devices'] = np.array(
      [jax.process_count(), jax.device_count(), jax.local_device_count()])
  np.savez(os.path.join(out_dir, f'{group}_{jax.process_index()}.npz'),
           **arrays)
  print('WORKER OK', flush=True)


if __name__ == '__main__':
  main(*sys.argv[1:])
