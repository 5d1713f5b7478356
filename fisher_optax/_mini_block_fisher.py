r"""Mini-Block Fisher (MBF): a block-diagonal Fisher made of small blocks.

Bahamou, Goldfarb & Ren (AISTATS 2023), as the authors' released code runs
it (``research/mbf_tkfac.md`` §1). MBF needs only the gradient ``g`` of the
mini-batch loss; each layer's weights are cut into many small mini-blocks
``g_b`` and every step, with heavy-ball momentum ``m`` ::

  m <- mu m + g                                   momentum first
  F_b <- rho F_b + (1 - rho) g_b g_b^T            every stats_every steps
  F_b^-1 <- (F_b + lambda I)^-1                   every inverse_every steps
  d_b = F_b^-1 m_b                                 every step

Mini-blocks (Flax layouts):

* conv kernel ``(*window, C_in, C_out)``: one block per (input, output)
  channel pair, the ``k = prod(window)`` weights ``K[..., i, o]``; stacked as
  ``(C_in * C_out, k, k)`` with pair ``(i, o)`` at index ``i * C_out + o``.
  A ``1 x 1`` kernel gives scalar blocks, a diagonal.
* dense kernel ``(I, O)`` with its bias folded in as a last row,
  ``G~ = [dW; db]`` of shape ``(I + 1, O)``: the rows of ``G~`` are the
  blocks (one per input unit). ``dense_blocks='average'`` (the paper's
  "Avg") shares one ``O x O`` matrix ``G~^T G~ / (I + 1)`` between all rows;
  ``'column'`` keeps one matrix per row. ``'chunks'`` is what the released
  code computes for "Avg": its blocks are runs of ``O`` consecutive entries
  of the output-major ``G~^T`` (a raw ``view(I + 1, O)`` of PyTorch's
  ``[dW | db]``), which mixes units; its presets were tuned with it.
  ``block_size`` splits the output axis into diagonal blocks of that size
  (1: a diagonal).
* everything else (conv biases, norm scales and shifts, embeddings,
  parameters no layer owns) goes to the fallback: the released code's Adam
  rule on the momentum, or MBF's own diagonal ``(E[g^2] + lambda)^-1``.

Inverses of every layer run as one batched call per block size
(``_linalg.bucketed``); a block whose inverse is not finite keeps its
previous value and is counted in ``state.nonfinite``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Iterable, Mapping, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import optax

from fisher_optax import _base
from fisher_optax import _linalg

DENSE_BLOCKS = ('average', 'column', 'chunks')
# Dense forms whose rows share one averaged matrix.
_SHARED = ('average', 'chunks')
FALLBACKS = ('adam', 'diagonal')
INVERSE_METHODS = ('cholesky', 'inv', 'eigh')


@dataclasses.dataclass(frozen=True)
class _Layer:
  """Static mini-block layout of one blocked layer (or fallback leaf).

  Attributes:
    key: layer path (param path for a ``'diagonal'`` fallback leaf).
    form: one of ``DENSE_BLOCKS`` (dense), ``'conv'`` or ``'diagonal'``.
    kernel: path of the kernel (or of the fallback leaf).
    bias: path of a dense bias folded in as the last row, or None.
    lead: stack axes (``nn.scan``) shared by every block of the layer.
    rows: number of block vectors: ``I (+1)`` for dense, ``C_in * C_out``
      for conv.
    width: length of a block vector: ``O`` for dense, the window for conv.
    block: block size along ``width``.
  """

  key: str
  form: str
  kernel: str
  bias: str | None
  lead: tuple[int, ...]
  rows: int
  width: int
  block: int

  @property
  def shape(self) -> tuple[int, ...]:
    """Shape of the statistic (and of the cached inverse)."""
    if self.form == 'diagonal':
      return self.lead
    nb = -(-self.width // self.block)
    per_row = () if self.form in _SHARED else (self.rows,)
    return self.lead + per_row + (nb, self.block, self.block)


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
    nonfinite: refreshes or blocks that came out non-finite and were kept
      at their previous value.
  """

  count: jax.Array
  momentum: optax.Updates
  stats: dict[str, dict[str, jax.Array]]
  inverses: dict[str, dict[str, jax.Array]]
  nu: dict[str, jax.Array]
  num_stats: jax.Array
  nonfinite: jax.Array


# ---------------------------------------------------------------------------
# Layouts: which parameters are blocked, and how.


def _layers(params: Any, layers: Mapping[str, _base.LayerStats] | None,
            block_size: int | None, dense_blocks: str, fallback: str,
            where: str) -> dict[str, _Layer]:
  """Blocked layers of ``params``, from ``layers`` metadata or from names.

  Layers in ``layers`` take their kind, stack axes and input axes from its
  metadata. Elsewhere a 2-D ``kernel`` is a dense layer (its sibling
  ``bias`` folded in) and a kernel of 3 or more axes a conv kernel
  ``(*window, C_in, C_out)``; stacked or multi-axis dense kernels need
  ``layers``.
  """
  leaves = _base.flatten_with_paths(params)
  live = {p: leaf for p, leaf in leaves.items() if not _base.is_masked(leaf)}
  out: dict[str, _Layer] = {}

  def add(key, kind, kernel, bias, n_stack, n_in):
    shape = _base.shape_of(live[kernel])
    lead, body = shape[:n_stack], shape[n_stack:]
    if kind == 'conv':
      rows, width = body[-2] * body[-1], math.prod(body[:-2])
      form, block = 'conv', math.prod(body[:-2])
    else:
      rows = math.prod(body[:n_in]) + (bias is not None)
      width = math.prod(body[n_in:])
      form = dense_blocks
      block = width if block_size is None else min(block_size, width)
    out[key] = _Layer(key, form, kernel, bias, lead, rows, width, block)

  captured = set()
  if layers is not None:
    for key, st in _base.check_layer_stats(layers, where).items():
      meta = st.meta
      captured.add(key)
      if meta.kind not in ('dense', 'conv'):
        continue
      kernel = _base.join_path(key, meta.param_name('kernel'))
      if kernel not in leaves:
        raise ValueError(
            f'{where}: layers has {meta.module} {key!r} but the parameters '
            f'have no {kernel!r}; pass the layer_stats of this model.')
      if kernel not in live:
        continue
      want = meta.param_shape(meta.param_name('kernel'))
      if _base.shape_of(live[kernel]) != want:
        raise ValueError(
            f'{where}: parameter {kernel!r} has shape '
            f'{_base.shape_of(live[kernel])} but layers says {want}.')
      bias = meta.param_name('bias')
      bias = _base.join_path(key, bias) if bias else None
      if meta.kind == 'conv' or (bias is not None and bias not in live):
        bias = None
      n_in = len(meta.cfg('in_axes') or (0,))
      add(key, meta.kind, kernel, bias, meta.stack_ndim, n_in)
  # Layers not in `layers`: a 2-D kernel is dense, a larger one a conv.
  for path, leaf in live.items():
    key, name = _base.split_path(path)
    ndim = len(_base.shape_of(leaf))
    if name != 'kernel' or ndim < 2 or key in captured:
      continue
    bias = _base.join_path(key, 'bias')
    if ndim >= 3 or bias not in live or (
        _base.shape_of(live[bias]) != _base.shape_of(leaf)[-1:]):
      bias = None
    add(key, 'conv' if ndim >= 3 else 'dense', path, bias, 0, 1)

  if fallback == 'diagonal':
    blocked = {p for layer in out.values() for p in (layer.kernel,
                                                      layer.bias) if p}
    for path, leaf in live.items():
      if path not in blocked:
        out[path] = _Layer(path, 'diagonal', path, None,
                           _base.shape_of(leaf), 1, 1, 1)
  return out


def _vectors(layer: _Layer, leaves: Mapping[str, jax.Array]) -> jax.Array:
  """The layer's gradient as block vectors ``(*lead, rows, width)``."""
  k = leaves[layer.kernel].astype(jnp.float32)
  if layer.form == 'diagonal':
    return k
  n = len(layer.lead)
  if layer.form == 'conv':
    v = k.reshape(layer.lead + (layer.width, layer.rows))
    return jnp.swapaxes(v, -1, -2)
  v = k.reshape(layer.lead + (-1, layer.width))
  if layer.bias is not None:
    b = leaves[layer.bias].astype(jnp.float32)
    v = jnp.concatenate([v, b.reshape(b.shape[:n] + (1, layer.width))], -2)
  if layer.form == 'chunks':
    # PyTorch's [dW | db] is G~^T; the released code views its memory as
    # (I + 1, O) rows without transposing.
    v = jnp.swapaxes(v, -1, -2).reshape(v.shape)
  return v


def _from_vectors(layer: _Layer, v: jax.Array,
                  like: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Inverse of :func:`_vectors`: ``{param path: array}``."""
  if layer.form == 'diagonal':
    return {layer.kernel: v}
  if layer.form == 'conv':
    v = jnp.swapaxes(v, -1, -2)
    return {layer.kernel: v.reshape(like[layer.kernel].shape)}
  if layer.form == 'chunks':
    v = jnp.swapaxes(v.reshape(v.shape[:-2] + v.shape[:-3:-1]), -1, -2)
  out = {}
  if layer.bias is not None:
    out[layer.bias] = v[..., -1, :].reshape(like[layer.bias].shape)
    v = v[..., :-1, :]
  out[layer.kernel] = v.reshape(like[layer.kernel].shape)
  return out


# ---------------------------------------------------------------------------
# The three stages: statistics, inverses, preconditioning.


def _statistic(layer: _Layer, v: jax.Array) -> jax.Array:
  """Mini-block second moments of block vectors ``v``."""
  if layer.form == 'diagonal':
    return jnp.square(v)
  if layer.form in _SHARED:
    # V^T V / rows, in diagonal blocks of the output axis.
    return _linalg.block_outer(v, layer.block)
  return _linalg.block_outer(v[..., None, :], layer.block)


def _inverses(layers: Mapping[str, _Layer], stats, damping, method: str):
  """``(F + damping I)^-1`` of every block; scalar blocks elementwise."""
  out, blocks = {}, {}
  for key, layer in layers.items():
    f = stats[key][layer.form]
    if layer.block == 1:
      out[key] = 1.0 / (f + damping)
    else:
      blocks[key] = f
  out.update(_linalg.bucketed(
      lambda s, d: _linalg.damped_inverse(s, d, method), blocks,
      {k: jnp.asarray(damping, jnp.float32) for k in blocks}))
  return out


def _precondition(layer: _Layer, inverse: jax.Array, v: jax.Array):
  """Blockwise ``F^-1 v`` for block vectors ``v``."""
  if layer.form == 'diagonal':
    return inverse * v
  if layer.block == 1:
    # Scalar blocks: (..., [rows,] nb, 1, 1) is a diagonal over the width.
    scale = inverse[..., 0, 0]
    return v * (scale[..., None, :] if layer.form in _SHARED else scale)
  if layer.form in _SHARED:
    return _linalg.block_apply(inverse, v, 'right')
  return _linalg.block_apply(inverse, v[..., None, :], 'right')[..., 0, :]


def scale_by_mini_block_fisher(
    damping: jax.typing.ArrayLike = 1e-3,
    fisher_decay: jax.typing.ArrayLike = 0.9,
    momentum: jax.typing.ArrayLike = 0.9,
    *,
    stats_every: int = 1,
    inverse_every: int = 20,
    block_size: int | None = None,
    dense_blocks: str = 'average',
    inverse_method: str = 'inv',
    fallback: str = 'adam',
    fallback_b2: jax.typing.ArrayLike = 0.999,
    fallback_eps: jax.typing.ArrayLike = 1e-8,
    layers: Mapping[str, _base.LayerStats] | None = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Precondition by the Mini-Block Fisher; see :func:`mini_block_fisher`.

  Caller contract: ``update(updates, state, params=None, layer_stats=None)``;
  ``layer_stats`` is optional (MBF needs only gradients); when given, its
  layer kinds are checked against the blocks ``init`` chose.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`.
  """
  where = 'scale_by_mini_block_fisher'
  _base.check_options(
      where, periods={'stats_every': stats_every,
                      'inverse_every': inverse_every},
      block_size=block_size,
      choices={'dense_blocks': (dense_blocks, DENSE_BLOCKS),
               'fallback': (fallback, FALLBACKS),
               'inverse_method': (inverse_method, INVERSE_METHODS)})

  def layers_for(tree):
    return _layers(tree, layers, block_size, dense_blocks, fallback, where)

  def init_fn(params):
    blocked = layers_for(params)
    covered = {p for layer in blocked.values()
               for p in (layer.kernel, layer.bias) if p}
    zeros = lambda layer: {layer.form: jnp.zeros(layer.shape, jnp.float32)}
    return ScaleByMiniBlockFisherState(
        count=jnp.zeros([], jnp.int32),
        momentum=jax.tree.map(jnp.zeros_like, params),
        stats={k: zeros(layer) for k, layer in blocked.items()},
        inverses={k: zeros(layer) for k, layer in blocked.items()},
        nu={p: jnp.zeros(_base.shape_of(leaf), jnp.float32)
            for p, leaf in _base.flatten_with_paths(params).items()
            if p not in covered and not _base.is_masked(leaf)},
        num_stats=jnp.zeros([], jnp.int32),
        nonfinite=jnp.zeros([], jnp.int32),
    )

  def check(blocked, state, layer_stats, frozen):
    for key, layer in blocked.items():
      have = state.stats.get(key, {}).get(layer.form)
      if have is None or have.shape != layer.shape:
        raise ValueError(
            f'{where}: layer {key!r} needs {layer.form} statistics of shape '
            f'{layer.shape} but the state holds '
            f'{jax.tree.map(jnp.shape, state.stats.get(key))}; init and '
            'update saw different parameter trees.')
    if layer_stats is None:
      return
    for key, st in _base.check_layer_stats(layer_stats, where).items():
      kind = st.meta.kind
      want = 'conv' if kind == 'conv' else dense_blocks
      got = blocked.get(key)
      if key in frozen:
        continue
      if kind in ('dense', 'conv') and (got is None or got.form != want
                                        or len(got.lead) != st.meta.stack_ndim):
        raise ValueError(
            f'{where}: layer {key!r} is a {kind} layer ({st.meta.module}, '
            f'{st.meta.stack_ndim} stack axes) but init(params) blocked it as'
            f' {got.form if got else "fallback"}; stacked or multi-axis '
            'layers cannot be inferred from parameters. Build the optimizer '
            'with layers=jax.eval_shape(step_fn, params, *batch)[2].')

  def update_fn(updates, state, params=None, *, layer_stats=None,
                **extra_args):
    del params, extra_args
    blocked = layers_for(updates)
    paths, grads, treedef = _base.flatten_leaves(updates)
    _, moms, _ = _base.flatten_leaves(state.momentum)
    live = [not _base.is_masked(g) for g in grads]
    frozen = {_base.split_path(p)[0] for p, ok in zip(paths, live) if not ok}
    check(blocked, state, layer_stats, frozen)
    g32 = {p: g.astype(jnp.float32) for p, g, ok in zip(paths, grads, live)
           if ok}
    if axis_name is not None:
      g32 = lax.pmean(g32, axis_name)
    moms = [m if not ok else (momentum * m + g32[p]).astype(m.dtype)
            for p, m, ok in zip(paths, moms, live)]
    m32 = {p: m.astype(jnp.float32) for p, m, ok in zip(paths, moms, live)
           if ok}

    def refresh_stats(old):
      first = state.num_stats == 0
      weight = jnp.where(first, 1.0, 1.0 - fisher_decay)
      new, bad = {}, jnp.zeros([], jnp.int32)
      for key, layer in blocked.items():
        fresh = _statistic(layer, _vectors(layer, g32))
        finite = jnp.all(jnp.isfinite(fresh))
        o = old[key][layer.form]
        new[key] = {layer.form: jnp.where(
            finite, (1 - weight) * o + weight * fresh, o)}
        bad = bad + (~finite).astype(jnp.int32)
      return new, bad

    def refresh_inverses(stats, old):
      fresh = _inverses(blocked, stats, damping, inverse_method)
      new, bad = {}, jnp.zeros([], jnp.int32)
      for key, layer in blocked.items():
        ndim = 0 if layer.form == 'diagonal' else 2
        kept, n_bad = _linalg.keep_finite(
            fresh[key].astype(jnp.float32), old[key][layer.form], ndim)
        new[key] = {layer.form: kept}
        bad = bad + n_bad
      return new, bad

    stats, inverses = state.stats, state.inverses
    num_stats, nonfinite = state.num_stats, state.nonfinite
    if blocked:
      do_stats = state.count % stats_every == 0
      # As the released code: while the first inverse period lasts, invert
      # after every statistics refresh, so early steps see current curvature.
      do_inverse = (state.count % inverse_every == 0) | (
          do_stats & (state.count < inverse_every))
      stats, bad_stats = lax.cond(
          do_stats, refresh_stats,
          lambda old: (old, jnp.zeros([], jnp.int32)), state.stats)
      inverses, bad_inv = lax.cond(
          do_inverse, refresh_inverses,
          lambda s, old: (old, jnp.zeros([], jnp.int32)),
          stats, state.inverses)
      num_stats = num_stats + do_stats.astype(jnp.int32)
      nonfinite = nonfinite + bad_stats + bad_inv

    direction = {}
    for key, layer in blocked.items():
      d = _precondition(layer, inverses[key][layer.form],
                        _vectors(layer, m32))
      direction.update(_from_vectors(layer, d, m32))

    # Fallback (Adam): the released code's rule, but with the second moment
    # of the gradient rather than of the averaged momentum.
    count_inc = optax.safe_increment(state.count)
    nu = {}
    for path, v in state.nu.items():
      nu[path], denom = _base.adam_denominator(
          v, g32[path], count_inc, fallback_b2, fallback_eps)
      direction[path] = (1 - momentum) * m32[path] / denom

    out = [g if not ok else direction[p].astype(g.dtype)
           for p, g, ok in zip(paths, grads, live)]
    unflatten = lambda leaves: jax.tree_util.tree_unflatten(treedef, leaves)
    return unflatten(out), ScaleByMiniBlockFisherState(
        count=count_inc, momentum=unflatten(moms), stats=stats,
        inverses=inverses, nu=nu, num_stats=num_stats, nonfinite=nonfinite)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def mini_block_fisher(
    learning_rate: optax.ScalarOrSchedule = 1e-4,
    damping: jax.typing.ArrayLike = 1e-3,
    fisher_decay: jax.typing.ArrayLike = 0.9,
    momentum: jax.typing.ArrayLike = 0.9,
    weight_decay: jax.typing.ArrayLike = 0.0,
    *,
    stats_every: int = 1,
    inverse_every: int = 20,
    block_size: int | None = None,
    dense_blocks: str = 'average',
    inverse_method: str = 'inv',
    fallback: str = 'adam',
    fallback_b2: jax.typing.ArrayLike = 0.999,
    fallback_eps: jax.typing.ArrayLike = 1e-8,
    layers: Mapping[str, _base.LayerStats] | None = None,
    axis_name: str | None = None,
    mask: Any = None,
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
    one block per row :math:`\tilde g_r`. With ``dense_blocks='average'``
    (the paper's "Avg") all rows share one matrix,
    :math:`S = \tilde G^\top \tilde G / (I+1)`; with ``'column'`` each row
    keeps its own :math:`\tilde g_r \tilde g_r^\top` (memory
    :math:`(I+1) O^2`). ``'chunks'`` is the released code's "Avg": the same
    average over :math:`I+1` vectors of length :math:`O`, but the vectors
    are runs of :math:`O` consecutive entries of :math:`\tilde G^\top`
    flattened row by row, so each mixes several units. The released presets
    were tuned with it; a mean gradient :math:`\tilde G` is close to rank
    one, so the true-row average has almost all eigenvalues below
    :math:`\lambda` and needs a much larger damping (see
    ``docs/mini_block_fisher.md``). ``block_size`` keeps only the diagonal
    blocks of that size along the output axis: 1 is a diagonal, ``None``
    (or :math:`O`) the full output-side block.

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
  biases, norm scales and shifts, embeddings) use ``fallback='adam'``,
  :math:`d = (1-\mu) m / (\sqrt{\hat v} + \epsilon)` with :math:`v` Adam's
  bias-corrected second moment of :math:`g` (the released code's rule,
  which squares the averaged momentum instead), or ``'diagonal'``,
  MBF's own :math:`(F + \lambda)^{-1} m` with scalar blocks.

  :math:`S_b` uses the mini-batch gradient, not per-example gradients, as
  the released code: for a mean loss over :math:`B` examples it is about
  the per-example empirical Fisher divided by :math:`B`, plus the squared
  mean. Learning rates and damping are on that scale (the released MNIST
  autoencoder preset: :math:`\alpha = 10^{-5}`, :math:`\lambda = 3 \cdot
  10^{-4}` with ``dense_blocks='chunks'`` and a loss summed over pixels).
  Where the gradient is small against :math:`\lambda` the step tends to
  :math:`\alpha m / \lambda`: heavy-ball SGD with learning rate
  :math:`\alpha / \lambda`, which must stay stable.

  Layer kinds come from parameter names and shapes: a 2-D ``kernel`` is
  dense, a kernel with 3 or more axes a conv. Stacked (``nn.scan``) or
  multi-axis (``DenseGeneral``) kernels need ``layers=``, the
  ``layer_stats`` of one step (``jax.eval_shape`` is enough); when
  ``update`` receives ``layer_stats`` they are checked against these.

  Args:
    learning_rate: :math:`\alpha`, a scalar or a schedule.
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
    fallback: ``'adam'`` or ``'diagonal'``, for parameters in no block.
    fallback_b2: second-moment decay of the Adam fallback.
    fallback_eps: epsilon of the Adam fallback.
    layers: ``layer_stats`` of one step, for stacked or multi-axis layers.
    axis_name: data-parallel axis to ``pmean`` gradients over under
      ``shard_map``/``pmap`` (a no-op if they are already averaged).
    mask: weight-decay mask.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; ``update`` accepts
    (and does not need) ``layer_stats=``.

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
  return optax.chain(
      scale_by_mini_block_fisher(
          damping, fisher_decay, momentum, stats_every=stats_every,
          inverse_every=inverse_every, block_size=block_size,
          dense_blocks=dense_blocks, inverse_method=inverse_method,
          fallback=fallback, fallback_b2=fallback_b2,
          fallback_eps=fallback_eps, layers=layers, axis_name=axis_name),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


@functools.partial(jax.jit, static_argnums=1)
def _mean_statistics(grads, all_blocked):
  """Mean of every layer's statistic over ``grads``, per MBF state.

  Module-level, with the (hashable) layouts static, so that a second warm
  start of the same model reuses the compiled function.
  """
  flat = [_base.flatten_with_paths(g) for g in grads]
  return [{key: {layer.form: sum(_statistic(layer, _vectors(layer, f))
                                 for f in flat) / len(flat)}
           for key, layer in blocked} for blocked in all_blocked]


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
  with decay ``fisher_decay``; the first step inverts it.

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
  template = _layers(grads[0], layers, None, 'average', 'diagonal', where)

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
      found[key] = layer
    return found

  all_blocked = tuple(tuple(blocked_for(s).items()) for s in states)
  new_stats = iter(_mean_statistics(grads, all_blocked))

  def replace(x):
    if not is_state(x):
      return x
    return x._replace(stats=next(new_stats),
                      num_stats=x.num_stats + len(grads))

  return jax.tree.map(replace, opt_state, is_leaf=is_state)
