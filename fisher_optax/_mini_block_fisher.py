r"""Mini-Block Fisher (MBF): a block-diagonal Fisher made of small blocks.

Bahamou, Goldfarb & Ren (AISTATS 2023), as the authors' released code runs
it (``research/mbf_tkfac.md`` §1). MBF needs only the gradient ``g`` of the
mini-batch loss; each layer's weights are cut into many small mini-blocks
``g_b`` (layouts: ``_mini_blocks``) and every step, with heavy-ball momentum
``m``, runs the stages below, one module-level function each::

  m <- mu m + g                                  momentum_step
  F_b <- rho F_b + (1 - rho) g_b g_b^T           refresh_statistics
                                                   (every stats_every steps)
  C_b <- (F_b + lambda I)^-1                     refresh_inverses
                                                   (every inverse_every steps)
  d_b = C_b m_b                                  precondition
  d = (1 - mu) m / (sqrt(v_hat) + eps)           adam_fallback (parameters
                                                   in no block)

Guards: every value that is stored is checked where it is made. A momentum
entry, a statistic block, an inverse block or a fallback second-moment entry
that comes out non-finite keeps its previous value and is counted in
``state.nonfinite``, so a non-finite gradient in one layer touches nothing
else and leaves no state non-finite. The update of a non-finite gradient
entry is that entry as given (see :func:`mini_block_fisher`).

Statistics, inverses and second moments have the dtype
``_base.stats_dtype(param)``: float32 for float32 and bfloat16 parameters,
float64 for float64 ones (``jax_enable_x64``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable, Mapping, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import optax

from fisher_optax import _adaptive
from fisher_optax import _base
from fisher_optax import _linalg
from fisher_optax import _mini_blocks
from fisher_optax import _pairing
from fisher_optax import _sharding

DENSE_BLOCKS = _mini_blocks.DENSE_BLOCKS
# 'adam' squares the averaged momentum as the released code does;
# 'adam_gradient' squares the gradient (the rule before issue 10).
FALLBACKS = ('adam', 'adam_gradient', 'diagonal')
INVERSE_METHODS = ('cholesky', 'inv', 'eigh')

Layouts = Mapping[str, _mini_blocks.Layer]


class ScaleByMiniBlockFisherState(NamedTuple):
  r"""State of :func:`scale_by_mini_block_fisher`.

  Attributes:
    count: steps taken.
    momentum: heavy-ball buffer :math:`m`, like the parameters.
    stats: ``{layer: {form: F}}``, the averaged mini-block statistics
      (``form`` is ``'average'``, ``'column'``, ``'chunks'``, ``'conv'`` or
      ``'diagonal'``; blocks are ``(..., nb, b, b)``).
    inverses: the cached :math:`(F + \lambda I)^{-1}`, same structure.
    nu: ``{param path: v}``, Adam second moments of fallback parameters.
    num_stats: statistics refreshes so far (warm-start batches included);
      the first refresh takes the new statistic as it is.
    nonfinite: non-finite events: each gradient leaf with a non-finite
      entry (its momentum entries kept), and each statistic, inverse or
      fallback second-moment block (a fallback entry is a block) that came
      out non-finite and kept its previous value.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import fisher_optax as fo
    >>> model = nn.Dense(2)
    >>> x = jax.random.normal(jax.random.key(0), (16, 3))
    >>> params = model.init(jax.random.key(1), x)['params']
    >>> loss_fn = lambda p: jnp.mean(jnp.sin(model.apply({'params': p}, x)))
    >>> tx = fo.mini_block_fisher(learning_rate=1e-3)
    >>> _, opt_state = tx.update(jax.grad(loss_fn)(params), tx.init(params),
    ...                          params)
    >>> state, = [s for s in opt_state
    ...           if isinstance(s, fo.ScaleByMiniBlockFisherState)]
    >>> int(state.count), int(state.num_stats), int(state.nonfinite)
    (1, 1, 0)
    >>> jax.tree.map(jnp.shape, state.stats)  # 'chunks': 3 + 1 blocks of 2
    {'': {'chunks': (1, 2, 2)}}
  """

  count: jax.Array
  momentum: optax.Updates
  stats: dict[str, dict[str, jax.Array]]
  inverses: dict[str, dict[str, jax.Array]]
  nu: dict[str, jax.Array]
  num_stats: jax.Array
  nonfinite: jax.Array


def _zero_count() -> jax.Array:
  return jnp.zeros([], jnp.int32)


# ---------------------------------------------------------------------------
# The stages of one step, in the order of the Algorithm box. Each works on
# flat ``{path: array}`` dicts of the live (unmasked) leaves and returns the
# number of non-finite events it absorbed.


def momentum_step(grads: Mapping[str, jax.Array],
                  momentum: Mapping[str, jax.Array], mu: Any
                  ) -> tuple[dict[str, jax.Array], jax.Array]:
  """``m <- mu m + g`` entry by entry; a non-finite result keeps ``m``.

  Args:
    grads: ``{path: g}``.
    momentum: ``{path: m}`` (the parameters' dtypes).
    mu: the momentum coefficient.

  Returns:
    ``(new momentum, number of leaves with a kept entry)``.
  """
  out, bad = {}, _zero_count()
  for path, g in grads.items():
    m = momentum[path]
    new = (mu * m + g.astype(_base.stats_dtype(g))).astype(m.dtype)
    ok = jnp.isfinite(new)
    out[path] = jnp.where(ok, new, m)
    bad = bad + (~jnp.all(ok)).astype(jnp.int32)
  return out, bad


def refresh_statistics(layouts: Layouts, grads: Mapping[str, jax.Array],
                       stats, weight: Any):
  """``F_b <- (1 - w) F_b + w S_b(g)``; a non-finite block keeps ``F_b``.

  Args:
    layouts: the blocked layers.
    grads: ``{path: g}``.
    stats: ``{layer: {form: F}}``.
    weight: ``w``: 1 at the first refresh, ``1 - fisher_decay`` after.

  Returns:
    ``(new stats, number of blocks kept)``.
  """
  new, bad = {}, _zero_count()
  for key, layer in layouts.items():
    old = stats[key][layer.form]
    fresh = _mini_blocks.statistic(
        layer, _mini_blocks.vectors(layer, grads, old.dtype))
    kept, n_bad = _linalg.keep_finite(
        ((1 - weight) * old + weight * fresh).astype(old.dtype), old,
        layer.block_ndim)
    new[key] = {layer.form: kept}
    bad = bad + n_bad
  return new, bad


def refresh_inverses(layouts: Layouts, stats, inverses, damping: Any,
                     method: str, spread: str | None = None):
  """``C_b <- (F_b + damping I)^-1``; a non-finite block keeps ``C_b``.

  Blocks of one size, across all layers, are inverted in one batched call;
  scalar blocks elementwise.

  Returns:
    ``(new inverses, number of blocks kept)``.
  """
  fresh, blocks = {}, {}
  for key, layer in layouts.items():
    f = stats[key][layer.form]
    if layer.block == 1:
      fresh[key] = 1.0 / (f + damping)
    else:
      blocks[key] = f
  fresh.update(_linalg.bucketed(
      lambda s, d: _linalg.damped_inverse(s, d, method), blocks,
      {k: jnp.asarray(damping, f.dtype) for k, f in blocks.items()},
      spread=spread))
  new, bad = {}, _zero_count()
  for key, layer in layouts.items():
    old = inverses[key][layer.form]
    kept, n_bad = _linalg.keep_finite(fresh[key].astype(old.dtype), old,
                                      layer.block_ndim)
    new[key] = {layer.form: kept}
    bad = bad + n_bad
  return new, bad


def precondition(layouts: Layouts, inverses,
                 momentum: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """``d_b = C_b m_b`` for every block: ``{path: d}`` of blocked leaves."""
  out = {}
  for key, layer in layouts.items():
    inverse = inverses[key][layer.form]
    v = _mini_blocks.vectors(layer, momentum, inverse.dtype)
    out.update(_mini_blocks.from_vectors(
        layer, _mini_blocks.precondition(layer, inverse, v), momentum))
  return out


def adam_fallback(nu: Mapping[str, jax.Array],
                  momentum: Mapping[str, jax.Array],
                  grads: Mapping[str, jax.Array], count: jax.Array, mu: Any,
                  b2: Any, eps: Any, square: str = 'momentum'):
  r"""The released code's Adam-like rule for parameters in no block.

  With :math:`b = (1 - \mu) m` (the released code's averaged momentum
  ``b <- mu b + (1 - mu) g``):
  :math:`v \leftarrow \beta_2 v + (1 - \beta_2) s^2` with :math:`s = b`
  (``square='momentum'``, the released rule) or :math:`s = g`
  (``'gradient'``), and :math:`d = b / (\sqrt{v / (1 - \beta_2^t)} +
  \epsilon)`, no first-moment bias correction. Where the denominator is 0
  (a dead parameter with ``eps = 0``) ``d`` is 0, not ``0 / 0``; a
  non-finite entry of :math:`v` keeps its previous value.

  Args:
    nu: ``{path: v}`` of the fallback parameters.
    momentum: ``{path: m}``, already updated this step.
    grads: ``{path: g}``.
    count: steps taken including this one.
    mu: momentum coefficient.
    b2: second-moment decay.
    eps: added to the square root.
    square: ``'momentum'`` or ``'gradient'``.

  Returns:
    ``(new nu, {path: d}, number of entries kept)``.
  """
  new_nu, out, bad = {}, {}, _zero_count()
  for path, v in nu.items():
    b = ((1 - mu) * momentum[path].astype(v.dtype)).astype(v.dtype)
    s = b if square == 'momentum' else grads[path].astype(v.dtype)
    fresh = (b2 * v + (1 - b2) * jnp.square(s)).astype(v.dtype)
    new_nu[path], n_bad = _linalg.keep_finite(fresh, v, 0)
    denom = jnp.sqrt(new_nu[path] / (1 - b2 ** count.astype(v.dtype))) + eps
    positive = denom > 0
    out[path] = jnp.where(positive, b / jnp.where(positive, denom, 1), 0)
    bad = bad + n_bad
  return new_nu, out, bad


def refresh(layouts: Layouts, grads: Mapping[str, jax.Array],
            state: ScaleByMiniBlockFisherState, *, stats_every: int,
            inverse_every: int, fisher_decay: Any, damping: Any,
            method: str, spread: str | None = None):
  """Runs the statistics and inverse refreshes that are due this step.

  As the released code: while the first inverse period lasts, the inverses
  are refreshed after every statistics refresh, so early steps see current
  curvature. Both run under ``lax.cond``.

  Returns:
    ``(stats, inverses, num_stats, number of blocks kept)``.
  """
  if not layouts:
    return state.stats, state.inverses, state.num_stats, _zero_count()
  do_stats = state.count % stats_every == 0
  do_inverse = (state.count % inverse_every == 0) | (
      do_stats & (state.count < inverse_every))
  weight = jnp.where(state.num_stats == 0, 1.0, 1.0 - fisher_decay)
  keep = lambda *args: (args[-1], _zero_count())
  stats, bad_stats = lax.cond(
      do_stats, lambda old: refresh_statistics(layouts, grads, old, weight),
      keep, state.stats)
  inverses, bad_inv = lax.cond(
      do_inverse,
      lambda s, old: refresh_inverses(layouts, s, old, damping, method,
                                      spread),
      keep, stats, state.inverses)
  num_stats = state.num_stats + do_stats.astype(jnp.int32)
  return stats, inverses, num_stats, bad_stats + bad_inv


def _check_update(where: str, layouts: Layouts, dense_blocks: str,
                  state: ScaleByMiniBlockFisherState, updates: Any,
                  layer_stats: Any) -> None:
  """Checks the blocks and ``layer_stats`` against the state; names paths."""
  for key, layer in layouts.items():
    have = state.stats.get(key, {}).get(layer.form)
    if have is None or have.shape != layer.shape:
      raise ValueError(
          f'{where}: layer {key!r} needs {layer.form} statistics of shape '
          f'{layer.shape} but the state holds '
          f'{jax.tree.map(jnp.shape, state.stats.get(key))}; init and '
          'update saw different parameter trees.')
  if layer_stats is None:
    return
  # Paths, shapes and a/g of every captured layer, naming the layer.
  _pairing.pair(updates, layer_stats, where)
  leaves = _base.flatten_with_paths(updates)
  for key, st in layer_stats.items():
    meta = st.meta
    if meta.kind not in ('dense', 'conv'):
      continue
    if _base.is_masked(leaves[_base.join_path(
        key, meta.param_name('kernel'))]):
      continue
    want = 'conv' if meta.kind == 'conv' else dense_blocks
    got = layouts.get(key)
    if got is None or got.form != want or len(got.lead) != meta.stack_ndim:
      raise ValueError(
          f'{where}: layer {key!r} is a {meta.kind} layer ({meta.module}, '
          f'{meta.stack_ndim} stack axes) but init(params) blocked it as'
          f' {got.form if got else "fallback"}; stacked or multi-axis '
          'layers cannot be inferred from parameters. Build the optimizer '
          f'with {_base.layers_hint(updates)}.')


def _check_hyperparams(where, damping, fisher_decay, momentum, fallback_b2,
                       fallback_eps):
  _base.check_hyperparams(
      where, positive={'damping': damping},
      nonnegative={'fallback_eps': fallback_eps},
      decays={'fisher_decay': fisher_decay, 'momentum': momentum,
              'fallback_b2': fallback_b2})


def scale_by_mini_block_fisher(
    damping: jax.typing.ArrayLike = 1e-4,
    fisher_decay: jax.typing.ArrayLike = 0.9,
    momentum: jax.typing.ArrayLike = 0.9,
    *,
    stats_every: int = 1,
    inverse_every: int = 20,
    block_size: int | None = None,
    dense_blocks: str = 'chunks',
    inverse_method: str = 'inv',
    fallback: str = 'adam',
    fallback_b2: jax.typing.ArrayLike = 0.999,
    fallback_eps: jax.typing.ArrayLike = 1e-8,
    layers: Mapping[str, _base.LayerStats] | None = None,
    axis_name: str | None = None,
    spread_inverses: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Precondition by the Mini-Block Fisher; see :func:`mini_block_fisher`.

  Caller contract: ``update(updates, state, params=None, layer_stats=None)``;
  ``layer_stats`` is optional (MBF needs only gradients); when given, it is
  checked against the gradients (paths, shapes, ``a``/``g``) and its layer
  kinds against the blocks ``init`` chose.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: an invalid option or concrete hyperparameter (named).

  Example:
    The preconditioner alone needs only gradients; chained with a
    learning rate it takes the steps of :func:`mini_block_fisher`
    (without weight decay):

    >>> import flax.linen as nn, jax, jax.numpy as jnp, optax
    >>> import fisher_optax as fo
    >>> model = nn.Dense(2)
    >>> x = jax.random.normal(jax.random.key(0), (16, 3))
    >>> params = model.init(jax.random.key(1), x)['params']
    >>> loss_fn = lambda p: jnp.mean(jnp.sin(model.apply({'params': p}, x)))
    >>> grads = jax.grad(loss_fn)(params)
    >>> tx = optax.chain(fo.scale_by_mini_block_fisher(),
    ...                  optax.scale(-1e-3))
    >>> ref = fo.mini_block_fisher(learning_rate=1e-3)
    >>> u, _ = tx.update(grads, tx.init(params), params)
    >>> v, _ = ref.update(grads, ref.init(params), params)
    >>> jax.tree.map(lambda a, b: bool(jnp.allclose(a, b)), u, v)
    {'bias': True, 'kernel': True}
  """
  where = 'scale_by_mini_block_fisher'
  _base.check_options(
      where, periods={'stats_every': stats_every,
                      'inverse_every': inverse_every},
      block_size=block_size,
      choices={'dense_blocks': (dense_blocks, DENSE_BLOCKS),
               'fallback': (fallback, FALLBACKS),
               'inverse_method': (inverse_method, INVERSE_METHODS)},
      axes={'axis_name': axis_name, 'spread_inverses': spread_inverses})
  _check_hyperparams(where, damping, fisher_decay, momentum, fallback_b2,
                     fallback_eps)
  default_damping = damping
  square = 'gradient' if fallback == 'adam_gradient' else 'momentum'

  def layouts_for(tree):
    return _mini_blocks.layouts(tree, layers, block_size, dense_blocks,
                                fallback, where)

  def init_fn(params):
    layouts = layouts_for(params)
    leaves = _base.flatten_with_paths(params)
    covered = {p for layer in layouts.values() for p in layer.paths}
    zeros = lambda shape, leaf: jnp.zeros(shape, _base.stats_dtype(leaf))
    blocks = lambda layer: {layer.form: zeros(layer.shape,
                                              leaves[layer.kernel])}
    return ScaleByMiniBlockFisherState(
        count=_zero_count(),
        momentum=jax.tree.map(jnp.zeros_like, params),
        stats={k: blocks(layer) for k, layer in layouts.items()},
        inverses={k: blocks(layer) for k, layer in layouts.items()},
        nu={p: zeros(_base.shape_of(leaf), leaf) for p, leaf in leaves.items()
            if p not in covered and not _base.is_masked(leaf)},
        num_stats=_zero_count(),
        nonfinite=_zero_count(),
    )

  @_sharding.with_auto_axes
  def update_fn(updates, state, params=None, *, layer_stats=None,
                damping=None, **extra_args):
    # ``damping=``: this step's damping, from a caller that adapts it
    # (``fisher_optax.adaptive``); inverses take it at their next refresh.
    del params, extra_args
    damping = default_damping if damping is None else damping
    _base.check_same_structure(where, 'updates', updates,
                               'the parameters init saw', state.momentum)
    layouts = layouts_for(updates)
    _check_update(where, layouts, dense_blocks, state, updates, layer_stats)
    paths, leaves, treedef = _base.flatten_leaves(updates)
    grads = {p: g for p, g in zip(paths, leaves) if not _base.is_masked(g)}
    if axis_name is not None:
      grads = lax.pmean(grads, axis_name)
    old_m = dict(zip(paths, _base.flatten_leaves(state.momentum)[1]))
    count = optax.safe_increment(state.count)

    m, bad_m = momentum_step(grads, old_m, momentum)
    stats, inverses, num_stats, bad_f = refresh(
        layouts, grads, state, stats_every=stats_every,
        inverse_every=inverse_every, fisher_decay=fisher_decay,
        damping=damping, method=inverse_method, spread=spread_inverses)
    direction = precondition(layouts, inverses, m)
    nu, d_fallback, bad_nu = adam_fallback(
        state.nu, m, grads, count, momentum, fallback_b2, fallback_eps,
        square)
    direction.update(d_fallback)

    # A non-finite gradient entry is passed through as given: the fault
    # stays visible (optax.apply_if_finite skips the step) while the state
    # above took nothing from it.
    out = {p: jnp.where(jnp.isfinite(g), direction[p].astype(g.dtype), g)
           for p, g in grads.items()}
    unflatten = lambda tree: jax.tree_util.tree_unflatten(
        treedef, [tree.get(p, leaf) for p, leaf in zip(paths, leaves)])
    return unflatten(out), ScaleByMiniBlockFisherState(
        count=count,
        momentum=jax.tree_util.tree_unflatten(
            treedef, [m.get(p, old_m[p]) for p in paths]),
        stats=stats, inverses=inverses, nu=nu, num_stats=num_stats,
        nonfinite=state.nonfinite + bad_m + bad_f + bad_nu)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def mini_block_fisher(
    learning_rate: optax.ScalarOrSchedule | None = None,
    damping: jax.typing.ArrayLike = 1e-4,
    fisher_decay: jax.typing.ArrayLike = 0.9,
    momentum: jax.typing.ArrayLike = 0.9,
    weight_decay: jax.typing.ArrayLike = 0.0,
    *,
    stats_every: int = 1,
    inverse_every: int = 20,
    block_size: int | None = None,
    dense_blocks: str = 'chunks',
    inverse_method: str = 'inv',
    fallback: str = 'adam',
    fallback_b2: jax.typing.ArrayLike = 0.999,
    fallback_eps: jax.typing.ArrayLike = 1e-8,
    layers: Mapping[str, _base.LayerStats] | None = None,
    axis_name: str | None = None,
    spread_inverses: str | None = None,
    mask: Any = None,
    loss_scale: float = 1.0,
    model_every: int = 1,
) -> optax.GradientTransformationExtraArgs:
  r"""Mini-Block Fisher (MBF) with heavy-ball momentum and decoupled decay.

  Let :math:`\alpha` be the learning rate, :math:`\lambda` ``damping``,
  :math:`\rho` ``fisher_decay``, :math:`\mu` ``momentum``, :math:`w`
  ``weight_decay`` and :math:`g` the gradient of the mini-batch loss. Each
  layer's weights are cut into mini-blocks :math:`b` with gradient slices
  :math:`g_b`:

  * conv kernel ``(*window, C_in, C_out)``: one block per channel pair
    :math:`(i, o)`, the :math:`k` window weights ``K[..., i, o]``
    (:math:`k \times k` matrices, :math:`C_{in} C_{out}` of them);
  * dense kernel ``(I, O)`` with its bias as an extra row,
    :math:`\tilde G = [\nabla W; \nabla b] \in \mathbb{R}^{(I+1) \times O}`:
    blocks of :math:`O` entries sharing one matrix. The default
    ``dense_blocks='chunks'`` is what the released code's "Avg" computes:
    the average over :math:`I+1` vectors of length :math:`O` that are runs
    of :math:`O` consecutive entries of :math:`\tilde G^\top` flattened
    row by row, so each mixes several units. ``'average'`` averages the
    true rows :math:`\tilde g_r` (per input unit, the blocking the paper's
    text describes), :math:`S = \tilde G^\top \tilde G / (I+1)`;
    ``'column'`` keeps one :math:`\tilde g_r \tilde g_r^\top` per row
    (memory :math:`(I+1) O^2`). A mean gradient :math:`\tilde G` is close
    to rank one, so the true-row average has almost all eigenvalues below
    :math:`\lambda`: in ``benchmarks/convergence.py`` it trained the MNIST
    autoencoder to a test BCE of 141 at its best damping (0.1) against 76
    for ``'chunks'`` and 87 for Adam (see ``docs/choosing.md``).
    ``block_size`` keeps only the diagonal blocks of that size along the
    output axis: 1 is a diagonal, ``None`` (or :math:`O`) the full
    output-side block.

  Every step

  .. math::
    \begin{align*}
      m &\leftarrow \mu m + g, \\
      F_b &\leftarrow \rho F_b + (1-\rho)\, S_b(g)
        \quad \text{every } \texttt{stats\_every} \text{ steps}, \\
      d_b &= (F_b + \lambda I)^{-1} m_b, \qquad
      \theta \leftarrow (1 - \alpha w)\,\theta - \alpha d,
    \end{align*}

  with the inverses refreshed every ``inverse_every`` steps (and after every
  statistics refresh during the first ``inverse_every`` steps, as the
  released code), all layers' blocks of one size in one batched call. The
  first refresh takes :math:`S_b(g)` as it is (or see
  :func:`mini_block_fisher_warm_start`). Parameters in no block (conv
  biases, norm scales and shifts, embeddings) use ``fallback='adam'``, the
  released code's rule: with :math:`b = (1-\mu) m` (its averaged momentum),
  :math:`v \leftarrow \beta_2 v + (1-\beta_2) b^2` and
  :math:`d = b / (\sqrt{v / (1-\beta_2^t)} + \epsilon)`; or
  ``'adam_gradient'``, the same with :math:`g^2` in place of :math:`b^2`
  (Adam's second moment of the gradient); or ``'diagonal'``, MBF's own
  :math:`(F + \lambda)^{-1} m` with scalar blocks.

  Non-finite values: a non-finite gradient entry is passed through as the
  update of that entry (so ``optax.apply_if_finite`` around this optimizer
  skips the step, and without it the parameter goes non-finite as under
  ``optax.sgd``), but the state takes nothing from it: its momentum entry,
  the statistic blocks it touches and fallback second moments keep their
  previous values, every other layer refreshes as usual, and the event is
  counted in ``state.nonfinite``. An inverse block that comes out
  non-finite keeps its previous value too. A layer whose gradient is zero
  gets a zero update. Statistics follow the parameters' dtype: float32 for
  float32 and bfloat16, float64 for float64.

  :math:`S_b` uses the mini-batch gradient, not per-example gradients, as
  the released code: for a mean loss over :math:`B` examples it is about
  the per-example empirical Fisher divided by :math:`B`, plus the squared
  mean. Learning rates and damping are on that scale (the released MNIST
  autoencoder preset: :math:`\alpha = 10^{-5}`, :math:`\lambda = 3 \cdot
  10^{-4}` with ``dense_blocks='chunks'`` and a loss summed over pixels).
  Where the gradient is small against :math:`\lambda` the step tends to
  :math:`\alpha m / \lambda`: heavy-ball SGD with learning rate
  :math:`\alpha / \lambda`, which must stay stable.

  Layer kinds, stack axes and input axes are guessed from the parameters'
  names and shapes (a bias has the shape of its layer's outputs, a stack
  puts the same leading axes on kernel and bias); ``update`` checks them
  against the ``layer_stats``. Where the parameters cannot tell (a
  bias-less ``DenseGeneral`` with several input axes looks like a conv),
  pass ``layers=``, the ``layer_stats`` of one step (``jax.eval_shape`` is
  enough).

  Args:
    learning_rate: :math:`\alpha`, a scalar or a schedule; None (the
      default): the adaptive step, :func:`fisher_optax.adaptive` around the
      preconditioner (``damping`` its initial value, ``momentum``
      unused, ``weight_decay`` an L2 term), whose ``update`` also takes
      ``value=`` and ``value_fn=`` (``docs/adaptive.md``).
    damping: :math:`\lambda`, added to every mini-block.
    fisher_decay: :math:`\rho`, decay of the block averages.
    momentum: :math:`\mu`, heavy-ball (no dampening).
    weight_decay: :math:`w`, decoupled and multiplied by :math:`\alpha`.
    stats_every: static period of the statistics refresh.
    inverse_every: static period of the inverse refresh.
    block_size: largest block along a dense layer's output axis (None: the
      whole output axis).
    dense_blocks: ``'average'``, ``'column'`` or ``'chunks'``.
    inverse_method: ``'inv'`` (LU; measured fastest here, see
      ``benchmarks/mini_block_fisher.py``), ``'cholesky'`` or ``'eigh'``.
    fallback: ``'adam'`` (the released rule), ``'adam_gradient'`` or
      ``'diagonal'``, for parameters in no block.
    fallback_b2: second-moment decay of the Adam fallback.
    fallback_eps: epsilon of the Adam fallback.
    layers: ``layer_stats`` of one step, where ``init(params)`` guesses a
      layer's blocks wrong (the first update says so).
    axis_name: data-parallel axis to ``pmean`` gradients over under
      ``shard_map``/``pmap`` (a no-op if they are already averaged).
    spread_inverses: a mesh axis name, or None. With a name, each device
      of that axis factorises its share of the blocks on an inverse step
      and the results are gathered, instead of every device factorising
      all of them; the result is the same. The update must run under
      ``jax.set_mesh(mesh)`` or inside ``jax.shard_map``
      (``docs/multi_device.md``).
    mask: weight-decay mask (integer leaves are never decayed).
    loss_scale: how many times your loss exceeds the loss the defaults are
      set for, a mean over examples (784 for a loss summed over 784
      pixels, the batch size for a sum over the batch). Gradients and
      captured cotangents are divided by it: the optimizer takes exactly
      the steps it takes on ``loss / loss_scale``.
    model_every: with no learning rate, steps between exact quadratic
      models (each a pass through the model); the steps between take the
      carried model of :func:`fisher_optax.adaptive`, which costs none.
      Must divide ``inverse_every`` and 5 (the damping's ``adapt_every``).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; ``update`` accepts
    (and does not need) ``layer_stats=``.

  Raises:
    ValueError: an invalid option, or a concrete hyperparameter out of range
      (``damping`` > 0, ``fisher_decay``, ``momentum`` and ``fallback_b2``
      in [0, 1), ``weight_decay`` and ``fallback_eps`` >= 0, a finite
      ``learning_rate``); traced values (``optax.inject_hyperparams``) and
      schedules are not checked.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, optax
    >>> import fisher_optax as fo
    >>> model = nn.Sequential([nn.Dense(16), nn.tanh, nn.Dense(1)])
    >>> x = jax.random.normal(jax.random.key(0), (64, 4))
    >>> y = jnp.sum(x, axis=1, keepdims=True)
    >>> params = model.init(jax.random.key(1), x)['params']
    >>> loss_fn = lambda p: jnp.mean((model.apply({'params': p}, x) - y) ** 2)
    >>> tx = fo.mini_block_fisher(learning_rate=0.03, damping=0.1)
    >>> opt_state = tx.init(params)
    >>> @jax.jit
    ... def step(params, opt_state):
    ...   loss, grads = jax.value_and_grad(loss_fn)(params)
    ...   updates, opt_state = tx.update(grads, opt_state, params)
    ...   return optax.apply_updates(params, updates), opt_state, loss
    >>> for _ in range(100):
    ...   params, opt_state, loss = step(params, opt_state)
    >>> print(loss < 0.05)
    True

  References:
    Bahamou, Goldfarb & Ren, `A Mini-Block Fisher Method for Deep Neural
    Networks <https://arxiv.org/abs/2202.04124>`_, AISTATS 2023.
  """
  where = 'mini_block_fisher'
  _check_hyperparams(where, damping, fisher_decay, momentum, fallback_b2,
                     fallback_eps)
  _base.check_hyperparams(where, nonnegative={'weight_decay': weight_decay},
                          finite={'learning_rate': learning_rate})
  precondition = lambda momentum: scale_by_mini_block_fisher(
      damping, fisher_decay, momentum, stats_every=stats_every,
      inverse_every=inverse_every, block_size=block_size,
      dense_blocks=dense_blocks, inverse_method=inverse_method,
      fallback=fallback, fallback_b2=fallback_b2,
      fallback_eps=fallback_eps, layers=layers, axis_name=axis_name,
      spread_inverses=spread_inverses)
  _adaptive.check_model_every(where, model_every, inverse_every)
  if learning_rate is None:
    return _base.with_loss_scale(_adaptive.adaptive(
        precondition(0.0), damping, weight_decay=weight_decay, mask=mask,
        axis_name=axis_name, model_every=model_every), loss_scale, where)
  return _base.with_loss_scale(optax.chain(
      precondition(momentum),
      _base.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  ), loss_scale, where)


@functools.partial(jax.jit, static_argnums=2)
def _mean_statistics(grads, old_stats, all_blocked):
  """Mean of every layer's statistic over ``grads``, per MBF state.

  A block whose mean is not finite keeps its value in ``old_stats``.
  Module-level, with the (hashable) layouts and dtypes static, so that a
  second warm start of the same model reuses the compiled function.

  Returns:
    ``[(stats, number of blocks kept)]``, one per state.
  """
  flat = [_base.flatten_with_paths(g) for g in grads]
  out = []
  for old, blocked in zip(old_stats, all_blocked):
    stats, bad = {}, _zero_count()
    for key, layer, dtype in blocked:
      mean = sum(_mini_blocks.statistic(
          layer, _mini_blocks.vectors(layer, f, dtype)) for f in flat)
      kept, n_bad = _linalg.keep_finite(
          (mean / len(flat)).astype(dtype), old[key][layer.form],
          layer.block_ndim)
      stats[key] = {layer.form: kept}
      bad = bad + n_bad
    out.append((stats, bad))
  return out


def mini_block_fisher_warm_start(
    opt_state: Any,
    grads: Iterable[Any],
    *,
    layers: Mapping[str, _base.LayerStats] | None = None,
) -> Any:
  r"""Starts MBF's statistics from the average over several gradients.

  The released code fills every :math:`F_b` with the mean of
  :math:`S_b(g_j)` over one pass of the training set (with labels sampled
  from the model, a Monte-Carlo Fisher) before training. This does the same
  for the gradients you pass: every
  :class:`ScaleByMiniBlockFisherState` in ``opt_state`` (alone or inside an
  ``optax.chain``) gets :math:`F_b = \frac1n \sum_j S_b(g_j)` and counts the
  ``n`` batches as statistics refreshes, so training continues the average
  with decay ``fisher_decay``; the first step inverts it. A block whose mean
  is not finite keeps its previous value and is counted in ``nonfinite``.

  Args:
    opt_state: the state returned by ``tx.init`` (or later).
    grads: an iterable of gradient pytrees of the same structure as the
      parameters, e.g. from a loss with sampled labels.
    layers: the ``layers=`` passed to the optimizer, if any.

  Returns:
    ``opt_state`` with the statistics replaced.

  Raises:
    ValueError: no gradients, no MBF state, or gradients whose layers do
      not match the state's blocks.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import fisher_optax as fo
    >>> model = nn.Dense(2)
    >>> x = jax.random.normal(jax.random.key(0), (64, 3))
    >>> params = model.init(jax.random.key(1), x)['params']
    >>> loss_fn = lambda p, x: jnp.mean(jnp.sin(model.apply({'params': p}, x)))
    >>> grads = [jax.grad(loss_fn)(params, xb) for xb in jnp.split(x, 4)]
    >>> tx = fo.mini_block_fisher(learning_rate=1e-3)
    >>> opt_state = fo.mini_block_fisher_warm_start(tx.init(params), grads)
    >>> state = opt_state[0]  # the ScaleByMiniBlockFisherState
    >>> int(state.num_stats)  # four batches averaged
    4
  """
  where = 'mini_block_fisher_warm_start'
  is_state = lambda x: isinstance(x, ScaleByMiniBlockFisherState)
  states = [x for x in jax.tree.leaves(opt_state, is_leaf=is_state)
            if is_state(x)]
  if not states:
    raise ValueError(f'{where}: opt_state holds no '
                     'ScaleByMiniBlockFisherState.')
  grads = list(grads)
  if not grads:
    raise ValueError(f'{where}: needs at least one gradient.')

  # Kinds and shapes come from the gradients; each layer's form and block
  # size from the structure and shapes of the state's statistics.
  template = _mini_blocks.layouts(grads[0], layers, None, 'average',
                                  'diagonal', where)

  def blocked_for(state):
    found = {}
    for key, forms in state.stats.items():
      (form, have), = forms.items()
      layer = template.get(key)
      if layer is None:
        raise ValueError(f'{where}: the state has statistics for {key!r} '
                         'but the gradients have no such layer.')
      if form in DENSE_BLOCKS:
        layer = dataclasses.replace(layer, form=form, block=have.shape[-1])
      if layer.shape != have.shape:
        raise ValueError(
            f'{where}: layer {key!r} has {form} statistics {have.shape} in '
            f'the state but {layer.shape} from the gradients; pass the '
            'layers= the optimizer was built with.')
      found[key] = (layer, have.dtype)
    return found

  all_blocked = tuple(tuple((k, layer, dtype) for k, (layer, dtype)
                            in blocked_for(s).items()) for s in states)
  new_stats = iter(_mean_statistics(grads, [s.stats for s in states],
                                    all_blocked))

  def replace(x):
    if not is_state(x):
      return x
    stats, bad = next(new_stats)
    return x._replace(stats=stats, num_stats=x.num_stats + len(grads),
                      nonfinite=x.nonfinite + bad)

  return jax.tree.map(replace, opt_state, is_leaf=is_state)
