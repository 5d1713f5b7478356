"""What the capture step hands the adaptive step, from one linearization.

The capture step (``fisher_optax.linen`` / ``.nnx``
``value_grad_and_stats``) linearizes the user's loss once, with the model's
outputs (what ``model.apply`` or the NNX model's ``__call__`` returns) as
extra outputs of the linearized function. Its transpose gives the gradient
and the layers' cotangents; the same linearization, kept, gives the
Jacobian-vector products :math:`J v` of the outputs that the Gauss-Newton
quadratic model of :func:`fisher_optax.adaptive` needs. The loss *on* the
outputs is the user's own loss function replayed with every model call
returning the recorded outputs: it runs the loss's own operations only.

The model/loss split is where the loss calls the model, so the user writes
the loss once and registers nothing; see ``docs/adaptive.md`` for why.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, NamedTuple

import jax
from jax.extend import core as jax_core

from fisher_optax import _base


class Linearization(NamedTuple):
  r"""The loss split at the model's outputs, linearized once.

  The loss is :math:`h(\theta) = \ell(f(\theta), \theta)` on the
  captured batch, with :math:`f` the model's outputs (a tuple: one entry per
  model call) and :math:`\ell` the rest of the user's loss, which may also
  read parameters itself (an L2 penalty, a head applied to the outputs).

  Attributes:
    value: :math:`h(\theta)`.
    value_fn: ``params -> h(params)`` on the same batch, with the same
      mutable collections, random keys and arguments.
    params: :math:`\theta`, shaped as the update's parameters.
    outputs: :math:`f(\theta)`.
    outputs_jvp: ``v -> J v``, the linearized model (no primal pass).
    loss_of: ``(params, outputs) -> loss``: :math:`\ell`, the user's loss
      with every model call returning its entry of ``outputs`` (the model
      does not run).
    outside: ``() -> paths`` of the parameters that :math:`\ell` reads
      itself. A function: it traces the loss once more, when asked.

  Example:
    The pieces, for a loss with an L2 penalty on the kernel:

    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import fisher_optax as fo
    >>> model = nn.Dense(2)
    >>> x = jnp.ones((4, 3))
    >>> params = model.init(jax.random.key(0), x)['params']
    >>> def loss_fn(p):
    ...   out = model.apply({'params': p}, x)
    ...   return jnp.mean(out ** 2) + 1e-3 * jnp.sum(p['kernel'] ** 2)
    >>> loss, grads, stats = fo.linen.value_grad_and_stats(loss_fn)(params)
    >>> lin = fo.linearization(stats)
    >>> lin.outside()
    ('kernel',)
    >>> v = jax.tree.map(jnp.ones_like, params)
    >>> jv = lin.outputs_jvp(v)[0]  # J v, without running the model
    >>> bool(jnp.allclose(jv, jax.jvp(
    ...     lambda p: model.apply({'params': p}, x), (params,), (v,))[1]))
    True
    >>> bool(jnp.allclose(lin.value_fn(params), loss))
    True
  """

  value: jax.Array
  value_fn: Callable[[Any], jax.Array]
  params: Any
  outputs: Any
  outputs_jvp: Callable[[Any], Any]
  loss_of: Callable[[Any, Any], jax.Array]
  outside: Callable[[], tuple[str, ...]]

  def outputs_loss(self, outputs) -> jax.Array:
    """``outputs -> loss`` at the captured parameters."""
    return self.loss_of(self.params, outputs)


# id(first leaf of a layer_stats) -> (weakref to that leaf, Linearization).
# Keyed by the statistics' own arrays, so that a transformation that keeps
# them (``nnx.Optimizer``'s ``nnx.as_pure``, an identity ``jax.tree.map``)
# keeps the linearization, and one that makes new arrays (a ``jax.jit``
# boundary) drops it: a linearization never meets other statistics.
_REGISTRY: dict[int, tuple[weakref.ref, Linearization]] = {}


def _key_leaf(layer_stats):
  leaves = jax.tree.leaves(layer_stats)
  return leaves[0] if leaves else None


def attach(layer_stats, linearization: Linearization):
  """Attaches ``linearization`` to ``layer_stats``; returns ``layer_stats``."""
  leaf = _key_leaf(layer_stats)
  if leaf is None:
    return layer_stats
  key = id(leaf)
  ref = weakref.ref(leaf, lambda _: _REGISTRY.pop(key, None))
  _REGISTRY[key] = (ref, linearization)
  return layer_stats


def linearization(layer_stats: Any) -> Linearization | None:
  """The linearization the capture step took with ``layer_stats``.

  Args:
    layer_stats: the third output of ``fisher_optax.linen`` or ``.nnx``
      ``value_grad_and_stats``, in the function that called it.

  Returns:
    Its :class:`Linearization`, or None when ``layer_stats`` does not hold
    the capture step's own arrays (they crossed a ``jax.jit`` boundary, or
    were transformed) or captured no layer.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import fisher_optax as fo
    >>> model = nn.Dense(2)
    >>> x = jnp.ones((4, 3))
    >>> params = model.init(jax.random.key(0), x)['params']
    >>> loss_fn = lambda p: jnp.mean(model.apply({'params': p}, x) ** 2)
    >>> loss, grads, stats = fo.linen.value_grad_and_stats(loss_fn)(params)
    >>> lin = fo.linearization(stats)
    >>> lin.outputs[0].shape  # one entry per model.apply in the loss
    (4, 2)
    >>> bool(jnp.allclose(lin.outputs_loss(lin.outputs), loss))
    True
  """
  leaf = _key_leaf(layer_stats)
  entry = None if leaf is None else _REGISTRY.get(id(leaf))
  if entry is None or entry[0]() is not leaf:
    return None
  return entry[1]


def _missing_message(where: str) -> str:
  return (
      f'{where}: layer_stats carries no linearization of the loss. Pass the '
      'third output of fisher_optax.linen/nnx value_grad_and_stats, called '
      'in the same traced function as tx.update (a jax.jit boundary or a '
      'transformation of the statistics in between makes new arrays), or '
      'pass the loss by hand: value=loss, value_fn=lambda p: loss_fn(p, '
      'batch), outputs_fn=lambda p: model.apply(...), outputs_loss=lambda '
      'out: loss_on(out, batch).')


def of(where: str, layer_stats: Any) -> Linearization:
  """The linearization of ``layer_stats`` (or ``layer_stats`` itself if it
  is one), checked for the adaptive step.

  Raises unless it is there and the loss has model outputs.
  """
  lin = (layer_stats if isinstance(layer_stats, Linearization) else
         linearization(layer_stats))
  if lin is None and isinstance(layer_stats, dict) and not layer_stats:
    raise ValueError(
        f'{where}: layer_stats is empty: the capture step captured no layer, '
        'so it carries no linearization of the loss. Call the Flax model '
        'inside the loss (linen: model.apply({"params": params}, ...); NNX: '
        'model(...)), with layers it captures (fisher_optax.coverage lists '
        'them), or pass the loss by hand: value=, value_fn=, outputs_fn=, '
        'outputs_loss=.')
  if lin is None:
    raise ValueError(_missing_message(where))
  if not jax.tree.leaves(lin.outputs):
    raise ValueError(_no_outputs_message(where))
  return lin


def _no_outputs_message(where: str) -> str:
  return (
      f'{where}: the capture step found no model outputs in the loss (no '
      'linen model.apply or NNX model call returned into it), so it cannot '
      'split the loss into model and loss on the outputs for the '
      'Gauss-Newton quadratic model. Call the Flax model inside the loss '
      '(linen: model.apply({"params": params}, ...); NNX: model(...)), or '
      'pass outputs_fn= and outputs_loss= (and value=, value_fn=) to '
      'tx.update.')


def used_inputs(fn: Callable[..., Any], *args) -> list[bool]:
  """Which leaves of ``args`` the output of ``fn`` depends on."""
  return _needed(jax.make_jaxpr(fn)(*args).jaxpr, None)


def _needed(jaxpr, outputs_needed) -> list[bool]:
  """Backward liveness: which invars of ``jaxpr`` the needed outvars read.

  Calls of nested jaxprs with the same inputs (``jit``, ``remat``,
  ``custom_jvp`` ...) are walked into; any other equation needs all its
  inputs when it is needed.
  """
  needed = {v for v, n in zip(jaxpr.outvars, outputs_needed or
                              [True] * len(jaxpr.outvars))
            if n and isinstance(v, jax_core.Var)}
  for eqn in reversed(jaxpr.eqns):
    outs = [v in needed for v in eqn.outvars]
    if not any(outs):
      continue
    inner = _inner_jaxpr(eqn)
    ins = (_needed(inner, outs) if inner is not None
           else [True] * len(eqn.invars))
    needed.update(v for v, n in zip(eqn.invars, ins)
                  if n and isinstance(v, jax_core.Var))
  return [v in needed for v in jaxpr.invars]


def _inner_jaxpr(eqn):
  for name in ('jaxpr', 'call_jaxpr', 'fun_jaxpr'):
    inner = eqn.params.get(name)
    inner = getattr(inner, 'jaxpr', inner)
    if (isinstance(inner, jax_core.Jaxpr) and not inner.constvars
        and len(inner.invars) == len(eqn.invars)
        and len(inner.outvars) == len(eqn.outvars)):
      return inner
  return None


def outside_paths(loss_of: Callable[[Any, Any], Any], params,
                  outputs) -> tuple[str, ...]:
  """Parameter paths that ``loss_of(params, outputs)`` reads."""
  paths, leaves, treedef = _base.flatten_leaves(params)
  used = used_inputs(
      lambda leaves: loss_of(jax.tree.unflatten(treedef, leaves),
                                     outputs), leaves)
  return tuple(p for p, u in zip(paths, used) if u)
