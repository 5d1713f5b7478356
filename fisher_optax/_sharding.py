"""Shardings of an optimizer state for parameters sharded over a mesh.

With parameters sharded FSDP-style (``NamedSharding`` of kernels over a mesh
axis), ``jit`` leaves the layout of everything it creates to XLA's sharding
propagation: a state made by ``jax.jit(tx.init)`` lands on one device (its
zeros depend on no input), and a train step without ``out_shardings`` may
return each slot laid out differently from the step before. Pinning the
state's shardings once makes the layout a decision instead of an accident.
"""

from __future__ import annotations

from typing import Any

import jax

from fisher_optax import _base


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
