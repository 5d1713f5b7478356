"""AdaFisher: Adam-like steps preconditioned by a diagonal Kronecker Fisher.

Implements Martins Gomes et al., "AdaFisher: Adaptive Second Order
Optimization via Fisher Information" (ICLR 2025), as an Optax transform fed
by the per-layer statistics of :mod:`fisher_optax.linen` /
:mod:`fisher_optax.nnx`. ``mode='reference'`` follows the official PyTorch
code (AtlasAnalyticsLab/AdaFisher); see ``docs/adafisher.md`` for the
differences between the two modes.

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

Everything is allocated from the parameters alone, so ``init(params)`` needs
no statistics, and uses about the memory of Adam.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import optax

from fisher_optax import _base
from fisher_optax import _pairing
from fisher_optax import _stats

MODES = ('paper', 'reference')
FALLBACKS = ('adam', 'momentum', 'damping')


class ScaleByAdaFisherState(NamedTuple):
  """State for :func:`fisher_optax.scale_by_adafisher`."""

  count: jax.Array  # shape=(), dtype=int32: steps taken.
  mu: optax.Updates  # first moment, like params.
  h: optax.Updates  # input-side factor EMA, shape P[:-1] + (1,).
  s: optax.Updates  # output-side factor EMA (or Adam's nu), shape P.
  scale: optax.Updates  # F = scale*(s - shift) + damping, shape P[:-1]+(1,).
  shift: optax.Updates
  nonfinite: jax.Array  # shape=(), int32: refreshes skipped for NaN/Inf.


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


def scale_by_adafisher(
    b1: jax.typing.ArrayLike = 0.9,
    damping: jax.typing.ArrayLike = 1e-3,
    fisher_decay: jax.typing.ArrayLike = 0.8,
    eps: jax.typing.ArrayLike = 1e-6,
    *,
    stats_every: int = 10,
    mode: str = 'paper',
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
  """
  _base.check_options(
      'scale_by_adafisher', periods={'stats_every': stats_every},
      choices={'mode': (mode, MODES), 'fallback': (fallback, FALLBACKS)})
  _check_hyperparams('scale_by_adafisher', b1=b1, damping=damping,
                     fisher_decay=fisher_decay, eps=eps,
                     fallback_b2=fallback_b2, fallback_eps=fallback_eps)
  reference = mode == 'reference'
  fill = 1.0 if reference else 0.0

  def init_fn(params):
    def slot(p, shape_fn):
      # float32 for float32/bf16 parameters, float64 for float64 ones.
      return jnp.full(shape_fn(jnp.shape(p)), fill, _base.stats_dtype(p))

    mu = jax.tree.map(
        lambda p: jnp.zeros_like(p, dtype=mu_dtype or jnp.result_type(p)),
        params)
    return ScaleByAdaFisherState(
        count=jnp.zeros([], jnp.int32),
        mu=mu,
        h=jax.tree.map(lambda p: slot(p, _slot_shape), params),
        s=jax.tree.map(lambda p: slot(p, tuple), params),
        scale=jax.tree.map(lambda p: slot(p, _slot_shape), params),
        shift=jax.tree.map(lambda p: slot(p, _slot_shape) * 0, params),
        nonfinite=jnp.zeros([], jnp.int32),
    )

  def refresh(layer_stats, active, h, s, scale, shift, index):
    """New (h, s, scale, shift) leaf lists from this step's statistics."""
    h, s, scale, shift = list(h), list(s), list(scale), list(shift)
    bad = jnp.zeros([], jnp.bool_)
    for key in sorted(active):
      st = layer_stats[key]
      k = st.meta.stack_ndim
      factors, normalise_h = _stats.adafisher_factors(st, reference)
      if axis_name is not None:
        # Data-parallel replicas see different rows: average the factors.
        factors = jax.tree.map(lambda x: lax.pmean(x, axis_name), factors)
      names = [n for n in sorted(factors) if n in active[key]]
      idx = [index[active[key][n]] for n in names]
      new_h = [jnp.broadcast_to(factors[n].h, h[i].shape)
               for n, i in zip(names, idx)]
      new_s = [jnp.broadcast_to(factors[n].s, s[i].shape)
               for n, i in zip(names, idx)]
      tiny = jnp.finfo(s[idx[0]].dtype).tiny
      if reference:
        # Official order: min-max normalise the new factors, then the
        # (non-convex) moving average 0.1*gamma*old + 0.01*gamma*new.
        if normalise_h:
          lo, hi = _group_min_max(new_h, k)
          new_h = [(x - _expand(lo, x.ndim)) / (_expand(hi - lo, x.ndim) + eps)
                   for x in new_h]
        lo, hi = _group_min_max(new_s, k)
        new_s = [(x - _expand(lo, x.ndim)) / (_expand(hi - lo, x.ndim) + eps)
                 for x in new_s]
        ema_h = [fisher_decay / 10 * h[i] + fisher_decay / 100 * x
                 for i, x in zip(idx, new_h)]
        ema_s = [fisher_decay / 10 * s[i] + fisher_decay / 100 * x
                 for i, x in zip(idx, new_s)]
        new_scale = ema_h
        new_shift = [jnp.zeros_like(x) for x in ema_h]
      else:
        # Paper: convex EMA of the raw factors, then min-max normalise.
        ema_h = [fisher_decay * h[i] + (1 - fisher_decay) * x
                 for i, x in zip(idx, new_h)]
        ema_s = [fisher_decay * s[i] + (1 - fisher_decay) * x
                 for i, x in zip(idx, new_s)]
        if normalise_h:
          lo, hi = _group_min_max(ema_h, k)
          hn = [(x - _expand(lo, x.ndim)) / _expand(
              hi - lo + eps * jnp.abs(hi) + tiny, x.ndim) for x in ema_h]
        else:
          hn = [jnp.ones_like(x) for x in ema_h]
        lo, hi = _group_min_max(ema_s, k)
        spread = hi - lo + eps * jnp.abs(hi)
        # Zero range (all output gradients zero: a zero-initialised head, a
        # dead ReLU, an unused branch): minmax(S) is 0 as for any constant
        # vector, so F = damping. scale = hn / range would be inf, and
        # inf * (s - shift) = inf * 0 = NaN.
        new_scale = [jnp.where(_expand(spread >= tiny, x.ndim),
                               x / _expand(spread + tiny, x.ndim), 0.0)
                     for x in hn]
        new_shift = [jnp.broadcast_to(_expand(lo, x.ndim), x.shape)
                     for x in hn]
      # Guard what the preconditioner uses, not only the raw statistics.
      finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in (
          ema_h + ema_s + new_scale + new_shift)]))
      bad = bad | ~finite
      for j, i in enumerate(idx):
        # Casts keep the state dtypes fixed (equal lax.cond branch types).
        h[i] = jnp.where(finite, ema_h[j], h[i]).astype(h[i].dtype)
        s[i] = jnp.where(finite, ema_s[j], s[i]).astype(s[i].dtype)
        scale[i] = jnp.where(finite, new_scale[j], scale[i]).astype(
            scale[i].dtype)
        shift[i] = jnp.where(finite, new_shift[j], shift[i]).astype(
            shift[i].dtype)
    return h, s, scale, shift, bad

  def update_fn(updates, state, params=None, *, layer_stats=None,
                **extra_args):
    del params, extra_args
    _base.check_same_structure('scale_by_adafisher', 'updates', updates,
                               'state.mu', state.mu)
    assignments = _pairing.pair(updates, layer_stats, 'scale_by_adafisher')

    paths, grads, treedef = _base.flatten_leaves(updates)
    index = {p: i for i, p in enumerate(paths)}
    _, mu, _ = _base.flatten_leaves(state.mu)
    _, h, _ = _base.flatten_leaves(state.h)
    _, s, _ = _base.flatten_leaves(state.s)
    _, scale, _ = _base.flatten_leaves(state.scale)
    _, shift, _ = _base.flatten_leaves(state.shift)

    active: dict[str, dict[str, str]] = {}
    for path, a in assignments.items():
      if a.layer is not None and not a.frozen:
        active.setdefault(a.layer, {})[a.name] = path
    covered = {p for names in active.values() for p in names.values()}

    count_inc = optax.safe_increment(state.count)

    # Masked (frozen) and integer leaves (step counters) have no moments.
    mu = [(b1 * m + (1 - b1) * g).astype(m.dtype) if _base.is_float(g)
          else m for g, m in zip(grads, mu)]

    if active:
      do_refresh = state.count % stats_every == 0
      h, s, scale, shift, bad = lax.cond(
          do_refresh,
          lambda args: refresh(layer_stats, active, *args, index),
          lambda args: (*args, jnp.zeros([], jnp.bool_)),
          (h, s, scale, shift))
      nonfinite = state.nonfinite + bad.astype(jnp.int32)
    else:
      nonfinite = state.nonfinite

    out = []
    for i, (path, g, m) in enumerate(zip(paths, grads, mu)):
      if _base.is_masked(g):
        out.append(g)
        continue
      if not _base.is_float(g):
        out.append(jnp.zeros_like(g))
        continue
      bias_mu = 1 - b1 ** count_inc.astype(_base.stats_dtype(m))
      m_hat = m / bias_mu.astype(m.dtype)
      if path in covered:
        fisher = scale[i] * (s[i] - shift[i]) + damping
        u = m_hat / fisher
      elif fallback == 'adam':
        s[i], denom = _base.adam_denominator(
            jnp.where(state.count == 0, 0.0, s[i]), g, count_inc,
            fallback_b2, fallback_eps)
        u = m_hat / denom
      elif fallback == 'momentum':
        u = m_hat
      else:
        u = m_hat / damping
      out.append(u.astype(g.dtype))

    unflatten = lambda leaves: jax.tree_util.tree_unflatten(treedef, leaves)
    return unflatten(out), ScaleByAdaFisherState(
        count=count_inc,
        mu=unflatten(mu),
        h=unflatten(h),
        s=unflatten(s),
        scale=unflatten(scale),
        shift=unflatten(shift),
        nonfinite=nonfinite,
    )

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
``mode='reference'`` reproduces the official PyTorch code instead: the new
statistics are min-max normalised first (absolute :math:`\epsilon`), then
averaged as :math:`H \leftarrow \tfrac{{\gamma}}{{10}} H +
\tfrac{{\gamma}}{{100}} \hat H'` from a ones-initialised state, and
BatchNorm/LayerNorm use its 2-vector construction. In ``'paper'`` mode norm
layers use their exact diagonal empirical Fisher (min-max normalised).
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
  mode: ``'paper'`` or ``'reference'``.
  fallback: preconditioner of parameters that no layer covers.
  fallback_b2: second-moment decay of the ``'adam'`` fallback.
  fallback_eps: epsilon of the ``'adam'`` fallback.
  mu_dtype: dtype of the first moment (default: the parameter's).
  axis_name: under ``shard_map``/``pmap``, the data-parallel axis over which
    the curvature factors are averaged (``lax.pmean``). Not needed under
    ``jax.jit`` with sharded arrays, where reductions are global already.
  mask: pytree of booleans (or a callable) selecting the parameters that
    weight decay applies to.

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
  >>> tx = fo.{name}(learning_rate=1e-4)
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
    mode: str = 'paper',
    fallback: str = 'adam',
    fallback_b2: jax.typing.ArrayLike = 0.999,
    fallback_eps: jax.typing.ArrayLike = 1e-8,
    mu_dtype: Any = None,
    axis_name: str | None = None,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
  _check_hyperparams('adafisher', learning_rate=learning_rate, b1=b1,
                     damping=damping, fisher_decay=fisher_decay, eps=eps,
                     weight_decay=weight_decay, fallback_b2=fallback_b2,
                     fallback_eps=fallback_eps)
  return _base.with_l2(
      scale_by_adafisher(b1, damping, fisher_decay, eps,
                         stats_every=stats_every, mode=mode,
                         fallback=fallback, fallback_b2=fallback_b2,
                         fallback_eps=fallback_eps, mu_dtype=mu_dtype,
                         axis_name=axis_name),
      learning_rate, weight_decay, mask)


def adafisherw(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: jax.typing.ArrayLike = 0.9,
    damping: jax.typing.ArrayLike = 1e-3,
    fisher_decay: jax.typing.ArrayLike = 0.8,
    eps: jax.typing.ArrayLike = 1e-6,
    weight_decay: jax.typing.ArrayLike = 1e-2,
    *,
    stats_every: int = 10,
    mode: str = 'paper',
    fallback: str = 'adam',
    fallback_b2: jax.typing.ArrayLike = 0.999,
    fallback_eps: jax.typing.ArrayLike = 1e-8,
    mu_dtype: Any = None,
    axis_name: str | None = None,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
  _check_hyperparams('adafisherw', learning_rate=learning_rate, b1=b1,
                     damping=damping, fisher_decay=fisher_decay, eps=eps,
                     weight_decay=weight_decay, fallback_b2=fallback_b2,
                     fallback_eps=fallback_eps)
  return optax.chain(
      scale_by_adafisher(b1, damping, fisher_decay, eps,
                         stats_every=stats_every, mode=mode,
                         fallback=fallback, fallback_b2=fallback_b2,
                         fallback_eps=fallback_eps, mu_dtype=mu_dtype,
                         axis_name=axis_name),
      _base.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


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
