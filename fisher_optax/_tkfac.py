"""TKFAC: trace-restricted Kronecker-factored approximate curvature.

Gao et al., "A Trace-restricted Kronecker-Factored Approximation to Natural
Gradient", AAAI 2021. The Fisher block is approximated by
``delta * Phi (x) Psi`` whose trace equals the exact block's:
with rows ``r``, ``T`` rows per example, bias-augmented inputs ``a_r`` and
per-example output cotangents ``g_r``::

  delta   = T mean_r |a_r|^2 |g_r|^2              (= tr F exactly)
  Phi_raw = T mean_r |g_r|^2 a_r a_r^T            Phi = Phi_raw / delta
  Psi_raw = T mean_r |a_r|^2 g_r g_r^T            Psi = Psi_raw / delta

The raw numerators are averaged (so ``tr Phi = tr Psi = 1`` for any
average) and the "normal" damping of the paper gives

  Phi_hat = sqrt(delta) Phi + sqrt(lambda) I,   Psi_hat likewise,
  W <- Phi_hat^-1 W Psi_hat^-1,

i.e. ``(delta Phi (x) Psi + sqrt(lambda delta) (Phi (x) I + I (x) Psi) +
lambda I)^-1``. Convolutions treat output locations as extra rows (KFC's
spatial independence), which keeps the trace identity for the
location-expanded block. Momentum follows the paper's Algorithm 1
(heavy ball on the preconditioned gradient) unless ``momentum_style='adam'``.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from fisher_optax import _adaptive
from fisher_optax import _base
from fisher_optax import _kfac
from fisher_optax import _kronecker
from fisher_optax import _linalg


def _statistics(rows, layout, block_size):
  t = rows.positions
  sq_g = jnp.sum(rows.g * rows.g, axis=-1)
  if layout.kind == 'embed':
    sq_a = jnp.ones_like(sq_g)  # one-hot inputs
    phi = t * _kfac._one_hot_mean(rows.a, layout.d_in, sq_g)  # pylint: disable=protected-access
  else:
    sq_a = jnp.sum(rows.a * rows.a, axis=-1)
    phi = t * _linalg.block_outer(rows.a, block_size, weights=sq_g)
  return {
      'delta': t * jnp.mean(sq_a * sq_g, axis=-1),
      'Phi': phi,
      'Psi': t * _linalg.block_outer(rows.g, block_size, weights=sq_a),
  }


def _shapes(layout, block_in, block_out):
  kfac = _kfac.KFAC.shapes(layout, block_in, block_out)
  return {'delta': layout.lead, 'Phi': kfac['A'], 'Psi': kfac['G']}


def _algorithm(conv_damping: str, where: str = 'scale_by_tkfac'
               ) -> _kronecker.Algorithm:
  """TKFAC with the paper's normal damping or the adaptive conv damping."""
  _kronecker.check_options(where, stats_every=1, inverse_every=1,
                           block_size=None, conv_damping=conv_damping)

  def factors(stats, layout, damping):
    delta = stats['delta']
    if conv_damping == 'adaptive' and layout.conv:
      # The layer's mean Fisher eigenvalue tr(F)/dim(F), floored at damping.
      damping = jnp.maximum(delta / (layout.d_in * layout.d_out), damping)
    damping = jnp.broadcast_to(damping, layout.lead)
    # sqrt(delta) Phi = Phi_raw / sqrt(delta); the guard only matters for a
    # layer whose cotangents are all zero.
    root = jnp.sqrt(jnp.maximum(delta, 1e-30))
    expand = lambda x: x / root.reshape(root.shape + (1,) * (
        x.ndim - root.ndim))
    return _kronecker.Factors(expand(stats['Phi']), expand(stats['Psi']),
                              jnp.sqrt(damping), jnp.sqrt(damping), damping)

  return _kronecker.Algorithm(name='tkfac', statistics=_statistics,
                              shapes=_shapes, factors=factors,
                              adaptive_conv=conv_damping == 'adaptive')


TKFAC = _algorithm('normal')


def scale_by_tkfac(
    damping: jax.typing.ArrayLike = 1e-2,
    fisher_decay: jax.typing.ArrayLike = 0.95,
    momentum: jax.typing.ArrayLike = 0.9,
    *,
    stats_every: int = 1,
    inverse_every: int = 20,
    block_size: int | None = None,
    damping_mode: str = 'factored',
    momentum_style: str = 'heavy_ball',
    loss_reduction: str = 'mean',
    inverse_method: str = 'cholesky',
    layers: Mapping[str, _base.LayerStats] | None = None,
    fallback_b2: jax.typing.ArrayLike = 0.999,
    fallback_eps: jax.typing.ArrayLike = 1e-8,
    axis_name: str | None = None,
    spread_inverses: str | None = None,
    eigen_correction: bool = False,
    conv_damping: str = 'normal',
    decay_schedule: str = 'constant',
    conv_scaling: str = 'per_example',
    weight_sharing: str = 'expand',
    stats_fraction: float | None = None,
    dense_damping: str = 'beta',
) -> optax.GradientTransformationExtraArgs:
  """TKFAC preconditioning; see :func:`fisher_optax.tkfac`.

  Example:
    The preconditioner alone, chained with a learning rate, takes the
    steps of :func:`fisher_optax.tkfac` (without weight decay):

    >>> import flax.linen as nn, jax, jax.numpy as jnp, optax
    >>> import fisher_optax as fo
    >>> model = nn.Dense(2)
    >>> x = jax.random.normal(jax.random.key(0), (16, 3))
    >>> params = model.init(jax.random.key(1), x)['params']
    >>> loss_fn = lambda p: jnp.mean(jnp.sin(model.apply({'params': p}, x)))
    >>> _, grads, stats = fo.linen.value_grad_and_stats(loss_fn)(params)
    >>> tx = optax.chain(fo.scale_by_tkfac(), optax.scale(-0.1))
    >>> ref = fo.tkfac(learning_rate=0.1)
    >>> u, _ = tx.update(grads, tx.init(params), params, layer_stats=stats)
    >>> v, _ = ref.update(grads, ref.init(params), params, layer_stats=stats)
    >>> jax.tree.map(lambda a, b: bool(jnp.allclose(a, b)), u, v)
    {'bias': True, 'kernel': True}
  """
  where = 'scale_by_tekfac' if eigen_correction else 'scale_by_tkfac'
  return _kronecker.scale_by_kronecker(
      _algorithm(conv_damping, where), momentum=momentum, damping=damping,
      fisher_decay=fisher_decay,
      stats_every=stats_every, inverse_every=inverse_every,
      block_size=block_size, damping_mode=damping_mode,
      momentum_style=momentum_style, loss_reduction=loss_reduction,
      inverse_method=inverse_method, layers=layers, fallback_b2=fallback_b2,
      fallback_eps=fallback_eps, axis_name=axis_name,
      spread_inverses=spread_inverses,
      eigen_correction=eigen_correction, decay_schedule=decay_schedule,
      conv_scaling=conv_scaling, dense_damping=dense_damping,
      weight_sharing=weight_sharing, stats_fraction=stats_fraction)


def tkfac(
    learning_rate: optax.ScalarOrSchedule | None = None,
    damping: jax.typing.ArrayLike = 1e-2,
    fisher_decay: jax.typing.ArrayLike = 0.95,
    momentum: jax.typing.ArrayLike = 0.9,
    weight_decay: jax.typing.ArrayLike = 0.0,
    *,
    stats_every: int = 1,
    inverse_every: int = 20,
    block_size: int | None = None,
    damping_mode: str = 'factored',
    momentum_style: str = 'heavy_ball',
    loss_reduction: str = 'mean',
    inverse_method: str = 'cholesky',
    layers: Mapping[str, _base.LayerStats] | None = None,
    fallback_b2: jax.typing.ArrayLike = 0.999,
    fallback_eps: jax.typing.ArrayLike = 1e-8,
    axis_name: str | None = None,
    spread_inverses: str | None = None,
    eigen_correction: bool = False,
    conv_damping: str = 'normal',
    mask: Any = None,
    decay_schedule: str = 'constant',
    l2_in_damping: bool = False,
    conv_scaling: str = 'per_example',
    weight_sharing: str = 'expand',
    stats_fraction: float | None = None,
    dense_damping: str = 'beta',
    loss_scale: float = 1.0,
    model_every: int = 1,
) -> optax.GradientTransformationExtraArgs:
  r"""TKFAC: trace-restricted K-FAC (the paper's TKFAC_nor).

  Let :math:`\alpha` be the learning rate, :math:`\lambda` ``damping``,
  :math:`\epsilon` ``fisher_decay`` and :math:`\tau` ``momentum``. Per
  captured layer with rows :math:`r` (:math:`T` per example), bias-augmented
  inputs :math:`\bar a_r` and per-example output cotangents :math:`g_r`,
  every ``stats_every`` steps the raw numerators are averaged,

  .. math::
    \begin{align*}
      \delta &\leftarrow \epsilon\delta + (1-\epsilon)\, T\,
        \mathrm{mean}_r \|\bar a_r\|^2 \|g_r\|^2 \\
      \Phi_{raw} &\leftarrow \epsilon\Phi_{raw} + (1-\epsilon)\, T\,
        \mathrm{mean}_r \|g_r\|^2 \bar a_r \bar a_r^\top, \quad
      \Psi_{raw} \leftarrow \epsilon\Psi_{raw} + (1-\epsilon)\, T\,
        \mathrm{mean}_r \|\bar a_r\|^2 g_r g_r^\top,
    \end{align*}

  so that :math:`\Phi = \Phi_{raw}/\delta`, :math:`\Psi = \Psi_{raw}/\delta`
  have unit trace and :math:`\mathrm{tr}(\delta\,\Phi\otimes\Psi) =
  \mathrm{tr}(F)`. Every ``inverse_every`` steps
  :math:`\hat\Phi = \sqrt\delta\,\Phi + \sqrt\lambda I` and
  :math:`\hat\Psi = \sqrt\delta\,\Psi + \sqrt\lambda I` are inverted, and
  every step

  .. math::
    m \leftarrow \tau m + \hat\Phi^{-1} W \hat\Psi^{-1}, \quad
    \theta \leftarrow \theta - \alpha\, m.

  ``damping_mode='eigen'`` damps exactly instead:
  :math:`(\delta\,\Phi\otimes\Psi + \lambda I)^{-1}` in the eigenbasis.
  ``conv_damping='adaptive'`` gives each convolution its own damping,
  :math:`\lambda_l = \max(\delta_l / \dim F_l, \lambda)`: the layer's mean
  Fisher eigenvalue, floored at ``damping``. The paper's adaptive conv
  damping (its Eq. 5.16) could not be checked; this is the form of the
  companion TEKFAC paper (its Eq. 3.5, :math:`\max(\mathrm{tr}\,\Theta_l,
  \vartheta)/\dim\Theta_l` with :math:`\vartheta = \lambda\dim F_l`). It
  keeps a fixed :math:`\lambda` from swamping the tiny eigenvalues of the
  unit-trace factors of wide convolutions. Everything else (blocks,
  embeddings, norm layers, fallback, ``layers=``) is as in
  :func:`fisher_optax.kfac`.

  Args:
    learning_rate: :math:`\alpha`, a scalar or a schedule; None (the
      default): the adaptive step, :func:`fisher_optax.adaptive` around
      the preconditioner, which chooses the learning rate, the momentum
      and the damping every step (``damping`` is then its initial
      value, ``momentum`` and ``l2_in_damping`` unused) and whose
      ``update`` also takes ``value=`` and ``value_fn=``, and
      preferably ``outputs_fn=`` and ``outputs_loss=``
      (``docs/adaptive.md``).
    damping: :math:`\lambda`.
    fisher_decay: :math:`\epsilon`.
    momentum: :math:`\tau`.
    weight_decay: L2 coefficient added to the gradient.
    stats_every: static period of the statistics refresh.
    inverse_every: static period of the inverse refresh.
    block_size: largest diagonal block of a factor (None: full factors).
    damping_mode: ``'factored'`` (the paper's normal damping) or
      ``'eigen'``.
    momentum_style: ``'heavy_ball'`` (Algorithm 1) or ``'adam'``.
    loss_reduction: ``'mean'`` or ``'sum'``, see :func:`fisher_optax.kfac`.
    inverse_method: ``'cholesky'``, ``'inv'`` or ``'eigh'``.
    layers: layer statistics template, see :func:`fisher_optax.kfac`.
    fallback_b2: Adam's second-moment decay for uncovered parameters.
    fallback_eps: Adam's epsilon for uncovered parameters.
    eigen_correction: keep the factors' eigenbasis but use the diagonal of
      the Fisher measured in it (see :func:`fisher_optax.tekfac`).
    axis_name: data-parallel axis for ``pmean`` under ``shard_map``/``pmap``.
    spread_inverses: a mesh axis name, or None. With a name, each device
      of that axis factorises its share of the blocks on an inverse step
      and the results are gathered, instead of every device factorising
      all of them; the result is the same. The update must run under
      ``jax.set_mesh(mesh)`` or inside ``jax.shard_map``
      (``docs/multi_device.md``).
    conv_damping: ``'normal'`` or ``'adaptive'`` (convolutions only).
    mask: weight-decay mask.
    loss_scale: how many times your loss exceeds the loss the defaults are
      set for, a mean over examples (784 for a loss summed over 784
      pixels, the batch size for a sum over the batch). Gradients and
      captured cotangents are divided by it: the optimizer takes exactly
      the steps it takes on ``loss / loss_scale``.
    decay_schedule: ``'constant'`` or ``'martens'``, see
      :func:`fisher_optax.kfac`.
    l2_in_damping: add ``weight_decay`` to ``damping``.
    conv_scaling: TEKFAC on convolutions, see :func:`fisher_optax.ekfac`.
    weight_sharing: ``'expand'``, ``'reduce'`` or ``'auto'``, see
      :func:`fisher_optax.kfac`.
    stats_fraction: ``1/n`` of the examples in the statistics, see
      :func:`fisher_optax.kfac`.
    dense_damping: TEKFAC with ``conv_damping='adaptive'``: ``'beta'`` (the
      TEKFAC paper: layers other than convolutions are damped by ``beta``,
      the largest conv layer's adaptive damping) or ``'fixed'``
      (``damping``). Only models with convolutions are affected.
    model_every: with no learning rate, steps between exact quadratic
      models (each a pass through the model); the steps between take the
      carried model of :func:`fisher_optax.adaptive`, which costs none.
      Must divide ``inverse_every`` and 5 (the damping's ``adapt_every``).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose ``update``
    takes ``layer_stats=``.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, optax
    >>> import fisher_optax as fo
    >>> model = nn.Sequential([nn.Dense(16), nn.tanh, nn.Dense(1)])
    >>> x = jax.random.normal(jax.random.key(0), (64, 4))
    >>> y = jnp.sum(x, axis=1, keepdims=True)
    >>> params = model.init(jax.random.key(1), x)['params']
    >>> loss_fn = lambda p: jnp.mean((model.apply({'params': p}, x) - y) ** 2)
    >>> step_fn = fo.linen.value_grad_and_stats(loss_fn)
    >>> tx = fo.tkfac(learning_rate=0.2, damping=0.1, inverse_every=5)
    >>> opt_state = tx.init(params)
    >>> @jax.jit
    ... def step(params, opt_state):
    ...   loss, grads, stats = step_fn(params)
    ...   updates, opt_state = tx.update(grads, opt_state, params,
    ...                                  layer_stats=stats)
    ...   return optax.apply_updates(params, updates), opt_state, loss
    >>> for _ in range(50):
    ...   params, opt_state, loss = step(params, opt_state)
    >>> print(loss < 0.05)
    True

  References:
    Gao, Liu, Huang, Wang, Wang, Xu, Yu, `A Trace-restricted
    Kronecker-Factored Approximation to Natural Gradient
    <https://arxiv.org/abs/2011.10741>`_, AAAI 2021.
  """
  if l2_in_damping and learning_rate is not None:
    damping = damping + weight_decay
  where = 'tekfac' if eigen_correction else 'tkfac'
  return _base.with_loss_scale(_adaptive.fixed_or_adaptive(
      lambda momentum: scale_by_tkfac(
          damping, fisher_decay, momentum, stats_every=stats_every,
          inverse_every=inverse_every, block_size=block_size,
          damping_mode=damping_mode, momentum_style=momentum_style,
          loss_reduction=loss_reduction, inverse_method=inverse_method,
          layers=layers, fallback_b2=fallback_b2, fallback_eps=fallback_eps,
          axis_name=axis_name, spread_inverses=spread_inverses,
          eigen_correction=eigen_correction,
          conv_damping=conv_damping, decay_schedule=decay_schedule,
          conv_scaling=conv_scaling, dense_damping=dense_damping,
          weight_sharing=weight_sharing, stats_fraction=stats_fraction),
      learning_rate, momentum, damping, weight_decay, mask,
      loss_reduction=loss_reduction, axis_name=axis_name, where=where,
      model_every=model_every, inverse_every=inverse_every),
      loss_scale, where)


scale_by_tekfac = functools.partial(scale_by_tkfac, eigen_correction=True)
scale_by_tekfac.__doc__ = """TEKFAC preconditioning.

See :func:`fisher_optax.tekfac`.

Example:
  The preconditioner alone, chained with a learning rate, takes the
  steps of :func:`fisher_optax.tekfac` (without weight decay):

  >>> import flax.linen as nn, jax, jax.numpy as jnp, optax
  >>> import fisher_optax as fo
  >>> model = nn.Dense(2)
  >>> x = jax.random.normal(jax.random.key(0), (16, 3))
  >>> params = model.init(jax.random.key(1), x)['params']
  >>> loss_fn = lambda p: jnp.mean(jnp.sin(model.apply({'params': p}, x)))
  >>> _, grads, stats = fo.linen.value_grad_and_stats(loss_fn)(params)
  >>> tx = optax.chain(fo.scale_by_tekfac(), optax.scale(-0.1))
  >>> ref = fo.tekfac(learning_rate=0.1)
  >>> u, _ = tx.update(grads, tx.init(params), params, layer_stats=stats)
  >>> v, _ = ref.update(grads, ref.init(params), params, layer_stats=stats)
  >>> jax.tree.map(lambda a, b: bool(jnp.allclose(a, b)), u, v)
  {'bias': True, 'kernel': True}
"""

tekfac = functools.partial(tkfac, eigen_correction=True)
tekfac.__doc__ = r"""TEKFAC: TKFAC's eigenbasis with measured diagonal scaling.

Same arguments as :func:`fisher_optax.tkfac` (damping is exact). The
eigenbases :math:`U_\Phi, U_\Psi` of the trace-restricted factors replace
K-FAC's in :func:`fisher_optax.ekfac`: the update divides the rotated
gradient by the measured diagonal :math:`\Theta` (the second moment of the
per-example gradients rotated into the basis, see
:func:`fisher_optax.ekfac` for convolutions and ``conv_scaling``) plus the
damping. Because :math:`\delta\,\Phi\otimes\Psi` is itself diagonal in that
basis and :math:`\Theta` is the best diagonal there, TEKFAC is never further
from the empirical Fisher (in Frobenius norm) than TKFAC.

``conv_damping='adaptive'`` is the paper's Eq. 3.5: each convolution is
damped by :math:`\lambda_l = \max(\mathrm{tr}\,\Theta_l, \vartheta_l) /
\dim\Theta_l` with :math:`\vartheta_l = \lambda \dim\Theta_l` (so
:math:`\lambda_l \ge \lambda`), from the current :math:`\Theta_l` on every
step, and (``dense_damping='beta'``, the default) the other layers of the
model by :math:`\beta = \max_l \lambda_l` over its convolutions, "to keep
pace with the convolution layers".

Examples:
  >>> import flax.linen as nn, jax, jax.numpy as jnp, optax
  >>> import fisher_optax as fo
  >>> model = nn.Sequential([nn.Dense(16), nn.tanh, nn.Dense(1)])
  >>> x = jax.random.normal(jax.random.key(0), (64, 4))
  >>> y = jnp.sum(x, axis=1, keepdims=True)
  >>> params = model.init(jax.random.key(1), x)['params']
  >>> loss_fn = lambda p: jnp.mean((model.apply({'params': p}, x) - y) ** 2)
  >>> step_fn = fo.linen.value_grad_and_stats(loss_fn)
  >>> tx = fo.tekfac(learning_rate=0.1, damping=0.1, inverse_every=5)
  >>> opt_state = tx.init(params)
  >>> first = loss_fn(params)
  >>> @jax.jit
  ... def step(params, opt_state):
  ...   loss, grads, stats = step_fn(params)
  ...   updates, opt_state = tx.update(grads, opt_state, params,
  ...                                  layer_stats=stats)
  ...   return optax.apply_updates(params, updates), opt_state, loss
  >>> for _ in range(50):
  ...   params, opt_state, loss = step(params, opt_state)
  >>> print(loss < first / 10)
  True

References:
  Gao, Liu, Huang, Wang, Wang, Xu, Yu, `Eigenvalue-corrected Natural
  Gradient Based on a New Approximation
  <https://arxiv.org/abs/2011.13609>`_, 2020.
"""
