"""Pairs captured layers with parameter leaves, by path, and reports it.

Parameters are matched to ``layer_stats`` entries by their path only
(``'<layer path>/<param name>'``), never by position or shape; every
mismatch is an error that names the path. Parameters no layer covers are
listed by :func:`coverage` with the fallback they get.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from fisher_optax import _base
from fisher_optax.capture import _layers


@dataclasses.dataclass(frozen=True)
class Assignment:
  """Which layer (if any) covers one parameter leaf."""

  path: str
  layer: str | None = None  # layer path in layer_stats
  name: str | None = None  # parameter name within the layer
  role: str | None = None  # 'kernel', 'bias', 'embedding', 'scale'
  frozen: bool = False


def pair(params: Any, layer_stats: Mapping[str, _base.LayerStats],
         where: str) -> dict[str, Assignment]:
  """Maps every parameter path to its :class:`Assignment`.

  Args:
    params: the parameter (or update) tree; masked leaves are frozen.
    layer_stats: captured layers, keyed by layer path.
    where: name of the caller, for error messages.

  Returns:
    ``{param path: Assignment}`` for every leaf of ``params``.

  Raises:
    ValueError: a layer entry names a parameter that is not in ``params``,
      or whose shape differs from the one captured.
  """
  layer_stats = _base.check_layer_stats(layer_stats, where)
  leaves = _base.flatten_with_paths(params)
  out = {path: Assignment(path, frozen=_base.is_masked(leaf))
         for path, leaf in leaves.items()}
  for key, st in layer_stats.items():
    meta = st.meta
    if not meta.params:
      raise ValueError(f'{where}: layer_stats[{key!r}] ({meta.module}) owns '
                       'no parameters.')
    for role, name in meta.params:
      path = _base.join_path(key, name)
      if path not in leaves:
        raise ValueError(
            f'{where}: layer_stats has layer {key!r} ({meta.module}) but the '
            f'parameters have no {path!r}. Pass the same params tree that '
            'value_grad_and_stats differentiated (paths must match).')
      leaf = leaves[path]
      if _base.is_masked(leaf):
        continue
      want = meta.param_shape(name)
      if _base.shape_of(leaf) != want:
        raise ValueError(
            f'{where}: parameter {path!r} has shape {_base.shape_of(leaf)} '
            f'but layer {key!r} ({meta.module}) was captured with {want}.')
      out[path] = Assignment(path, key, name, role)
    check_arrays(key, st, where)
  return out


def check_arrays(key: str, st: _base.LayerStats, where: str) -> None:
  """Checks a layer's ``a`` and ``g`` against its metadata; names the layer.

  ``a`` and ``g`` must share their stack, call and batch axes, the stack
  axes must be the parameters', and the feature sizes must be the ones the
  kernel (or table, or scale) implies. Statistics of another model, or
  arrays edited by hand, fail here instead of deep inside an optimizer.
  """
  meta = st.meta
  k = meta.stack_ndim

  def fail(msg):
    raise ValueError(f'{where}: layer_stats[{key!r}] ({meta.module}, '
                     f'{meta.kind}): {msg}.')

  a_shape, g_shape = _base.shape_of(st.a), _base.shape_of(st.g)
  if len(a_shape) < k + 2 or len(g_shape) < k + 2:
    fail(f'a {a_shape} and g {g_shape} need {k} stack axes, a call axis '
         'and a batch axis')
  if a_shape[:k + 2] != g_shape[:k + 2]:
    fail(f'a {a_shape} and g {g_shape} differ in their leading (stack, '
         'call, batch) axes')
  stack = meta.param_shapes[0][1][:k]
  if a_shape[:k] != stack:
    fail(f'stack axes {a_shape[:k]} differ from the parameter stack {stack}')
  if meta.kind in ('dense', 'conv'):
    from fisher_optax.capture import _layers  # pylint: disable=g-import-not-at-top
    shapes = {n: s[k:] for n, s in meta.param_shapes}
    try:
      _layers.validate_shapes(key, meta.kind, dict(meta.config),
                              a_shape[k + 1:], g_shape[k + 1:], shapes,
                              dict(meta.params))
    except ValueError as e:
      fail(str(e))
    if meta.kind == 'dense':
      # The axes a Dense layer does not contract are the output's batch axes.
      in_axes = meta.cfg('in_axes') or (len(a_shape) - k - 2,)
      kept = tuple(d for i, d in enumerate(a_shape[k + 1:])
                   if i not in in_axes)
      n_out = len(meta.param_shape(meta.param_name('kernel'))) - k - len(
          in_axes)
      out_dims = meta.param_shape(meta.param_name('kernel'))[-n_out:]
      if g_shape[len(g_shape) - n_out:] != out_dims:
        fail(f'g {g_shape} does not end in the kernel\'s output dims '
             f'{out_dims}')
      if kept != g_shape[k + 1:len(g_shape) - n_out]:
        fail(f'a {a_shape} and g {g_shape} differ in their batch axes')
  elif meta.kind == 'embed':
    table = meta.param_shape(meta.param_name('embedding'))
    if g_shape[-1] != table[-1] or a_shape != g_shape[:-1]:
      fail(f'ids a {a_shape} and g {g_shape} do not match the table '
           f'{table}: g must be a\'s shape plus {table[-1]} features')
  elif meta.kind == 'norm' and a_shape != g_shape:
    fail(f'a {a_shape} and g {g_shape} must have the same shape')


class Coverage(list):
  """Rows of :func:`coverage`; ``str()`` gives an aligned table.

  Each row is ``(path, shape, layer, preconditioner)``.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import fisher_optax as fo
    >>> model = nn.Dense(3)
    >>> x = jnp.ones((4, 2))
    >>> params = model.init(jax.random.key(0), x)['params']
    >>> loss_fn = lambda p: jnp.mean(model.apply({'params': p}, x) ** 2)
    >>> _, _, stats = fo.linen.value_grad_and_stats(loss_fn)(params)
    >>> rows = fo.coverage(params, stats)
    >>> rows[1]
    ('kernel', (2, 3), '<root> Dense', 'dense kernel')
    >>> [row[0] for row in rows if row[3].startswith('fallback')]
    []
  """

  def __str__(self):
    header = ('parameter', 'shape', 'layer', 'preconditioner')
    rows = [header] + [tuple(str(c) for c in r) for r in self]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    fmt = '  '.join(f'{{:<{w}}}' for w in widths)
    lines = [fmt.format(*r).rstrip() for r in rows]
    lines.insert(1, '  '.join('-' * w for w in widths))
    return '\n'.join(lines)


def coverage(params: Any, layer_stats: Mapping[str, _base.LayerStats],
             fallback: str = 'adam') -> Coverage:
  """Which preconditioner each parameter gets.

  Args:
    params: the parameters (a pytree; ``nnx.State`` works).
    layer_stats: the third output of ``value_grad_and_stats``.
    fallback: the optimizer's ``fallback`` option, for parameters no layer
      covers.

  Returns:
    A :class:`Coverage` list of ``(path, shape, layer, preconditioner)``
    rows; ``print(...)`` it for a table.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import fisher_optax as fo
    >>> model = nn.Dense(3)
    >>> x = jnp.ones((4, 2))
    >>> params = model.init(jax.random.key(0), x)['params']
    >>> loss_fn = lambda p, x: jnp.mean(model.apply({'params': p}, x) ** 2)
    >>> _, _, stats = fo.linen.value_grad_and_stats(loss_fn)(params, x)
    >>> print(fo.coverage(params, stats))
    parameter  shape   layer         preconditioner
    ---------  ------  ------------  --------------
    bias       (3,)    <root> Dense  dense bias
    kernel     (2, 3)  <root> Dense  dense kernel
  """
  leaves = _base.flatten_with_paths(params)
  rows = Coverage()
  for path, a in pair(params, layer_stats, 'coverage').items():
    shape = _base.shape_of(leaves[path])
    if a.frozen:
      rows.append((path, '-', '-', 'frozen (masked)'))
    elif a.layer is None:
      why = _layers.SKIPPED.get(path.rpartition('/')[0])
      rows.append((path, shape, '-', f'fallback: {fallback}'
                   + (f' ({why})' if why else '')))
    else:
      meta = layer_stats[a.layer].meta
      rows.append((path, shape, f'{a.layer or "<root>"} {meta.module}',
                   f'{meta.kind} {a.role}'))
  return rows
