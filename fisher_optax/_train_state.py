"""A Flax ``TrainState`` whose ``apply_gradients`` forwards ``layer_stats``.

``flax.training.train_state.TrainState.apply_gradients`` calls
``tx.update(grads, opt_state, params)`` with no room for the statistics the
fisher_optax optimizers need, and treats any other keyword as a field to
replace. This subclass adds one keyword, ``layer_stats``, passed on to
``tx.update``; everything else is Flax's.
"""

from __future__ import annotations

from typing import Any, Mapping

from flax.training import train_state
import optax


class TrainState(train_state.TrainState):
  """``flax.training.train_state.TrainState`` that forwards ``layer_stats``.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import fisher_optax as fo
    >>> model = nn.Dense(3)
    >>> x = jnp.ones((4, 2))
    >>> state = fo.linen.TrainState.create(
    ...     apply_fn=model.apply,
    ...     params=model.init(jax.random.key(0), x)['params'],
    ...     tx=fo.kfac(1e-3))
    >>> loss_fn = lambda p, x: jnp.mean(state.apply_fn({'params': p}, x) ** 2)
    >>> step_fn = fo.linen.value_grad_and_stats(loss_fn)
    >>> _, grads, stats = step_fn(state.params, x)
    >>> state = state.apply_gradients(grads=grads, layer_stats=stats)
    >>> int(state.step)
    1
  """

  def apply_gradients(self, *, grads: Any,
                      layer_stats: Mapping[str, Any] | None = None,
                      **kwargs) -> 'TrainState':
    """One optimizer step; ``layer_stats`` goes to ``tx.update``.

    Args:
      grads: gradients shaped like ``params``.
      layer_stats: the third output of ``value_grad_and_stats``; omitted
        for optimizers that take none (``optax.adam``).
      **kwargs: other fields to ``replace``, as in Flax.

    Returns:
      The state with ``step`` incremented and ``params``, ``opt_state`` and
      ``kwargs`` updated.
    """
    extra = {} if layer_stats is None else {'layer_stats': layer_stats}
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params,
                                        **extra)
    return self.replace(step=self.step + 1,
                        params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state, **kwargs)
