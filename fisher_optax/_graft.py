r"""Grafting: one transformation's direction at another's step size.

Distributed Shampoo (Anil et al. 2020; Shi et al. 2023) rescales each
block's preconditioned step to the norm of an Adam (or AdaGrad) step of the
same block, so that the second-order method inherits the first-order one's
learning rate, schedule and warm-up. Here the block is one parameter leaf.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fisher_optax import _base


class GraftState(NamedTuple):
  """State of :func:`fisher_optax.graft`: its two transformations'.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import fisher_optax as fo
    >>> params = {'w': jnp.ones((3, 2))}
    >>> tx = fo.graft(optax.identity(), optax.scale_by_adam())
    >>> state = tx.init(params)
    >>> isinstance(state, fo.GraftState)
    True
    >>> u, state = tx.update({'w': jnp.full((3, 2), 2.0)}, state, params)
    >>> bool(jnp.allclose(u['w'], 1.0))  # Adam's first step, unit entries
    True
  """

  direction: optax.OptState
  magnitude: optax.OptState


def _norm(x):
  x = x.astype(_base.stats_dtype(x))
  return jnp.sqrt(jnp.sum(x * x))


def graft_leaf(direction, magnitude):
  """``direction`` at the norm of ``magnitude``; ``magnitude`` where either
  norm is unusable (a zero or non-finite direction; a non-finite magnitude,
  which would spread a user's NaN gradient entry over the whole leaf)."""
  if _base.is_masked(direction):
    return direction
  if not _base.is_float(direction):
    return jnp.zeros_like(direction)
  d_norm, m_norm = _norm(direction), _norm(magnitude)
  usable = jnp.isfinite(d_norm) & (d_norm > 0) & jnp.isfinite(m_norm)
  scale = m_norm / jnp.where(usable, d_norm, 1.0)
  # Not d * 0 where unusable: a non-finite direction would stay NaN.
  return jnp.where(usable, direction * scale.astype(direction.dtype),
                   magnitude.astype(direction.dtype))


def graft(
    direction: optax.GradientTransformation,
    magnitude: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  r"""The direction of one transformation at the per-leaf step of another.

  Let :math:`d_\ell` be ``direction``'s update of parameter leaf
  :math:`\ell` and :math:`m_\ell` ``magnitude``'s, both computed from the
  same incoming updates. The grafted update is

  .. math::
    u_\ell = \frac{\lVert m_\ell \rVert}{\lVert d_\ell \rVert}\, d_\ell,

  and :math:`u_\ell = m_\ell` where :math:`\lVert d_\ell \rVert` is zero or
  not finite, or :math:`\lVert m_\ell \rVert` is not finite (a non-finite
  gradient entry then reaches only the entries ``magnitude`` gives it).
  With ``magnitude=optax.scale_by_adam()`` a Fisher preconditioner takes
  steps of Adam's size in its own directions, so Adam's learning rate,
  schedule and warm-up carry over; the damping then only shapes the
  direction. Both transformations keep their own state
  (each its own momentum) and get the ``update``'s extra arguments
  (``layer_stats=``).

  Args:
    direction: sets each leaf's direction, e.g.
      ``fo.scale_by_kfac(momentum_style='adam')``.
    magnitude: sets each leaf's norm, e.g. ``optax.scale_by_adam()``.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` with a
    :class:`~fisher_optax.GraftState`; chain a learning rate after it.

  Example:
    K-FAC's directions at Adam's step sizes:

    >>> import flax.linen as nn, jax, jax.numpy as jnp, optax
    >>> import fisher_optax as fo
    >>> model = nn.Sequential([nn.Dense(16), nn.tanh, nn.Dense(1)])
    >>> x = jax.random.normal(jax.random.key(0), (64, 4))
    >>> y = jnp.sum(x, axis=1, keepdims=True)
    >>> params = model.init(jax.random.key(1), x)['params']
    >>> loss_fn = lambda p: jnp.mean((model.apply({'params': p}, x) - y) ** 2)
    >>> step_fn = fo.linen.value_grad_and_stats(loss_fn)
    >>> tx = optax.chain(
    ...     fo.graft(fo.scale_by_kfac(momentum_style='adam'),
    ...              optax.scale_by_adam()),
    ...     optax.scale_by_learning_rate(1e-2))
    >>> opt_state = tx.init(params)
    >>> @jax.jit
    ... def step(params, opt_state):
    ...   loss, grads, stats = step_fn(params)
    ...   updates, opt_state = tx.update(grads, opt_state, params,
    ...                                  layer_stats=stats)
    ...   return optax.apply_updates(params, updates), opt_state, loss
    >>> first = loss_fn(params)
    >>> for _ in range(100):
    ...   params, opt_state, loss = step(params, opt_state)
    >>> print(loss < first / 10)
    True

  References:
    Anil et al., `Scalable Second Order Optimization for Deep Learning
    <https://arxiv.org/abs/2002.09018>`_, 2020 (grafting, §4);
    Shi et al., `A Distributed Data-Parallel PyTorch Implementation of the
    Distributed Shampoo Optimizer <https://arxiv.org/abs/2309.06497>`_,
    2023.
  """
  direction = optax.with_extra_args_support(direction)
  magnitude = optax.with_extra_args_support(magnitude)

  def init_fn(params):
    return GraftState(direction.init(params), magnitude.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    d, d_state = direction.update(updates, state.direction, params,
                                  **extra_args)
    m, m_state = magnitude.update(updates, state.magnitude, params,
                                  **extra_args)
    out = jax.tree.map(graft_leaf, d, m, is_leaf=_base.is_masked)
    return out, GraftState(d_state, m_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
