"""How the optimizers meet meshes: layouts, mesh axis types, replicas.

* :func:`state_shardings`. With parameters sharded FSDP-style
  (``NamedSharding`` of kernels over a mesh axis), ``jit`` leaves the layout
  of everything it creates to XLA's sharding propagation: a state made by
  ``jax.jit(tx.init)`` lands on one device (its zeros depend on no input),
  and a train step without ``out_shardings`` may return each slot laid out
  differently from the step before. Pinning the state's shardings once
  makes the layout a decision instead of an accident.
* :func:`with_auto_axes`: every optimizer's update on a mesh with Explicit
  axes (``jax.make_mesh``'s default).
* :func:`assert_replicated`: a host-side check that the copies of every
  replicated array agree across devices and processes.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import Any

import jax
import jax.experimental.multihost_utils  # noqa: F401 (process_allgather)
import numpy as np

from fisher_optax import _base


def _spec(x: Any) -> jax.sharding.PartitionSpec:
  return jax.typeof(x).sharding.spec


def _all_arrays(tree: Any) -> bool:
  return all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(tree))


def _typed_mesh(tree: Any) -> jax.sharding.AbstractMesh | None:
  """The mesh with Explicit axes that the arrays of ``tree`` are typed on.

  None when no array is typed on such a mesh (plain arrays, Auto axes).
  """
  for leaf in jax.tree.leaves(tree):
    if not isinstance(leaf, jax.Array):
      continue
    sharding = jax.typeof(leaf).sharding
    mesh = getattr(sharding, 'mesh', None)
    if (isinstance(mesh, jax.sharding.AbstractMesh) and not mesh.empty
        and mesh.explicit_axes):
      return mesh
  return None


def with_auto_axes(update_fn: Callable[..., Any]) -> Callable[..., Any]:
  """``update_fn`` run with the mesh's Explicit axes made Auto.

  Under a mesh with Explicit axes (``jax.make_mesh``'s default on current
  JAX: sharding in types) every contraction over a sharded axis must state
  its output's sharding, and so must every reshape that merges a sharded
  axis with another: the statistics sum over the batch (which data
  parallelism shards), the convolution statistics fold output positions
  into it, the preconditioners contract the sharded axis of an FSDP
  gradient. Instead of annotating each, an optimizer's update runs as it
  does under Auto axes (``jax.sharding.auto_axes``), where XLA places the
  reductions as all-reduces, and its results are given the shardings the
  caller's types say: the updates those of the gradients, the new state
  those of the old. The same code as under Auto axes thus runs under
  both, and both are tested against one device.

  The mesh is the context's (``jax.set_mesh``) or, without one, the mesh
  in the arguments' types: JAX lets a user place arrays with
  ``jax.device_put(x, NamedSharding(mesh, P('data')))`` or
  ``jax.make_array_from_process_local_data`` and call a jitted step with
  no mesh set, and the update then runs under that mesh as if it were set.

  Without a mesh, under Auto axes or inside ``shard_map`` (Manual axes)
  the update runs as it is.
  """

  @functools.wraps(update_fn)
  def wrapped(updates, state, params=None, **extra_args):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      typed = _typed_mesh((updates, state, params, extra_args))
      if typed is not None:
        with jax.sharding.use_abstract_mesh(typed):
          return wrapped(updates, state, params, **extra_args)
    if mesh.empty or not mesh.explicit_axes:
      return update_fn(updates, state, params, **extra_args)
    # auto_axes re-types its positional array arguments only; extra
    # arguments that are not arrays (callables) stay in the closure.
    arrays = {k: v for k, v in extra_args.items() if _all_arrays(v)}
    others = {k: v for k, v in extra_args.items() if k not in arrays}
    out_sharding = (jax.tree.map(_spec, updates), jax.tree.map(_spec, state))

    def run(updates, state, params, arrays):
      return update_fn(updates, state, params, **arrays, **others)
    return jax.sharding.auto_axes(
        run, axes=mesh.explicit_axes, out_sharding=out_sharding)(
            updates, state, params, arrays)

  return wrapped


def _key(path) -> tuple[str, ...]:
  return tuple(_base.key_str(k) for k in path)


def state_shardings(state: Any, params: Any) -> Any:
  """Shardings for an optimizer state: slots like their parameters.

  A state leaf whose tree path ends with a parameter's path and whose shape
  is the parameter's (momentum, Adam-style moments, AdaFisher's output-side
  factor ``s``) gets that parameter's sharding. Every other leaf (Kronecker
  factors, their inverses and eigenbases, Mini-Block Fisher blocks,
  AdaFisher's input-side factors, counters) is replicated over the mesh:
  they are small (``d_in^2 + d_out^2`` per layer, blocks of at most
  ``block_size^2``) and every device needs all of them to precondition its
  shard. Works for any Optax state, this library's or not.

  Args:
    state: the optimizer state, or its shapes (``jax.eval_shape(tx.init,
      params)``).
    params: the parameters as placed on the mesh (``jax.device_put(params,
      shardings)``), or ``jax.ShapeDtypeStruct`` leaves with ``sharding``:
      each leaf's ``shape`` and ``sharding`` are read.

  Returns:
    A pytree like ``state`` of ``NamedSharding``, to pass as the state's
    ``in_shardings``/``out_shardings`` of the train step, or to
    ``jax.device_put`` the state.

  Raises:
    ValueError: no leaf of ``params`` has a ``NamedSharding``.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    >>> import fisher_optax as fo
    >>> mesh = Mesh(np.array(jax.devices()[:1]), ('data',))
    >>> params = {'kernel': jnp.zeros((4, 8)), 'bias': jnp.zeros((8,))}
    >>> params = jax.device_put(params, {
    ...     'kernel': NamedSharding(mesh, P(None, 'data')),
    ...     'bias': NamedSharding(mesh, P())})
    >>> tx = fo.kfac(1e-2)
    >>> shardings = fo.state_shardings(jax.eval_shape(tx.init, params),
    ...                                params)
    >>> shardings[1].mu['kernel'].spec, shardings[1].stats['']['A'].spec
    (P(None, 'data'), P())
    >>> opt_state = jax.device_put(tx.init(params), shardings)
  """
  by_path = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    sharding = getattr(leaf, 'sharding', None)
    if isinstance(sharding, jax.sharding.NamedSharding):
      by_path[_key(path)] = (tuple(leaf.shape), sharding)
  if not by_path:
    raise ValueError(
        'state_shardings: no parameter has a NamedSharding; pass the '
        'parameters as placed on the mesh, e.g. jax.device_put(params, '
        'shardings).')
  mesh = next(iter(by_path.values()))[1].mesh
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def pick(path, leaf):
    key = _key(path)
    for start in range(len(key)):
      shape, sharding = by_path.get(key[start:], (None, None))
      if sharding is not None and tuple(leaf.shape) == shape:
        return sharding
    return replicated

  return jax.tree_util.tree_map_with_path(pick, state)


def _index_key(index) -> tuple[tuple[Any, Any, Any], ...]:
  return tuple((s.start, s.stop, s.step) for s in index)


def _fingerprint(x: np.ndarray) -> np.ndarray:
  """Two random projections of ``x`` and its L1 norm, in float64.

  The projections' weights depend only on the position, so equal arrays
  give equal fingerprints everywhere and a permutation of values shows.
  """
  flat = np.asarray(x, np.float64).reshape(-1)
  weights = np.random.default_rng(0).uniform(-1.0, 1.0, (2, flat.size))
  return np.concatenate([weights @ flat, [np.abs(flat).sum()]])


def assert_replicated(tree: Any, *, rtol: float = 1e-6) -> None:
  """Checks that every copy of each replicated array holds the same values.

  Under ``jit`` a replicated array (parameters in data parallelism, the
  Kronecker factors, their inverses) is one value that every device holds a
  copy of, and XLA trusts that the copies agree. They do not when the
  program breaks that promise, silently, for example when each process of
  a multi-process job passes its own host data as if it were the whole
  replicated batch instead of building the global batch with
  ``jax.make_array_from_process_local_data``: every process then steps on
  its own statistics and the copies drift apart without an error. This
  host-side check compares the copies: within a process array by array,
  across processes by a fingerprint of each fully replicated leaf (two
  random projections and the L1 norm, one small all-gather in all). Call
  it on the parameters and optimizer state after the first step, and
  every so often after; every process must call it (it is a collective
  in a multi-process job).

  Args:
    tree: a pytree of ``jax.Array`` (other leaves are skipped).
    rtol: copies differ when a fingerprint entry differs by more than
      ``rtol`` times the leaf's L1 norm; float32 rounding of the same
      computation stays far below the default.

  Raises:
    ValueError: some copies differ; names each such leaf by its path, the
      processes or devices whose copies differ, and the relative
      difference.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import fisher_optax as fo
    >>> fo.assert_replicated({'w': jnp.ones((3, 2))})  # one copy: passes
  """
  flat = [(jax.tree_util.keystr(path), leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
          if isinstance(leaf, jax.Array)]
  bad = []
  # Copies on this process's devices: compared directly.
  for name, leaf in flat:
    copies = {}
    for shard in leaf.addressable_shards:
      copies.setdefault(_index_key(shard.index), []).append(shard)
    for shards in copies.values():
      first = np.asarray(shards[0].data, np.float64)
      for other in shards[1:]:
        second = np.asarray(other.data, np.float64)
        scale = max(float(np.abs(first).sum()), float(np.abs(second).sum()),
                    np.finfo(np.float64).tiny)
        diff = float(np.abs(second - first).sum()) / scale
        if not diff <= rtol:
          bad.append(f'{name} (devices {shards[0].device.id} and '
                     f'{other.device.id}: relative difference {diff:.3g})')
  if jax.process_count() > 1:
    replicated = [(n, x) for n, x in flat if x.sharding.is_fully_replicated]
    if replicated:
      local = np.stack([_fingerprint(x.addressable_data(0))
                        for _, x in replicated])
      # (processes, leaves, 3): every process's fingerprints, everywhere.
      every = np.asarray(jax.experimental.multihost_utils.process_allgather(
          local))
      for i, (name, _) in enumerate(replicated):
        fps = every[:, i]
        scale = max(float(np.abs(fps[:, -1]).max()),
                    np.finfo(np.float64).tiny)
        diff = np.abs(fps - fps[0]).max(axis=1) / scale
        for p in np.flatnonzero(~(diff <= rtol)):
          bad.append(f'{name} (processes 0 and {p}: relative difference '
                     f'{diff[p]:.3g})')
  if bad:
    more = ''
    if len(bad) > 8:
      more = f'; and {len(bad) - 8} more: ' + ', '.join(
          b.split(' (', 1)[0] for b in bad[8:])
    raise ValueError(
        f'assert_replicated: {len(bad)} replicated array(s) hold different '
        'values on different processes or devices: '
        + '; '.join(bad[:8]) + more
        + '. Each process must feed its part of one global batch '
        '(jax.make_array_from_process_local_data) and run the same '
        'program with the same seeds; see docs/multi_device.md.')
