r"""Tuning-free steps: the quadratic model of Martens & Grosse (2015), §6-7.

Any preconditioner that takes ``damping=`` in its ``update`` (the Kronecker
family, MBF) gives the direction :math:`\Delta`; this module chooses the
step from it and the previous update :math:`\delta`:

1. (§7) the coefficients :math:`w = (w_0, w_1)` of
   :math:`d = w_0 \Delta + w_1 \delta` minimise the local quadratic model
   :math:`M(d) = \nabla h^\top d + \tfrac12 d^\top (C + (\lambda + \eta) I) d`
   by the exact :math:`2 \times 2` solve, with :math:`C` an exact curvature
   (``_curvature_products.py``), not the preconditioner's approximation;
   the learning rate is :math:`\alpha = -w_0`, the momentum :math:`\mu = w_1`;
2. (§6.5) every ``adapt_every`` steps the reduction ratio
   :math:`\rho = (h(\theta + d) - h(\theta)) / M(d)` on the same batch moves
   :math:`\lambda` by the Levenberg-Marquardt rule.

Beyond the paper (``docs/adaptive.md``): :math:`\mu` is kept in ``[0,
max_momentum]``, and a step that raises its batch's loss is not taken.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import optax

from fisher_optax import _base
from fisher_optax import _curvature_products
from fisher_optax import _linearization


class AdaptiveState(NamedTuple):
  r"""State of :func:`fisher_optax.adaptive`.

  Attributes:
    count: steps taken.
    damping: :math:`\lambda`, used by the model and the preconditioner.
    learning_rate: :math:`\alpha` of the last step.
    momentum: :math:`\mu` of the last step.
    rho: the last measured reduction ratio (0 before the first: not NaN,
      which ``jax.device_put`` on several processes would take for a
      difference between them).
    model_change: :math:`M(d)` of the last step (negative: a decrease).
    rejected: steps that fell back to no update (a non-finite or
      non-decreasing model, or a non-finite loss after the step).
    exact_models: steps that took the exact model (the others took
      :func:`carried_model`).
    curvature_scale: :math:`\kappa`, the exact model's damped curvature
      along :math:`\Delta` over the preconditioner's own, at the last exact
      model (1 before it).
    reference_change: :math:`M(d)` of the last exact model, when its
      :math:`\kappa` agreed with the one before within a factor of 3
      and no step has been rejected since; else 0, and the next step
      takes the exact model.
    step_curvature: :math:`d^\top (C + \lambda I) d` of the last step
      :math:`d` (0 when none was taken), the model's curvature along the
      next step's :math:`\delta`.
    delta: the last update :math:`\delta`.
    inner: the preconditioner's state.

  Example:
    What to log after a step of ``fo.kfac()``:

    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import fisher_optax as fo
    >>> model = nn.Dense(2)
    >>> x = jax.random.normal(jax.random.key(0), (16, 3))
    >>> params = model.init(jax.random.key(1), x)['params']
    >>> loss_fn = lambda p: jnp.mean(jnp.sin(model.apply({'params': p}, x)))
    >>> loss, grads, stats = fo.linen.value_grad_and_stats(loss_fn)(params)
    >>> tx = fo.kfac()
    >>> _, state = tx.update(grads, tx.init(params), params,
    ...                      layer_stats=stats)
    >>> isinstance(state, fo.AdaptiveState), int(state.count)
    (True, 1)
    >>> bool(state.learning_rate > 0), int(state.rejected)
    (True, 0)
  """

  count: jax.Array
  damping: jax.Array
  learning_rate: jax.Array
  momentum: jax.Array
  rho: jax.Array
  model_change: jax.Array
  rejected: jax.Array
  exact_models: jax.Array
  curvature_scale: jax.Array
  reference_change: jax.Array
  step_curvature: jax.Array
  delta: Any
  inner: Any


# Consecutive exact models whose curvature scales agree within this factor
# let the steps up to the next exact model carry the scale.
_STEADY = 3.0
# A carried model predicting more than this many times the decrease of the
# last exact one is replaced by the exact model on its step.
_TRUST = 2.0

# A 2x2 model whose determinant is below this fraction of its diagonal's
# product has (numerically) collinear directions: solve for alpha alone.
_SINGULAR = 1e-6


def _static_int(x):
  """``x`` as a Python int, or None when it is traced (or None)."""
  value = _base.concrete(x)
  return None if value is None else int(value)


def solve_quadratic_model(a, b, learning_rate=None, momentum=None,
                          max_momentum=None):
  r"""The coefficients minimising :math:`\tfrac12 w^\top A w + b^\top w`.

  ``a`` is the damped :math:`2 \times 2` model matrix of the directions
  :math:`(\Delta, \delta)`, ``b`` their inner products with the gradient.
  A fixed ``learning_rate`` (:math:`w_0 = -\alpha`) or ``momentum``
  (:math:`w_1 = \mu`) is kept and the other coefficient minimises the
  model. With both free, the 1-D solve for :math:`w_0` (:math:`w_1 = 0`)
  replaces the 2-D one when :math:`\delta = 0` (the first step) or the
  system is singular. With ``max_momentum``, a minimising :math:`\mu`
  outside ``[0, max_momentum]`` is clipped into it and :math:`\alpha`
  minimises the model for the clipped :math:`\mu`.

  Returns:
    ``w``, shape ``(2,)``.
  """
  a00, a01, a11 = a[0, 0], a[0, 1], a[1, 1]
  if learning_rate is not None and momentum is not None:
    return jnp.stack([-jnp.asarray(learning_rate, a.dtype),
                      jnp.asarray(momentum, a.dtype)])
  clip = ((lambda mu: mu) if max_momentum is None else
          (lambda mu: jnp.clip(mu, 0.0, max_momentum)))
  alpha_for = lambda mu: -(b[0] + a01 * mu) / a00
  if learning_rate is not None:
    w0 = -jnp.asarray(learning_rate, a.dtype)
    w1 = jnp.where(a11 > 0, -(b[1] + a01 * w0) / jnp.where(
        a11 > 0, a11, 1.0), 0.0)
    return jnp.stack([w0, clip(w1)])
  if momentum is not None:
    w1 = jnp.asarray(momentum, a.dtype)
    return jnp.stack([alpha_for(w1), w1])
  one_d = jnp.stack([alpha_for(0.0), jnp.zeros([], a.dtype)])
  det = a00 * a11 - a01 * a01
  mu = -(a00 * b[1] - a01 * b[0]) / jnp.where(det > 0, det, 1.0)
  two_d = jnp.stack([alpha_for(clip(mu)), clip(mu)])
  return jnp.where(det > _SINGULAR * a00 * a11, two_d, one_d)


def nonnegative_part(c):
  r"""The :math:`2 \times 2` curvature with negative eigenvalues set to 0.

  The Gauss-Newton matrix is positive semi-definite only for a loss convex
  in the model's outputs (cross-entropy, squared error); for another loss
  the model keeps the curvature's non-negative part and leaves the rest to
  the damping. A positive semi-definite ``c`` is returned unchanged.
  """
  w, v = jnp.linalg.eigh(c)
  return jnp.where(w[0] < 0, (v * jnp.maximum(w, 0.0)) @ v.T, c)


def carried_model(b, curvature_scale, step_curvature, damping, gram):
  r"""The damped :math:`2 \times 2` model between exact models, for free.

  A preconditioner direction :math:`\Delta = P g` with :math:`P`
  symmetric has :math:`\Delta^\top P^{-1} \Delta = g^\top \Delta = b_0`
  and :math:`\Delta^\top P^{-1} \delta = g^\top \delta = b_1`: the
  preconditioner's own curvature along the model's directions is known from
  the inner products :math:`b` alone. Scaled by :math:`\kappa` (the exact
  curvature over :math:`P^{-1}` along :math:`\Delta`, measured at the last
  exact model), these estimate the first row; the last step's own model
  curvature, :math:`s = \delta^\top C \delta`, gives the corner:

  .. math::
    A \approx \begin{pmatrix} \kappa b_0 & \kappa b_1 \\
      \kappa b_1 & s + \lambda \lVert\delta\rVert^2 \end{pmatrix}.

  Args:
    b: the gradient's inner products with :math:`(\Delta, \delta)`.
    curvature_scale: :math:`\kappa`.
    step_curvature: :math:`s`, the undamped model curvature along
      :math:`\delta` when it was taken.
    damping: :math:`\lambda`.
    gram: the directions' inner products.

  Returns:
    ``A``, shape ``(2, 2)``.
  """
  a01 = curvature_scale * b[1]
  return jnp.stack([
      jnp.stack([curvature_scale * b[0], a01]),
      jnp.stack([a01, step_curvature + damping * gram[1, 1]])])


def model_change(a, b, w):
  r""":math:`M(d) - M(0) = \tfrac12 w^\top A w + b^\top w`."""
  return 0.5 * w @ a @ w + b @ w


def levenberg_marquardt(damping, rho, *, decay, lower=0.25, upper=0.75,
                        min_damping=0.0, max_damping=jnp.inf):
  r"""Martens & Grosse's §6.5 rule for :math:`\lambda`.

  :math:`\lambda \leftarrow \omega\lambda` when :math:`\rho > 3/4` (the
  model is trusted), :math:`\lambda / \omega` when :math:`\rho < 1/4`
  (including a non-finite :math:`\rho`), clipped to ``[min_damping,
  max_damping]``; :math:`\omega` is ``decay``.
  """
  rho = jnp.where(jnp.isfinite(rho), rho, -jnp.inf)
  damping = jnp.where(rho > upper, damping * decay,
                      jnp.where(rho < lower, damping / decay, damping))
  return jnp.clip(damping, min_damping, max_damping)


def _combine(w, u, v):
  return jax.tree.map(
      lambda x, y: x if _base.is_masked(x) or not _base.is_float(x) else (
          w[0] * x.astype(_base.stats_dtype(x))
          + w[1] * y.astype(_base.stats_dtype(x))).astype(y.dtype),
      u, v, is_leaf=_base.is_masked)


def _gram(vectors, others=None):
  others = vectors if others is None else others
  return jnp.stack([jnp.stack([_curvature_products.vdot(u, v)
                               for v in others]) for u in vectors])


def adaptive(
    preconditioner: optax.GradientTransformation,
    damping: jax.typing.ArrayLike = 1e-3,
    *,
    learning_rate: jax.typing.ArrayLike | None = None,
    momentum: jax.typing.ArrayLike | None = None,
    adapt_every: int = 5,
    model_every: int = 1,
    damping_decay: jax.typing.ArrayLike = 0.95,
    min_damping: jax.typing.ArrayLike = 1e-8,
    max_damping: jax.typing.ArrayLike = 1e4,
    weight_decay: jax.typing.ArrayLike = 0.0,
    mask: Any = None,
    max_momentum: jax.typing.ArrayLike = 0.99,
    loss_reduction: str = 'mean',
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Learning rate, momentum and damping from the local quadratic model.

  Let :math:`h` be the loss, :math:`g` its gradient (plus :math:`\eta
  \theta`, :math:`\eta` ``weight_decay``), :math:`\Delta` the
  ``preconditioner``'s direction for :math:`g` at damping :math:`\lambda +
  \eta`, :math:`\delta` the previous update and :math:`C` an exact curvature
  matrix (below). With :math:`A_{ij} = v_i^\top (C + (\lambda + \eta) I)
  v_j` and :math:`b_i = g^\top v_i` for :math:`v = (\Delta, \delta)`,

  .. math::
    \begin{align*}
      (w_0, w_1) &= \arg\min_w \tfrac12 w^\top A w + b^\top w, \qquad
      d = w_0 \Delta + w_1 \delta, \qquad \theta \leftarrow \theta + d,\\
      \rho &= \frac{h(\theta + d) - h(\theta)}{M(d)}, \quad
      M(d) = \tfrac12 w^\top (A - \lambda D) w + b^\top w, \quad
      D_{ij} = v_i^\top v_j,\\
      \lambda &\leftarrow \begin{cases}
        \omega \lambda & \rho > 3/4 \\ \lambda / \omega & \rho < 1/4
      \end{cases}, \quad \omega = \text{damping\_decay}^{T}
    \end{align*}

  with :math:`\rho` and :math:`\lambda` updated every :math:`T` =
  ``adapt_every`` steps (Martens & Grosse's §6.5 and §7; kfac-jax's
  ``use_adaptive_learning_rate``, ``use_adaptive_momentum`` and
  ``use_adaptive_damping``). The learning rate is :math:`\alpha = -w_0` and
  the momentum :math:`\mu = w_1`; a fixed ``learning_rate`` or ``momentum``
  keeps that coefficient and solves for the other. The first step, with no
  :math:`\delta`, and a singular system solve for :math:`\alpha` alone.

  **Curvature.** With only ``layer_stats=`` from the capture step, which
  carry the loss's linearization (:func:`fisher_optax.linearization`),
  :math:`C` is the exact Gauss-Newton matrix of the model's outputs (plus
  the exact curvature of parameters the loss reads itself, an L2 penalty),
  by tangent passes of that linearization: no second primal pass. With
  ``outputs_fn`` and ``outputs_loss`` (the loss is
  ``outputs_loss(outputs_fn(params))``) it is the same matrix by a second
  ``jax.linearize`` of the model. With ``value=`` and ``value_fn=`` alone,
  it comes from the captured ``layer_stats`` with no extra pass:
  the per-example gradients' inner products with :math:`v` give
  :math:`v_i^\top C v_j = \mathrm{mean}_n\, (\nabla h_n^\top v_i)
  (\nabla h_n^\top v_j)`, the empirical Fisher (or, captured with
  ``fisher='softmax'`` etc., a sampled estimate of the true Fisher);
  parameters no layer covers then contribute no curvature beyond
  :math:`\lambda + \eta`.

  **Safety.** A step whose model is not finite or predicts no decrease, or
  whose loss :math:`h(\theta + d)` (on an adaptation step) is higher than
  :math:`h(\theta)` or not finite, is not taken: the update is zero,
  :math:`\delta` is reset, :math:`\lambda` grows by :math:`1/\omega` and
  ``state.rejected`` counts it. NaN or infinite values never reach the
  parameters through this transform.

  Args:
    preconditioner: a transformation whose ``update`` takes ``damping=``
      (e.g. ``fo.scale_by_kfac(momentum=0.0)``); it gets :math:`\lambda +
      \eta`, which the Kronecker family uses from its next inverse refresh.
    damping: the initial :math:`\lambda`.
    learning_rate: None to adapt :math:`\alpha`, or a fixed value.
    momentum: None to adapt :math:`\mu`, or a fixed value (0: none).
    max_momentum: an adapted :math:`\mu` is kept in ``[0,
      max_momentum]`` (and :math:`\alpha` re-solved for it); None leaves
      it free, as Martens & Grosse do.
    adapt_every: :math:`T`, steps between damping adaptations.
    model_every: steps between exact models (curvature products); the
      steps between take :func:`carried_model`, which costs no pass
      through the model. Must divide ``adapt_every``, and should divide
      the preconditioner's ``inverse_every`` (the carried model assumes
      the preconditioner's scale has not changed since the exact one).
    damping_decay: per-step factor; :math:`\lambda` moves by
      :math:`\omega = \text{damping\_decay}^T` per adaptation.
    min_damping: lower clip of :math:`\lambda`.
    max_damping: upper clip of :math:`\lambda`.
    weight_decay: :math:`\eta`, an L2 term added to the gradient and to the
      model's curvature.
    mask: weight-decay mask, as in ``optax.add_decayed_weights``.
    loss_reduction: ``'mean'`` or ``'sum'``: how the loss reduces the
      batch (for the captured-statistics curvature).
    axis_name: data-parallel axis (``shard_map``/``pmap``) over which the
      curvature products and the losses are averaged.

  Returns:
    A transformation whose ``update(grads, state, params, *, layer_stats,
    value=..., value_fn=..., outputs_fn=..., outputs_loss=...,
    linearization=...)`` returns the update to add to the parameters.
    ``value`` (the loss at ``params``) and ``value_fn`` (``params -> loss``
    on the same batch, Optax's line-search names) come from the
    linearization that ``layer_stats`` carries (or ``linearization=``, a
    :class:`~fisher_optax.Linearization`) when all four are omitted.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, optax
    >>> import fisher_optax as fo
    >>> model = nn.Sequential([nn.Dense(16), nn.tanh, nn.Dense(1)])
    >>> x = jax.random.normal(jax.random.key(0), (64, 4))
    >>> y = jnp.sum(x, axis=1, keepdims=True)
    >>> params = model.init(jax.random.key(1), x)['params']
    >>> loss_fn = lambda p: jnp.mean((model.apply({'params': p}, x) - y) ** 2)
    >>> step_fn = fo.linen.value_grad_and_stats(loss_fn)
    >>> tx = fo.adaptive(fo.scale_by_kfac(momentum=0.0))
    >>> opt_state = tx.init(params)
    >>> @jax.jit
    ... def step(params, opt_state):
    ...   loss, grads, stats = step_fn(params)
    ...   updates, opt_state = tx.update(grads, opt_state, params,
    ...                                  layer_stats=stats)
    ...   return optax.apply_updates(params, updates), opt_state, loss
    >>> first = loss_fn(params)
    >>> for _ in range(30):
    ...   params, opt_state, loss = step(params, opt_state)
    >>> print(loss < first / 10)
    True

  References:
    Martens & Grosse, `Optimizing Neural Networks with Kronecker-factored
    Approximate Curvature <https://arxiv.org/abs/1503.05671>`_, ICML 2015,
    §6.5 and §7.
  """
  where = 'adaptive'
  if loss_reduction not in ('mean', 'sum'):
    raise ValueError(f"{where}: loss_reduction must be 'mean' or 'sum', got "
                     f'{loss_reduction!r}.')
  _base.check_hyperparams(
      where, positive={'damping': damping, 'adapt_every': adapt_every,
                       'model_every': model_every,
                       'max_damping': max_damping},
      nonnegative={'min_damping': min_damping,
                   'weight_decay': weight_decay},
      decays={'damping_decay': damping_decay,
              'max_momentum': max_momentum},
      finite={'learning_rate': learning_rate, 'momentum': momentum})
  # Under optax.inject_hyperparams the periods may be traced: the carried
  # model's structure is then built and model_every chooses at run time.
  static_every = _static_int(model_every)
  static_adapt = _static_int(adapt_every)
  if None not in (static_every, static_adapt) and static_adapt % static_every:
    raise ValueError(
        f'{where}: model_every={model_every} must divide adapt_every='
        f'{adapt_every}: the damping rule measures the exact model.')
  decay_l2 = _base.add_decayed_weights(weight_decay, mask)
  preconditioner = optax.with_extra_args_support(preconditioner)

  def l2_term(tree):
    # eta * tree on the decayed leaves (the user's mask, float leaves).
    zeros = jax.tree.map(
        lambda x: x if _base.is_masked(x) else jnp.zeros_like(x), tree,
        is_leaf=_base.is_masked)
    return decay_l2.update(zeros, decay_l2.init(tree), tree)[0]

  def init_fn(params):
    dtype = jnp.float32
    for leaf in jax.tree.leaves(params):
      if _base.is_float(leaf):
        dtype = jnp.promote_types(dtype, _base.stats_dtype(leaf))
    scalar = lambda x: jnp.asarray(x, dtype)
    return AdaptiveState(
        count=jnp.zeros([], jnp.int32),
        damping=scalar(damping),
        learning_rate=scalar(0.0), momentum=scalar(0.0),
        rho=scalar(0.0), model_change=scalar(0.0),
        rejected=jnp.zeros([], jnp.int32),
        exact_models=jnp.zeros([], jnp.int32),
        curvature_scale=scalar(1.0), reference_change=scalar(0.0),
        step_curvature=scalar(0.0),
        delta=jax.tree.map(
            lambda x: x if _base.is_masked(x) else jnp.zeros_like(x),
            params, is_leaf=_base.is_masked),
        inner=preconditioner.init(params))

  def update_fn(updates, state, params=None, *, value=None, value_fn=None,
                layer_stats=None, outputs_fn=None, outputs_loss=None,
                linearization=None, **extra_args):
    if params is None:
      raise ValueError(f'{where}: update needs params: tx.update(grads, '
                       'state, params, layer_stats=layer_stats).')
    linearized = None
    if all(x is None for x in (value, value_fn, outputs_fn, outputs_loss)):
      linearized = _linearization.of(where, linearization or layer_stats)
      value, value_fn = linearized.value, linearized.value_fn
    if value is None or value_fn is None:
      raise ValueError(
          f'{where}: update needs value= (the loss at params) and value_fn= '
          '(params -> the loss on the same batch), optax\'s line-search '
          'arguments, with outputs_fn= and outputs_loss=; or none of the '
          'four, and the layer_stats of the capture step, which carries '
          'them.')
    if (outputs_fn is None) != (outputs_loss is None):
      raise ValueError(f'{where}: pass outputs_fn= and outputs_loss= '
                       'together (the Gauss-Newton curvature), or neither.')
    _base.check_same_structure(where, 'updates', updates, 'params', params)
    dtype = state.damping.dtype
    l2 = l2_term(params)
    grads = jax.tree.map(
        lambda g, d: g if _base.is_masked(g) else g + d.astype(g.dtype),
        updates, l2, is_leaf=_base.is_masked)
    eta = jnp.asarray(weight_decay, dtype)
    direction, inner = preconditioner.update(
        grads, state.inner, params, layer_stats=layer_stats,
        damping=state.damping + eta, **extra_args)
    vectors = (direction, state.delta)

    def curvature():
      if linearized is not None:
        return _curvature_products.linearization_products(
            linearized, params, vectors, axis_name)
      if outputs_fn is not None:
        return _curvature_products.ggn_products(
            outputs_fn, outputs_loss, params, vectors, axis_name)
      if layer_stats is None:
        raise ValueError(
            f'{where}: update needs layer_stats= (or outputs_fn= and '
            'outputs_loss=) for the curvature of the quadratic model.')
      return _curvature_products.captured_products(
          layer_stats, vectors, loss_reduction, axis_name, where)[0]

    adapt = state.count % adapt_every == 0
    both_fixed = learning_rate is not None and momentum is not None
    gram = _gram(vectors).astype(dtype)
    l2_gram = _gram(vectors, [l2_term(v) for v in vectors]).astype(dtype)
    b = jnp.stack([_curvature_products.vdot(grads, v)
                   for v in vectors]).astype(dtype)
    if axis_name is not None:
      b, gram, l2_gram = lax.pmean((b, gram, l2_gram), axis_name)
    solve = lambda a, mu: solve_quadratic_model(a, b, learning_rate, mu,
                                                max_momentum)
    carries = not both_fixed and (static_every is None or static_every > 1)
    if carries:
      carried = carried_model(b, state.curvature_scale, state.step_curvature,
                              state.damping, gram)
      w_carried = solve(carried, momentum)
      carried_change = model_change(carried - state.damping * gram, b,
                                    w_carried)
      # A carried learning rate is a fixed one: along a direction stiffer
      # than the last exact model's it diverges within a few steps, its
      # predicted decrease growing with each. Trusted while it predicts at
      # most _TRUST times the last steady exact model's decrease (0: not
      # trusted).
      trusted = (carried_change < 0) & (
          carried_change >= _TRUST * state.reference_change)
      exact = (state.count % model_every == 0) | ~trusted
    else:
      # Only the damping rule needs the model when both are fixed.
      exact = adapt if both_fixed else True
    if both_fixed or carries:
      c = lax.cond(exact, lambda: curvature().astype(dtype),
                   lambda: jnp.zeros((2, 2), dtype))
    else:
      c = curvature().astype(dtype)
    undamped = nonnegative_part(c) + l2_gram
    a = undamped + state.damping * gram
    w = solve(a, momentum)
    change = model_change(undamped, b, w)
    kappa, reference = state.curvature_scale, state.reference_change
    if carries:
      # The exact model's damped curvature over the preconditioner's own
      # along Delta (b_0, see carried_model). Early in training, or after
      # the preconditioner changes, it moves by orders of magnitude from
      # one step to the next: only a steady one is carried.
      measured_kappa = a[0, 0] / b[0]
      measured = exact & jnp.isfinite(measured_kappa) & (measured_kappa > 0)
      steady = measured & (state.count > 0) & (
          jnp.abs(jnp.log(measured_kappa / kappa)) < jnp.log(_STEADY))
      kappa = jnp.where(measured, measured_kappa, kappa)
      reference = jnp.where(exact, jnp.where(steady, change, 0.0),
                            reference)
      w = jnp.where(exact, w, w_carried)
      change = jnp.where(exact, change, carried_change)
      undamped = jnp.where(exact, undamped, carried - state.damping * gram)
    valid = jnp.all(jnp.isfinite(w)) & jnp.isfinite(change) & (change < 0)
    step = _combine(w, direction, state.delta)

    # Martens & Grosse: this step's loss change on this batch.
    measured = adapt & valid

    def loss_after():
      loss = jnp.asarray(value_fn(optax.apply_updates(params, step)), dtype)
      # Averaged inside the branch: both branches then agree across devices.
      return loss if axis_name is None else lax.pmean(loss, axis_name)

    new_loss = lax.cond(measured, loss_after,
                        lambda: jnp.asarray(jnp.nan, dtype))
    old_loss = jnp.asarray(value, dtype)
    if axis_name is not None:
      old_loss = lax.pmean(old_loss, axis_name)
    rho = (new_loss - old_loss) / change
    # A step to a non-finite or higher loss (the model failed on its own
    # batch) is not taken.
    taken = valid & ~(measured & ~(new_loss <= old_loss))
    omega = jnp.asarray(damping_decay, dtype) ** adapt_every
    lam = jnp.where(
        measured,
        levenberg_marquardt(state.damping, rho, decay=omega,
                            min_damping=min_damping,
                            max_damping=max_damping),
        state.damping)
    lam = jnp.where(taken, lam, jnp.clip(
        state.damping / omega, min_damping, max_damping))
    # Not ``0 * step``: a step not taken may hold NaNs.
    step = jax.tree.map(
        lambda x: x if _base.is_masked(x) or not _base.is_float(x)
        else jnp.where(taken, x, jnp.zeros_like(x)), step,
        is_leaf=_base.is_masked)
    return step, AdaptiveState(
        count=optax.safe_increment(state.count),
        damping=lam,
        learning_rate=jnp.where(taken, -w[0], 0.0),
        momentum=jnp.where(taken, w[1], 0.0),
        rho=jnp.where(measured, rho, state.rho),
        model_change=jnp.where(taken, change, 0.0),
        rejected=state.rejected + (~taken).astype(jnp.int32),
        exact_models=state.exact_models + jnp.asarray(exact, jnp.int32),
        curvature_scale=kappa,
        reference_change=jnp.where(taken, reference, 0.0),
        step_curvature=jnp.where(taken, w @ undamped @ w, 0.0),
        delta=step,
        inner=inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def check_model_every(where: str, model_every: int,
                      inverse_every: int | None) -> None:
  """``model_every`` divides ``inverse_every`` (a carried model never
  spans a refresh of the preconditioner's inverses)."""
  _base.check_hyperparams(where, positive={'model_every': model_every})
  model_every, inverse_every = (_static_int(x) for x in (model_every,
                                                         inverse_every))
  # Traced under optax.inject_hyperparams: nothing to check here.
  if None not in (model_every, inverse_every) and inverse_every % model_every:
    raise ValueError(
        f'{where}: model_every={model_every} must divide inverse_every='
        f'{inverse_every}: the carried quadratic model assumes the '
        'preconditioner has not changed since the exact one.')


def fixed_or_adaptive(
    make_preconditioner: Callable[[Any], optax.GradientTransformation],
    learning_rate: optax.ScalarOrSchedule | None, momentum: Any,
    damping: Any, weight_decay: Any, mask: Any, *, loss_reduction: str,
    axis_name: str | None, where: str, model_every: int = 1,
    inverse_every: int | None = None
) -> optax.GradientTransformationExtraArgs:
  """The step of an optimizer alias: a learning rate, or :func:`adaptive`.

  Args:
    make_preconditioner: ``momentum -> preconditioner``.
    learning_rate: a learning rate or schedule (L2, the preconditioner with
      ``momentum``, then ``-learning_rate``), or None: :func:`adaptive`
      around the preconditioner without momentum, starting at ``damping``.
    momentum: the fixed-step momentum.
    damping: the fixed damping, or the adaptive step's initial one.
    weight_decay: L2 coefficient.
    mask: weight-decay mask.
    loss_reduction: how the loss reduces the batch.
    axis_name: data-parallel axis name, or None.
    where: the alias's name, for messages.
    model_every: :func:`adaptive`'s ``model_every``.
    inverse_every: the preconditioner's, which ``model_every`` must divide.

  Returns:
    The transformation.
  """
  check_model_every(where, model_every, inverse_every)
  if learning_rate is None:
    return adaptive(make_preconditioner(0.0), damping,
                    weight_decay=weight_decay, mask=mask,
                    loss_reduction=loss_reduction, axis_name=axis_name,
                    model_every=model_every)
  return _base.with_l2(make_preconditioner(momentum), learning_rate,
                       weight_decay, mask, where=where)
