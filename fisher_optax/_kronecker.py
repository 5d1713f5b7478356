"""The Kronecker engine shared by K-FAC and TKFAC.

Each captured dense or conv layer is preconditioned by the inverse of a
damped Kronecker product ``C_in (x) C_out`` acting on its bias-augmented
weight matrix ``W`` (``d_in x d_out``): ``W <- C_in^-1 W C_out^-1``. An
:class:`Algorithm` says which statistics of the layer's rows to average and
how to turn them into ``C_in`` and ``C_out``; this module does the rest, the
same way for every algorithm:

* statistics of each layer's rows (``_stats.kronecker_rows``) are averaged
  with decay ``fisher_decay`` every ``stats_every`` steps;
* every ``inverse_every`` steps the damped factors are inverted (or
  eigendecomposed), with every factor of every layer that has the same block
  size in one batched call (``_linalg.bucketed``); ``block_size`` splits
  large factors into diagonal blocks; a block whose inverse is not finite
  keeps its previous value and is counted in ``state.nonfinite``;
* ``damping_mode='factored'`` damps each factor (the algorithm chooses the
  split), ``'eigen'`` damps exactly in the factors' eigenbasis:
  ``(s_in (x) s_out + damping)^-1``;
* embeddings use a diagonal input factor (one-hot inputs); norm layers and
  parameters no layer covers use a diagonal (``damping`` added) and Adam,
  respectively.

Factor shapes depend on the layer kind and on stack axes (``nn.scan``),
which ``init(params)`` cannot see. It infers them from the parameters
(a ``kernel`` is ``(*inputs, outputs)``, an ``embedding`` is a table); for
stacked, grouped or multi-output layers pass ``layers=`` (the statistics of
one step, e.g. ``jax.eval_shape(step_fn, params, batch)[2]``). A mismatch is
an error naming the layer.
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


def layout_from_meta(key: str, meta: _base.LayerMeta) -> Layout | None:
  """The exact layout of a captured layer (None for norm layers)."""
  k = meta.stack_ndim
  if meta.kind == 'embed':
    table = meta.param_shape(meta.param_name('embedding'))
    return Layout(key, 'embed', meta.param_name('embedding'), None,
                  table[:k] + (1,), k, 1, table[k], table[-1])
  if meta.kind not in ('dense', 'conv'):
    return None
  name = meta.param_name('kernel')
  kernel = meta.param_shape(name)
  bias = meta.param_name('bias')
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
  """Layouts guessed from parameter names and shapes (no stack axes)."""
  leaves = _base.flatten_with_paths(params)
  out = {}
  for path, leaf in leaves.items():
    if _base.is_masked(leaf):
      continue
    key, name = _base.split_path(path)
    shape = _base.shape_of(leaf)
    bias = f'{key}/bias'.strip('/')
    has_bias = bias in leaves and not _base.is_masked(leaves[bias])
    if name == 'kernel' and len(shape) >= 2:
      out[key] = Layout(key, 'kron', name, 'bias' if has_bias else None,
                        (1,), 0, len(shape) - 1,
                        math.prod(shape[:-1]) + has_bias, shape[-1],
                        len(shape) >= 3)
    elif name == 'embedding' and len(shape) == 2:
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
    name: for messages.
    statistics: ``statistics(rows, layout, block_size) -> {name: array}``;
      ``rows`` is a :class:`~fisher_optax._stats.KroneckerRows` (for
      embeddings ``rows.a`` holds integer ids ``(*lead, N)``). Input-side
      arrays are ``(*lead, nb, b, b)`` blocks (``(*lead, V)`` for
      embeddings), shaped as ``shapes`` says.
    shapes: ``shapes(layout, block_in, block_out) -> {name: shape}``.
    factors: ``factors(stats, layout, damping) -> Factors``: the undamped
      factors and how to damp them.
  """

  name: str
  statistics: Callable[..., dict[str, jax.Array]]
  shapes: Callable[..., dict[str, tuple[int, ...]]]
  factors: Callable[..., tuple[jax.Array, jax.Array, str]]


def block_shape(d: int, block_size: int | None) -> tuple[int, int]:
  """``(nb, b)`` of a factor of size ``d`` split into ``block_size`` blocks."""
  b = d if block_size is None else min(block_size, d)
  return -(-d // b), b


class KroneckerState(NamedTuple):
  """State of :func:`fisher_optax.scale_by_kfac` / ``scale_by_tkfac``."""

  count: jax.Array  # shape=(), int32.
  mu: optax.Updates  # momentum, like params.
  nu: optax.Updates  # diagonal second moments (norm layers, fallback).
  stats: dict[str, dict[str, jax.Array]]  # per layer: averaged statistics.
  precond: dict[str, dict[str, jax.Array]]  # inverses or eigenbases.
  nonfinite: jax.Array  # shape=(), int32: blocks kept for NaN/Inf.


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


def _to_matrix(layout: Layout, kernel, bias):
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
                 damping_mode: str):
  """``C_in^-1 w C_out^-1`` with cached inverses or eigenbases."""
  if damping_mode == 'eigen':
    damping = precond['damping'][..., None, None]
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


def measure_scaling(layout: Layout, rows, precond):
  """Diagonal of the rows' Fisher in the factors' eigenbasis.

  ``S = T mean_r (U_in^T a_r)^2 (U_out^T g_r)^2^T``: the second moments of
  the per-row gradients ``a_r g_r^T`` rotated into the eigenbasis, i.e. the
  best diagonal (in Frobenius norm) of the location-expanded Fisher there
  (George et al., 2018). Shape ``(*lead, P_in, P_out)`` with padded sizes.
  """
  out_vecs = precond['out_vecs']
  g = _pad_to(rows.g, -1, out_vecs.shape[-3] * out_vecs.shape[-1])
  g2 = jnp.square(_linalg.block_apply(out_vecs, g, 'right'))
  n = rows.g.shape[-2]
  if layout.kind == 'embed':
    flat_ids = rows.a.reshape((-1, rows.a.shape[-1]))
    flat_g2 = g2.reshape((-1,) + g2.shape[-2:])
    s = jax.vmap(lambda i, v: jnp.zeros(
        (layout.d_in, v.shape[-1]), v.dtype).at[i].add(v))(flat_ids, flat_g2)
    s = s.reshape(layout.lead + s.shape[1:])
  else:
    in_vecs = precond['in_vecs']
    a = _pad_to(rows.a, -1, in_vecs.shape[-3] * in_vecs.shape[-1])
    a2 = jnp.square(_linalg.block_apply(in_vecs, a, 'right'))
    s = jnp.einsum('...ni,...nj->...ij', a2, g2)
  return rows.positions * s / n


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
) -> optax.GradientTransformationExtraArgs:
  """The engine behind ``scale_by_kfac``, ``scale_by_tkfac`` and their
  eigenvalue-corrected forms (``eigen_correction=True``)."""
  where = f'scale_by_{"e" if eigen_correction else ""}{algorithm.name}'
  if eigen_correction:
    damping_mode = 'eigen'
  _base.check_options(
      where, periods={'stats_every': stats_every,
                      'inverse_every': inverse_every},
      block_size=block_size,
      choices={'damping_mode': (damping_mode, ('factored', 'eigen')),
               'momentum_style': (momentum_style, ('heavy_ball', 'adam')),
               'loss_reduction': (loss_reduction, ('mean', 'sum'))})
  template = None
  if layers is not None:
    template = {}
    for key, st in _base.check_layer_stats(layers, where).items():
      layout = layout_from_meta(key, st.meta)
      if layout is not None:
        template[key] = layout
  known_layers: set[str] = set()

  def layouts_for(params):
    return dict(template) if template is not None else infer_layouts(params)

  def init_fn(params):
    layouts = layouts_for(params)
    stats, precond = {}, {}
    for key, layout in layouts.items():
      stats[key] = {n: jnp.zeros(s, jnp.float32) for n, s in
                    algorithm.shapes(layout, block_size, block_size).items()}
      precond[key] = {n: jnp.zeros(s, jnp.float32) for n, s in
                      _precond_shapes(layout, block_size, block_size,
                                      damping_mode,
                                      eigen_correction).items()}
    return KroneckerState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(jnp.zeros_like, params),
        nu=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32),
                        params),
        stats=stats,
        precond=precond,
        nonfinite=jnp.zeros([], jnp.int32),
    )

  def check_layouts(layer_stats, state):
    layouts = {}
    for key, st in layer_stats.items():
      layout = layout_from_meta(key, st.meta)
      if layout is None:
        continue
      if key not in state.stats:
        raise ValueError(
            f'{where}: layer {key!r} ({st.meta.module}) has no curvature '
            'state; init(params) could not infer it from the parameters. '
            'Build the optimizer with layers=jax.eval_shape(step_fn, params,'
            ' *batch)[2].')
      want = algorithm.shapes(layout, block_size, block_size)
      have = {n: tuple(v.shape) for n, v in state.stats[key].items()}
      if want != have:
        raise ValueError(
            f'{where}: layer {key!r} ({st.meta.module}) needs factors {want}'
            f' but the state was initialised with {have} (stacked, grouped '
            'or multi-output layers cannot be inferred from params). Build '
            'the optimizer with layers=jax.eval_shape(step_fn, params, '
            '*batch)[2].')
      layouts[key] = layout
    return layouts

  def layer_rows(st):
    if st.meta.kind == 'embed':
      k = st.meta.stack_ndim
      ids = st.a.reshape(st.a.shape[:k] + (1, -1)).astype(jnp.int32)
      batch = st.a.shape[k + 1]
      scale = float(batch) if loss_reduction == 'mean' else 1.0
      g = st.g.astype(jnp.float32).reshape(
          ids.shape + (st.g.shape[-1],)) * scale
      return _stats.KroneckerRows(ids, g, ids.shape[-1] // batch)
    return _stats.kronecker_rows(st, loss_reduction)

  def refresh_stats(layer_stats, layouts, old, old_scaling, first):
    new, bad = {}, jnp.zeros([], jnp.bool_)
    new_scaling = {}
    weight = jnp.where(first, 1.0, 1.0 - fisher_decay)
    for key, layout in layouts.items():
      rows = layer_rows(layer_stats[key])
      fresh = algorithm.statistics(rows, layout, block_size)
      if eigen_correction:
        fresh['scaling'] = measure_scaling(layout, rows, old_scaling[key])
      if axis_name is not None:
        fresh = jax.tree.map(lambda x: lax.pmean(x, axis_name), fresh)
      finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                                  for x in fresh.values()]))
      bad = bad | ~finite
      avg = lambda o, f, finite=finite: jnp.where(
          finite, (1 - weight) * o + weight * f, o)
      new[key] = {n: avg(old[key][n], fresh[n]) for n in old[key]}
      if eigen_correction:
        new_scaling[key] = avg(old_scaling[key]['scaling'],
                               fresh['scaling'])
    return new, new_scaling, bad

  def refresh_precond(layer_stats, layouts, stats, old):
    blocks, extra, diag, exact = {}, {}, {}, {}
    for key, layout in layouts.items():
      c_in, c_out, d_in, d_out, exact[key] = algorithm.factors(
          stats[key], layout, damping)
      if layout.kind == 'embed':
        diag[key] = (c_in, d_in)
      else:
        blocks[(key, 'in')] = c_in
        extra[(key, 'in')] = d_in[..., None]
      blocks[(key, 'out')] = c_out
      extra[(key, 'out')] = d_out[..., None]
    if damping_mode == 'eigen':
      results = _linalg.bucketed(_linalg.safe_eigh, blocks)
    else:
      results = _linalg.bucketed(
          lambda s, d: _linalg.damped_inverse(s, d, inverse_method),
          blocks, extra)
    new, bad_blocks = {}, jnp.zeros([], jnp.int32)
    for key, layout in layouts.items():
      fresh = {}
      for side in ('in', 'out'):
        if layout.kind == 'embed' and side == 'in':
          c_in, d_in = diag[key]
          fresh['in_vals'] = (c_in if damping_mode == 'eigen'
                              else 1.0 / (c_in + d_in[..., None]))
        elif damping_mode == 'eigen':
          vals, vecs = results[(key, side)]
          fresh[f'{side}_vals'], fresh[f'{side}_vecs'] = vals, vecs
        else:
          fresh[f'{side}_inv'] = results[(key, side)]
      if damping_mode == 'eigen':
        fresh['damping'] = jnp.broadcast_to(exact[key], layout.lead)
      new[key] = {}
      for name, value in fresh.items():
        block_ndim = _BLOCK_NDIM.get(name, 2)
        kept, n_bad = _linalg.keep_finite(value, old[key][name], block_ndim)
        new[key][name] = kept
        bad_blocks = bad_blocks + n_bad
      if eigen_correction:
        # A new basis invalidates the averaged scaling: measure it afresh.
        rows = layer_rows(layer_stats[key])
        scaling = measure_scaling(layout, rows, new[key])
        if axis_name is not None:
          scaling = lax.pmean(scaling, axis_name)
        new[key]['scaling'], n_bad = _linalg.keep_finite(
            scaling, old[key]['scaling'], 2)
        bad_blocks = bad_blocks + n_bad
    return new, bad_blocks

  def update_fn(updates, state, params=None, *, layer_stats=None,
                **extra_args):
    del params, extra_args
    assignments = _pairing.pair(updates, layer_stats, where)
    missing = known_layers - set(layer_stats)
    if missing:
      raise ValueError(
          f'{where}: layer_stats has no entry for layer(s) {sorted(missing)}'
          ' that earlier steps captured; their parameters would silently '
          'lose their preconditioner.')
    known_layers.update(layer_stats)
    layouts = check_layouts(layer_stats, state)

    paths, grads, treedef = _base.flatten_leaves(updates)
    _, mu, _ = _base.flatten_leaves(state.mu)
    _, nu, _ = _base.flatten_leaves(state.nu)
    index = {p: i for i, p in enumerate(paths)}
    count_inc = optax.safe_increment(state.count)
    first = state.count == 0

    # Curvature: statistics, then inverses, each on its own period.
    stats, precond, nonfinite = state.stats, state.precond, state.nonfinite
    if layouts:
      active = {k: state.stats[k] for k in layouts}
      old_pre = {k: state.precond[k] for k in layouts}
      new_stats, scaling, bad = lax.cond(
          state.count % stats_every == 0,
          lambda args: refresh_stats(layer_stats, layouts, *args, first),
          lambda args: (args[0], {k: v['scaling'] for k, v in args[1].items()}
                        if eigen_correction else {},
                        jnp.zeros([], jnp.bool_)),
          (active, old_pre))
      if eigen_correction:
        old_pre = {k: {**v, 'scaling': scaling[k]} for k, v in old_pre.items()}
      new_pre, bad_blocks = lax.cond(
          state.count % inverse_every == 0,
          lambda args: refresh_precond(layer_stats, layouts, *args),
          lambda args: (args[1], jnp.zeros([], jnp.int32)),
          (new_stats, old_pre))
      stats = {**state.stats, **new_stats}
      precond = {**state.precond, **new_pre}
      nonfinite = nonfinite + bad.astype(jnp.int32) + bad_blocks

    # Norm layers: diagonal empirical Fisher of scale and bias, computed
    # inside the cond so that other steps do not pay for it.
    weight = jnp.where(first, 1.0, 1.0 - fisher_decay)
    norm_layers = {key: st for key, st in layer_stats.items()
                   if st.meta.kind == 'norm'}

    def refresh_norm(old):
      new = dict(old)
      for key, st in norm_layers.items():
        batch = st.g.shape[st.meta.stack_ndim + 1]
        scale = float(batch) ** 2 if loss_reduction == 'mean' else 1.0
        for name, f in _stats.adafisher_factors(st, False)[0].items():
          path = _base.join_path(key, name)
          if path in old:
            fresh = jnp.broadcast_to(f.s * scale, old[path].shape)
            new[path] = (1 - weight) * old[path] + weight * fresh
      return new

    # A norm layer's factors are its scale and bias, the params it owns.
    diag_paths = {path: index[path] for path in (
        _base.join_path(key, name) for key, st in norm_layers.items()
        for _, name in st.meta.params) if not assignments[path].frozen}
    refreshed = lax.cond(state.count % stats_every == 0, refresh_norm,
                         lambda old: old,
                         {p: nu[i] for p, i in diag_paths.items()})
    for path, i in diag_paths.items():
      nu[i] = refreshed[path]

    def direction(i, g):
      """Preconditioned direction of leaf ``i`` (non-Kronecker leaves)."""
      path = paths[i]
      if path in diag_paths:
        return g / (nu[i] + damping)
      # Parameters no layer covers: Adam's diagonal.
      nu[i], denom = _base.adam_denominator(
          jnp.where(first, 0.0, nu[i]), g, count_inc, fallback_b2,
          fallback_eps)
      return g / denom

    grads32 = [g if _base.is_masked(g) else g.astype(jnp.float32)
               for g in grads]
    if momentum_style == 'adam':
      mu = [m if _base.is_masked(g) else
            (momentum * m + (1 - momentum) * g).astype(m.dtype)
            for g, m in zip(grads32, mu)]
      bias_mu = 1 - momentum ** count_inc.astype(jnp.float32)
      source = [m if _base.is_masked(m) else m.astype(jnp.float32) / bias_mu
                for m in mu]
    else:
      source = grads32

    out = list(source)
    done = set()
    for key, layout in layouts.items():
      kname = _base.join_path(key, layout.kernel)
      bname = _base.join_path(key, layout.bias) if layout.bias else None
      if assignments[kname].frozen or (bname and assignments[bname].frozen):
        continue
      ik = index[kname]
      ib = index[bname] if bname else None
      if layout.kind == 'embed':
        w = source[ik].reshape(layout.lead + (layout.d_in, layout.d_out))
      else:
        w = _to_matrix(layout, source[ik],
                       None if ib is None else source[ib])
      w = precondition(layout, precond[key], w, damping_mode)
      if layout.kind == 'embed':
        out[ik] = w.reshape(source[ik].shape)
      else:
        out[ik], b = _from_matrix(layout, w, source[ik].shape,
                                  None if ib is None else source[ib].shape)
        if ib is not None:
          out[ib] = b
          done.add(ib)
      done.add(ik)
    for i, g in enumerate(source):
      if i not in done and not _base.is_masked(g):
        out[i] = direction(i, g)

    if momentum_style == 'heavy_ball':
      mu = [m if _base.is_masked(u) else
            (momentum * m + u).astype(m.dtype) for u, m in zip(out, mu)]
      out = mu
    final = [u if _base.is_masked(g) else u.astype(g.dtype)
             for u, g in zip(out, grads)]
    unflatten = lambda leaves: jax.tree_util.tree_unflatten(treedef, leaves)
    return unflatten(final), KroneckerState(
        count=count_inc, mu=unflatten(mu), nu=unflatten(nu), stats=stats,
        precond=precond, nonfinite=nonfinite)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
