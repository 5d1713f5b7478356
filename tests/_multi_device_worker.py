"""Runs the multi-device checks of test_multi_device.py in a fresh process.

The device count is fixed when JAX starts, so the tests run this script
with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``. Usage:

  python tests/_multi_device_worker.py GROUP OUT.npz

GROUP is ``sharded_jit`` (data parallel and FSDP under ``jit``), ``shard_map``
(``shard_map`` with and without ``check_vma``, and ``spread_inverses``) or
``explicit`` (the same on a mesh with Explicit axes, ``jax.make_mesh``'s
default, beside an Auto one). For every optimizer and mode it saves the
parameters after five steps (``<mode>/<optimizer>/<leaf>``) next to the
single-device run's (``single/<optimizer>/<leaf>``); the test compares them. It
also saves a few facts as strings under ``facts/...``.
"""

import functools
import re
import sys

import flax.linen as nn
import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

import fisher_optax as fo

import _worker_common  # pylint: disable=g-import-not-at-top

STEPS = 5
DEVICES = 8
OPTIMIZERS = ('adafisher', 'adafisherw', 'kfac', 'ekfac', 'tkfac', 'tekfac',
              'mini_block_fisher', 'kfac_graft')
SPREAD = ('kfac', 'ekfac', 'tkfac', 'tekfac', 'mini_block_fisher')
# The adaptive step, both curvature sources: data parallel, FSDP and
# shard_map (its products and losses averaged over the devices).
ADAPTIVE = ('kfac_adaptive', 'kfac_adaptive_ggn')
VMA_OFF = ('adafisher', 'kfac')


class Net(nn.Module):
  """A conv and two dense layers: every block kind of every optimizer."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.tanh(nn.Dense(16)(x))
    return nn.Dense(3)(x)


class MLP(nn.Module):
  """Dense and norm layers only: JAX cannot yet differentiate a convolution
  whose batch is sharded in its type (jax-ml/jax#31798), so data parallelism
  under ``jit`` on an Explicit mesh is tested without one."""

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.tanh(nn.Dense(16)(x))
    x = nn.LayerNorm()(x)
    return nn.Dense(3)(x)


MODEL = Net()
X = jax.random.normal(jax.random.key(0), (64, 6, 6, 2))
Y = jax.random.randint(jax.random.key(1), (64,), 0, 3)
PARAMS = MODEL.init(jax.random.key(2), X)['params']


STEP_FN = _worker_common.capture(MODEL)
MLP_MODEL = MLP()
MLP_PARAMS = MLP_MODEL.init(jax.random.key(3), X)['params']
MLP_STEP_FN = _worker_common.capture(MLP_MODEL)


make = _worker_common.make
step = functools.partial(_worker_common.step, step_fn=STEP_FN)


def train(tx, fn, params, state, x, y):
  del tx
  return _worker_common.train(fn, params, state, x, y, STEPS)


def single(name):
  tx = make(name)
  return train(tx, jax.jit(functools.partial(step, tx)), PARAMS,
               tx.init(PARAMS), X, Y)[0]


def data_parallel(mesh, name):
  """The batch sharded over the mesh, parameters replicated, plain jit."""
  tx = make(name)
  batch = NamedSharding(mesh, P('data'))
  return train(tx, jax.jit(functools.partial(step, tx)), PARAMS,
               tx.init(PARAMS), jax.device_put(X, batch),
               jax.device_put(Y, batch))[0]


def fsdp_spec(leaf):
  """Shards a kernel's output features over the mesh (FSDP-style)."""
  if leaf.ndim >= 2 and leaf.shape[-1] % DEVICES == 0:
    return P(*([None] * (leaf.ndim - 1) + ['data']))
  return P()


def fsdp(mesh, name, facts):
  """Kernels sharded over 'data', batch too; the state's shardings pinned."""
  tx = make(name)
  params = jax.device_put(PARAMS, jax.tree.map(
      lambda p: NamedSharding(mesh, fsdp_spec(p)), PARAMS))
  param_sh = jax.tree.map(lambda p: p.sharding, params)
  state_sh = fo.state_shardings(jax.eval_shape(tx.init, params), params)
  state = jax.device_put(tx.init(params), state_sh)
  batch = NamedSharding(mesh, P('data'))
  fn = jax.jit(functools.partial(step, tx),
               in_shardings=(param_sh, state_sh, batch, batch),
               out_shardings=(param_sh, state_sh))
  params, state = train(tx, fn, params, state, jax.device_put(X, batch),
                        jax.device_put(Y, batch))
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    if getattr(leaf, 'ndim', 0):
      facts[f'facts/fsdp/{name}/{jax.tree_util.keystr(path)}'] = str(
          leaf.sharding.spec)
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    facts[f'facts/fsdp_params/{name}/{jax.tree_util.keystr(path)}'] = str(
        leaf.sharding.spec)
  return params


def shard_mapped(mesh, name, check_vma, x=X, y=Y, **kwargs):
  """Each device its slice of the batch; statistics pmean-ed.

  With ``check_vma`` (shard_map's default) the gradient of the replicated
  parameters already comes out summed over the devices, so it is divided by
  their number; without it the gradient is pmean-ed.
  """
  tx = make(name, axis_name='data', **kwargs)
  if check_vma:
    body = functools.partial(step, tx, grad_scale=1.0 / DEVICES)
  else:
    body = functools.partial(step, tx, axis='data')
  fn = jax.jit(jax.shard_map(
      body, mesh=mesh, in_specs=(P(), P(), P('data'), P('data')),
      out_specs=(P(), P()), check_vma=check_vma))
  return train(tx, fn, PARAMS, tx.init(PARAMS), x, y)[0]


def spread_jit(mesh, name, facts):
  """spread_inverses under jit with the mesh set; the batch sharded."""
  tx = make(name, spread_inverses='data')
  batch = NamedSharding(mesh, P('data'))
  x, y = jax.device_put(X, batch), jax.device_put(Y, batch)
  replicated = make(name)
  with jax.set_mesh(mesh):
    for key, t in (('spread', tx), ('replicated', replicated)):
      hlo = jax.jit(functools.partial(step, t)).lower(
          PARAMS, t.init(PARAMS), x, y).compile().as_text()
      facts[f'facts/collectives/{key}/{name}'] = str(count_collectives(hlo))
    fn = jax.jit(functools.partial(step, tx))
    return train(tx, fn, PARAMS, tx.init(PARAMS), x, y)[0]


def count_collectives(hlo):
  return len(re.findall(
      r' (?:all-gather|all-reduce|collective-permute|all-to-all)'
      r'(?:-start)?\(', hlo))


def explicit(name, results, facts):
  """A mesh with Explicit axes (``jax.make_mesh``'s default) beside Auto."""
  explicit_mesh = jax.make_mesh((DEVICES,), ('data',))
  assert explicit_mesh.axis_types == (jax.sharding.AxisType.Explicit,)
  auto_mesh = Mesh(np.array(jax.devices()), ('data',))
  mlp_step = functools.partial(step, step_fn=MLP_STEP_FN)

  def mlp_train(tx, mesh):
    batch = NamedSharding(mesh, P('data'))
    return train(tx, jax.jit(functools.partial(mlp_step, tx)), MLP_PARAMS,
                 tx.init(MLP_PARAMS), jax.device_put(X, batch),
                 jax.device_put(Y, batch))[0]

  tx = make(name)
  results.setdefault('mlp_single', {})[name] = train(
      tx, jax.jit(functools.partial(mlp_step, tx)), MLP_PARAMS,
      tx.init(MLP_PARAMS), X, Y)[0]
  results.setdefault('mlp_auto', {})[name] = mlp_train(tx, auto_mesh)
  with jax.set_mesh(explicit_mesh):
    results.setdefault('mlp_explicit', {})[name] = mlp_train(
        tx, explicit_mesh)
    if name in SPREAD:
      spread = make(name, spread_inverses='data')
      results.setdefault('mlp_explicit_spread', {})[name] = mlp_train(
          spread, explicit_mesh)
      batch = NamedSharding(explicit_mesh, P('data'))
      x, y = jax.device_put(X, batch), jax.device_put(Y, batch)
      for key, t in (('spread', spread), ('replicated', tx)):
        hlo = jax.jit(functools.partial(mlp_step, t)).lower(
            MLP_PARAMS, t.init(MLP_PARAMS), x, y).compile().as_text()
        facts[f'facts/explicit_collectives/{key}/{name}'] = str(
            count_collectives(hlo))
    if name in VMA_OFF:
      # Inside shard_map the axis is Manual: the Auto code path runs.
      # An Explicit mesh wants the inputs typed as batch-sharded.
      batch = NamedSharding(explicit_mesh, P('data'))
      results.setdefault('explicit_shard_map', {})[name] = shard_mapped(
          explicit_mesh, name, True, jax.device_put(X, batch),
          jax.device_put(Y, batch))
  results.setdefault('typed', {})[name] = typed(explicit_mesh, name)
  if name == 'kfac':
    results.setdefault('typed_spread', {})[name] = typed(
        explicit_mesh, name, spread_inverses='data')
  if name in ADAPTIVE:  # its update needs the loss: no FSDP-only update
    return
  results.setdefault('explicit_fsdp', {})[name] = explicit_fsdp(
      explicit_mesh, name, facts)


def typed(mesh, name, **kwargs):
  """Arrays placed on an Explicit mesh and no ``jax.set_mesh``.

  JAX lets a user call a jitted step on arrays whose shardings name the
  mesh (``jax.device_put`` with a ``NamedSharding``) without setting it:
  the mesh travels in the arrays' types, and the update must find it there.
  """
  tx = make(name, **kwargs)
  assert jax.sharding.get_abstract_mesh().empty
  params = jax.device_put(PARAMS, NamedSharding(mesh, P()))
  batch = NamedSharding(mesh, P('data'))
  return train(tx, jax.jit(functools.partial(step, tx)), params,
               tx.init(params), jax.device_put(X, batch),
               jax.device_put(Y, batch))[0]


def explicit_fsdp(mesh, name, facts):
  """The conv net's update on an Explicit mesh, FSDP-sharded kernels."""
  tx = make(name)
  captured = jax.jit(STEP_FN)
  sharding = jax.tree.map(lambda p: NamedSharding(mesh, fsdp_spec(p)),
                          PARAMS)
  params = jax.device_put(PARAMS, sharding)
  state_sh = fo.state_shardings(jax.eval_shape(tx.init, params), params)
  state = jax.device_put(tx.init(params), state_sh)
  update = jax.jit(lambda g, s, p, st: tx.update(g, s, p, layer_stats=st))

  def batch_sharded(x):  # (calls, batch, ...)
    return NamedSharding(mesh, P(None, 'data') if x.ndim >= 2 else P())
  for _ in range(STEPS):
    # Captured on one device, then typed as batch-sharded: JAX cannot
    # differentiate the conv with a batch sharded in its type (see MLP).
    _, grads, stats = captured(jax.tree.map(np.asarray, params),
                               X, Y)
    with jax.set_mesh(mesh):
      grads = jax.device_put(grads, sharding)
      stats = jax.device_put(stats, jax.tree.map(batch_sharded, stats))
      updates, state = jax.block_until_ready(update(grads, state, params,
                                                    stats))
      params = optax.apply_updates(params, updates)
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    facts[f'facts/explicit_fsdp_params/{name}/'
          f'{jax.tree_util.keystr(path)}'] = str(jax.typeof(leaf).sharding.spec)
  return params


def save(out, results, facts):
  arrays = {}
  for mode, by_name in results.items():
    for name, params in by_name.items():
      for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        arrays[f'{mode}/{name}/{jax.tree_util.keystr(path)}'] = np.asarray(
            leaf)
  arrays.update({k: np.array(v) for k, v in facts.items()})
  np.savez(out, **arrays)


def main(group, out):
  assert jax.device_count() == DEVICES, jax.devices()
  mesh = Mesh(np.array(jax.devices()), ('data',))
  results = {'single': {}}
  facts = {}
  for name in OPTIMIZERS:
    results['single'][name] = single(name)
    if group == 'explicit':
      explicit(name, results, facts)
    elif group == 'sharded_jit':
      results.setdefault('jit', {})[name] = data_parallel(mesh, name)
      results.setdefault('fsdp', {})[name] = fsdp(mesh, name, facts)
    else:
      # check_vma=False runs the same library code as True (only the
      # user's gradient averaging differs): two optimizers suffice.
      for check_vma in ((False, True) if name in VMA_OFF else (True,)):
        results.setdefault(f'shard_map_vma{int(check_vma)}', {})[name] = (
            shard_mapped(mesh, name, check_vma))
      if name in SPREAD:
        results.setdefault('spread_jit', {})[name] = spread_jit(
            mesh, name, facts)
        results.setdefault('spread_shard_map', {})[name] = shard_mapped(
            mesh, name, True, spread_inverses='data')
    print(name, 'done', flush=True)
  for name in ADAPTIVE:
    results['single'][name] = single(name)
    if group == 'explicit':
      # The batch-sharded per-example scores and output tangents.
      explicit(name, results, facts)
    elif group == 'sharded_jit':
      results.setdefault('jit', {})[name] = data_parallel(mesh, name)
      results.setdefault('fsdp', {})[name] = fsdp(mesh, name, facts)
    else:
      results.setdefault('shard_map_vma1', {})[name] = shard_mapped(
          mesh, name, True)
    print(name, 'done', flush=True)
  if group == 'explicit':
    # K-FAC-reduce and the sampled statistics reshape the batch-sharded
    # conv rows: the conv net's update on both kinds of mesh.
    explicit_mesh = jax.make_mesh((DEVICES,), ('data',))
    for name in ('kfac_reduce', 'kfac_sampled'):
      results['single'][name] = single(name)
      results.setdefault('jit', {})[name] = data_parallel(mesh, name)
      results.setdefault('explicit_fsdp', {})[name] = explicit_fsdp(
          explicit_mesh, name, facts)
      results.setdefault('typed', {})[name] = typed(explicit_mesh, name)
  elif group == 'shard_map':
    # Each device samples its own examples: with a local batch that the
    # period divides, the same examples as one device's stride.
    name = 'kfac_sampled'
    results['single'][name] = single(name)
    results.setdefault('shard_map_vma1', {})[name] = shard_mapped(
        mesh, name, True)
  try:
    tx = make('kfac', spread_inverses='data')
    jax.jit(functools.partial(step, tx))(PARAMS, tx.init(PARAMS), X, Y)
    facts['facts/no_mesh_error'] = 'none'
  except ValueError as e:
    facts['facts/no_mesh_error'] = str(e)
  save(out, results, facts)
  print('WORKER OK')


if __name__ == '__main__':
  main(*sys.argv[1:])
