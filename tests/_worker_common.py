"""What the multi-device and multi-process workers share.

Both compare an optimizer's steps on several devices with its steps on one;
they build each optimizer and take each step the same way.
"""

import jax
import optax

import fisher_optax as fo


def _ce(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def capture(model):
  """The capturing step of ``model`` under a mean softmax cross-entropy.

  It carries ``model`` for the adaptive step's loss and Gauss-Newton
  products (:func:`step`).
  """
  def loss_fn(params, x, y):
    return _ce(model.apply({'params': params}, x), y)
  step_fn = fo.linen.value_grad_and_stats(loss_fn)
  step_fn.model = model
  return step_fn


def _without(tx, *names):
  """``tx`` with the extra arguments ``names`` dropped from ``update``."""
  def update(updates, state, params=None, **extra):
    for name in names:
      extra.pop(name, None)
    return tx.update(updates, state, params, **extra)
  return optax.GradientTransformationExtraArgs(tx.init, update)


def make(name, **kwargs):
  """The optimizer ``name`` with periods of 2.

  Five steps then include statistics and inverse refreshes and the steps
  between them. ``'adafisher_reference'`` is AdaFisher's official-code mode,
  ``'kfac_reduce'`` K-FAC with ``weight_sharing='reduce'``,
  ``'kfac_sampled'`` with ``stats_fraction=0.5``.
  """
  if name == 'kfac_adaptive_ggn':
    # The recommended form: only layer_stats=, whose linearization gives
    # the loss and the Gauss-Newton products (this device's, averaged over
    # axis_name by the adaptive step). model_every=2: the exact model under
    # lax.cond, and a carried one on odd steps where its guards allow.
    return _without(
        fo.adaptive(fo.scale_by_kfac(momentum=0.0, inverse_every=2,
                                     **kwargs),
                    damping=0.1, adapt_every=2, model_every=2,
                    axis_name=kwargs.get('axis_name')),
        'value', 'value_fn', 'outputs_fn', 'outputs_loss')
  if name == 'kfac_adaptive':  # the captured statistics' products
    return _without(fo.kfac(damping=0.1, inverse_every=2, **kwargs),
                    'outputs_fn', 'outputs_loss')
  if name == 'kfac_reduce':
    return fo.kfac(0.05, damping=0.1, inverse_every=2,
                   weight_sharing='reduce', **kwargs)
  if name == 'kfac_sampled':
    return fo.kfac(0.05, damping=0.1, inverse_every=2, stats_fraction=0.5,
                   **kwargs)
  if name == 'adafisher_reference':
    return fo.adafisher(1e-2, damping=1e-3, mode='reference', stats_every=2,
                        **kwargs)
  if name in ('adafisher', 'adafisherw'):
    return getattr(fo, name)(1e-2, damping=0.1, mode='paper', stats_every=2,
                             **kwargs)
  if name == 'kfac_graft':  # K-FAC's directions at Adam's step sizes
    return optax.chain(
        fo.graft(fo.scale_by_kfac(0.1, momentum_style='adam',
                                  inverse_every=2, **kwargs),
                 optax.scale_by_adam()),
        optax.scale_by_learning_rate(1e-2))
  if name == 'mini_block_fisher':
    return fo.mini_block_fisher(1e-3, damping=1e-3, inverse_every=2,
                                **kwargs)
  return getattr(fo, name)(0.05, damping=0.1, inverse_every=2, **kwargs)


def step(tx, params, state, x, y, grad_scale=None, axis=None, *, step_fn):
  """One step: capture, average or scale the gradient if asked, update.

  Under ``shard_map`` the gradient of the replicated parameters comes out
  summed over the devices with ``check_vma`` (``grad_scale`` undoes it) and
  per device without (``axis`` pmeans it).
  """
  loss, grads, stats = step_fn(params, x, y)
  if axis is not None:
    grads = jax.lax.pmean(grads, axis)
  if grad_scale is not None:
    grads = jax.tree.map(lambda g: g * grad_scale, grads)
  # The adaptive step's arguments (the others ignore them): this device's
  # loss and Gauss-Newton products, which it averages over ``axis_name``.
  apply = lambda p: step_fn.model.apply({'params': p}, x)
  updates, state = tx.update(
      grads, state, params, layer_stats=stats, value=loss,
      value_fn=lambda p: _ce(apply(p), y), outputs_fn=apply,
      outputs_loss=lambda z: _ce(z, y))
  return optax.apply_updates(params, updates), state


def train(fn, params, state, x, y, steps):
  """``steps`` calls of ``fn``, each waiting for the one before.

  XLA's CPU client runs forced devices' programs on one thread pool, and a
  device waiting in a collective holds its thread: a program queued behind
  unfinished work on some device (this step's, or another run's) could
  then never start.
  """
  for _ in range(steps):
    params, state = jax.block_until_ready(fn(params, state, x, y))
  return params, state
