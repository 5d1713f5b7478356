"""The Kronecker engine shared by K-FAC, EKFAC, TKFAC and TEKFAC.

Each captured dense or conv layer is preconditioned by the inverse of a
damped Kronecker product ``C_in (x) C_out`` acting on its bias-augmented
weight matrix ``W`` (``d_in x d_out``): ``W <- C_in^-1 W C_out^-1``. An
:class:`Algorithm` says which statistics of the layer's rows to average and
how to turn them into ``C_in`` and ``C_out``; this module does the rest, the
same way for every algorithm, in named stages that follow the papers'
Algorithm boxes:

* :func:`refresh_statistics` (every ``stats_every`` steps): statistics of
  each layer's rows (``_stats.kronecker_rows``; of one example in every
  ``1 / stats_fraction``, ``_stats.subsample_examples``) averaged with
  decay ``fisher_decay`` (:func:`average_weight`);
  :func:`refresh_norm_diagonals` does the same for norm layers' diagonal Fisher;
* :func:`refresh_inverses` (every ``inverse_every`` steps): the damped
  factors inverted (or eigendecomposed), every factor of every layer that
  has the same block size in one batched call (``_linalg.bucketed``);
  ``block_size`` splits large factors into diagonal blocks;
  ``damping_mode='factored'`` damps each factor (the algorithm chooses the
  split), ``'eigen'`` damps exactly in the factors' eigenbasis:
  ``(s_in (x) s_out + damping)^-1``; EKFAC/TEKFAC re-measure their scaling
  (:func:`measure_scaling`) in the new basis;
* :func:`precondition_layers` (every step), with :func:`eigen_damping`
  for TEKFAC's adaptive damping; then momentum (:func:`first_moment`,
  heavy ball).

Any statistic, inverse, eigenbasis or scaling that is not finite keeps its
previous value and is counted in ``state.nonfinite``. Embeddings use a
diagonal input factor (one-hot inputs); norm layers and parameters no layer
covers use a diagonal (``damping`` added) and Adam, respectively. Masked
(frozen) parameters are ignored: a frozen kernel leaves its layer out, a
frozen bias makes the layer bias-less. Statistics use
``_base.stats_dtype(kernel)`` (float64 for float64 kernels).

Factor shapes depend on the layer kind and on stack axes (``nn.scan``),
which ``init(params)`` cannot see. It guesses them from the parameters
(``_base.guess_kernels``: a bias has the shape of its layer's outputs, a
stack puts the same leading axes on kernel and bias; an ``embedding`` is a
table); for the few layers it guesses wrong pass ``layers=`` (the
statistics of one step, e.g. ``jax.eval_shape(step_fn, params,
batch)[2]``). A mismatch is an error naming the layer. Everything that
depends on the model lives in the state (the layers with curvature state
are ``state.stats``' keys), so one optimizer object serves several models.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import optax

from fisher_optax import _base
from fisher_optax import _linalg
from fisher_optax import _pairing
from fisher_optax import _sharding
from fisher_optax import _stats


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static shape of one layer's Kronecker factors.

  Attributes:
    key: layer path.
    kind: ``'kron'`` (dense, conv) or ``'embed'`` (diagonal input side).
    kernel: name of the kernel (or embedding table) parameter.
    bias: name of the bias parameter, or None.
    lead: leading axes of every factor: stack axes, then conv groups.
    n_stack: number of stack axes in ``lead``.
    n_in: number of kernel axes (after the stack) on the input side.
    d_in: input-side size, bias row included (vocabulary for embeddings).
    d_out: output-side size of one group.
    conv: whether the layer is a convolution.
  """

  key: str
  kind: str
  kernel: str
  bias: str | None
  lead: tuple[int, ...]
  n_stack: int
  n_in: int
  d_in: int
  d_out: int
  conv: bool = False


def layout_from_meta(key: str, meta: _base.LayerMeta,
                     frozen: frozenset[str] = frozenset()) -> Layout | None:
  """The exact layout of a captured layer.

  Args:
    key: the layer's path.
    meta: its metadata.
    frozen: names of its parameters that are masked (``optax.masked``,
      ``optax.multi_transform``): a frozen kernel or table leaves nothing to
      precondition, a frozen bias makes the layer bias-less.

  Returns:
    The layout, or None for norm layers and frozen kernels.
  """
  k = meta.stack_ndim
  if meta.kind == 'embed':
    if meta.param_name('embedding') in frozen:
      return None
    table = meta.param_shape(meta.param_name('embedding'))
    return Layout(key, 'embed', meta.param_name('embedding'), None,
                  table[:k] + (1,), k, 1, table[k], table[-1])
  if meta.kind not in ('dense', 'conv'):
    return None
  name = meta.param_name('kernel')
  if name in frozen:
    return None
  kernel = meta.param_shape(name)
  bias = meta.param_name('bias')
  if bias in frozen:
    bias = None
  if meta.kind == 'conv':
    groups = meta.cfg('groups')
    n_in = len(kernel) - k - 1
    d_out = kernel[-1] // groups
  else:
    groups = 1
    n_in = len(meta.cfg('in_axes') or (0,))
    d_out = math.prod(kernel[k + n_in:])
  d_in = math.prod(kernel[k:k + n_in]) + (bias is not None)
  return Layout(key, 'kron', name, bias, kernel[:k] + (groups,), k, n_in,
                d_in, d_out, meta.kind == 'conv')


def infer_layouts(params: Any) -> dict[str, Layout]:
  """Layouts guessed from parameter names and shapes (``_base.guess_kernels``).
  """
  leaves = {p: leaf for p, leaf in _base.flatten_with_paths(params).items()
            if not _base.is_masked(leaf)}
  out = {}
  for key, guess in _base.guess_kernels(leaves).items():
    shape = _base.shape_of(leaves[guess.kernel])
    k, n_in = guess.n_stack, guess.n_in
    out[key] = Layout(key, 'kron', _base.split_path(guess.kernel)[1],
                      None if guess.bias is None else 'bias',
                      shape[:k] + (1,), k, n_in,
                      math.prod(shape[k:k + n_in]) + (guess.bias is not None),
                      math.prod(shape[k + n_in:]), guess.conv)
  for path, leaf in leaves.items():
    key, name = _base.split_path(path)
    shape = _base.shape_of(leaf)
    if name == 'embedding' and len(shape) == 2:
      out[key] = Layout(key, 'embed', name, None, (1,), 0, 1, shape[0],
                        shape[1])
  return out


class Factors(NamedTuple):
  """Undamped Kronecker factors of one layer and their damping.

  ``c_in`` / ``c_out`` are blocks ``(*lead, nb, b, b)`` (``c_in`` is
  ``(*lead, V)`` for embeddings); ``damp_in`` / ``damp_out`` (``lead``
  shaped) are added to their diagonals for ``damping_mode='factored'``;
  ``exact`` is added to the eigenvalue products for ``'eigen'``.
  """

  c_in: jax.Array
  c_out: jax.Array
  damp_in: jax.Array
  damp_out: jax.Array
  exact: jax.Array


class Algorithm(NamedTuple):
  """What a Kronecker method averages and how it builds its factors.

  Attributes:
    name: for messages (``'kfac'``, ``'tkfac'``).
    statistics: ``statistics(rows, layout, block_size) -> {name: array}``;
      ``rows`` is a :class:`~fisher_optax._stats.KroneckerRows` (for
      embeddings ``rows.a`` holds integer ids ``(*lead, N)``). Input-side
      arrays are ``(*lead, nb, b, b)`` blocks (``(*lead, V)`` for
      embeddings), shaped as ``shapes`` says.
    shapes: ``shapes(layout, block_in, block_out) -> {name: shape}``.
    factors: ``factors(stats, layout, damping) -> Factors``: the undamped
      factors and how to damp them.
    adaptive_conv: with ``eigen_correction``, damp each conv layer by
      TEKFAC's Eq. 3.5, ``max(tr Theta, damping dim Theta) / dim Theta``
      from the current scaling ``Theta`` (see :func:`eigen_damping`).
  """

  name: str
  statistics: Callable[..., dict[str, jax.Array]]
  shapes: Callable[..., dict[str, tuple[int, ...]]]
  factors: Callable[..., Factors]
  adaptive_conv: bool = False


def block_shape(d: int, block_size: int | None) -> tuple[int, int]:
  """``(nb, b)`` of a factor of size ``d`` split into ``block_size`` blocks."""
  b = d if block_size is None else min(block_size, d)
  return -(-d // b), b


class KroneckerState(NamedTuple):
  """State of :func:`fisher_optax.scale_by_kfac` / ``scale_by_tkfac``.

  Everything that depends on the model lives here (one optimizer object
  serves any number of models): the layers with curvature state are the
  keys of ``stats``. Statistics and inverses use
  ``_base.stats_dtype(kernel)``: float32 for bfloat16 or float32 kernels,
  float64 for float64 ones.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import fisher_optax as fo
    >>> model = nn.Dense(2)
    >>> x = jax.random.normal(jax.random.key(0), (16, 3))
    >>> params = model.init(jax.random.key(1), x)['params']
    >>> loss_fn = lambda p: jnp.mean(jnp.sin(model.apply({'params': p}, x)))
    >>> _, grads, stats = fo.linen.value_grad_and_stats(loss_fn)(params)
    >>> tx = fo.kfac(learning_rate=0.1)
    >>> _, opt_state = tx.update(grads, tx.init(params), params,
    ...                          layer_stats=stats)
    >>> state, = [s for s in opt_state if isinstance(s, fo.KroneckerState)]
    >>> int(state.count), int(state.nonfinite)
    (1, 0)
    >>> jax.tree.map(jnp.shape, state.stats)  # 3 inputs and a bias, 2 outputs
    {'': {'A': (1, 1, 4, 4), 'G': (1, 1, 2, 2)}}
  """

  count: jax.Array  # shape=(), int32.
  mu: optax.Updates  # momentum, like params.
  nu: optax.Updates  # diagonal second moments (norm layers, fallback).
  stats: dict[str, dict[str, jax.Array]]  # per layer: averaged statistics.
  precond: dict[str, dict[str, jax.Array]]  # inverses or eigenbases.
  nonfinite: jax.Array  # shape=(), int32: values kept for NaN/Inf.


def _precond_shapes(layout: Layout, block_in, block_out, damping_mode,
                    eigen_correction=False):
  nb_o, b_o = block_shape(layout.d_out, block_out)
  out = {}
  if eigen_correction:
    nb_i, b_i = block_shape(layout.d_in, block_in)
    p_in = layout.d_in if layout.kind == 'embed' else nb_i * b_i
    out['scaling'] = layout.lead + (p_in, nb_o * b_o)
  if layout.kind == 'embed':
    out['in_vals'] = layout.lead + (layout.d_in,)
  else:
    nb_i, b_i = block_shape(layout.d_in, block_in)
    if damping_mode == 'eigen':
      out['in_vecs'] = layout.lead + (nb_i, b_i, b_i)
      out['in_vals'] = layout.lead + (nb_i, b_i)
    else:
      out['in_inv'] = layout.lead + (nb_i, b_i, b_i)
  if damping_mode == 'eigen':
    out['out_vecs'] = layout.lead + (nb_o, b_o, b_o)
    out['out_vals'] = layout.lead + (nb_o, b_o)
    out['damping'] = layout.lead
  else:
    out['out_inv'] = layout.lead + (nb_o, b_o, b_o)
  return out


def to_matrix(layout: Layout, kernel, bias):
  """Kernel (and bias) gradients as ``(*lead, d_in, d_out)`` matrices."""
  k = layout.n_stack
  stack = layout.lead[:k]
  groups = layout.lead[-1]
  d_in = layout.d_in - (layout.bias is not None)
  w = kernel.reshape(stack + (d_in, groups, layout.d_out))
  w = jnp.moveaxis(w, -2, -3)
  if layout.bias is not None:
    b = bias.reshape(stack + (groups, 1, layout.d_out))
    w = jnp.concatenate([w, b.astype(w.dtype)], axis=-2)
  return w


def _from_matrix(layout: Layout, w, kernel_shape, bias_shape):
  k = layout.n_stack
  stack = layout.lead[:k]
  bias = None
  if layout.bias is not None:
    w, bias = w[..., :-1, :], w[..., -1:, :]
    bias = bias.reshape(bias_shape)
  w = jnp.moveaxis(w, -3, -2).reshape(kernel_shape)
  del stack
  return w, bias


# Trailing axes that form one block of each cached array (for keep_finite).
_BLOCK_NDIM = {'in_vals': 1, 'out_vals': 1, 'damping': 0}


def _pad_to(w, axis: int, size: int):
  pad = [(0, 0)] * w.ndim
  pad[axis] = (0, size - w.shape[axis])
  return jnp.pad(w, pad)


def _full(vals):
  """Eigenvalues of all blocks, ``(..., nb, b) -> (..., nb * b)``."""
  return vals.reshape(vals.shape[:-2] + (-1,))


def precondition(layout: Layout, precond: Mapping[str, jax.Array], w,
                 damping_mode: str, *, eigen_damping=None):
  """``C_in^-1 w C_out^-1`` with cached inverses or eigenbases.

  Args:
    layout: the layer's layout.
    precond: its cached inverses (``'factored'``) or eigenbases.
    w: its gradient as ``(*lead, d_in, d_out)`` matrices.
    damping_mode: ``'factored'`` or ``'eigen'``.
    eigen_damping: ``'eigen'`` only: a ``lead``-shaped damping that replaces
      the cached ``precond['damping']`` (TEKFAC's adaptive damping).

  Returns:
    The preconditioned ``w``.
  """
  if damping_mode == 'eigen':
    damping = (precond['damping'] if eigen_damping is None
               else eigen_damping)[..., None, None]
    # Rotate, divide and rotate back in the padded space: eigh sorts the
    # eigenvalues of a padded block, so padding can sit in any slot.
    out_vecs = precond['out_vecs']
    w = _pad_to(w, -1, out_vecs.shape[-3] * out_vecs.shape[-1])
    if layout.kind == 'embed':
      s_in = precond['in_vals']
    else:
      in_vecs = precond['in_vecs']
      w = _pad_to(w, -2, in_vecs.shape[-3] * in_vecs.shape[-1])
      w = _linalg.block_apply(jnp.swapaxes(in_vecs, -1, -2), w, 'left')
      s_in = _full(precond['in_vals'])
    w = _linalg.block_apply(out_vecs, w, 'right')
    if 'scaling' in precond:  # eigenvalue-corrected (EKFAC, TEKFAC)
      w = w / (precond['scaling'] + damping)
    else:
      s_out = _full(precond['out_vals'])
      w = w / (s_in[..., :, None] * s_out[..., None, :] + damping)
    if layout.kind != 'embed':
      w = _linalg.block_apply(precond['in_vecs'], w, 'left')
    w = _linalg.block_apply(jnp.swapaxes(out_vecs, -1, -2), w, 'right')
    return w[..., :layout.d_in, :layout.d_out]
  if layout.kind == 'embed':
    w = w * precond['in_vals'][..., :, None]
  else:
    w = _linalg.block_apply(precond['in_inv'], w, 'left')
  return _linalg.block_apply(precond['out_inv'], w, 'right')


def measure_scaling(layout: Layout, rows, precond, per_example: bool = True):
  """Diagonal of the layer's empirical Fisher in the factors' eigenbasis.

  George et al. (2018), Algorithm 1: ``S = E_n[(U_in^T G_n U_out)^2]``,
  the second moment of the per-example gradients ``G_n = sum_t a_t g_t^T``
  rotated into the eigenbasis (the best diagonal, in Frobenius norm, of the
  Fisher there). For convolutions ``per_example=False`` gives the
  location-expanded form instead, ``T mean_r (U_in^T a_r)^2 (U_out^T
  g_r)^2^T``, which squares each position's term before summing and so
  drops the cross-position terms. Dense layers and embeddings always use
  the row form (one row per example unless a layer is shared or applied to
  tokens). Shape ``(*lead, P_in, P_out)`` with padded sizes.
  """
  out_vecs = precond['out_vecs']
  g = _pad_to(rows.g, -1, out_vecs.shape[-3] * out_vecs.shape[-1])
  g = _linalg.block_apply(out_vecs, g, 'right')
  n = rows.g.shape[-2]
  if layout.kind == 'embed':
    g2 = jnp.square(g)
    flat_ids = rows.a.reshape((-1, rows.a.shape[-1]))
    flat_g2 = g2.reshape((-1,) + g2.shape[-2:])
    s = jax.vmap(lambda i, v: jnp.zeros(
        (layout.d_in, v.shape[-1]), v.dtype).at[i].add(v))(flat_ids, flat_g2)
    return rows.positions * s.reshape(layout.lead + s.shape[1:]) / n
  in_vecs = precond['in_vecs']
  a = _pad_to(rows.a, -1, in_vecs.shape[-3] * in_vecs.shape[-1])
  a = _linalg.block_apply(in_vecs, a, 'right')
  if per_example and layout.conv and rows.positions > 1:
    # Rows are ordered (call, example, position): one example's gradient
    # sums its positions in every call.
    per = rows.positions // rows.calls
    batch = n // rows.positions
    split = lambda x: x.reshape(x.shape[:-2] + (
        rows.calls, batch, per, x.shape[-1]))
    grad = jnp.einsum('...cbpi,...cbpj->...bij', split(a), split(g),
                      precision=lax.Precision.HIGHEST)
    return jnp.mean(jnp.square(grad), axis=-3)
  s = jnp.einsum('...ni,...nj->...ij', jnp.square(a), jnp.square(g),
                 precision=lax.Precision.HIGHEST)
  return rows.positions * s / n


# ----------------------------------------------------------------------------
# The stages of one step, in the order of the papers' Algorithm boxes:
# statistics (every stats_every steps), inverses (every inverse_every steps),
# preconditioning, momentum.


@dataclasses.dataclass(frozen=True, eq=False)
class Options:
  """Hyperparameters of :func:`scale_by_kronecker` (numbers may be traced).

  Attributes mirror the arguments of :func:`fisher_optax.kfac`; ``where`` is
  the factory's name for messages.
  """

  where: str
  damping: Any
  fisher_decay: Any
  momentum: Any
  stats_every: int
  inverse_every: int
  block_size: int | None
  damping_mode: str
  momentum_style: str
  loss_reduction: str
  inverse_method: str
  fallback_b2: Any
  fallback_eps: Any
  axis_name: str | None
  eigen_correction: bool
  decay_schedule: str
  conv_scaling: str
  dense_damping: str
  spread_inverses: str | None = None
  weight_sharing: str = 'expand'
  stats_fraction: float | None = None


def sample_period(stats_fraction: float | None) -> int:
  """``1 / stats_fraction`` (an integer, see :func:`check_stats_fraction`);
  1 for None, every example."""
  return 1 if stats_fraction is None else round(1.0 / stats_fraction)


def average_weight(opts: Options, count) -> jax.Array:
  """Weight of the fresh statistics in the average at step ``count``.

  1 on the first refresh, then ``1 - fisher_decay``; with
  ``decay_schedule='martens'`` the decay is Martens & Grosse's
  ``min(1 - 1/k, fisher_decay)`` for the ``k``-th refresh, i.e. a plain mean
  of the first refreshes.
  """
  decay = opts.fisher_decay
  if opts.decay_schedule == 'martens':
    k = (count // opts.stats_every + 1).astype(jnp.float32)
    decay = jnp.minimum(1.0 - 1.0 / k, decay)
  return jnp.where(count == 0, 1.0, 1.0 - decay)


def layer_rows(opts: Options, st: _base.LayerStats, layout: Layout, dtype,
               refresh):
  """The layer's :class:`~fisher_optax._stats.KroneckerRows` in ``dtype``.

  With ``stats_fraction < 1`` the rows are those of the examples that the
  statistics refresh ``refresh`` samples (:func:`_stats.subsample_examples`);
  their cotangents keep the scale of the whole batch's loss.
  """
  k = st.meta.stack_ndim
  loss_batch = st.a.shape[k + 1]
  st = _stats.subsample_examples(st, sample_period(opts.stats_fraction),
                                 refresh)
  if st.meta.kind == 'embed':
    ids = st.a.reshape(st.a.shape[:k] + (1, -1)).astype(jnp.int32)
    batch = st.a.shape[k + 1]
    scale = float(loss_batch) if opts.loss_reduction == 'mean' else 1.0
    g = st.g.astype(dtype).reshape(ids.shape + (st.g.shape[-1],)) * scale
    return _stats.KroneckerRows(ids, g, ids.shape[-1] // batch,
                                st.a.shape[k])
  rows = _stats.kronecker_rows(st, opts.loss_reduction,
                               with_bias=layout.bias is not None,
                               weight_sharing=opts.weight_sharing,
                               loss_batch=loss_batch)
  return rows._replace(a=rows.a.astype(dtype), g=rows.g.astype(dtype))


def _dtype(layer_state: Mapping[str, jax.Array]):
  return next(iter(layer_state.values())).dtype


def _pmean(opts: Options, tree):
  if opts.axis_name is None:
    return tree
  return jax.tree.map(lambda x: lax.pmean(x, opts.axis_name), tree)


def refresh_statistics(algorithm: Algorithm, opts: Options, layouts,
                       layer_stats, stats, precond, count):
  """Averages each layer's fresh statistics into ``stats``.

  EKFAC/TEKFAC also average the scaling measured in the current basis.
  A layer whose fresh statistics are not all finite keeps its previous
  ones and counts one event.

  Returns:
    ``(stats, scaling, num_bad)``; ``scaling`` is ``{}`` without
    ``eigen_correction``.
  """
  weight = average_weight(opts, count)
  new, scaling, bad = {}, {}, jnp.zeros([], jnp.int32)
  for key, layout in layouts.items():
    dtype = _dtype(stats[key])
    rows = layer_rows(opts, layer_stats[key], layout, dtype,
                      count // opts.stats_every)
    fresh = algorithm.statistics(rows, layout, opts.block_size)
    old = dict(stats[key])
    if opts.eigen_correction:
      fresh['scaling'] = measure_scaling(
          layout, rows, precond[key], opts.conv_scaling == 'per_example')
      old['scaling'] = precond[key]['scaling']
    fresh = _pmean(opts, fresh)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                                for x in fresh.values()]))
    bad = bad + (~finite).astype(jnp.int32)
    avg = {n: jnp.where(finite, (1 - weight) * o + weight * fresh[n],
                        o).astype(o.dtype) for n, o in old.items()}
    if opts.eigen_correction:
      scaling[key] = avg.pop('scaling')
    new[key] = avg
  return new, scaling, bad


def refresh_inverses(algorithm: Algorithm, opts: Options, layouts,
                     layer_stats, stats, precond, count):
  """Damped inverses (or eigenbases) of every layer's factors.

  All blocks of one size, across layers, are factorised in one batched
  call. A block whose result is not finite keeps its previous value and is
  counted. EKFAC/TEKFAC measure the scaling afresh in the new basis.

  Returns:
    ``(precond, num_bad)``.
  """
  blocks, extra, diag, exact = {}, {}, {}, {}
  for key, layout in layouts.items():
    c_in, c_out, d_in, d_out, exact[key] = algorithm.factors(
        stats[key], layout, opts.damping)
    if layout.kind == 'embed':
      diag[key] = (c_in, d_in)
    else:
      blocks[(key, 'in')] = c_in
      extra[(key, 'in')] = d_in[..., None]
    blocks[(key, 'out')] = c_out
    extra[(key, 'out')] = d_out[..., None]
  eigen = opts.damping_mode == 'eigen'
  if eigen:
    results = _linalg.bucketed(_linalg.safe_eigh, blocks,
                               spread=opts.spread_inverses)
  else:
    results = _linalg.bucketed(
        lambda s, d: _linalg.damped_inverse(s, d, opts.inverse_method),
        blocks, extra, spread=opts.spread_inverses)
  new, bad = {}, jnp.zeros([], jnp.int32)
  for key, layout in layouts.items():
    fresh = {}
    for side in ('in', 'out'):
      if layout.kind == 'embed' and side == 'in':
        c_in, d_in = diag[key]
        fresh['in_vals'] = c_in if eigen else 1.0 / (c_in + d_in[..., None])
      elif eigen:
        fresh[f'{side}_vals'], fresh[f'{side}_vecs'] = results[(key, side)]
      else:
        fresh[f'{side}_inv'] = results[(key, side)]
    if eigen:
      fresh['damping'] = jnp.broadcast_to(exact[key], layout.lead)
    new[key] = {}
    for name, value in fresh.items():
      old = precond[key][name]
      new[key][name], n_bad = _linalg.keep_finite(
          value.astype(old.dtype), old, _BLOCK_NDIM.get(name, 2))
      bad = bad + n_bad
    if opts.eigen_correction:
      # A new basis invalidates the averaged scaling: measure it afresh.
      old = precond[key]['scaling']
      rows = layer_rows(opts, layer_stats[key], layout, old.dtype,
                        count // opts.stats_every)
      scaling = _pmean(opts, measure_scaling(
          layout, rows, new[key], opts.conv_scaling == 'per_example'))
      new[key]['scaling'], n_bad = _linalg.keep_finite(
          scaling.astype(old.dtype), old, 2)
      bad = bad + n_bad
  return new, bad


def refresh_norm_diagonals(opts: Options, norm_layers, nu, count):
  """Diagonal empirical Fisher of norm layers' scale and bias.

  ``nu`` maps each trainable norm parameter's path to its average. A
  parameter whose fresh diagonal is not finite keeps its average and
  counts one event.

  Returns:
    ``(nu, num_bad)``.
  """
  weight = average_weight(opts, count)
  new, bad = dict(nu), jnp.zeros([], jnp.int32)
  for key, st in norm_layers.items():
    batch = st.g.shape[st.meta.stack_ndim + 1]
    scale = float(batch) ** 2 if opts.loss_reduction == 'mean' else 1.0
    for name, f in _stats.adafisher_factors(st, False)[0].items():
      path = _base.join_path(key, name)
      if path not in nu:
        continue
      old = nu[path]
      fresh = _pmean(opts, jnp.broadcast_to(f.s * scale, old.shape))
      avg = ((1 - weight) * old + weight * fresh).astype(old.dtype)
      new[path], n_bad = _linalg.keep_finite(avg, old, old.ndim)
      bad = bad + n_bad
  return new, bad


def eigen_damping(algorithm: Algorithm, opts: Options, layouts, precond):
  """Per-layer damping of EKFAC/TEKFAC, or None to use the cached one.

  With ``algorithm.adaptive_conv`` (``fo.tekfac(conv_damping='adaptive')``)
  each conv layer uses TEKFAC's Eq. 3.5 on the current scaling Theta,
  ``max(tr Theta, vartheta) / dim Theta`` with ``vartheta = damping *
  dim Theta`` (so never below ``damping``), and, with
  ``dense_damping='beta'``, the other layers use ``beta``, the largest of
  those conv values, "to keep pace with the convolution layers".
  """
  if not (opts.eigen_correction and algorithm.adaptive_conv):
    return {}
  out = {}
  for key, layout in layouts.items():
    if layout.conv:
      theta = precond[key]['scaling']
      dim = layout.d_in * layout.d_out
      out[key] = jnp.maximum(jnp.sum(theta, (-2, -1)) / dim, opts.damping)
  if out and opts.dense_damping == 'beta':
    beta = jnp.max(jnp.stack([jnp.max(v) for v in out.values()]))
    for key, layout in layouts.items():
      if not layout.conv:
        out[key] = jnp.broadcast_to(beta, layout.lead)
  return out


def precondition_layers(opts: Options, layouts, precond, damping, source,
                        index):
  """Preconditioned kernel (and bias) leaves of every Kronecker layer.

  Args:
    opts: options.
    layouts: the active layers.
    precond: their cached inverses or eigenbases.
    damping: ``{layer: damping}`` overriding the cached eigen damping.
    source: flat list of (momentum) gradient leaves.
    index: ``{path: position in source}``.

  Returns:
    ``{leaf position: preconditioned leaf}``.
  """
  out = {}
  for key, layout in layouts.items():
    ik = index[_base.join_path(key, layout.kernel)]
    ib = index[_base.join_path(key, layout.bias)] if layout.bias else None
    kernel = source[ik]
    if layout.kind == 'embed':
      w = kernel.reshape(layout.lead + (layout.d_in, layout.d_out))
    else:
      w = to_matrix(layout, kernel, None if ib is None else source[ib])
    w = precondition(layout, precond[key], w, opts.damping_mode,
                     eigen_damping=damping.get(key))
    if layout.kind == 'embed':
      out[ik] = w.reshape(kernel.shape)
    else:
      out[ik], bias = _from_matrix(layout, w, kernel.shape,
                                   None if ib is None else source[ib].shape)
      if ib is not None:
        out[ib] = bias
  return out


def _check_layouts(algorithm: Algorithm, opts: Options, updates, layer_stats,
                   state, assignments):
  """The captured layers with curvature state, and the norm layers.

  Masked (frozen) parameters are left out: a frozen kernel leaves the layer
  out, a frozen bias makes it bias-less. Every layer with curvature state
  must be captured, and every captured one must have state of its shape.
  """
  hint = _base.layers_hint(updates)
  layouts, norms = {}, {}
  for key, st in layer_stats.items():
    frozen = frozenset(name for _, name in st.meta.params if assignments[
        _base.join_path(key, name)].frozen)
    if st.meta.kind == 'norm':
      if len(frozen) < len(st.meta.params):
        norms[key] = st
      continue
    layout = layout_from_meta(key, st.meta, frozen)
    if layout is None:
      continue
    if key not in state.stats:
      raise ValueError(
          f'{opts.where}: layer {key!r} ({st.meta.module}) has no curvature '
          'state; init(params) could not infer it from the parameters. '
          f'Build the optimizer with {hint}.')
    want = algorithm.shapes(layout, opts.block_size, opts.block_size)
    have = {n: tuple(v.shape) for n, v in state.stats[key].items()}
    if want != have:
      raise ValueError(
          f'{opts.where}: layer {key!r} ({st.meta.module}) needs factors '
          f'{want} but the state was initialised with {have} (stacked, '
          'grouped or multi-output layers cannot be inferred from params). '
          f'Build the optimizer with {hint}.')
    layouts[key] = layout
  return layouts, norms


def _uncaptured_layouts(template, updates, layer_stats, state):
  """Layers with curvature state that this step did not capture.

  Either ``init`` found a kernel that no registered layer owns (it never
  has statistics and gets the fallback, as ``fo.coverage`` says), or a
  layer captured on earlier steps is missing from this one: it keeps its
  cached inverses rather than jumping to another preconditioner.
  """
  return {key: layout for key, layout in init_layouts(
      template, updates).items()
          if key in state.stats and key not in layer_stats}


def _has_inverses(precond: Mapping[str, jax.Array]) -> jax.Array:
  """Whether a layer's inverses or eigenbases were ever computed.

  Both are nonzero once set (a damped inverse has a positive diagonal, an
  eigenbasis is orthogonal); ``init`` leaves them zero.
  """
  out = precond['out_inv' if 'out_inv' in precond else 'out_vecs']
  return jnp.any(out != 0)


def init_layouts(template, params) -> dict[str, Layout]:
  """Layouts of ``params``: from ``layers=`` if given, else inferred.

  A ``layers=`` entry counts only if ``params`` has its kernel with the
  captured shape; masked parameters are left out as in ``update``.
  """
  if template is None:
    return infer_layouts(params)
  leaves = _base.flatten_with_paths(params)
  out = {}
  for key, meta in template.items():
    paths = {name: _base.join_path(key, name) for _, name in meta.params}
    if not all(p in leaves for p in paths.values()):
      continue
    frozen = frozenset(n for n, p in paths.items()
                       if _base.is_masked(leaves[p]))
    layout = layout_from_meta(key, meta, frozen)
    if layout is not None and _base.shape_of(leaves[paths[
        layout.kernel]]) == meta.param_shape(layout.kernel):
      out[key] = layout
  return out


def init_state(algorithm: Algorithm, opts: Options, layouts, params
               ) -> KroneckerState:
  """Zero statistics and inverses in ``_base.stats_dtype`` of each kernel."""
  leaves = _base.flatten_with_paths(params)
  stats, precond = {}, {}
  for key, layout in layouts.items():
    dtype = _base.stats_dtype(leaves[_base.join_path(key, layout.kernel)])
    stats[key] = {n: jnp.zeros(s, dtype) for n, s in algorithm.shapes(
        layout, opts.block_size, opts.block_size).items()}
    precond[key] = {n: jnp.zeros(s, dtype) for n, s in _precond_shapes(
        layout, opts.block_size, opts.block_size, opts.damping_mode,
        opts.eigen_correction).items()}
  zeros = lambda p: jnp.zeros(jnp.shape(p), _base.stats_dtype(p))
  return KroneckerState(
      count=jnp.zeros([], jnp.int32),
      mu=jax.tree.map(jnp.zeros_like, params),
      nu=jax.tree.map(zeros, params),
      stats=stats, precond=precond, nonfinite=jnp.zeros([], jnp.int32))


def _every(period: int, count, refresh, keep, operand):
  """``refresh(operand)`` on steps ``count % period == 0``, else ``keep``.

  A period of 1 refreshes on every step without ``lax.cond``, whose
  operands and results XLA may copy (the whole curvature state).
  """
  if period == 1:
    return refresh(operand)
  return lax.cond(count % period == 0, refresh, keep, operand)


def refresh_curvature(algorithm: Algorithm, opts: Options, layouts, norms,
                      layer_stats, state, nu_paths):
  """Statistics, then inverses, each on its period (:func:`_every`).

  Args:
    algorithm: the method.
    opts: options.
    layouts: active Kronecker layers.
    norms: norm layers.
    layer_stats: this step's captured statistics.
    state: the state before this step.
    nu_paths: ``{path: nu leaf}`` of trainable norm parameters.

  Returns:
    ``(stats, precond, nu_paths, nonfinite)``.
  """
  count = state.count
  stats, precond = dict(state.stats), dict(state.precond)
  bad = jnp.zeros([], jnp.int32)
  if layouts:
    active = {k: state.stats[k] for k in layouts}
    old_pre = {k: state.precond[k] for k in layouts}
    unchanged = lambda args: (
        args[0], {k: v['scaling'] for k, v in args[1].items()}
        if opts.eigen_correction else {}, jnp.zeros([], jnp.int32))
    new_stats, scaling, bad_stats = _every(
        opts.stats_every, count,
        lambda args: refresh_statistics(algorithm, opts, layouts,
                                        layer_stats, *args, count),
        unchanged, (active, old_pre))
    if opts.eigen_correction:
      old_pre = {k: {**v, 'scaling': scaling[k]} for k, v in old_pre.items()}
    new_pre, bad_inv = _every(
        opts.inverse_every, count,
        lambda args: refresh_inverses(algorithm, opts, layouts, layer_stats,
                                      *args, count),
        lambda args: (args[1], jnp.zeros([], jnp.int32)),
        (new_stats, old_pre))
    stats.update(new_stats)
    precond.update(new_pre)
    bad = bad + bad_stats + bad_inv
  if nu_paths:
    nu_paths, bad_norm = _every(
        opts.stats_every, count,
        lambda nu: refresh_norm_diagonals(opts, norms, nu, count),
        lambda nu: (nu, jnp.zeros([], jnp.int32)), nu_paths)
    bad = bad + bad_norm
  return stats, precond, nu_paths, state.nonfinite + bad


def first_moment(opts: Options, grads, mu, count_inc):
  """``(source, mu)``: what is preconditioned, and Adam-style momentum.

  ``momentum_style='adam'`` averages the gradient first and preconditions
  the bias-corrected average; ``'heavy_ball'`` preconditions the gradient.
  """
  grads = [g if _base.is_masked(g) else g.astype(_base.stats_dtype(g))
           for g in grads]
  if opts.momentum_style != 'adam':
    return grads, mu
  mu = [m if _base.is_masked(g) else
        (opts.momentum * m + (1 - opts.momentum) * g).astype(m.dtype)
        for g, m in zip(grads, mu)]
  source = []
  for g, m in zip(grads, mu):
    if _base.is_masked(g):
      source.append(m)
    else:
      correction = 1 - opts.momentum ** count_inc.astype(g.dtype)
      source.append(m.astype(g.dtype) / correction)
  return source, mu


def other_directions(opts: Options, paths, source, done, nu, norm_paths,
                     count):
  """Directions of the leaves no Kronecker layer covers.

  Norm layers' parameters divide by their damped diagonal Fisher; other
  parameters get Adam's second moment (updated in ``nu``).

  Returns:
    ``(directions, nu)``: flat lists like ``source``.
  """
  out, nu = list(source), list(nu)
  count_inc = optax.safe_increment(count)
  for i, g in enumerate(source):
    if i in done:
      out[i] = done[i]
    elif _base.is_masked(g):
      continue
    elif paths[i] in norm_paths:
      out[i] = g / (nu[i] + opts.damping)
    else:
      new_nu, denom = _base.adam_denominator(
          jnp.where(count == 0, 0.0, nu[i]), g, count_inc, opts.fallback_b2,
          opts.fallback_eps)
      nu[i] = new_nu.astype(nu[i].dtype)
      out[i] = g / denom
  return out, nu


def heavy_ball(opts: Options, directions, mu):
  """``m <- momentum m + direction`` (TKFAC's Algorithm 1); the step is m."""
  if opts.momentum_style != 'heavy_ball':
    return directions, mu
  mu = [m if _base.is_masked(u) else
        (opts.momentum * m + u).astype(m.dtype)
        for u, m in zip(directions, mu)]
  return mu, mu


def kronecker_update(algorithm: Algorithm, opts: Options, updates,
                     state: KroneckerState, layer_stats, template=None):
  """One step: statistics, inverses, preconditioning, momentum.

  Args:
    algorithm: the method.
    opts: its options.
    updates: the gradients.
    state: the state from ``init`` or the previous step.
    layer_stats: this step's captured statistics.
    template: the ``layers=`` metadata ``init`` used, or None.

  Returns:
    ``(updates, state)``.
  """
  _base.check_same_structure(opts.where, 'updates', updates,
                             'the state (the params init saw)', state.mu)
  assignments = _pairing.pair(updates, layer_stats, opts.where)
  layouts, norms = _check_layouts(algorithm, opts, updates, layer_stats,
                                  state, assignments)
  paths, grads, treedef = _base.flatten_leaves(updates)
  index = {p: i for i, p in enumerate(paths)}
  nu = treedef.flatten_up_to(state.nu)

  # Statistics and inverses, each on its own period.
  norm_nu = {p: nu[index[p]] for p in (
      _base.join_path(key, name) for key, st in norms.items()
      for _, name in st.meta.params) if not assignments[p].frozen}
  stats, precond, norm_nu, nonfinite = refresh_curvature(
      algorithm, opts, layouts, norms, layer_stats, state, norm_nu)
  for path, value in norm_nu.items():
    nu[index[path]] = value

  # Preconditioning of the gradient (or of Adam-style momentum).
  source, mu = first_moment(opts, grads, treedef.flatten_up_to(state.mu),
                            optax.safe_increment(state.count))
  uncaptured = _uncaptured_layouts(template, updates, layer_stats, state)
  damping = eigen_damping(algorithm, opts, {**layouts, **uncaptured},
                          precond)
  done = precondition_layers(opts, layouts, precond, damping, source, index)
  old_nu = list(nu)
  directions, nu = other_directions(opts, paths, source, done, nu,
                                    set(norm_nu), state.count)
  # Uncaptured layers: their cached inverses once they have any (their
  # statistics and inverses are not refreshed), else the fallback.
  kept = precondition_layers(opts, uncaptured, precond, damping, source,
                             index)
  has = {i: _has_inverses(precond[key]) for key, layout in uncaptured.items()
         for i in (index[_base.join_path(key, name)]
                   for name in (layout.kernel, layout.bias) if name)}
  for i, u in kept.items():
    directions[i] = jnp.where(has[i], u, directions[i])
    nu[i] = jnp.where(has[i], old_nu[i], nu[i])

  # Momentum and step.
  out, mu = heavy_ball(opts, directions, mu)
  out = [u if _base.is_masked(g) else u.astype(g.dtype)
         for u, g in zip(out, grads)]
  unflatten = lambda leaves: jax.tree_util.tree_unflatten(treedef, leaves)
  return unflatten(out), KroneckerState(
      count=optax.safe_increment(state.count), mu=unflatten(mu),
      nu=unflatten(nu), stats=stats, precond=precond, nonfinite=nonfinite)


def scale_by_kronecker(
    algorithm: Algorithm,
    *,
    momentum: jax.typing.ArrayLike,
    damping: jax.typing.ArrayLike,
    fisher_decay: jax.typing.ArrayLike,
    stats_every: int,
    inverse_every: int,
    block_size: int | None,
    damping_mode: str,
    momentum_style: str,
    loss_reduction: str,
    inverse_method: str,
    layers: Mapping[str, _base.LayerStats] | None,
    fallback_b2: jax.typing.ArrayLike,
    fallback_eps: jax.typing.ArrayLike,
    axis_name: str | None,
    eigen_correction: bool = False,
    decay_schedule: str = 'constant',
    conv_scaling: str = 'per_example',
    dense_damping: str = 'beta',
    spread_inverses: str | None = None,
    weight_sharing: str = 'expand',
    stats_fraction: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  """The engine behind ``scale_by_kfac``, ``scale_by_tkfac`` and their
  eigenvalue-corrected forms (``eigen_correction=True``)."""
  where = 'scale_by_' + (corrected_name(algorithm.name) if eigen_correction
                         else algorithm.name)
  if eigen_correction:
    damping_mode = 'eigen'
  check_options(where, stats_every=stats_every, inverse_every=inverse_every,
                block_size=block_size, damping_mode=damping_mode,
                momentum_style=momentum_style, loss_reduction=loss_reduction,
                inverse_method=inverse_method, decay_schedule=decay_schedule,
                conv_scaling=conv_scaling, dense_damping=dense_damping,
                weight_sharing=weight_sharing, stats_fraction=stats_fraction,
                axes={'axis_name': axis_name,
                      'spread_inverses': spread_inverses})
  _base.check_hyperparams(
      where, positive={'damping': damping},
      nonnegative={'fallback_eps': fallback_eps},
      decays={'fisher_decay': fisher_decay, 'momentum': momentum,
              'fallback_b2': fallback_b2})
  opts = Options(where, damping, fisher_decay, momentum, stats_every,
                 inverse_every, block_size, damping_mode, momentum_style,
                 loss_reduction, inverse_method, fallback_b2, fallback_eps,
                 axis_name, eigen_correction, decay_schedule, conv_scaling,
                 dense_damping, spread_inverses, weight_sharing,
                 stats_fraction)
  # The user's description of their layers, not state: init uses it for
  # the layers each params tree has.
  template = None if layers is None else {
      key: st.meta for key, st in _base.check_layer_stats(
          layers, where).items()}

  def init_fn(params):
    return init_state(algorithm, opts, init_layouts(template, params), params)

  @_sharding.with_auto_axes
  def update_fn(updates, state, params=None, *, layer_stats=None,
                damping=None, **extra_args):
    # ``damping=``: this step's damping, from a caller that adapts it
    # (``fisher_optax.adaptive``); inverses take it at their next refresh.
    del params, extra_args
    step_opts = opts if damping is None else dataclasses.replace(
        opts, damping=damping)
    return kronecker_update(algorithm, step_opts, updates, state,
                            layer_stats, template)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def check_stats_fraction(where: str, stats_fraction) -> None:
  """``stats_fraction`` must be None or a static ``1 / n``, ``n`` a positive
  int. None, not 1.0, is the default: ``optax.inject_hyperparams`` would
  trace a numeric default, and the fraction sets array shapes."""
  if stats_fraction is None:
    return
  if isinstance(stats_fraction, (bool, jax.Array)) or not isinstance(
      stats_fraction, (int, float)):
    raise ValueError(
        f'{where}: stats_fraction must be a Python number 1/n, got '
        f'{stats_fraction!r}; it sets array shapes, so it is static (pass '
        'it in static_args of optax.inject_hyperparams).')
  n = 1.0 / stats_fraction if 0 < stats_fraction <= 1 else 0.0
  if not (n >= 1 and abs(n - round(n)) <= 1e-6 * n):
    raise ValueError(
        f'{where}: stats_fraction must be 1/n for a positive int n (one '
        f'example in every n enters the statistics), got {stats_fraction!r}.')


def corrected_name(name: str) -> str:
  """``'kfac'`` -> ``'ekfac'``, ``'tkfac'`` -> ``'tekfac'``."""
  return {'kfac': 'ekfac', 'tkfac': 'tekfac'}.get(name, 'e' + name)


def check_options(where: str, *, stats_every, inverse_every, block_size,
                  axes=None, stats_fraction=None, **choices) -> None:
  """Validates the static options of a Kronecker factory; names them."""
  check_stats_fraction(where, stats_fraction)
  allowed = {
      'damping_mode': ('factored', 'eigen'),
      'momentum_style': ('heavy_ball', 'adam'),
      'loss_reduction': ('mean', 'sum'),
      'inverse_method': ('cholesky', 'inv', 'eigh'),
      'decay_schedule': ('constant', 'martens'),
      'conv_scaling': ('per_example', 'per_position'),
      'dense_damping': ('beta', 'fixed'),
      'conv_damping': ('normal', 'adaptive'),
      'weight_sharing': ('expand', 'reduce', 'auto'),
  }
  _base.check_options(
      where, periods={'stats_every': stats_every,
                      'inverse_every': inverse_every},
      block_size=block_size,
      choices={name: (value, allowed[name])
               for name, value in choices.items()},
      axes=axes)
