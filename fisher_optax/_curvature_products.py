"""Exact curvature quadratic forms ``v_i^T C v_j`` for the adaptive step.

Two sources, compared in ``docs/adaptive.md``:

* :func:`captured_products`, from the statistics the capture already took
  (no extra pass). For every example ``n`` the inner product of its gradient
  with ``v`` is ``s_n(v) = sum_layers sum_rows a_{n,r}^T V g_{n,r}``
  (kernels and biases of dense and conv layers, with a conv's rows its
  patches; embedding rows; a norm layer's per-example sums of
  ``g * xhat`` and ``g``), cross-layer terms included, and
  ``v_i^T C v_j = mean_n s_n(v_i) s_n(v_j)``: the empirical Fisher, or with
  ``fisher='softmax'`` etc. a Monte-Carlo estimate of the true Fisher.
* :func:`ggn_products`, the exact Gauss-Newton matrix ``J^T H_L J`` of a
  loss split into ``outputs_fn(params)`` and ``outputs_loss(outputs)``, by
  one ``jax.linearize`` of the model and a Hessian-vector product of the
  loss in output space (Martens & Grosse's and kfac-jax's choice);
  :func:`linearization_products` the same from the linearization the
  capture step already took (``_linearization.py``): no primal pass.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from fisher_optax import _base
from fisher_optax import _kronecker
from fisher_optax import _stats


def _kron_scores(st: _base.LayerStats, layout, vectors, loss_reduction,
                 dtype):
  """``s_n(v)`` of one dense, conv or embedding layer: ``(K, batch)``."""
  k = st.meta.stack_ndim
  calls, batch = st.a.shape[k], st.a.shape[k + 1]
  scale = float(batch) if loss_reduction == 'mean' else 1.0
  if layout.kind == 'embed':
    # Rows are the looked-up ids; V's rows at those ids meet g.
    stack = layout.lead[:-1]
    ids = st.a.reshape((math.prod(stack), -1)).astype(jnp.int32)
    g = st.g.astype(dtype).reshape(ids.shape + (layout.d_out,)) * scale
    tables = jnp.stack([v[layout.kernel].astype(dtype).reshape(
        (-1, layout.d_in, layout.d_out)) for v in vectors])
    picked = jax.vmap(lambda t, i: t[:, i], in_axes=(1, 0), out_axes=1)(
        tables, ids)
    per_row = jnp.sum(picked * g, -1)  # (K, stack, N)
  elif layout.conv:
    return _conv_scores(st, layout, vectors, scale, dtype)
  else:
    rows = _stats.kronecker_rows(st, loss_reduction,
                                 with_bias=layout.bias is not None)
    mats = jnp.stack([
        _kronecker.to_matrix(layout, v[layout.kernel].astype(dtype),
                             None if layout.bias is None else
                             v[layout.bias].astype(dtype))
        for v in vectors])
    av = jnp.einsum('...ni,k...ij->k...nj', rows.a.astype(dtype), mats,
                    precision=lax.Precision.HIGHEST)
    per_row = jnp.sum(av * rows.g.astype(dtype), -1)  # (K, *lead, N)
  # Rows are ordered (call, example, position) after the stack and groups:
  # one example's score sums all of them.
  per_row = per_row.reshape((len(vectors), -1, calls, batch,
                             per_row.shape[-1] // (calls * batch)))
  return jnp.sum(per_row, axis=(1, 2, 4))


def _conv_scores(st: _base.LayerStats, layout, vectors, scale, dtype):
  """``s_n(v)`` of a conv layer: ``sum_positions <conv(x_n, V), g_n>``.

  The layer's own convolution with the direction as its kernel gives the
  output perturbation of each example without forming patches: one conv
  forward per direction.
  """
  meta = st.meta
  cfg = dict(meta.config)
  k = meta.stack_ndim
  n = len(cfg['kernel_size'])
  calls, batch = st.a.shape[k], st.a.shape[k + 1]
  x = st.a.astype(dtype).reshape((-1, calls * batch) + st.a.shape[k + 2:])
  g = st.g.astype(dtype).reshape((x.shape[0], calls * batch) + st.g.shape[
      k + 2:]) * scale
  if cfg['pre_pad'] is not None:
    mode, pads = cfg['pre_pad']
    x = jnp.pad(x, ((0, 0), (0, 0)) + tuple(pads) + ((0, 0),), mode=mode)
  spatial = 'DHW'[-n:]
  numbers = ('N' + spatial + 'C', spatial + 'IO', 'N' + spatial + 'C')
  kernel_shape = meta.param_shape(layout.kernel)[k:]

  def one(x, kernel, g):
    y = lax.conv_general_dilated(
        x, kernel, cfg['strides'], cfg['padding'], cfg['lhs_dilation'],
        cfg['rhs_dilation'], numbers, feature_group_count=cfg['groups'],
        precision=lax.Precision.HIGHEST)
    return jnp.sum(y * g, axis=tuple(range(1, y.ndim)))

  out = []
  for v in vectors:
    kernel = v[layout.kernel].astype(dtype).reshape(
        (x.shape[0],) + kernel_shape)
    scores = jax.vmap(one)(x, kernel, g)  # (stack, calls * batch)
    if layout.bias is not None:
      bias = v[layout.bias].astype(dtype).reshape((x.shape[0], -1))
      scores = scores + jnp.einsum(
          'snpo,so->sn', g.reshape(g.shape[:2] + (-1, g.shape[-1])), bias)
    out.append(jnp.sum(scores.reshape((-1, calls, batch)), axis=(0, 1)))
  return jnp.stack(out)


def _norm_scores(st: _base.LayerStats, vectors, loss_reduction, dtype):
  """``s_n(v)`` of a norm layer's scale and bias, ``(K, batch)``, or None
  when both are frozen."""
  meta = st.meta
  k = meta.stack_ndim
  batch = st.g.shape[k + 1]
  g = st.g.astype(dtype) * (batch if loss_reduction == 'mean' else 1.0)
  feat = tuple(ax + k + 1 for ax in meta.cfg('feature_axes'))
  pos = tuple(ax for ax in range(k + 2, g.ndim) if ax not in feat)
  out = None
  for role, value in (('scale', st.extras.get('xhat')), ('bias', None)):
    name = meta.param_name(role)
    if name is None or any(_base.is_masked(v[name]) for v in vectors):
      continue
    per_example = g if value is None else g * value.astype(dtype)
    per_example = jnp.sum(per_example, axis=pos)  # (*stack, C, B, *feat)
    shape = per_example.shape
    w = jnp.stack([v[name].astype(dtype).reshape(
        shape[:k] + (1, 1) + shape[k + 2:]) for v in vectors])
    # Summed, not written into zeros: the batch axis may be sharded.
    scores = jnp.sum(per_example[None] * w, axis=tuple(range(1, k + 2)) +
                     tuple(range(k + 3, len(shape) + 1)))
    out = scores if out is None else out + scores
  return out


def per_example_scores(layer_stats: Mapping[str, _base.LayerStats],
                       vectors: Sequence[Any], loss_reduction: str,
                       where: str) -> tuple[jax.Array, frozenset[str]]:
  """``S[i, n] = s_n(v_i)`` summed over captured layers, and covered paths.

  Args:
    layer_stats: this step's captured statistics.
    vectors: parameter-shaped pytrees.
    loss_reduction: ``'mean'`` (captured cotangents are per-example ones
      divided by the batch size) or ``'sum'``.
    where: caller's name for errors.

  Returns:
    ``(S, covered)``: ``S`` of shape ``(len(vectors), batch)`` and the
    parameter paths whose per-example gradients ``S`` includes.
  """
  layer_stats = _base.check_layer_stats(layer_stats, where)
  flat = [_base.flatten_with_paths(v) for v in vectors]
  dtype = jnp.float32
  for leaf in flat[0].values():
    if _base.is_float(leaf):
      dtype = jnp.promote_types(dtype, _base.stats_dtype(leaf))
  total, covered = None, set()
  for key, st in layer_stats.items():
    meta = st.meta
    per_layer = [{name: f[_base.join_path(key, name)]
                  for _, name in meta.params
                  if _base.join_path(key, name) in f} for f in flat]
    frozen = frozenset(name for name, leaf in per_layer[0].items()
                       if _base.is_masked(leaf))
    if meta.kind == 'norm':
      scores = _norm_scores(st, per_layer, loss_reduction, dtype)
      if scores is None:  # scale and bias both frozen
        continue
      names = [n for _, n in meta.params if n not in frozen]
    else:
      layout = _kronecker.layout_from_meta(key, meta, frozen)
      if layout is None:
        continue
      scores = _kron_scores(st, layout, per_layer, loss_reduction, dtype)
      names = [n for n in (layout.kernel, layout.bias) if n]
    covered.update(_base.join_path(key, n) for n in names)
    total = scores if total is None else total + scores
  if total is None:
    raise ValueError(
        f'{where}: layer_stats covers no parameter, so the quadratic model '
        'has no curvature. Capture with fisher_optax.linen/nnx '
        'value_grad_and_stats, or pass outputs_fn= and outputs_loss=.')
  return total, frozenset(covered)


def captured_products(layer_stats, vectors, loss_reduction: str,
                      axis_name: str | None, where: str):
  """``C[i, j] = mean_n s_n(v_i) s_n(v_j)`` (``sum_n`` for a summed loss).

  Parameters no captured layer covers contribute nothing to ``C``: the
  model sees them through the gradient and the damping only.

  Returns:
    ``(C, covered)``: the ``(K, K)`` matrix and the covered paths.
  """
  scores, covered = per_example_scores(layer_stats, vectors, loss_reduction,
                                       where)
  # A sum, not a matmul: on an Explicit mesh the batch axis is sharded.
  c = jnp.sum(scores[:, None, :] * scores[None, :, :], axis=-1)
  if loss_reduction == 'mean':
    c = c / scores.shape[-1]
  if axis_name is not None:
    c = lax.pmean(c, axis_name)
  return c, covered


def _zeros_for_masked(v, params):
  return jax.tree.map(
      lambda x, p: jnp.zeros_like(p) if _base.is_masked(x) else
      x.astype(jnp.result_type(p)), v, params, is_leaf=_base.is_masked)


def ggn_products(outputs_fn: Callable[[Any], Any],
                 outputs_loss: Callable[[Any], jax.Array], params,
                 vectors: Sequence[Any], axis_name: str | None):
  """``C[i, j] = (J v_i)^T H_L (J v_j)``: the exact Gauss-Newton products.

  Args:
    outputs_fn: ``params -> outputs`` (any pytree), the model on the batch.
    outputs_loss: ``outputs -> loss``, so that the loss is
      ``outputs_loss(outputs_fn(params))``.
    params: where the products are taken.
    vectors: parameter-shaped pytrees.
    axis_name: data-parallel axis to ``pmean`` over, or None.

  Returns:
    The ``(K, K)`` matrix.
  """
  outputs, jvp = jax.linearize(outputs_fn, params)
  tangents = [(jvp(_zeros_for_masked(v, params)),) for v in vectors]
  return _hessian_products(outputs_loss, (outputs,), tangents, axis_name)


def linearization_products(linearization, params, vectors: Sequence[Any],
                           axis_name: str | None):
  """The Gauss-Newton products of the capture step's linearization.

  With the loss :math:`\\ell(f(\\theta), \\theta)` split where it calls
  the model (``_linearization.py``), ``C[i, j] = u_i^T H u_j`` with
  ``u = (J v, v_outside)`` and ``H`` the Hessian of :math:`\\ell` in the
  outputs and in the parameters it reads itself (``v_outside``, those
  leaves of ``v``): the Gauss-Newton matrix of the outputs, plus an L2
  penalty's exact curvature. :math:`J v` costs one tangent pass of the
  linearized model per vector, and no primal pass.

  Args:
    linearization: a :class:`~fisher_optax._linearization.Linearization`.
    params: the update's parameters (masked leaves give zero tangents).
    vectors: parameter-shaped pytrees.
    axis_name: data-parallel axis to ``pmean`` over, or None.

  Returns:
    The ``(K, K)`` matrix.
  """
  lin = linearization
  paths, leaves, treedef = _base.flatten_leaves(lin.params)
  given = len(jax.tree.leaves(params, is_leaf=_base.is_masked))
  if given != len(leaves):
    raise ValueError(
        f'the update\'s parameters have {given} leaves, the ones the capture '
        f'step differentiated {len(leaves)}: the one-keyword adaptive step '
        'needs all of them (pass value=, value_fn=, outputs_fn= and '
        'outputs_loss= to update a part).')
  outside = set(lin.outside())
  used = [p in outside for p in paths]
  vectors = [_zeros_for_masked(v, params) for v in vectors]
  try:
    outputs_tangents = [lin.outputs_jvp(v) for v in vectors]
  except TypeError as e:
    if 'custom_vjp' not in str(e):
      raise
    raise TypeError(
        'The Gauss-Newton quadratic model needs forward-mode products J v of '
        'the model, and the model contains a jax.custom_vjp function, which '
        'has none. Pass value= and value_fn= (and no outputs_fn=) to '
        'tx.update for the captured statistics\' curvature, or give the '
        'function a custom_jvp rule.') from e

  def loss_of(read, outputs):
    it = iter(read)
    full = [next(it) if u else leaf for leaf, u in zip(leaves, used)]
    return lin.loss_of(jax.tree.unflatten(treedef, full), outputs)

  def pick(v):
    return [x for x, u in zip(jax.tree.leaves(v), used) if u]

  read = [leaf for leaf, u in zip(leaves, used) if u]
  tangents = [(pick(v), t) for v, t in zip(vectors, outputs_tangents)]
  return _hessian_products(loss_of, (read, lin.outputs), tangents, axis_name)


def _hessian_products(loss, primals, tangents, axis_name):
  """``C[i, j] = t_i^T H t_j``, ``H`` the Hessian of ``loss(*primals)``."""
  grad = jax.grad(loss, argnums=tuple(range(len(primals))))
  hessian = [jax.jvp(grad, primals, t)[1] for t in tangents]
  c = jnp.stack([jnp.stack([vdot(t, h) for h in hessian])
                 for t in tangents])
  c = (c + c.T) / 2
  if axis_name is not None:
    c = lax.pmean(c, axis_name)
  return c


def vdot(a, b) -> jax.Array:
  """``sum`` of leafwise inner products (masked and integer leaves skip)."""
  pairs = zip(jax.tree.leaves(a, is_leaf=_base.is_masked),
              jax.tree.leaves(b, is_leaf=_base.is_masked))
  total = jnp.zeros([], jnp.float32)
  for x, y in pairs:
    if _base.is_float(x) and _base.is_float(y):
      dtype = jnp.promote_types(_base.stats_dtype(x), _base.stats_dtype(y))
      # A sum, not jnp.vdot: the leaves may be batch-sharded outputs.
      total = total + jnp.sum(x.astype(dtype) * y.astype(dtype)).real
  return total

