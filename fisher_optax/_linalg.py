"""Linear algebra on stacks of small symmetric positive semi-definite blocks.

K-FAC, TKFAC, EKFAC and Mini-Block Fisher all approximate a layer's curvature
by a block-diagonal matrix whose blocks are small (tens to a few thousand
rows) symmetric positive semi-definite (PSD) matrices. They need the same few
operations on those blocks: build them from captured rows, damp and invert or
eigendecompose them, multiply a gradient by them, and survive the occasional
non-finite factorisation. Keeping these in one module means every algorithm
pads, symmetrises, damps and guards the same way, so a fix made here reaches
all of them.

Conventions:

* Blocks are arrays of shape ``(..., b, b)``; leading axes are stack axes
  (``nn.scan`` over layers, the block index of a block-diagonal factor, ...)
  and everything broadcasts and batches over them, so the functions are
  ``jit`` and ``vmap`` friendly and never loop in Python over blocks.
* A factor of ``n`` features split into blocks of size ``b`` has
  ``nb = ceil(n / b)`` blocks. When ``b`` does not divide ``n``, the features
  are zero-padded to ``nb * b`` and the padded diagonal entries are 1, so the
  last block stays positive definite and padding never couples to a real
  feature. :func:`block_apply` pads vectors with zeros and slices the padding
  off again, so padded entries never reach a result.
* Computations are done in at least float32: curvature statistics in
  bfloat16 are too coarse to be inverted.
* Contractions use ``Precision.HIGHEST`` by default. On GPUs the default
  float32 matmul may run in TF32 (10-bit mantissa), and the inverse of a
  weakly damped factor amplifies that error by its condition number; the
  blocks are small, so the exact product costs little.
* Many layers share a few block sizes. :func:`bucketed` concatenates all
  blocks of one size into a single stack so that each expensive
  factorisation is traced and launched once per block size, not once per
  layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import math
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

# Smallest trace mean accepted by `pi_damping`; keeps the ratio finite when a
# factor is all zeros (dead units, or before the first statistics arrive).
_PI_EPS = 1e-30

_METHODS = ('cholesky', 'inv', 'eigh')

# Largest number of blocks that block_apply multiplies one by one on CPU.
_UNROLL_BLOCKS = 16


def _float(x) -> jax.Array:
  """``x`` as an array of at least float32."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _symmetrise(blocks: jax.Array) -> jax.Array:
  # Accumulated statistics and round-off leave tiny asymmetries; Cholesky and
  # eigh read only one triangle, so symmetrising makes the result independent
  # of which triangle that is.
  return 0.5 * (blocks + jnp.swapaxes(blocks, -1, -2))


def _eye_like(blocks: jax.Array) -> jax.Array:
  return jnp.eye(blocks.shape[-1], dtype=blocks.dtype)


def _unroll(nb: int) -> bool:
  """Whether to issue the products of ``nb`` blocks one by one.

  XLA:CPU runs a dot batched over a few large blocks much slower than the
  same dots issued separately (1.75x for 7 blocks of 128 on 2 cores).
  """
  return 1 < nb <= _UNROLL_BLOCKS and jax.default_backend() == 'cpu'


def _block_layout(n: int, block_size: int | None) -> tuple[int, int]:
  """(b, nb) for ``n`` features in blocks of at most ``block_size``."""
  if n < 1:
    raise ValueError(f'Need at least one feature, got n={n}.')
  if block_size is not None and block_size < 1:
    raise ValueError(f'block_size must be positive, got {block_size}.')
  b = n if block_size is None else min(block_size, n)
  return b, -(-n // b)


def block_outer(
    x: jax.Array,
    block_size: int | None,
    weights: jax.Array | None = None,
    *,
    precision: lax.Precision | None = lax.Precision.HIGHEST,
) -> jax.Array:
  """Diagonal blocks of the weighted second moment ``x^T diag(w) x / N``.

  The full ``n x n`` moment is never formed when there is more than one
  block: the features are reshaped into ``(nb, b)`` and contracted per block,
  which costs ``N * n * b`` instead of ``N * n**2``.

  Args:
    x: Rows of shape ``(..., N, n)``: ``N`` rows of ``n`` features, leading
      axes are stack axes.
    block_size: Largest block size ``b``; ``None`` means one block of all
      ``n`` features. Clipped to ``n``.
    weights: Optional per-row weights of shape ``(..., N)`` broadcasting
      against the leading axes of ``x``; default all ones. The moment is
      still divided by ``N``, not by the sum of the weights.
    precision: Precision of the contraction.

  Returns:
    Blocks of shape ``(..., nb, b, b)`` with ``nb = ceil(n / b)``. If ``b``
    does not divide ``n`` the last block covers ``n - (nb - 1) * b`` real
    features; its remaining diagonal entries are 1 and its remaining
    off-diagonal entries 0.
  """
  x = _float(x)
  num_rows, n = x.shape[-2:]
  b, nb = _block_layout(n, block_size)
  pad = nb * b - n
  if pad:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  xb = x.reshape(x.shape[:-1] + (nb, b))
  xw = xb if weights is None else xb * _float(weights)[..., None, None]
  if _unroll(nb):
    out = jnp.stack([
        jnp.einsum('...ri,...rj->...ij', xw[..., k, :], xb[..., k, :],
                   precision=precision) for k in range(nb)], axis=-3)
  else:
    out = jnp.einsum('...rki,...rkj->...kij', xw, xb, precision=precision)
  out = out / max(num_rows, 1)
  if pad:
    # A unit diagonal on the padded features keeps the last block invertible
    # without damping and leaves the real features' block untouched.
    pad_diag = np.zeros((nb * b,), np.float32)
    pad_diag[n:] = 1.0
    out = out + jnp.asarray(
        pad_diag.reshape(nb, b)[:, :, None] * np.eye(b, dtype=np.float32),
        out.dtype)
  return out


def block_apply(
    blocks: jax.Array,
    v: jax.Array,
    side: str = 'left',
    *,
    precision: lax.Precision | None = lax.Precision.HIGHEST,
) -> jax.Array:
  """Multiplies ``v`` by a block-diagonal matrix given by its blocks.

  Args:
    blocks: Blocks of shape ``(..., nb, b, b)`` of the block-diagonal matrix
      ``B = blockdiag(blocks)`` of size ``nb * b``.
    v: A matrix of shape ``(..., n, m)`` for ``side='left'`` or
      ``(..., m, n)`` for ``side='right'``, with ``n <= nb * b``. A vector is
      passed as a one-column (or one-row) matrix. Leading axes broadcast
      against those of ``blocks``.
    side: ``'left'`` computes ``B @ v``, ``'right'`` computes ``v @ B``.
    precision: Precision of the products.

  Returns:
    ``B[:n, :n] @ v`` (left) or ``v @ B[:n, :n]`` (right), same trailing
    shape as ``v``. Only the top-left ``n x n`` part of ``B`` is used:
    ``v`` is zero-padded to ``nb * b`` and the padded part of the result is
    dropped.
  """
  if side not in ('left', 'right'):
    raise ValueError(f"side must be 'left' or 'right', got {side!r}.")
  nb, b = blocks.shape[-3], blocks.shape[-1]
  axis = -2 if side == 'left' else -1
  n = v.shape[axis]
  pad = nb * b - n
  if pad < 0:
    raise ValueError(f'v has {n} features along axis {axis}, more than the '
                     f'{nb} x {b} block-diagonal matrix.')
  if pad:
    widths = [(0, 0)] * v.ndim
    widths[axis] = (0, pad)
    v = jnp.pad(v, widths)
  if _unroll(nb):
    if side == 'left':
      parts = [jnp.matmul(blocks[..., i, :, :], v[..., i * b:(i + 1) * b, :],
                          precision=precision) for i in range(nb)]
      return jnp.concatenate(parts, axis=-2)[..., :n, :]
    parts = [jnp.matmul(v[..., i * b:(i + 1) * b], blocks[..., i, :, :],
                        precision=precision) for i in range(nb)]
    return jnp.concatenate(parts, axis=-1)[..., :n]
  if side == 'left':
    m = v.shape[-1]
    vb = v.reshape(v.shape[:-2] + (nb, b, m))
    out = jnp.matmul(blocks, vb, precision=precision)
    out = out.reshape(out.shape[:-3] + (nb * b, m))
    return out[..., :n, :]
  m = v.shape[-2]
  # (..., m, nb, b) -> (..., nb, m, b) so that nb becomes a batch axis.
  vb = jnp.swapaxes(v.reshape(v.shape[:-1] + (nb, b)), -3, -2)
  out = jnp.swapaxes(jnp.matmul(vb, blocks, precision=precision), -3, -2)
  out = out.reshape(out.shape[:-3] + (m, nb * b))
  return out[..., :n]


def safe_eigh(blocks: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eigendecomposition of symmetrised PSD blocks, eigenvalues clipped at 0.

  Round-off makes the smallest eigenvalues of a PSD matrix slightly
  negative; clipping them keeps the reconstruction PSD so that damping alone
  bounds its inverse.

  Args:
    blocks: Blocks of shape ``(..., b, b)``.

  Returns:
    ``(eigenvalues, eigenvectors)`` of shapes ``(..., b)`` (ascending,
    non-negative) and ``(..., b, b)`` (columns), such that
    ``V @ diag(w) @ V^T`` is the PSD part of ``(blocks + blocks^T) / 2``.
  """
  w, v = jnp.linalg.eigh(_symmetrise(_float(blocks)), symmetrize_input=False)
  return jnp.maximum(w, 0.0), v


def damped_inverse(
    blocks: jax.Array,
    damping: jax.Array | float,
    method: str = 'cholesky',
) -> jax.Array:
  """Inverse of ``blocks + damping * I`` for a stack of symmetric blocks.

  Args:
    blocks: Blocks of shape ``(..., b, b)``; symmetrised before use.
    damping: Scalar or array broadcasting against the leading axes ``...``
      (one damping per block).
    method: ``'cholesky'`` (Cholesky factor and two triangular solves; the
      cheapest, but NaN if a damped block is not positive definite),
      ``'inv'`` (LU inverse) or ``'eigh'`` (eigendecomposition with
      eigenvalues clipped at 0 as in :func:`safe_eigh`, so it is finite for
      any positive damping; it inverts the PSD part of the block, which for a
      PSD block differs from the exact inverse only by round-off).

  Returns:
    Symmetric inverses of shape ``(..., b, b)``. Non-finite results are left
    as they are; see :func:`keep_finite`.
  """
  if method not in _METHODS:
    raise ValueError(f'method must be one of {_METHODS}, got {method!r}.')
  blocks = _symmetrise(_float(blocks))
  damping = jnp.asarray(damping, blocks.dtype)
  eye = _eye_like(blocks)
  if method == 'eigh':
    w, v = safe_eigh(blocks)
    scale = 1.0 / (w + damping[..., None])
    out = jnp.matmul(v * scale[..., None, :], jnp.swapaxes(v, -1, -2),
                     precision=lax.Precision.HIGHEST)
  elif method == 'inv':
    out = jnp.linalg.inv(blocks + damping[..., None, None] * eye)
  else:
    damped = blocks + damping[..., None, None] * eye
    chol = jnp.linalg.cholesky(damped)
    out = jax.scipy.linalg.cho_solve(
        (chol, True), jnp.broadcast_to(eye, damped.shape))
  # None of the methods returns an exactly symmetric result in floating
  # point; downstream eigendecompositions and moving averages assume one.
  return _symmetrise(out)


def keep_finite(
    new: jax.Array,
    old: jax.Array,
    block_ndim: int = 2,
) -> tuple[jax.Array, jax.Array]:
  """Replaces blocks of ``new`` that contain a non-finite entry by ``old``.

  A failed factorisation (Cholesky of an indefinite block, overflow) poisons
  a whole block; keeping the previous value of just that block lets the
  other blocks and layers carry on.

  Args:
    new: Array of shape ``(..., *block)`` with ``block_ndim`` trailing block
      axes, e.g. ``(..., b, b)`` for matrices and ``block_ndim=1`` for
      eigenvalues ``(..., b)``.
    old: Fallback of the same shape as ``new``.
    block_ndim: Number of trailing axes that form one block; clipped to
      ``new.ndim``.

  Returns:
    ``(result, num_bad)``: ``result`` has ``new``'s shape and dtype, and
    ``num_bad`` is the int32 scalar number of blocks taken from ``old``.
  """
  if new.shape != old.shape:
    raise ValueError(f'Shapes differ: new {new.shape}, old {old.shape}.')
  block_ndim = min(block_ndim, new.ndim)
  block_axes = tuple(range(new.ndim - block_ndim, new.ndim))
  bad = ~jnp.all(jnp.isfinite(new), axis=block_axes)
  result = jnp.where(bad.reshape(bad.shape + (1,) * block_ndim),
                     old.astype(new.dtype), new)
  return result, jnp.sum(bad, dtype=jnp.int32)


def keep_finite_tree(
    new_tree: Any,
    old_tree: Any,
    block_ndim: int = 2,
) -> tuple[Any, jax.Array]:
  """:func:`keep_finite` on every leaf of matching pytrees.

  Args:
    new_tree: Pytree of arrays.
    old_tree: Pytree of the same structure and leaf shapes.
    block_ndim: Trailing block axes of every leaf, as in :func:`keep_finite`.

  Returns:
    ``(result_tree, num_bad)``: the tree of kept leaves and the int32 sum of
    the leaves' counts (a block replaced in two leaves counts twice).
  """
  new_leaves, treedef = jax.tree.flatten(new_tree)
  old_leaves = treedef.flatten_up_to(old_tree)
  pairs = [keep_finite(n, o, block_ndim)
           for n, o in zip(new_leaves, old_leaves)]
  total = jnp.zeros((), jnp.int32)
  for _, count in pairs:
    total = total + count
  return treedef.unflatten([r for r, _ in pairs]), total


def _lapack_may_deadlock() -> bool:
  """Whether batched LAPACK calls can deadlock here (several CPU devices).

  jaxlib's CPU LAPACK kernels split a batched call over the intra-op thread
  pool and wait for the pieces (``ParallelBatchMap``). With several CPU
  devices (``--xla_force_host_platform_device_count``) their programs run on
  that same pool, so when the device programs hold every pool thread while
  waiting for their pieces, or for a collective, nothing runs (seen with
  jaxlib 0.10 on 2 cores: TKFAC's step under ``shard_map`` on 8 devices).
  """
  return jax.default_backend() == 'cpu' and jax.device_count() > 1


def _one_at_a_time(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn`` over the leading axis with one block per call (``lax.map``).

  LAPACK factorises each matrix of a batch on its own, so this gives the
  batched call's results; each call has a batch of one, which jaxlib runs
  without handing pieces to the thread pool.
  """
  def run(*args):
    return lax.map(lambda xs: jax.tree.map(
        lambda leaf: leaf[0], fn(*(x[None] for x in xs))), args)
  return run


def _spread(fn: Callable[..., Any], axis: str, stack: jax.Array,
            *extra: jax.Array) -> Any:
  """``fn(stack, *extra)`` with the blocks shared out over mesh axis ``axis``.

  Each device factorises ``ceil(N / n)`` of the ``N`` blocks and the results are
  gathered, so every device ends with all of them. Under ``jit`` (an ``Auto``
  axis; the updates make Explicit axes Auto) this is a sharding of the block
  axis that XLA's SPMD partitioner carries through ``fn`` and an all-gather back
  to replicated. Under ``shard_map`` (a ``Manual`` axis) each device slices its
  share with ``axis_index``; the shares are put in place in zeros and summed
  with ``psum``, an all-reduce whose result is replicated by construction, so it
  also passes ``shard_map``'s replication check (``check_vma``).
  Adding zeros is exact, so either way the result equals ``fn(stack)``.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or axis not in mesh.axis_names:
    raise ValueError(
        f'spread_inverses={axis!r}: no mesh axis {axis!r} is in context '
        f'(mesh: {None if mesh.empty else dict(mesh.shape)}). Call the '
        'update under `jax.set_mesh(mesh)` (jit with shardings), on arrays '
        'placed on a mesh with Explicit axes, or inside `jax.shard_map` '
        'over a mesh with that axis, or leave spread_inverses=None.')
  kind = dict(zip(mesh.axis_names, mesh.axis_types))[axis]
  if kind == jax.sharding.AxisType.Manual:
    n = mesh.shape[axis]
    total = stack.shape[0]
    share = -(-total // n)
    pad = share * n - total
    # Identity blocks (and unit extras) keep the padding well posed.
    eye = jnp.broadcast_to(_eye_like(stack), (pad,) + stack.shape[1:])
    stack = jnp.concatenate([stack, eye])
    extra = [jnp.concatenate([e, jnp.ones((pad,) + e.shape[1:], e.dtype)])
             for e in extra]
    start = lax.axis_index(axis) * share
    mine = fn(*(lax.dynamic_slice_in_dim(x, start, share)
                for x in (stack, *extra)))

    def gather(part):
      full = jnp.zeros((share * n,) + part.shape[1:], part.dtype)
      full = lax.dynamic_update_slice_in_dim(full, part, start, 0)
      return lax.psum(full, axis)[:total]
    return jax.tree.map(gather, mine)
  # An Auto axis: the optimizers' updates make Explicit axes Auto
  # (_sharding.with_auto_axes), so XLA may pad a stack that does not divide.
  spec = jax.sharding.PartitionSpec(axis)
  replicated = jax.sharding.PartitionSpec()
  out = fn(*(lax.with_sharding_constraint(x, spec) for x in (stack, *extra)))
  return jax.tree.map(
      lambda leaf: lax.with_sharding_constraint(leaf, replicated), out)


def bucketed(
    fn: Callable[..., Any],
    blocks_by_key: Mapping[Any, jax.Array],
    extra_by_key: Mapping[Any, jax.Array] | None = None,
    spread: str | None = None,
) -> dict[Any, Any]:
  """Applies ``fn`` once per block size to all blocks of that size.

  Blocks of every key with the same size ``b`` are flattened into one
  ``(N_b, b, b)`` stack, so ``fn`` (a Cholesky, an eigh, ...) is traced and
  run once per distinct ``b`` as one batched call, however many layers
  share that size.

  Args:
    fn: ``fn(stack)`` or, with ``extra_by_key``, ``fn(stack, extra)``, where
      ``stack`` has shape ``(N, b, b)`` and ``extra`` shape ``(N,)``. Returns
      an array or a pytree of arrays whose leading axis is ``N`` (e.g.
      ``(eigenvalues (N, b), eigenvectors (N, b, b))``). ``fn`` must treat
      the ``N`` blocks independently.
    blocks_by_key: Mapping from key to blocks of shape ``(*lead, b, b)``;
      ``lead`` and ``b`` may differ between keys. Blocks of the same ``b``
      are concatenated, so mixed dtypes are promoted to a common one.
    extra_by_key: Optional mapping with the same keys to a per-block
      argument broadcastable to that key's ``lead`` shape (e.g. a scalar or
      per-block damping).
    spread: a mesh axis name, or None. With a name, each device of that
      axis factorises its share of every stack and the results are
      gathered (see :func:`_spread`); the result is the same.

  Returns:
    A dict from each key to ``fn``'s output for that key's blocks, every
    leaf reshaped from ``(N_key, ...)`` back to ``(*lead, ...)``.
  """
  groups: dict[int, list[Any]] = {}
  for key, blocks in blocks_by_key.items():
    if blocks.ndim < 2 or blocks.shape[-1] != blocks.shape[-2]:
      raise ValueError(f'Blocks of {key!r} are not square: {blocks.shape}.')
    groups.setdefault(blocks.shape[-1], []).append(key)
  if extra_by_key is not None and set(extra_by_key) != set(blocks_by_key):
    raise ValueError('extra_by_key must have the same keys as blocks_by_key.')

  results = {}
  previous = None
  for b, keys in groups.items():
    leads = [blocks_by_key[k].shape[:-2] for k in keys]
    sizes = [math.prod(lead) for lead in leads]
    stack = jnp.concatenate(
        [blocks_by_key[k].reshape(size, b, b) for k, size in zip(keys, sizes)])
    if previous is not None:
      # Run the block sizes one after another. jaxlib 0.10.0 to 0.11.0 split
      # a batched LAPACK call over XLA's intra-op thread pool; two such calls
      # running at once can block every pool thread and deadlock (seen on a
      # 2-core CPU). A true data dependency orders them (XLA does not fold
      # x * 0 for floats); an optimization_barrier did not.
      stack = stack + 0.0 * jnp.isfinite(previous).astype(stack.dtype)
    args = [stack]
    if extra_by_key is not None:
      args.append(jnp.concatenate([
          jnp.broadcast_to(jnp.asarray(extra_by_key[k]), lead).reshape(size)
          for k, lead, size in zip(keys, leads, sizes)]))
    run = _one_at_a_time(fn) if _lapack_may_deadlock() else fn
    out = run(*args) if spread is None else _spread(run, spread, *args)
    previous = jax.tree.leaves(out)[0].reshape(-1)[0]
    offsets = np.cumsum([0] + sizes)
    for key, lead, start, stop in zip(keys, leads, offsets[:-1], offsets[1:]):
      results[key] = jax.tree.map(
          lambda leaf, lead=lead, start=start, stop=stop:
          leaf[start:stop].reshape(lead + leaf.shape[1:]),
          out)
  return {key: results[key] for key in blocks_by_key}


def block_trace_mean(blocks: jax.Array, n: int | None = None) -> jax.Array:
  """Mean diagonal entry over the real features of a block-diagonal factor.

  This is ``tr(F) / dim(F)`` for :func:`pi_damping`, with the padded
  diagonal entries of :func:`block_outer` left out.

  Args:
    blocks: Blocks of shape ``(..., nb, b, b)``.
    n: Number of real features, ``<= nb * b``; default ``nb * b``.

  Returns:
    Array of shape ``(...)``.
  """
  nb, b = blocks.shape[-3], blocks.shape[-1]
  n = nb * b if n is None else n
  diag = jnp.diagonal(_float(blocks), axis1=-2, axis2=-1)
  diag = diag.reshape(diag.shape[:-2] + (nb * b,))[..., :n]
  return jnp.mean(diag, axis=-1)


def pi_damping(
    a_trace_mean: jax.Array | float,
    g_trace_mean: jax.Array | float,
    damping: jax.Array | float,
) -> tuple[jax.Array, jax.Array]:
  """Factored Tikhonov damping split between Kronecker factors by ``pi``.

  Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored
  Approximate Curvature", ICML 2015, Section 6.3: rather than damping
  ``A (x) G + damping * I`` (which has no Kronecker-factored inverse), damp
  each factor,

      (A + pi * sqrt(damping) * I) (x) (G + sqrt(damping) / pi * I),

  with ``pi = sqrt((tr(A) / dim(A)) / (tr(G) / dim(G)))``, the trace-norm
  choice that makes both factors' damping proportional to their average
  eigenvalue. The product's cross term ``damping * I`` equals the unfactored
  damping, and ``pi`` minimises the norm of the two remaining error terms
  ``pi sqrt(damping) G`` and ``sqrt(damping) / pi A``.

  Args:
    a_trace_mean: ``tr(A) / dim(A)`` of the input-side factor (any shape,
      e.g. stack axes).
    g_trace_mean: ``tr(G) / dim(G)`` of the output-side factor, broadcasting
      against ``a_trace_mean``.
    damping: Total damping, broadcasting against both.

  Returns:
    ``(a_damping, g_damping) = (sqrt(damping) * pi, sqrt(damping) / pi)``.
    Trace means are floored at 1e-30 so that ``pi`` stays finite and
    positive when a factor is zero (``pi = 1`` when both are).
  """
  a = jnp.maximum(_float(a_trace_mean), _PI_EPS)
  g = jnp.maximum(_float(g_trace_mean), _PI_EPS)
  pi = jnp.sqrt(a / g)
  root = jnp.sqrt(_float(damping))
  return root * pi, root / pi
