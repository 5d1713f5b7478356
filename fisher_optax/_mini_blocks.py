"""Mini-block layouts of Mini-Block Fisher: which weights form a block.

Mini-Block Fisher (``_mini_block_fisher``) cuts each layer's gradient into
many small vectors, its *block vectors*, and keeps one small second moment
per block. This module holds everything that depends on the layout and
nothing that depends on the algorithm's state:

* :func:`layouts` decides, from a parameter (or gradient) tree and optional
  captured metadata, which leaves are blocked and how (:class:`Layer`);
* :func:`vectors` and :func:`from_vectors` turn a layer's leaves into block
  vectors ``(*lead, rows, width)`` and back;
* :func:`statistic` and :func:`precondition` are the two products with the
  blocks: the mini-block second moments of block vectors, and blockwise
  ``F^-1 v``.

Layouts (Flax parameter layouts):

* conv kernel ``(*window, C_in, C_out)``: one block per (input, output)
  channel pair, the ``k = prod(window)`` weights ``K[..., i, o]``, stacked
  as ``(C_in * C_out, k)`` with pair ``(i, o)`` at row ``i * C_out + o``.
* dense kernel ``(I, O)`` with its bias folded in as a last row,
  ``G~ = [dW; db]`` of shape ``(I + 1, O)``: the rows of ``G~`` are the
  block vectors (form ``'average'``: one shared matrix; ``'column'``: one
  matrix per row). Form ``'chunks'`` is what the released code's "Avg"
  computes: its vectors are runs of ``O`` consecutive entries of the
  output-major ``G~^T`` (PyTorch's ``[dW | db]`` viewed as ``(I + 1, O)``).
  ``block`` splits the width ``O`` into diagonal blocks.
* ``'diagonal'``: one fallback leaf with scalar blocks, kept elementwise.

A layout is a pure function of the tree's paths and shapes (and of the
``layers`` metadata), so it is recomputed from the gradients at every
``update`` and never stored outside the optimizer state.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from fisher_optax import _base
from fisher_optax import _linalg

DENSE_BLOCKS = ('average', 'column', 'chunks')
# Dense forms whose rows share one averaged matrix.
SHARED = ('average', 'chunks')


@dataclasses.dataclass(frozen=True)
class Layer:
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
    per_row = () if self.form in SHARED else (self.rows,)
    return self.lead + per_row + (nb, self.block, self.block)

  @property
  def block_ndim(self) -> int:
    """Trailing axes of one block of the statistic (0: scalar entries)."""
    return 0 if self.form == 'diagonal' else 2

  @property
  def paths(self) -> tuple[str, ...]:
    """Parameter paths the layer covers."""
    return (self.kernel,) + ((self.bias,) if self.bias else ())


def layouts(params: Any, layers: Mapping[str, _base.LayerStats] | None,
            block_size: int | None, dense_blocks: str, fallback: str,
            where: str) -> dict[str, Layer]:
  """Blocked layers of ``params``, from ``layers`` metadata or from names.

  Layers in ``layers`` take their kind, stack axes and input axes from its
  metadata. Elsewhere the kernels' layouts are guessed from the
  parameters (:func:`fisher_optax._base.guess_kernels`: stack axes, input
  and output axes, dense or conv); the first update checks each guess
  against the statistics. Masked (frozen) leaves are never blocked: a dense
  layer whose bias is frozen is a bias-less layer, and a frozen kernel is
  no layer.
  With ``fallback='diagonal'`` every other leaf gets a ``'diagonal'``
  layout of its own.
  """
  leaves = _base.flatten_with_paths(params)
  live = {p: leaf for p, leaf in leaves.items() if not _base.is_masked(leaf)}
  out: dict[str, Layer] = {}

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
    out[key] = Layer(key, form, kernel, bias, lead, rows, width, block)

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
  # Layers not in `layers`: guessed from the parameters' shapes.
  for key, guess in _base.guess_kernels(live).items():
    if key in captured:
      continue
    add(key, 'conv' if guess.conv else 'dense', guess.kernel,
        None if guess.conv else guess.bias, guess.n_stack, guess.n_in)

  if fallback == 'diagonal':
    blocked = {p for layer in out.values() for p in layer.paths}
    for path, leaf in live.items():
      if path not in blocked:
        out[path] = Layer(path, 'diagonal', path, None,
                          _base.shape_of(leaf), 1, 1, 1)
  return out


def vectors(layer: Layer, leaves: Mapping[str, jax.Array],
            dtype: Any) -> jax.Array:
  """The layer's leaves as block vectors ``(*lead, rows, width)``.

  Args:
    layer: the layout.
    leaves: ``{param path: array}`` holding at least ``layer.paths``.
    dtype: dtype of the result (the statistics' dtype).

  Returns:
    The block vectors; a ``'diagonal'`` leaf is returned as it is.
  """
  k = leaves[layer.kernel].astype(dtype)
  if layer.form == 'diagonal':
    return k
  n = len(layer.lead)
  if layer.form == 'conv':
    v = k.reshape(layer.lead + (layer.width, layer.rows))
    return jnp.swapaxes(v, -1, -2)
  v = k.reshape(layer.lead + (-1, layer.width))
  if layer.bias is not None:
    b = leaves[layer.bias].astype(dtype)
    v = jnp.concatenate([v, b.reshape(b.shape[:n] + (1, layer.width))], -2)
  if layer.form == 'chunks':
    # PyTorch's [dW | db] is G~^T; the released code views its memory as
    # (I + 1, O) rows without transposing.
    v = jnp.swapaxes(v, -1, -2).reshape(v.shape)
  return v


def from_vectors(layer: Layer, v: jax.Array,
                 like: Mapping[str, Any]) -> dict[str, jax.Array]:
  """Inverse of :func:`vectors`: ``{param path: array}`` shaped as ``like``."""
  if layer.form == 'diagonal':
    return {layer.kernel: v}
  shape = lambda path: _base.shape_of(like[path])
  if layer.form == 'conv':
    v = jnp.swapaxes(v, -1, -2)
    return {layer.kernel: v.reshape(shape(layer.kernel))}
  if layer.form == 'chunks':
    v = jnp.swapaxes(v.reshape(v.shape[:-2] + v.shape[:-3:-1]), -1, -2)
  out = {}
  if layer.bias is not None:
    out[layer.bias] = v[..., -1, :].reshape(shape(layer.bias))
    v = v[..., :-1, :]
  out[layer.kernel] = v.reshape(shape(layer.kernel))
  return out


def statistic(layer: Layer, v: jax.Array) -> jax.Array:
  """Mini-block second moments ``S_b`` of block vectors ``v``."""
  if layer.form == 'diagonal':
    return jnp.square(v)
  if layer.form in SHARED:
    # V^T V / rows, in diagonal blocks of the output axis.
    return _linalg.block_outer(v, layer.block)
  return _linalg.block_outer(v[..., None, :], layer.block)


def precondition(layer: Layer, inverse: jax.Array, v: jax.Array):
  """Blockwise ``F^-1 v`` for block vectors ``v``."""
  if layer.form == 'diagonal':
    return inverse * v
  if layer.block == 1:
    # Scalar blocks: (..., [rows,] nb, 1, 1) is a diagonal over the width.
    scale = inverse[..., 0, 0]
    return v * (scale[..., None, :] if layer.form in SHARED else scale)
  if layer.form in SHARED:
    return _linalg.block_apply(inverse, v, 'right')
  return _linalg.block_apply(inverse, v[..., None, :], 'right')[..., 0, :]
