"""Layer kinds: which modules are captured and the static geometry they need.

A :class:`LayerKind` tells the capture code three things about a module
class: the curvature kind it maps to (``'dense'``, ``'conv'``, ``'embed'``,
``'norm'``), which of its parameters play which role, and how to read the
static geometry (conv strides and padding, contracted axes, feature axes) off
the module and the shape of one call's input. Stock Flax layers of both APIs
are registered here; :func:`register_layer` adds a user's own module class.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ('dense', 'conv', 'embed', 'norm')


class Unsupported(Exception):
  """A registered module is configured in a way we cannot capture.

  The module then runs untouched and its parameters get the optimizer's
  fallback; the message ends up in the coverage table.
  """


@dataclasses.dataclass(frozen=True)
class LayerKind:
  """How one module class is captured.

  Attributes:
    kind: one of ``'dense'``, ``'conv'``, ``'embed'``, ``'norm'``.
    params: role -> parameter attribute/variable name. Roles: ``'kernel'``
      and ``'bias'`` (dense, conv), ``'embedding'`` (embed), ``'scale'`` and
      ``'bias'`` (norm).
    describe: ``describe(module, input_shape) -> dict`` of static geometry
      for one call (``input_shape`` excludes stack axes); may raise
      :class:`Unsupported`.
  """

  kind: str
  params: Mapping[str, str]
  describe: Callable[[Any, tuple[int, ...]], dict] | None = None


_REGISTRY: dict[str, dict[type, LayerKind]] = {'linen': {}, 'nnx': {}}


def register_layer(framework: str, module_type: type, kind: str,
                   params: Mapping[str, str] | None = None,
                   describe: Callable[..., dict] | None = None) -> None:
  """Registers ``module_type`` for capture (see ``fisher_optax.linen``)."""
  if kind not in KINDS:
    raise ValueError(f'kind must be one of {KINDS}, got {kind!r}.')
  if params is None:
    params = _DEFAULT_PARAMS[kind]
  roles = set(params)
  allowed = set(_DEFAULT_PARAMS[kind]) | {'bias'}
  if not roles <= allowed:
    raise ValueError(f'{module_type.__name__}: roles {sorted(roles - allowed)}'
                     f' are not valid for kind {kind!r} ({sorted(allowed)}).')
  if describe is None:
    describe = _DEFAULT_DESCRIBE[kind]
  _REGISTRY[framework][module_type] = LayerKind(kind, dict(params), describe)


def lookup(framework: str, module_type: type) -> LayerKind | None:
  """The kind of the nearest registered class in ``module_type``'s MRO."""
  registry = _REGISTRY[framework]
  for cls in module_type.__mro__:
    if cls in registry:
      return registry[cls]
  return None


# Methods a subclass may override to change what a registered layer computes
# (linen's ``param`` is where weight standardisation is usually written).
_OVERRIDABLE = {'linen': ('__call__', 'param'), 'nnx': ('__call__',)}

# Layers the most recent capture trace ran uncaptured: module path -> why.
# ``fisher_optax.coverage`` reports the reason next to their fallback.
SKIPPED: dict[str, str] = {}


def _wrapped_chain(fn) -> set[int]:
  ids = set()
  while fn is not None and id(fn) not in ids:
    ids.add(id(fn))
    fn = getattr(fn, '__wrapped__', None)
  return ids


def check_not_overridden(framework: str, module_type: type) -> None:
  """Raises :class:`Unsupported` if a subclass changes a registered layer.

  A subclass of a registered class (``class StdConv(nn.Conv)``) that
  overrides ``__call__`` (or linen's ``param``, e.g. to standardise the
  kernel) computes something else from the same parameters: its statistics
  would describe another weight than the one they are applied to. Unless
  the subclass itself is registered, it gets the fallback. Flax's lifted
  classes (``nn.remat(nn.Dense)``) wrap the registered method and are not
  overrides.
  """
  registry = _REGISTRY[framework]
  mro = module_type.__mro__
  registered = next(cls for cls in mro if cls in registry)
  for cls in mro[:mro.index(registered)]:
    for method in _OVERRIDABLE[framework]:
      if method not in vars(cls):
        continue
      base = _wrapped_chain(getattr(registered, method, None))
      if not _wrapped_chain(vars(cls)[method]) & base:
        raise Unsupported(
            f'{module_type.__name__} subclasses {registered.__name__} but '
            f'{cls.__name__} overrides {method}; register it with '
            'register_layer to capture it')


def defining_class(module_type: type, method: str) -> type | None:
  """The class in ``module_type``'s MRO whose body defines ``method``."""
  for cls in module_type.__mro__:
    if method in vars(cls):
      return cls
  return None


# ----------------------------------------------------------------------------
# Geometry readers. Attribute names are shared by linen and NNX layers.


def _as_tuple(x, n):
  if x is None:
    return (1,) * n
  if isinstance(x, int):
    return (x,) * n
  return tuple(int(v) for v in x)


def describe_dense(module, input_shape):
  del module, input_shape
  return {'in_ndim': 1}


def describe_dense_general(module, input_shape):
  """Contracted input axes of ``DenseGeneral`` / ``nnx.LinearGeneral``."""
  batch = getattr(module, 'batch_dims', None) or getattr(
      module, 'batch_axis', None)
  if batch:
    raise Unsupported('DenseGeneral with batch_dims is not captured')
  axis = getattr(module, 'axis', -1)
  axis = (axis,) if isinstance(axis, int) else tuple(axis)
  ndim = len(input_shape)
  axis = tuple(sorted(a % ndim for a in axis))
  return {'in_axes': axis}


def describe_conv(module, input_shape):
  """Strides, dilations, groups and padding of ``Conv`` (linen and NNX)."""
  kernel_size = _as_tuple(module.kernel_size, 1 if isinstance(
      module.kernel_size, int) else len(module.kernel_size))
  n = len(kernel_size)
  if getattr(module, 'shared_weights', True) is False:
    raise Unsupported('ConvLocal (unshared weights) is not captured')
  if len(input_shape) < n + 1:
    raise Unsupported(f'input of rank {len(input_shape)} for a {n}-D conv')
  strides = _as_tuple(module.strides, n)
  lhs_dilation = _as_tuple(module.input_dilation, n)
  rhs_dilation = _as_tuple(module.kernel_dilation, n)
  groups = int(getattr(module, 'feature_group_count', 1))
  padding = module.padding
  pre_pad = None
  if isinstance(padding, str):
    padding = padding.upper()
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, rhs_dilation)]
    if padding in ('CIRCULAR', 'REFLECT'):
      pre_pad = ({'CIRCULAR': 'wrap', 'REFLECT': 'reflect'}[padding],
                 tuple(((k - 1) // 2, k // 2) for k in dilated))
      padding = 'VALID'
    elif padding == 'CAUSAL':
      pre_pad = ('constant', ((rhs_dilation[0] * (kernel_size[0] - 1), 0),))
      padding = 'VALID'
    elif padding not in ('SAME', 'VALID'):
      raise Unsupported(f'conv padding {padding!r}')
  elif isinstance(padding, int):
    padding = ((padding, padding),) * n
  else:
    padding = tuple((p, p) if isinstance(p, int) else tuple(p)
                    for p in padding)
  return {
      'kernel_size': kernel_size,
      'strides': strides,
      'lhs_dilation': lhs_dilation,
      'rhs_dilation': rhs_dilation,
      'groups': groups,
      'padding': padding,
      'pre_pad': pre_pad,
  }


def describe_embed(module, input_shape):
  del input_shape
  return {'num_embeddings': int(module.num_embeddings)}


def describe_norm(module, input_shape):
  """Feature axes of a normalisation layer's scale and bias."""
  ndim = len(input_shape)
  if hasattr(module, 'feature_axes'):
    axes = module.feature_axes
  elif hasattr(module, 'axis'):  # BatchNorm
    axes = module.axis
  else:  # GroupNorm: channels last
    axes = -1
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return {'feature_axes': tuple(sorted(a % ndim for a in axes))}


_DEFAULT_PARAMS = {
    'dense': {'kernel': 'kernel', 'bias': 'bias'},
    'conv': {'kernel': 'kernel', 'bias': 'bias'},
    'embed': {'embedding': 'embedding'},
    'norm': {'scale': 'scale', 'bias': 'bias'},
}
_DEFAULT_DESCRIBE = {
    'dense': describe_dense,
    'conv': describe_conv,
    'embed': describe_embed,
    'norm': describe_norm,
}


def normalised_input(y, params: Mapping[str, Any], feature_axes):
  """Recovers ``xhat`` from a norm layer's output ``y = xhat*scale + bias``.

  Inverting the affine map gives the normalised input for every norm flavour
  (LayerNorm, RMSNorm, BatchNorm in train or eval mode, GroupNorm) without
  re-implementing their statistics. A scale entry that is exactly zero gives
  ``xhat = 0`` there (its gradient is then ``0`` anyway).
  """
  shape = [1] * y.ndim
  for ax in feature_axes:
    shape[ax] = y.shape[ax]
  # At least float32 (bfloat16 activations), float64 under x64.
  dtype = jnp.promote_types(y.dtype, jnp.float32)
  xhat = y.astype(dtype)
  if params.get('bias') is not None:
    xhat = xhat - jnp.reshape(params['bias'], shape).astype(dtype)
  if params.get('scale') is not None:
    scale = jnp.reshape(params['scale'], shape).astype(dtype)
    safe = jnp.where(scale == 0, 1.0, scale)
    xhat = jnp.where(scale == 0, 0.0, xhat / safe)
  return xhat


def validate_shapes(path: str, kind: str, config: Mapping[str, Any],
                    in_shape: Sequence[int], out_shape: Sequence[int],
                    shapes: Mapping[str, tuple[int, ...]],
                    params: Mapping[str, str]) -> None:
  """Checks that one call's input/output shapes agree with the parameters."""
  def fail(msg):
    raise ValueError(f'layer {path!r} ({kind}): {msg}')
  kernel = shapes.get(params.get('kernel', ''))
  if kind == 'dense' and kernel is not None:
    if 'in_axes' in config:
      got = tuple(in_shape[a] for a in config['in_axes'])
      if tuple(kernel[:len(got)]) != got:
        fail(f'contracted input dims {got} do not match kernel {kernel}')
    elif in_shape[-1] != kernel[-2] or out_shape[-1] != kernel[-1]:
      fail(f'input (..., {in_shape[-1]}) / output (..., {out_shape[-1]}) do '
           f'not match kernel {kernel}')
  if kind == 'conv' and kernel is not None:
    if in_shape[-1] != kernel[-2] * config['groups']:
      fail(f'{in_shape[-1]} input channels do not match kernel {kernel} with '
           f'{config["groups"]} groups')
    if out_shape[-1] != kernel[-1]:
      fail(f'{out_shape[-1]} output channels do not match kernel {kernel}')


def marker() -> jax.Array:
  """A scalar sown once per call; lifted transforms give it the stack axes."""
  return np.zeros((), np.int8)


def _merge_lifted(x, lifts: Sequence[str]):
  """``(calls, *lifted, *one_call)`` -> ``(*stack, calls', [batch,] *...)``.

  Stack axes go first; the captured calls and the ``'call'`` axes (steps of
  a scan whose parameters are broadcast) merge into one call axis; the
  ``'batch'`` axes (an ``nn.vmap`` whose parameters are broadcast) merge
  into one batch axis in front of a call's input, which had none.
  """
  order = {'stack': [], 'call': [], 'batch': []}
  for i, kind in enumerate(lifts):
    order[kind].append(i + 1)
  x = jnp.transpose(x, order['stack'] + [0] + order['call'] + order['batch']
                    + list(range(len(lifts) + 1, x.ndim)))
  n_stack, n_call = len(order['stack']), len(order['call'])
  merged = x.shape[:n_stack] + (-1,)
  if order['batch']:
    batch = x.shape[n_stack + 1 + n_call:1 + len(lifts)]
    merged += (math.prod(batch),)
  return x.reshape(merged + x.shape[1 + len(lifts):])


def _shift_axes(config: Mapping[str, Any]) -> dict[str, Any]:
  """One call's axis numbers once a batch axis is put in front of it."""
  return {k: (tuple(a + 1 for a in v) if k in ('in_axes', 'feature_axes')
              else v) for k, v in config.items()}


def build(path: str, spec: LayerKind, module_name: str,
          config: Mapping[str, Any], outer_shapes: Mapping[str, tuple],
          lifts: Sequence[str], a_calls: Sequence[Any], g_calls: Sequence[Any],
          extra_calls: Mapping[str, Sequence[Any]]):
  """Stacks one layer's calls into a :class:`~fisher_optax.LayerStats`.

  Each captured call has one leading axis per lifted transform it ran
  under, of kind ``lifts`` (see :func:`_merge_lifted`).
  """
  from fisher_optax import _base  # pylint: disable=g-import-not-at-top
  if len(a_calls) != len(g_calls):
    raise ValueError(f'layer {path!r}: {len(a_calls)} inputs but '
                     f'{len(g_calls)} output cotangents were captured.')
  for name, calls in (('inputs', a_calls), ('output cotangents', g_calls)):
    shapes = {tuple(x.shape) for x in calls}
    if len(shapes) > 1:
      raise ValueError(
          f'layer {path!r} ({module_name}) was called {len(calls)} times with '
          f'different {name} shapes {sorted(shapes)}; a shared layer must see '
          'equal shapes on every call to be captured.')
  stack_ndim = list(lifts).count('stack')
  stack = lambda xs: _merge_lifted(jnp.stack(list(xs)), lifts)
  if 'batch' in lifts:
    config = _shift_axes(config)
  a, g = stack(a_calls), stack(g_calls)
  in_shape = tuple(a.shape[stack_ndim + 1:])
  out_shape = tuple(g.shape[stack_ndim + 1:])
  inner = {n: tuple(s[stack_ndim:]) for n, s in outer_shapes.items()}
  validate_shapes(path, spec.kind, config, in_shape, out_shape, inner,
                  spec.params)
  present = tuple((r, n) for r, n in sorted(spec.params.items())
                  if n in outer_shapes)
  meta = _base.LayerMeta(
      kind=spec.kind,
      module=module_name,
      params=present,
      param_shapes=tuple(sorted((n, tuple(s)) for n, s in
                                outer_shapes.items())),
      stack_ndim=stack_ndim,
      config=tuple(sorted(config.items())),
  )
  extras = {k: stack(v) for k, v in extra_calls.items()}
  return _base.LayerStats(a, g, meta, extras)
