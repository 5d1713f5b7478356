"""AdaFisher: Adam-like steps preconditioned by a diagonal Kronecker Fisher.

Implements Martins Gomes et al., "AdaFisher: Adaptive Second Order
Optimization via Fisher Information" (ICLR 2025), as an Optax transform fed
by the per-layer statistics of :mod:`fisher_optax.linen` /
:mod:`fisher_optax.nnx`. The default ``mode='reference'`` follows the
official PyTorch code (AtlasAnalyticsLab/AdaFisher) at its settings
(learning rate and damping 1e-3), which trained best without tuning in the
convergence study; ``mode='paper'`` follows the paper's Algorithm 1. See
``docs/adafisher.md`` for the differences between the two modes.

State layout (per parameter leaf of shape ``P``; ``P[:-1] + (1,)`` is the
"input side" shape, since every captured layer keeps its output features on
the last parameter axis):

* ``h``  ``P[:-1] + (1,)``: EMA of the input-side factor ``H_D``.
* ``s``  ``P``: EMA of the output-side factor ``S_D`` broadcast to ``P``; for
  parameters no layer covers and ``fallback='adam'``, Adam's second moment.
* ``scale``, ``shift`` ``P[:-1] + (1,)``: the preconditioner is
  ``F = scale * (s - shift) + damping``, which is exactly
  ``minmax(H_D) (x) minmax(S_D) + damping`` (``shift = min S_D``,
  ``scale = minmax(H_D) / range(S_D)``), refreshed with the statistics.
  Subtracting the minimum before scaling keeps ``F >= damping`` in float32
  even when ``S_D`` spans a tiny range.
* ``captured`` ``()`` bool: a captured layer has preconditioned the leaf.
  A layer missing from a later step's statistics keeps its curvature (the
  ``s`` slot then holds ``S_D``, not the fallback's second moment), as the
  Kronecker family keeps its inverses.

Everything is allocated from the parameters alone, so ``init(params)`` needs
no statistics, and uses about the memory of Adam. Nothing about the model is
kept outside the state: one optimizer object serves any number of models.

The update reads like the paper's Algorithm 1, one function per stage:

1. every ``stats_every`` steps, :func:`layer_factors`: this step's diagonal
   factors ``H_D``, ``S_D`` of each captured layer;
2. :func:`paper_average_then_normalise` (EMA, then min-max: the paper) or
   :func:`reference_normalise_then_average` (the official code's order);
3. :func:`keep_finite`: a layer whose new curvature is not finite keeps the
   old one (stages 1-3 for all layers: :func:`refresh_curvature`);
4. every step, :func:`update_momentum` and :func:`precondition`:
   ``m_hat / F``, or the fallback for parameters no layer covers.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import optax

from fisher_optax import _base
from fisher_optax import _pairing
from fisher_optax import _sharding
from fisher_optax import _stats

MODES = ('paper', 'reference')
# In 'paper' mode a factor whose range is at most this many ulps of its
# maximum normalises to 0 (see _relative_range).
_RANGE_ULPS = 64
FALLBACKS = ('adam', 'momentum', 'damping')


class ScaleByAdaFisherState(NamedTuple):
  """State for :func:`fisher_optax.scale_by_adafisher`.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import fisher_optax as fo
    >>> model = nn.Dense(2)
    >>> x = jax.random.normal(jax.random.key(0), (16, 3))
    >>> params = model.init(jax.random.key(1), x)['params']
    >>> loss_fn = lambda p: jnp.mean(jnp.sin(model.apply({'params': p}, x)))
    >>> _, grads, stats = fo.linen.value_grad_and_stats(loss_fn)(params)
    >>> tx = fo.adafisher(learning_rate=1e-2)
    >>> _, opt_state = tx.update(grads, tx.init(params), params,
    ...                          layer_stats=stats)
    >>> state, = [s for s in opt_state
    ...           if isinstance(s, fo.ScaleByAdaFisherState)]
    >>> int(state.count), int(state.nonfinite)
    (1, 0)
    >>> jax.tree.map(jnp.shape, state.mu)
    {'bias': (2,), 'kernel': (3, 2)}
  """

  count: jax.Array  # shape=(), dtype=int32: steps taken.
  mu: optax.Updates  # first moment, like params.
  h: optax.Updates  # input-side factor EMA, shape P[:-1] + (1,).
  s: optax.Updates  # output-side factor EMA (or Adam's nu), shape P.
  scale: optax.Updates  # F = scale*(s - shift) + damping, shape P[:-1]+(1,).
  shift: optax.Updates
  nonfinite: jax.Array  # shape=(), int32: refreshes skipped for NaN/Inf.
  # shape=() bool per leaf: a captured layer has preconditioned it, so its
  # slots hold curvature (kept when the layer is missing from a step).
  captured: optax.Updates


def _slot_shape(shape):
  return tuple(shape[:-1]) + (1,) if len(shape) else ()


def _per_stack(x, k: int, fn: Callable[..., jax.Array]):
  """Reduces all but the first ``k`` axes."""
  return fn(x, axis=tuple(range(k, x.ndim))) if x.ndim > k else x


def _group_min_max(arrays, k: int):
  lo = hi = None
  for x in arrays:
    mn, mx = _per_stack(x, k, jnp.min), _per_stack(x, k, jnp.max)
    lo = mn if lo is None else jnp.minimum(lo, mn)
    hi = mx if hi is None else jnp.maximum(hi, mx)
  return lo, hi


def _expand(v, ndim: int):
  return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def _check_hyperparams(where, *, learning_rate=None, weight_decay=None,
                       **kw):
  """Validates the concrete numeric arguments; traced ones pass unchecked."""
  _base.check_hyperparams(
      where, positive={'damping': kw['damping']},
      nonnegative={'eps': kw['eps'], 'fallback_eps': kw['fallback_eps'],
                   **({} if weight_decay is None
                      else {'weight_decay': weight_decay})},
      decays={'b1': kw['b1'], 'fisher_decay': kw['fisher_decay'],
              'fallback_b2': kw['fallback_b2']},
      finite={} if learning_rate is None else {
          'learning_rate': learning_rate})


class Curvature(NamedTuple):
  """The curvature slots of the state as per-leaf lists (see above).

  ``F = scale * (s - shift) + damping`` for every covered leaf.
  """

  h: list[Any]
  s: list[Any]
  scale: list[Any]
  shift: list[Any]


# Stage 1, every stats_every steps: this step's raw factors H_D and S_D.


def layer_factors(st: _base.LayerStats, old: Curvature, names: list[str],
                  reference: bool, axis_name: str | None):
  """Raw diagonal factors of one layer's parameters ``names``.

  Args:
    st: the layer's captured statistics.
    old: the layer's current curvature slots, in the order of ``names``
      (they give the shapes to broadcast to).
    names: the layer's parameter names that are trained (frozen ones are
      left out).
    reference: the official code's constructions.
    axis_name: the data-parallel axis of ``shard_map``, or None: the
      factors are then those of the whole batch.

  Returns:
    ``(new_h, new_s, normalise_h)``: lists in the order of ``names``, in the
    state's dtype and broadcastable to ``old.h`` and ``old.s`` (the output
    side of a kernel is one row, not the kernel's shape); ``normalise_h`` is
    False when ``h`` is identically one and must not be min-max normalised.
  """
  factors, normalise_h = _stats.adafisher_factors(st, reference, axis_name)
  new_h = [factors[n].h.astype(x.dtype) for n, x in zip(names, old.h)]
  new_s = [factors[n].s.astype(x.dtype) for n, x in zip(names, old.s)]
  return new_h, new_s, normalise_h


# Stage 2: moving average and min-max normalisation, two orders.


def _relative_range(xs, k: int, eps):
  """``(min, spread)`` of the paper's min-max, ``spread = 0`` for no range.

  ``mm(x) = (x - min) / spread`` with ``spread = max - min + eps * |max|``;
  a range within float rounding of zero counts as none, so that ``mm`` is
  0, as for any constant vector. XLA may compute an average twice (inside
  the min/max's fusion and for the stored state) and round the two an ulp
  apart; with the relative ``eps`` only ~8 float32 ulps, one ulp of noise
  would otherwise normalise to ~0.1: a one-output layer, whose exact ``F``
  is the damping, got up to 100x that, or a negative ``F``.
  """
  lo, hi = _group_min_max(xs, k)
  finfo = jnp.finfo(lo.dtype)
  resolved = hi - lo > _RANGE_ULPS * finfo.eps * jnp.abs(hi)
  spread = hi - lo + eps * jnp.abs(hi)
  return lo, jnp.where(resolved & (spread >= finfo.tiny), spread, 0.0)


def _divide(x, spread):
  """``x / spread``, and 0 where ``spread`` is 0."""
  return jnp.where(spread > 0, x / jnp.where(spread > 0, spread, 1.0), 0.0)


def paper_average_then_normalise(old: Curvature, new_h, new_s, k: int,
                                 fisher_decay, eps,
                                 normalise_h: bool) -> Curvature:
  """The paper: convex EMA of the raw factors, then min-max normalise.

  The min-max is over all of a layer's (trained) parameters together, per
  stack element (the first ``k`` axes), with a relative epsilon. A zero
  range (all output gradients zero) normalises to 0, as any other constant
  vector does, so ``F = damping`` there instead of ``inf * 0 = NaN``; so
  does a range within 64 ulps of the maximum, which rounding alone can
  make (:func:`_relative_range`).

  Args:
    old: one layer's curvature slots.
    new_h: this step's ``H_D`` per parameter.
    new_s: this step's ``S_D`` per parameter.
    k: number of stack axes.
    fisher_decay: the EMA decay.
    eps: relative epsilon of the min-max normalisation.
    normalise_h: False when ``h`` is identically one.

  Returns:
    The layer's new curvature: ``scale = mm(H) / range(S)`` and
    ``shift = min S``, so that ``scale * (s - shift) = mm(H) mm(S)``.
  """
  h = [fisher_decay * o + (1 - fisher_decay) * x
       for o, x in zip(old.h, new_h)]
  s = [fisher_decay * o + (1 - fisher_decay) * x
       for o, x in zip(old.s, new_s)]
  if normalise_h:
    lo, spread = _relative_range(h, k, eps)
    hn = [_divide(x - _expand(lo, x.ndim), _expand(spread, x.ndim))
          for x in h]
  else:
    hn = [jnp.ones_like(x) for x in h]
  lo, spread = _relative_range(s, k, eps)
  scale = [_divide(x, _expand(spread, x.ndim)) for x in hn]
  shift = [jnp.broadcast_to(_expand(lo, x.ndim), x.shape) for x in hn]
  return Curvature(h, s, scale, shift)


def _minmax_absolute(xs, k: int, eps):
  """The official min-max over a layer's factors, absolute epsilon."""
  lo, hi = _group_min_max(xs, k)
  return [(x - _expand(lo, x.ndim)) / (_expand(hi - lo, x.ndim) + eps)
          for x in xs]


def reference_normalise_then_average(old: Curvature, new_h, new_s, k: int,
                                     fisher_decay, eps,
                                     normalise_h: bool) -> Curvature:
  """The official code: min-max the new factors, then its moving average.

  Absolute epsilon; the average is ``gamma/10 * old + gamma/100 * new`` (not
  convex). Arguments as :func:`paper_average_then_normalise`.

  Returns:
    The layer's new curvature: ``scale = h`` and ``shift = 0``.
  """
  if normalise_h:
    new_h = _minmax_absolute(new_h, k, eps)
  new_s = _minmax_absolute(new_s, k, eps)
  h = [fisher_decay / 10 * o + fisher_decay / 100 * x
       for o, x in zip(old.h, new_h)]
  s = [fisher_decay / 10 * o + fisher_decay / 100 * x
       for o, x in zip(old.s, new_s)]
  return Curvature(h, s, h, [jnp.zeros_like(x) for x in h])


# Stage 3: keep a layer's previous curvature if anything new is not finite.


def keep_finite(new: Curvature, old: Curvature, checked=None):
  """``(new or old, finite)``: ``old`` where any checked entry is NaN/Inf.

  Args:
    new: a layer's new curvature.
    old: its previous (finite) curvature.
    checked: the arrays whose finiteness implies ``new``'s; default every
      leaf of ``new``. :func:`refresh_curvature` passes ``h``, ``scale``,
      ``shift`` and the one-row output-side terms averaged into ``s``: a
      convex (or smaller) combination of the finite previous ``s`` and
      finite terms is finite, and a pass over the kernel-sized ``s`` on every
      refresh costs 5% of an MLP's step.

  Returns:
    ``(curvature, finite)``; the casts keep the state's dtypes (both
    ``lax.cond`` branches must agree).
  """
  if checked is None:
    checked = new
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                              for x in jax.tree.leaves(checked)]))
  kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o).astype(o.dtype),
                      new, old)
  return kept, finite


def refresh_curvature(layer_stats, layers: dict[str, dict[str, int]],
                      curv: Curvature, *, reference: bool, fisher_decay, eps,
                      axis_name: str | None):
  """Stages 1-3 for every captured layer.

  Args:
    layer_stats: the captured statistics.
    layers: ``{layer: {parameter name: leaf index}}`` of the trained
      parameters of each captured layer.
    curv: the curvature slots of all leaves.
    reference: the official code's order and constructions.
    fisher_decay: the EMA decay.
    eps: the min-max epsilon.
    axis_name: data-parallel axis, or None.

  Returns:
    ``(curvature, bad)``: ``bad`` is True if some layer kept its previous
    curvature because the new one was not finite.
  """
  h, s, scale, shift = (list(x) for x in curv)
  combine = (reference_normalise_then_average if reference
             else paper_average_then_normalise)
  bad = jnp.zeros([], jnp.bool_)
  for key in sorted(layers):
    names = sorted(layers[key])
    idx = [layers[key][n] for n in names]
    old = Curvature(*([x[i] for i in idx] for x in (h, s, scale, shift)))
    st = layer_stats[key]
    new_h, new_s, normalise_h = layer_factors(st, old, names, reference,
                                              axis_name)
    k = st.meta.stack_ndim
    new = combine(old, new_h, new_s, k, fisher_decay, eps, normalise_h)
    s_terms = _minmax_absolute(new_s, k, eps) if reference else new_s
    new, finite = keep_finite(new, old,
                              (new.h, new.scale, new.shift, s_terms))
    bad = bad | ~finite
    for j, i in enumerate(idx):
      h[i], s[i], scale[i], shift[i] = (x[j] for x in new)
  return Curvature(h, s, scale, shift), bad


# Stage 4, every step: momentum, then the preconditioned step.


def update_momentum(grads, mu, b1):
  """``b1 * m + (1 - b1) * g``; masked and integer leaves keep ``m``."""
  return [(b1 * m + (1 - b1) * g).astype(m.dtype) if _base.is_float(g)
          else m for g, m in zip(grads, mu)]


def precondition(grads, mu, curv: Curvature, covered: set[int], captured,
                 count_inc, *, b1, damping, fallback: str, fallback_b2,
                 fallback_eps):
  """``m_hat / F`` for every leaf.

  Args:
    grads: the incoming updates (leaves).
    mu: the new first moments (leaves).
    curv: the curvature slots (leaves).
    covered: indices of the leaves a captured layer preconditions.
    captured: per leaf, whether a captured layer preconditioned it on an
      earlier step: an uncovered leaf that was captured keeps its stored
      curvature (its layer is missing from this step's statistics) instead
      of taking the fallback.
    count_inc: steps taken including this one.
    b1: momentum decay, for the bias correction.
    damping: added to the normalised Fisher.
    fallback: the preconditioner of the other leaves.
    fallback_b2: second-moment decay of the ``'adam'`` fallback.
    fallback_eps: epsilon of the ``'adam'`` fallback.

  Returns:
    ``(updates, s)``: the leaves' updates (masked leaves pass through,
    integer leaves get zeros) and ``curv.s`` with the ``'adam'`` fallback's
    new second moments.
  """
  s = list(curv.s)
  out = []
  for i, (g, m) in enumerate(zip(grads, mu)):
    if _base.is_masked(g):
      out.append(g)
      continue
    if not _base.is_float(g):
      out.append(jnp.zeros_like(g))
      continue
    bias_mu = 1 - b1 ** count_inc.astype(_base.stats_dtype(m))
    m_hat = m / bias_mu.astype(m.dtype)
    # F >= damping by construction, whatever rounding did to the factors
    # (or to a state written elsewhere): F < damping would multiply the
    # step, and a negative F turns it uphill.
    stored = (jnp.maximum(curv.scale[i] * (s[i] - curv.shift[i]), 0)
              + damping)
    if i in covered:
      u = m_hat / stored
    else:
      if fallback == 'adam':
        nu, denom = _base.adam_denominator(
            jnp.where(count_inc == 1, 0.0, s[i]), g, count_inc, fallback_b2,
            fallback_eps)
        s[i] = jnp.where(captured[i], s[i], nu)
      elif fallback == 'momentum':
        denom = jnp.ones([], m_hat.dtype)
      else:
        denom = jnp.asarray(damping, m_hat.dtype)
      u = m_hat / jnp.where(captured[i], stored, denom)
    out.append(u.astype(g.dtype))
  return out, s


def _captured_layers(assignments, paths) -> dict[str, dict[str, int]]:
  """``{layer: {parameter name: leaf index}}`` of trained, captured leaves."""
  index = {p: i for i, p in enumerate(paths)}
  layers: dict[str, dict[str, int]] = {}
  for path, a in assignments.items():
    if a.layer is not None and not a.frozen:
      layers.setdefault(a.layer, {})[a.name] = index[path]
  return layers


def scale_by_adafisher(
    b1: jax.typing.ArrayLike = 0.9,
    damping: jax.typing.ArrayLike = 1e-3,
    fisher_decay: jax.typing.ArrayLike = 0.8,
    eps: jax.typing.ArrayLike = 1e-6,
    *,
    stats_every: int = 10,
    mode: str = 'reference',
    fallback: str = 'adam',
    fallback_b2: jax.typing.ArrayLike = 0.999,
    fallback_eps: jax.typing.ArrayLike = 1e-8,
    mu_dtype: Any = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescale updates by AdaFisher's diagonal Kronecker-factored Fisher.

  See :func:`fisher_optax.adafisher` for the algorithm, notation and
  arguments.

  Caller contract: ``update(updates, state, params, layer_stats=...)`` with
  the ``layer_stats`` returned by ``fisher_optax.linen.value_grad_and_stats``
  (or ``.nnx.``) for the same parameter tree. Statistics are reduced only on
  steps where ``count % stats_every == 0`` (under ``lax.cond``).

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`.

  Example:
    The preconditioner alone, chained with a learning rate, takes the
    steps of :func:`fisher_optax.adafisher` (without weight decay):

    >>> import flax.linen as nn, jax, jax.numpy as jnp, optax
    >>> import fisher_optax as fo
    >>> model = nn.Dense(2)
    >>> x = jax.random.normal(jax.random.key(0), (16, 3))
    >>> params = model.init(jax.random.key(1), x)['params']
    >>> loss_fn = lambda p: jnp.mean(jnp.sin(model.apply({'params': p}, x)))
    >>> _, grads, stats = fo.linen.value_grad_and_stats(loss_fn)(params)
    >>> tx = optax.chain(fo.scale_by_adafisher(), optax.scale(-1e-2))
    >>> ref = fo.adafisher(learning_rate=1e-2)
    >>> u, _ = tx.update(grads, tx.init(params), params, layer_stats=stats)
    >>> v, _ = ref.update(grads, ref.init(params), params, layer_stats=stats)
    >>> jax.tree.map(lambda a, b: bool(jnp.allclose(a, b)), u, v)
    {'bias': True, 'kernel': True}
  """
  where = 'scale_by_adafisher'
  _base.check_options(
      where, periods={'stats_every': stats_every},
      choices={'mode': (mode, MODES), 'fallback': (fallback, FALLBACKS)},
      axes={'axis_name': axis_name})
  _check_hyperparams(where, b1=b1, damping=damping,
                     fisher_decay=fisher_decay, eps=eps,
                     fallback_b2=fallback_b2, fallback_eps=fallback_eps)
  reference = mode == 'reference'
  fill = 1.0 if reference else 0.0

  def init_fn(params):
    def slot(shape_fn):
      # float32 for float32/bf16 parameters, float64 for float64 ones.
      return lambda p: jnp.full(shape_fn(jnp.shape(p)), fill,
                                _base.stats_dtype(p))

    return ScaleByAdaFisherState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(lambda p: jnp.zeros_like(
            p, dtype=mu_dtype or jnp.result_type(p)), params),
        h=jax.tree.map(slot(_slot_shape), params),
        s=jax.tree.map(slot(tuple), params),
        scale=jax.tree.map(slot(_slot_shape), params),
        shift=jax.tree.map(lambda p: slot(_slot_shape)(p) * 0, params),
        nonfinite=jnp.zeros([], jnp.int32),
        captured=jax.tree.map(lambda _: jnp.zeros([], jnp.bool_), params),
    )

  @_sharding.with_auto_axes
  def update_fn(updates, state, params=None, *, layer_stats=None,
                **extra_args):
    del params, extra_args
    _base.check_same_structure(where, 'updates', updates, 'state.mu',
                               state.mu)
    assignments = _pairing.pair(updates, layer_stats, where)
    paths, grads, treedef = _base.flatten_leaves(updates)
    leaves = lambda tree: _base.flatten_leaves(tree)[1]
    layers = _captured_layers(assignments, paths)
    curv = Curvature(leaves(state.h), leaves(state.s), leaves(state.scale),
                     leaves(state.shift))
    count_inc = optax.safe_increment(state.count)
    mu = update_momentum(grads, leaves(state.mu), b1)
    nonfinite = state.nonfinite
    if layers:
      curv, bad = lax.cond(
          state.count % stats_every == 0,
          lambda c: refresh_curvature(
              layer_stats, layers, c, reference=reference,
              fisher_decay=fisher_decay, eps=eps, axis_name=axis_name),
          lambda c: (c, jnp.zeros([], jnp.bool_)), curv)
      nonfinite = nonfinite + bad.astype(jnp.int32)
    covered = {i for names in layers.values() for i in names.values()}
    captured = leaves(state.captured)
    out, s = precondition(grads, mu, curv, covered, captured, count_inc,
                          b1=b1, damping=damping, fallback=fallback,
                          fallback_b2=fallback_b2, fallback_eps=fallback_eps)
    captured = [c if _base.is_masked(c) else c | (i in covered)
                for i, c in enumerate(captured)]
    unflatten = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)
    return unflatten(out), ScaleByAdaFisherState(
        count=count_inc, mu=unflatten(mu), h=unflatten(curv.h),
        s=unflatten(s), scale=unflatten(curv.scale),
        shift=unflatten(curv.shift), nonfinite=nonfinite,
        captured=unflatten(captured))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


_DOC = r"""{summary}

AdaFisher keeps, for every captured layer, the diagonals of the two
Kronecker factors of its empirical Fisher: the input side :math:`H_D`
(second moments of the bias-augmented layer inputs; for convolutions, of the
input patches) and the output side :math:`S_D` (second moments of the
output cotangents). Let :math:`\alpha_t` be the learning rate,
:math:`\beta_1` ``b1``, :math:`\gamma` ``fisher_decay``, :math:`\lambda`
``damping``, :math:`\epsilon` ``eps`` and :math:`T` ``stats_every``. On
steps with :math:`t \bmod T = 0`, with :math:`\hat H, \hat S` this step's
statistics (``mode='paper'``):

.. math::
  \begin{{align*}}
    H_t &\leftarrow \gamma H_{{t-1}} + (1-\gamma) \hat H, \quad
    S_t \leftarrow \gamma S_{{t-1}} + (1-\gamma) \hat S \\
    \tilde F_t &\leftarrow \mathrm{{mm}}(H_t) \otimes \mathrm{{mm}}(S_t)
      + \lambda, \quad
      \mathrm{{mm}}(v) = \frac{{v - \min v}}{{\max v - \min v + \epsilon
      \max v}}
  \end{{align*}}

and on every step, with :math:`g_t` the gradient{grad_note}:

.. math::
  \begin{{align*}}
    m_t &\leftarrow \beta_1 m_{{t-1}} + (1-\beta_1) g_t \\
    \theta_t &\leftarrow \theta_{{t-1}} - \alpha_t
      \frac{{m_t / (1-\beta_1^t)}}{{\tilde F_t}}{decay_term}
  \end{{align*}}

There is no square root: :math:`\tilde F` is already a second moment.
The default ``mode='reference'`` reproduces the official PyTorch code
instead: the new statistics are min-max normalised first (absolute
:math:`\epsilon`), then averaged as :math:`H \leftarrow
\tfrac{{\gamma}}{{10}} H + \tfrac{{\gamma}}{{100}} \hat H'` from a
ones-initialised state, and BatchNorm/LayerNorm use its 2-vector
construction. In ``'paper'`` mode norm layers use their exact diagonal
empirical Fisher (min-max normalised). The defaults (``'reference'``,
learning rate and damping 1e-3) are the official code's; with
``mode='paper'`` pass a larger damping (0.1) and learning rate (1e-2 to
0.3), see ``docs/adafisher.md``.
Parameters that no captured layer covers (a ``cls`` token, positional
embeddings, custom modules) get ``fallback``: ``'adam'`` (default),
``'momentum'`` (:math:`\tilde F = 1`, what the official code does) or
``'damping'`` (:math:`\tilde F = \lambda`); :func:`fisher_optax.coverage`
lists who gets what.

A layer whose output gradients are all zero (a zero-initialised head, a
dead ReLU, an unused branch) has a zero-range :math:`S`; its min-max
normalisation is taken as 0, so :math:`\tilde F = \lambda` there. A
refresh that would make any entry of a layer's state non-finite keeps that
layer's previous state and increments ``state.nonfinite``. Concrete numeric
arguments are validated when the optimizer is built and errors name the
argument (``damping`` finite and > 0; ``b1``, ``fisher_decay``,
``fallback_b2`` in [0, 1); ``eps``, ``fallback_eps``, ``weight_decay``
>= 0; ``learning_rate`` finite). Values traced under
:func:`optax.inject_hyperparams` inside ``jit`` are not checked; pass
``stats_every``, ``mode`` and ``fallback`` in its ``static_args``.

Args:
  learning_rate: global step size :math:`\alpha`, a scalar or a schedule.
  b1: momentum decay :math:`\beta_1`.
  damping: :math:`\lambda`, added to the normalised Fisher diagonal.
  fisher_decay: :math:`\gamma`, EMA decay of the curvature factors.
  eps: :math:`\epsilon` of the min-max normalisation (relative to the
    factor's maximum in ``'paper'`` mode, absolute in ``'reference'``).
  weight_decay: {wd_doc}
  stats_every: :math:`T`, static period of the statistics refresh.
  mode: ``'reference'`` (the official code's arithmetic) or ``'paper'``
    (the paper's Algorithm 1).
  fallback: preconditioner of parameters that no layer covers.
  fallback_b2: second-moment decay of the ``'adam'`` fallback.
  fallback_eps: epsilon of the ``'adam'`` fallback.
  mu_dtype: dtype of the first moment (default: the parameter's).
  axis_name: under ``shard_map``/``pmap``, the data-parallel axis over which
    the curvature factors are averaged (``lax.pmean``). Not needed under
    ``jax.jit`` with sharded arrays, where reductions are global already.
  mask: pytree of booleans (or a callable) selecting the parameters that
    weight decay applies to.
  loss_scale: how many times your loss exceeds the loss the defaults are
    set for, a mean over examples (784 for a loss summed over 784 pixels,
    the batch size for a sum over the batch). Gradients and captured
    cotangents are divided by it: the optimizer takes exactly the steps it
    takes on ``loss / loss_scale``.

Returns:
  The corresponding :class:`optax.GradientTransformationExtraArgs`; its
  ``update`` takes ``layer_stats=``.

Examples:
  >>> import flax.linen as nn, jax, jax.numpy as jnp, optax
  >>> import fisher_optax as fo
  >>> model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(1)])
  >>> x = jax.random.normal(jax.random.key(0), (64, 4))
  >>> y = jnp.sum(x, axis=1, keepdims=True)
  >>> params = model.init(jax.random.key(1), x)['params']
  >>> loss_fn = lambda p: jnp.mean((model.apply({{'params': p}}, x) - y) ** 2)
  >>> step_fn = fo.linen.value_grad_and_stats(loss_fn)
  >>> tx = fo.{name}()
  >>> opt_state = tx.init(params)
  >>> @jax.jit
  ... def step(params, opt_state):
  ...   loss, grads, stats = step_fn(params)
  ...   updates, opt_state = tx.update(grads, opt_state, params,
  ...                                  layer_stats=stats)
  ...   return optax.apply_updates(params, updates), opt_state, loss
  >>> for _ in range(100):
  ...   params, opt_state, loss = step(params, opt_state)
  >>> print(loss < 0.2)
  True

References:
  Martins Gomes et al., `AdaFisher: Adaptive Second Order Optimization via
  Fisher Information <https://arxiv.org/abs/2405.16397>`_, ICLR 2025.
"""


def adafisher(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: jax.typing.ArrayLike = 0.9,
    damping: jax.typing.ArrayLike = 1e-3,
    fisher_decay: jax.typing.ArrayLike = 0.8,
    eps: jax.typing.ArrayLike = 1e-6,
    weight_decay: jax.typing.ArrayLike = 0.0,
    *,
    stats_every: int = 10,
    mode: str = 'reference',
    fallback: str = 'adam',
    fallback_b2: jax.typing.ArrayLike = 0.999,
    fallback_eps: jax.typing.ArrayLike = 1e-8,
    mu_dtype: Any = None,
    axis_name: str | None = None,
    mask: Any = None,
    loss_scale: float = 1.0,
) -> optax.GradientTransformationExtraArgs:
  _check_hyperparams('adafisher', learning_rate=learning_rate, b1=b1,
                     damping=damping, fisher_decay=fisher_decay, eps=eps,
                     weight_decay=weight_decay, fallback_b2=fallback_b2,
                     fallback_eps=fallback_eps)
  return _base.with_loss_scale(_base.with_l2(
      scale_by_adafisher(b1, damping, fisher_decay, eps,
                         stats_every=stats_every, mode=mode,
                         fallback=fallback, fallback_b2=fallback_b2,
                         fallback_eps=fallback_eps, mu_dtype=mu_dtype,
                         axis_name=axis_name),
      learning_rate, weight_decay, mask, where='adafisher'), loss_scale,
                                'adafisher')


def adafisherw(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: jax.typing.ArrayLike = 0.9,
    damping: jax.typing.ArrayLike = 1e-3,
    fisher_decay: jax.typing.ArrayLike = 0.8,
    eps: jax.typing.ArrayLike = 1e-6,
    weight_decay: jax.typing.ArrayLike = 1e-2,
    *,
    stats_every: int = 10,
    mode: str = 'reference',
    fallback: str = 'adam',
    fallback_b2: jax.typing.ArrayLike = 0.999,
    fallback_eps: jax.typing.ArrayLike = 1e-8,
    mu_dtype: Any = None,
    axis_name: str | None = None,
    mask: Any = None,
    loss_scale: float = 1.0,
) -> optax.GradientTransformationExtraArgs:
  _check_hyperparams('adafisherw', learning_rate=learning_rate, b1=b1,
                     damping=damping, fisher_decay=fisher_decay, eps=eps,
                     weight_decay=weight_decay, fallback_b2=fallback_b2,
                     fallback_eps=fallback_eps)
  return _base.with_loss_scale(optax.chain(
      scale_by_adafisher(b1, damping, fisher_decay, eps,
                         stats_every=stats_every, mode=mode,
                         fallback=fallback, fallback_b2=fallback_b2,
                         fallback_eps=fallback_eps, mu_dtype=mu_dtype,
                         axis_name=axis_name),
      _base.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  ), loss_scale, 'adafisherw')


adafisher.__doc__ = _DOC.format(
    summary='AdaFisher with coupled L2 regularisation.',
    name='adafisher',
    grad_note=r' plus the L2 term :math:`w \theta_{t-1}` (``weight_decay``)',
    decay_term='',
    wd_doc=r':math:`w`, added to the gradient before the momentum '
    '(coupled L2, as the official ``AdaFisher``).',
)
adafisherw.__doc__ = _DOC.format(
    summary='AdaFisherW: AdaFisher with decoupled weight decay.',
    name='adafisherw',
    grad_note='',
    decay_term=r' - \alpha_t w \theta_{t-1}',
    wd_doc=r':math:`w`, decoupled: multiplied by the learning rate and not '
    r'divided by :math:`\tilde F` (as torch AdamW and the official '
    '``AdaFisherW``).',
)
