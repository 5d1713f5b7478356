"""Curvature statistics from captured layer inputs ``a`` and cotangents ``g``.

Every function here reduces one :class:`~fisher_optax.LayerStats` to the
statistics an algorithm needs, keeping the layer's stack axes (``nn.scan``
over layers) in front and treating calls, batch and spatial positions as
rows. Shapes are given for one stack element.

AdaFisher's conv diagonals never unfold the inputs into patches: the sum
over output positions of squared patches equals the filter gradient of
``conv(x**2, w)`` with an all-ones cotangent, which ``lax`` computes with the
layer's own strides, padding, dilations and groups, directly in the HWIO
kernel layout. The Kronecker factors' rows do unfold them
(:func:`conv_patches`), by strided slices of the padded input.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from fisher_optax import _base


class DiagFactors(NamedTuple):
  """Diagonal Kronecker factors of one parameter leaf.

  ``h`` (input side) has the leaf's shape with its last axis reduced to 1;
  ``s`` (output side) broadcasts against the leaf. Both carry stack axes.
  """

  h: jax.Array
  s: jax.Array


def _rows(x, stack_ndim: int, feature_ndim: int):
  """(*stack, ..., *features) -> (*stack, rows, *features)."""
  stack = x.shape[:stack_ndim]
  feats = x.shape[x.ndim - feature_ndim:]
  return x.reshape(stack + (-1,) + feats)


def _f32(x):
  # At least float32: bf16 activations are promoted, float64 tests stay exact.
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _dense(st: _base.LayerStats, reference: bool):
  meta = st.meta
  k = meta.stack_ndim
  kernel = meta.param_shape(meta.param_name('kernel'))
  stack = kernel[:k]
  in_axes = meta.cfg('in_axes')
  a = _f32(st.a)
  if in_axes is not None:
    # Per call: move contracted axes last. +1 skips the call axis.
    src = [k + 1 + ax for ax in in_axes]
    a = jnp.moveaxis(a, src, list(range(a.ndim - len(src), a.ndim)))
    n_in = len(in_axes)
  else:
    n_in = 1
  in_dims = kernel[k:k + n_in]
  out_dims = kernel[k + n_in:]
  a = a.reshape(stack + (-1, math.prod(in_dims)))
  g = _f32(st.g).reshape(stack + (-1, math.prod(out_dims)))
  h = jnp.mean(a * a, axis=-2)
  s = jnp.mean(g * g, axis=-2)
  del reference  # The official code uses the same Linear statistics.
  h_kernel = h.reshape(stack + in_dims + (1,) * len(out_dims))
  s_out = s.reshape(stack + out_dims)
  return _with_bias(meta, h_kernel, s_out, len(in_dims))


def _with_bias(meta, h_kernel, s_out, n_in, bias_h=1.0):
  """Kernel and bias factors; ``bias_h`` is the bias row's ``H_D`` entry.

  The bias row of the augmented input is 1, so its entry is 1, except in
  the official code's conv arithmetic, which rescales every entry.
  """
  k = meta.stack_ndim
  stack = s_out.shape[:k]
  out_dims = s_out.shape[k:]
  out = {meta.param_name('kernel'): DiagFactors(
      h_kernel, s_out.reshape(stack + (1,) * n_in + out_dims))}
  bias = meta.param_name('bias')
  if bias is not None:
    dtype = jnp.promote_types(h_kernel.dtype, s_out.dtype)
    out[bias] = DiagFactors(
        jnp.full(stack + (1,) * len(out_dims), bias_h, dtype), s_out)
  return out


def _taps(size: int, k: int, stride: int, dilation: int, pads):
  """Which input index each kernel tap reads, summed over output positions.

  Returns:
    ``(hits, positions)``: ``hits[i, t]`` is 1 where tap ``t`` reads
    unpadded input index ``i`` at some output position (zero padding adds
    nothing), and the number of output positions along the axis.
  """
  lo, hi = pads
  positions = max((size + lo + hi - (k - 1) * dilation - 1) // stride + 1, 0)
  offset = np.arange(size)[:, None] + lo - np.arange(k)[None, :] * dilation
  hits = (offset >= 0) & (offset % stride == 0) & (
      offset // stride < positions)
  return hits, positions


def _conv_input(x, cfg):
  """One stack element's inputs as ``(rows, *spatial, C_in)``, with the
  layer's own padding that ``lax`` lacks (circular, reflect, causal)."""
  n = len(cfg['kernel_size'])
  x = x.reshape((-1,) + x.shape[x.ndim - n - 1:])
  if cfg['pre_pad'] is not None:
    mode, pads = cfg['pre_pad']
    x = jnp.pad(x, ((0, 0),) + tuple(pads) + ((0, 0),), mode=mode)
  return x


def _explicit_pads(spatial, cfg):
  """``(dilated, pads)``: the dilated kernel's extent and the ``(lo, hi)``
  padding along each spatial axis of an input of shape ``spatial``."""
  dilated = [(k - 1) * d + 1 for k, d in zip(cfg['kernel_size'],
                                              cfg['rhs_dilation'])]
  pads = (lax.padtype_to_pads(spatial, dilated, cfg['strides'],
                              cfg['padding'])
          if isinstance(cfg['padding'], str) else cfg['padding'])
  return dilated, pads


def _window_sums(x, meta: _base.LayerMeta, per_row: bool):
  """Sums over output positions of a conv's input patches, kernel layout.

  A patch entry is the input at one kernel tap, so its sum over output
  positions is the input contracted, along each spatial axis, with a 0/1
  matrix of the indices that tap reads: a few small contractions of the
  input, no ``(rows * positions, patch)`` array. With input dilation the
  sum is the kernel gradient of a one-output convolution whose output
  cotangent is all ones.

  Args:
    x: one stack element's inputs, shape ``(rows..., *spatial, C_in)``.
    meta: the conv layer's metadata.
    per_row: one sum per row (``(rows, *kernel_size, C_in)``), or one for
      all rows (``(*kernel_size, C_in)``).

  Returns:
    ``(sums, positions)``: positions is the output positions per row.
  """
  cfg = dict(meta.config)
  n = len(cfg['kernel_size'])
  if n > 3:
    raise ValueError(f'{n}-D convolutions are not supported.')
  x = _conv_input(x, cfg)
  if any(d != 1 for d in cfg['lhs_dilation']):
    return _window_sums_by_vjp(x, cfg, per_row)
  spatial = x.shape[1:-1]
  _, pads = _explicit_pads(spatial, cfg)
  if not per_row:
    x = jnp.sum(x, axis=0, keepdims=True)
  positions = 1
  letters = 'dhw'[-n:]
  for axis in range(n):
    hits, count = _taps(spatial[axis], cfg['kernel_size'][axis],
                        cfg['strides'][axis], cfg['rhs_dilation'][axis],
                        pads[axis])
    positions *= count
    # Axes already contracted hold taps (upper case) in the same slots.
    before = letters[:axis].upper() + letters[axis:]
    after = before[:axis] + before[axis].upper() + before[axis + 1:]
    x = jnp.einsum(f'n{before}c,{letters[axis]}{after[axis]}->n{after}c', x,
                   jnp.asarray(hits, x.dtype),
                   precision=lax.Precision.HIGHEST)
  return (x if per_row else x[0]), positions


def _window_sums_by_vjp(x, cfg, per_row: bool):
  """:func:`_window_sums` for input-dilated convs (x already pre-padded)."""
  n = len(cfg['kernel_size'])
  c_in = x.shape[-1]
  spatial = 'DHW'[-n:]
  dn = lax.conv_dimension_numbers(
      x.shape, cfg['kernel_size'] + (c_in, 1),
      ('N' + spatial + 'C', spatial + 'IO', 'N' + spatial + 'C'))

  def sums(rows):
    def conv(w):
      return lax.conv_general_dilated(
          rows, w, cfg['strides'], cfg['padding'], cfg['lhs_dilation'],
          cfg['rhs_dilation'], dn)
    # The kernel takes x's dtype: a float64 input keeps a float64 sum. Made
    # from x, it is device-varying like x under shard_map; an invariant one
    # would have its cotangent summed over the devices (check_vma).
    w = jnp.zeros_like(rows, shape=cfg['kernel_size'] + (c_in, 1))
    out, vjp = jax.vjp(conv, w)
    (total,) = vjp(jnp.ones_like(out))
    return total[..., 0], math.prod(out.shape[1:-1])

  if not per_row:
    return sums(x)
  positions = []  # static, filled while vmap traces sums once
  def one(row):
    total, count = sums(row[None])
    positions.append(count)
    return total
  total = jax.vmap(one)(x)
  return total, positions[0]


def conv_patch_second_moment(x, meta: _base.LayerMeta):
  """Sum over rows and output positions of squared input patches.

  Args:
    x: one stack element's inputs, shape ``(rows..., *spatial, C_in)``.
    meta: the conv layer's metadata.

  Returns:
    ``(sum, count)``: the sum in kernel layout ``(*kernel_size, C_in/G)``,
    averaged over the ``G`` groups (the official AdaFisher pools patch rows
    across groups), and the number of (row, output position) pairs.
  """
  x = _f32(x)
  total, positions = _window_sums(x * x, meta, per_row=False)
  rows = math.prod(x.shape[:x.ndim - len(meta.cfg('kernel_size')) - 1])
  groups = meta.cfg('groups')
  c_in = x.shape[-1]
  total = total.reshape(meta.cfg('kernel_size') + (groups, c_in // groups))
  return jnp.mean(total, axis=-2), rows * positions


def conv_patch_means(x, meta: _base.LayerMeta):
  """Each row's mean over output positions of its input patches.

  Args:
    x: one stack element's inputs, shape ``(rows..., *spatial, C_in)``.
    meta: the conv layer's metadata.

  Returns:
    ``(groups, rows, prod(kernel_size) * C_in / groups)``, features ordered
    like :func:`conv_patches` (like ``kernel.reshape(-1, C_out)`` of one
    group).
  """
  total, positions = _window_sums(x, meta, per_row=True)
  groups = meta.cfg('groups')
  ks = meta.cfg('kernel_size')
  c_in = x.shape[-1]
  total = total.reshape((-1, math.prod(ks), groups, c_in // groups))
  total = jnp.moveaxis(total, 2, 0)  # (groups, rows, taps, C_in/G)
  return total.reshape(total.shape[:2] + (-1,)) / positions


def _conv(st: _base.LayerStats, reference: bool):
  meta = st.meta
  k = meta.stack_ndim
  kernel = meta.param_shape(meta.param_name('kernel'))
  stack = kernel[:k]
  counts = []  # static, filled while vmap traces the reduction once

  def second_moment(x):
    total, count = conv_patch_second_moment(x, meta)
    counts.append(count)
    return total

  a = st.a.reshape((-1,) + st.a.shape[k:])
  h = jax.vmap(second_moment)(a) / counts[0]
  bias_h = 1.0
  if reference:
    # The official code sums the squared ones-augmented patches over batch,
    # groups and positions and divides by batch * positions * D (D: one
    # group's patch length): every entry, the bias one included, is G/D
    # times ours. It matters through the absolute epsilon of the min-max.
    bias_h = meta.cfg('groups') / math.prod(kernel[k:-1])
    h = h * bias_h
  h = h.reshape(stack + kernel[k:-1] + (1,))
  g = _rows(_f32(st.g), k, 1)
  s = jnp.mean(g * g, axis=-2)
  return _with_bias(meta, h, s, len(kernel) - k - 1, bias_h)


def _embed(st: _base.LayerStats, reference: bool):
  del reference
  meta = st.meta
  k = meta.stack_ndim
  name = meta.param_name('embedding')
  table = meta.param_shape(name)
  stack = table[:k]
  ids = st.a.reshape((math.prod(stack), -1)).astype(jnp.int32)
  n = ids.shape[-1]
  g = _rows(_f32(st.g), k, 1)
  counts = jax.vmap(
      lambda i: jnp.zeros(table[k], g.dtype).at[i].add(1.0))(ids)
  h = (counts / n).reshape(stack + (table[k], 1))
  s = jnp.mean(g * g, axis=-2).reshape(stack + (1, table[-1]))
  return {name: DiagFactors(h, s)}


def _norm_paper(st: _base.LayerStats):
  """Diagonal empirical Fisher of scale and bias (``h = 1``).

  A norm layer's parameters each touch one feature, so the Kronecker
  factorisation degenerates; its diagonal is the mean over examples of the
  squared per-example gradient, ``E[(sum_pos g * xhat)^2]`` for the scale and
  ``E[(sum_pos g)^2]`` for the bias, with calls and batch as examples.
  """
  meta = st.meta
  k = meta.stack_ndim
  feat = tuple(ax + k + 1 for ax in meta.cfg('feature_axes'))
  g = _f32(st.g)
  ndim = g.ndim
  # Per example: reduce every axis after (stack, call, batch) but features.
  pos = tuple(ax for ax in range(k + 2, ndim) if ax not in feat)
  out = {}
  for role, value in (('scale', st.extras.get('xhat')), ('bias', None)):
    name = meta.param_name(role)
    if name is None:
      continue
    per_example = g if value is None else g * _f32(value)
    per_example = jnp.sum(per_example, axis=pos)
    stack = per_example.shape[:k]
    diag = jnp.mean(per_example.reshape(stack + (-1,) + meta.param_shape(
        name)[k:]) ** 2, axis=k)
    out[name] = DiagFactors(jnp.ones(diag.shape[:-1] + (1,), diag.dtype),
                            diag)
  return out


def _norm_reference(st: _base.LayerStats, axis_name=None):
  """The official AdaFisher construction for BatchNorm / LayerNorm.

  ``H`` is a 2-vector (scale entry, bias entry) built from the raw input
  ``x`` and ``S`` is the squared per-feature batch gradient of the bias; see
  research/adafisher.md §1.2. BatchNorm reduces per channel; the other norms
  follow the LayerNorm rule (reduce over all axes but axis 1 of one call).

  Both square sums over the batch, so a data-parallel replica cannot
  average its own: with ``axis_name`` the sums are taken over the devices
  first (``psum``), giving every replica the whole batch's statistics, and
  each replica's ``g`` (the cotangent of its own mean loss, ``n`` times the
  global mean loss's) is divided by the ``n`` devices.
  """
  meta = st.meta
  k = meta.stack_ndim
  x = _f32(st.a)
  g = _f32(st.g)
  stack = x.shape[:k]
  x = x.reshape(stack + (-1,) + x.shape[k + 2:])  # calls into batch
  g = g.reshape(stack + (-1,) + g.shape[k + 2:])
  devices = 1 if axis_name is None else lax.psum(1, axis_name)
  batch = x.shape[k] * devices
  # Axes of one call, shifted past the stack; calls are merged into batch.
  feat = tuple(ax + k for ax in meta.cfg('feature_axes'))
  if meta.module == 'BatchNorm':
    other = tuple(ax for ax in range(k + 1, x.ndim) if ax not in feat)
    spatial = math.prod(x.shape[ax] for ax in other)
    u = jnp.sum(x, axis=(k,) + other) / spatial ** 2
    n_entries = math.prod(u.shape[k:])
  else:
    axis1 = k + 1 if x.ndim > k + 1 else k
    other = tuple(ax for ax in range(k, x.ndim) if ax != axis1)
    spatial = math.prod(x.shape[ax] for ax in other if ax != k)
    u = jnp.sum(x, axis=other) / spatial ** 2
    n_entries = u.shape[-1]
  u = u.reshape(stack + (-1,))
  g_other = tuple(ax for ax in range(k, g.ndim) if ax not in feat)
  g_sum = jnp.sum(g, axis=g_other)
  if axis_name is not None:
    u = lax.psum(u, axis_name)
    g_sum = lax.psum(g_sum, axis_name) / devices
  h_scale = jnp.sum(u * u, axis=-1) / batch ** 2
  h_bias = jnp.full(stack, n_entries / batch ** 2, x.dtype)
  s = g_sum ** 2 / batch
  out = {}
  for role, h in (('scale', h_scale), ('bias', h_bias)):
    name = meta.param_name(role)
    if name is None:
      continue
    shape = meta.param_shape(name)
    out[name] = DiagFactors(h.reshape(stack + (1,) * (len(shape) - k)),
                            s.reshape(shape))
  return out


def adafisher_factors(st: _base.LayerStats, reference: bool,
                      axis_name=None) -> tuple[dict[str, DiagFactors], bool]:
  """AdaFisher's raw diagonal factors ``(H_D, S_D)`` of each parameter.

  Every factor but the official norm construction is a mean over examples
  of a square of one example's ``a`` or ``g``. Under ``shard_map`` with
  ``axis_name`` each replica's ``g`` is the cotangent of its own mean loss,
  ``n`` times the global mean loss's, so the factors of the whole batch are
  the replicas' mean (``pmean``) with ``S_D`` divided by ``n**2``.

  Args:
    st: one layer's captured statistics.
    reference: use the official code's constructions (norm layers, conv
      scaling) instead of the paper-mode ones.
    axis_name: the data-parallel axis of ``shard_map``, or None.

  Returns:
    ``({param name: DiagFactors}, normalise_h)``. ``normalise_h`` is False
    when ``h`` is identically one and must not be min-max normalised.
  """
  kind = st.meta.kind
  if kind == 'norm' and reference:
    return _norm_reference(st, axis_name), True
  if kind == 'dense':
    factors, normalise_h = _dense(st, reference), True
  elif kind == 'conv':
    factors, normalise_h = _conv(st, reference), True
  elif kind == 'embed':
    factors, normalise_h = _embed(st, reference), True
  elif kind == 'norm':
    factors, normalise_h = _norm_paper(st), False
  else:
    raise ValueError(f'AdaFisher has no statistics for layer kind {kind!r}.')
  if axis_name is not None:
    n = lax.psum(1, axis_name)
    factors = {name: DiagFactors(lax.pmean(f.h, axis_name),
                                 lax.pmean(f.s, axis_name) / n ** 2)
               for name, f in factors.items()}
  return factors, normalise_h


# ----------------------------------------------------------------------------
# Kronecker factors (K-FAC, TKFAC, EKFAC).
#
# A layer's rows are (example, position, call) triples: for a dense layer on
# tokens the positions are tokens, for a conv the output locations (KFC's
# spatial-independence assumption), and calls of a shared layer add rows too.
# With per-example cotangents g_r (the captured g times the batch size for a
# batch-mean loss) and bias-augmented inputs a_r, the location-expanded
# empirical Fisher block is F = T * mean_r[(a_r a_r^T) (x) (g_r g_r^T)] with T
# rows per example, and
#   K-FAC:  A = mean_r a_r a_r^T,          G = T mean_r g_r g_r^T
#   TKFAC:  delta = T mean_r |a_r|^2 |g_r|^2 = tr F,
#           Phi_raw = T mean_r |g_r|^2 a_r a_r^T,
#           Psi_raw = T mean_r |a_r|^2 g_r g_r^T,
#           Phi = Phi_raw / delta, Psi = Psi_raw / delta (unit trace).


class KroneckerRows(NamedTuple):
  """Rows of one layer for Kronecker statistics.

  ``a``: ``(*stack, groups, N, d_in [+1])`` inputs (patches for convs) with a
  trailing ones column when the layer has a bias; ``g``: ``(*stack, groups,
  N, d_out)`` per-example output cotangents; ``positions``: rows per
  example ``T`` (positions x calls); ``calls``: calls of the layer. The
  ``N`` rows are ordered (call, example, position), so the rows of one
  example in one call are consecutive (per-example sums, as in EKFAC's
  scaling, reshape them). Grouped convolutions are independent layers per
  group, so groups form a leading axis (1 for other layers).
  """

  a: jax.Array
  g: jax.Array
  positions: int
  calls: int = 1


def reduce_rows(rows: KroneckerRows, batch: int) -> KroneckerRows:
  """K-FAC-reduce's rows: one per example, its shared rows reduced.

  Eschenhagen et al. (NeurIPS 2023, Eq. 12-13): where a layer shares its
  weights over ``R`` rows of one example (a conv's output positions, a
  dense layer's tokens, the calls of a layer applied several times), the
  reduce flavour takes ``a_n = mean_r a_{n,r}`` and ``g_n = sum_r g_{n,r}``
  before the outer products, so ``A = mean_n a_n a_n^T`` and
  ``G = mean_n g_n g_n^T`` are ``R`` times cheaper than expand's and exact
  when ``g_{n,r}`` does not depend on ``r`` (the reduce setting: the loss
  sees a mean over the shared rows). Every statistic built from rows then
  reads with one row per example (``positions = 1``): TKFAC's
  ``delta = mean_n |a_n|^2 |g_n|^2`` is the trace of the reduce Fisher
  ``mean_n (a_n a_n^T) (x) (g_n g_n^T)``, and EKFAC's scaling the second
  moment of ``g_n a_n^T`` in the eigenbasis. The bias column stays ones.

  Args:
    rows: the expand rows, ordered (call, example, position).
    batch: examples per call.

  Returns:
    Rows ``(*lead, batch, d)``.
  """
  def split(x):
    return x.reshape(x.shape[:-2] + (rows.calls, batch, -1, x.shape[-1]))
  a = jnp.mean(split(rows.a), axis=(-4, -2))
  g = jnp.sum(split(rows.g), axis=(-4, -2))
  return KroneckerRows(a, g, 1, 1)


def subsample_examples(st: _base.LayerStats, every: int, refresh
                       ) -> _base.LayerStats:
  """The statistics of one example in every ``every``.

  Kronecker factors are means over a batch's examples, so those of a
  sample of the examples estimate the same matrices without bias, and
  cost ``every`` times less where the outer products dominate (expand's
  conv patches, a sequence's tokens). Refresh ``refresh`` takes examples
  ``refresh mod every``, ``refresh mod every + every``, ...: a strided
  slice, so a batch sharded over devices stays sharded; over ``every``
  refreshes each example position is taken once. Of a batch that
  ``every`` does not divide, the last ``B mod every`` examples are never
  taken; one smaller than ``every`` is used whole.

  Args:
    st: a layer's captured statistics; the batch is the axis after the
      stack and call axes.
    every: static sampling period, at least 1.
    refresh: the statistics refresh's index (may be traced).

  Returns:
    The sampled statistics. Their cotangents are still those of the whole
    batch's loss: a mean loss's carry ``1/B``, not ``1/B_sampled``
    (:func:`kronecker_rows`' ``loss_batch``).
  """
  axis = st.meta.stack_ndim + 1
  batch = st.a.shape[axis]
  kept = batch // every
  if every == 1 or kept == 0:
    return st

  def take(x):
    x = lax.slice_in_dim(x, 0, kept * every, axis=axis)
    x = x.reshape(x.shape[:axis] + (kept, every) + x.shape[axis + 1:])
    return lax.dynamic_index_in_dim(x, refresh % every, axis + 1,
                                    keepdims=False)

  return _base.LayerStats(take(st.a), take(st.g), st.meta)


def conv_patches(x, meta: _base.LayerMeta):
  """Input patches in the HWIO kernel's feature order.

  Each kernel tap's column is a strided slice of the padded input: data
  movement only. ``lax.conv_general_dilated_patches`` forms the same array
  as a depthwise convolution with a one-hot kernel, in another feature
  order; on one CPU core that and the reordering took 3x the time of the
  factor's product (a 3x3 conv of 16 channels, batch 128, 14x14). Input
  dilation (a transposed conv) still takes that path.

  Args:
    x: ``(rows..., *spatial, C_in)`` inputs of one stack element.
    meta: the conv layer's metadata.

  Returns:
    ``(groups, N * positions, prod(kernel_size) * C_in / groups)`` with
    features ordered like ``kernel.reshape(-1, C_out)`` of one group.
  """
  cfg = dict(meta.config)
  ks = cfg['kernel_size']
  x = _conv_input(x, cfg)
  groups = cfg['groups']
  c_in = x.shape[-1]
  if all(d == 1 for d in cfg['lhs_dilation']):
    dilation, strides = cfg['rhs_dilation'], cfg['strides']
    dilated, pads = _explicit_pads(x.shape[1:-1], cfg)
    # Negative padding crops, as in lax.conv.
    x = lax.pad(x, jnp.zeros([], x.dtype),
                ((0, 0, 0),) + tuple((lo, hi, 0) for lo, hi in pads)
                + ((0, 0, 0),))
    out = [max((size - span) // stride + 1, 0) for size, span, stride in
           zip(x.shape[1:-1], dilated, strides)]
    columns = [
        x[(slice(None),) + tuple(
            slice(t * d, t * d + (o - 1) * s + 1, s)
            for t, d, o, s in zip(taps, dilation, out, strides))]
        for taps in itertools.product(*(range(k) for k in ks))]
    # (N, *out, taps, groups, C_in / groups): the kernel's feature order
    # within each group.
    p = jnp.stack(columns, axis=-2).reshape(
        (-1, math.prod(ks), groups, c_in // groups))
    return jnp.moveaxis(p, 2, 0).reshape(
        (groups, -1, math.prod(ks) * (c_in // groups)))
  spatial = 'DHW'[-len(ks):]
  dn = lax.conv_dimension_numbers(
      x.shape, ks + (c_in, c_in), ('N' + spatial + 'C', spatial + 'IO',
                                   'N' + spatial + 'C'))
  p = lax.conv_general_dilated_patches(
      x, ks, cfg['strides'], cfg['padding'], cfg['lhs_dilation'],
      cfg['rhs_dilation'], dn)
  # Patch features are ordered (C_in, *kernel_size); the kernel is
  # (*kernel_size, C_in/groups, C_out) with group-major channels.
  p = p.reshape((-1, groups, c_in // groups, math.prod(ks)))
  p = jnp.swapaxes(p, -1, -2).reshape((-1, groups, math.prod(ks) *
                                       (c_in // groups)))
  return jnp.swapaxes(p, 0, 1)


def kronecker_rows(st: _base.LayerStats, loss_reduction: str = 'mean',
                   with_bias: bool | None = None,
                   weight_sharing: str = 'expand',
                   loss_batch: int | None = None):
  """:class:`KroneckerRows` of a dense or conv layer.

  Args:
    st: the layer's captured statistics.
    loss_reduction: ``'mean'`` if the loss averages over the batch (the
      leading axis of one call's input): ``g`` is rescaled by the batch size
      to per-example cotangents; ``'sum'`` uses ``g`` as is.
    with_bias: append the ones column of the bias; default: when the layer
      has a bias (False for a frozen bias: the layer is then bias-less).
    weight_sharing: ``'expand'`` or ``'reduce'`` (:func:`reduce_rows`; a
      conv's position means then come from :func:`conv_patch_means`, with
      no patches formed), or ``'auto'``: reduce for a conv layer, expand
      for a dense one.
    loss_batch: the examples a mean loss averages over, when ``st`` holds
      a sample of them (:func:`subsample_examples`); default: ``st``'s.

  Returns:
    The layer's :class:`KroneckerRows`.
  """
  meta = st.meta
  if weight_sharing == 'auto':
    # A conv's positions share one example's label (reduce's setting); a
    # dense layer's tokens often have a loss each (expand's).
    weight_sharing = 'reduce' if meta.kind == 'conv' else 'expand'
  k = meta.stack_ndim
  kernel_name = meta.param_name('kernel')
  kernel = meta.param_shape(kernel_name)
  stack = kernel[:k]
  has_bias = (meta.param_name('bias') is not None if with_bias is None
              else with_bias)
  batch = st.a.shape[k + 1]
  scale = float(loss_batch or batch) if loss_reduction == 'mean' else 1.0
  if meta.kind == 'conv':
    groups = meta.cfg('groups')
    g = _f32(st.g)
    if weight_sharing == 'reduce':
      # One row per (call, example): its patches' mean over positions and
      # its cotangents' sum; the calls are reduced below.
      patches = conv_patch_means
      g = jnp.sum(g, axis=tuple(range(k + 2, g.ndim - 1)))
    else:
      patches = conv_patches
    a = jax.vmap(lambda x: patches(_f32(x), meta))(
        st.a.reshape((-1,) + st.a.shape[k:]))
    a = a.reshape(stack + a.shape[1:])
    g = g.reshape(stack + (-1, groups, kernel[-1] // groups))
    g = jnp.moveaxis(g, -2, -3)
  elif meta.kind == 'dense':
    in_axes = meta.cfg('in_axes')
    a = _f32(st.a)
    n_in = 1
    if in_axes is not None:
      src = [k + 1 + ax for ax in in_axes]
      a = jnp.moveaxis(a, src, list(range(a.ndim - len(src), a.ndim)))
      n_in = len(in_axes)
    a = a.reshape(stack + (1, -1, math.prod(kernel[k:k + n_in])))
    g = _f32(st.g).reshape(stack + (1, -1, math.prod(kernel[k + n_in:])))
  else:
    raise ValueError(f'no Kronecker rows for layer kind {meta.kind!r}')
  with_ones = lambda x: (jnp.concatenate([x, jnp.ones_like(x[..., :1])], -1)
                         if has_bias else x)
  rows = KroneckerRows(a, g, a.shape[-2] // batch, st.a.shape[k])
  if weight_sharing == 'reduce':
    # Reduce first: the ones column's mean is one, the scale is linear, and
    # XLA:CPU runs a sum fused with its operand's scaling 20x slower.
    rows = reduce_rows(rows, batch)
  return rows._replace(a=with_ones(rows.a), g=rows.g * scale)
