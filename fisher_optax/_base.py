"""Shared types: the per-layer capture record and parameter-path helpers.

A captured layer is described by a :class:`LayerStats` record: the layer's
input activations ``a`` and output cotangents ``g`` (arrays, pytree children)
plus a hashable :class:`LayerMeta` (static, pytree aux data) that says what
kind of layer produced them, which parameters it owns and the geometry needed
to turn ``a`` and ``g`` into curvature statistics.

Array layout, for a layer called ``C`` times in one loss evaluation and
stacked by a lifted transform (``nn.scan`` over layers) into ``S`` leading
axes::

  a: (*stack, C, *input_shape_of_one_call)
  g: (*stack, C, *output_shape_of_one_call)

``stack`` has ``meta.stack_ndim`` axes and matches the leading axes of the
layer's parameters; ``C`` is the call axis (weight sharing). Statistics treat
the call axis as extra rows, never as a sum of separate entries.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array
PathKey = str  # '/'-joined parameter path, e.g. 'encoder/Dense_0'.


@dataclasses.dataclass(frozen=True)
class LayerMeta:
  """Static description of one captured layer.

  Attributes:
    kind: layer kind ('dense', 'conv', 'embed', 'norm', or a registered one).
    module: class name of the module, for messages.
    params: ``(role, name)`` pairs: which parameter of the layer plays which
      role ('kernel', 'bias', 'embedding', 'scale').
    param_shapes: ``(name, shape)`` of each parameter including stack axes.
    stack_ndim: number of leading stack axes shared by ``a``, ``g`` and params.
    config: sorted ``(key, value)`` pairs of kind-specific static geometry.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import fisher_optax as fo
    >>> model = nn.Dense(3)
    >>> x = jnp.ones((4, 2))
    >>> params = model.init(jax.random.key(0), x)['params']
    >>> loss_fn = lambda p: jnp.mean(model.apply({'params': p}, x) ** 2)
    >>> _, _, stats = fo.linen.value_grad_and_stats(loss_fn)(params)
    >>> meta = stats[''].meta
    >>> meta.kind, meta.module, meta.stack_ndim
    ('dense', 'Dense', 0)
    >>> meta.param_name('kernel'), meta.param_shape('kernel')
    ('kernel', (2, 3))
  """

  kind: str
  module: str
  params: tuple[tuple[str, str], ...]
  param_shapes: tuple[tuple[str, tuple[int, ...]], ...]
  stack_ndim: int = 0
  config: tuple[tuple[str, Any], ...] = ()

  def cfg(self, key: str, default: Any = None) -> Any:
    return dict(self.config).get(key, default)

  def param_name(self, role: str) -> str | None:
    return dict(self.params).get(role)

  def param_shape(self, name: str) -> tuple[int, ...]:
    return dict(self.param_shapes)[name]


@jax.tree_util.register_pytree_node_class
class LayerStats:
  """Activations and output cotangents captured for one layer.

  Attributes:
    a: layer inputs, shape ``(*stack, calls, *input_shape)``.
    g: cotangents of the loss w.r.t. the layer outputs, shape
      ``(*stack, calls, *output_shape)``. For a batch-mean loss they carry the
      ``1/B`` factor of the mean; statistics document how they rescale.
    extras: kind-specific arrays with the same leading axes (normalisation
      layers store the normalised input ``xhat``).
    meta: static :class:`LayerMeta`.

  Example:
    A dense layer's statistics give its kernel gradient,
    ``sum_rows a^T g``:

    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import fisher_optax as fo
    >>> model = nn.Dense(3)
    >>> x = jax.random.normal(jax.random.key(0), (4, 2))
    >>> params = model.init(jax.random.key(1), x)['params']
    >>> loss_fn = lambda p: jnp.mean(jnp.sin(model.apply({'params': p}, x)))
    >>> _, grads, stats = fo.linen.value_grad_and_stats(loss_fn)(params)
    >>> st = stats['']  # the root module; submodules by their path
    >>> st  # doctest: +NORMALIZE_WHITESPACE
    LayerStats(kind='dense', module='Dense', a=(1, 4, 2), g=(1, 4, 3),
               stack_ndim=0)
    >>> bool(jnp.allclose(grads['kernel'], st.a[0].T @ st.g[0], atol=1e-6))
    True
  """

  def __init__(self, a, g, meta: LayerMeta, extras=None):
    self.a = a
    self.g = g
    self.meta = meta
    self.extras = dict(extras or {})

  def tree_flatten(self):
    keys = tuple(sorted(self.extras))
    return (self.a, self.g, tuple(self.extras[k] for k in keys)), (
        self.meta, keys)

  @classmethod
  def tree_unflatten(cls, aux, children):
    meta, keys = aux
    a, g, extras = children
    return cls(a, g, meta, dict(zip(keys, extras)))

  def __repr__(self):
    shape = lambda x: getattr(x, 'shape', None)
    return (f'LayerStats(kind={self.meta.kind!r}, module={self.meta.module!r},'
            f' a={shape(self.a)}, g={shape(self.g)},'
            f' stack_ndim={self.meta.stack_ndim})')


def key_str(key: Any) -> str:
  """One component of a pytree key path as a plain string."""
  for attr in ('key', 'idx', 'name'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path: tuple[Any, ...]) -> PathKey:
  return '/'.join(key_str(k) for k in path)


def is_masked(x: Any) -> bool:
  """Whether ``x`` is an ``optax.MaskedNode`` (a frozen/masked parameter)."""
  return type(x).__name__ == 'MaskedNode'


def flatten_with_paths(tree: Any) -> dict[PathKey, Any]:
  """``{'/'-joined path: leaf}``; masked nodes are kept as leaves.

  Variables from ``flax.nnx`` flatten to their value with a trailing
  attribute key; that key is dropped so that paths match module paths.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_masked)[0]
  out = {}
  for path, leaf in leaves:
    path = tuple(k for k in path if not _is_variable_value_key(k))
    out[path_str(path)] = leaf
  return out


def _is_variable_value_key(k: Any) -> bool:
  return isinstance(k, jax.tree_util.GetAttrKey) and k.name in (
      'value', 'raw_value', '_raw_value')


def flatten_leaves(tree: Any):
  """``(paths, leaves, treedef)`` of ``tree``; masked nodes are leaves."""
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=is_masked)
  paths = [path_str(tuple(k for k in p if not _is_variable_value_key(k)))
           for p, _ in paths_leaves]
  return paths, [leaf for _, leaf in paths_leaves], treedef


def split_path(path: PathKey) -> tuple[PathKey, str]:
  """'a/b/kernel' -> ('a/b', 'kernel')."""
  head, _, name = path.rpartition('/')
  return head, name


def join_path(key: PathKey, name: str) -> PathKey:
  """('a/b', 'kernel') -> 'a/b/kernel'; a top-level layer's key is ''."""
  return f'{key}/{name}' if key else name


# Output axes of the kernels of Flax's attention sub-layers (linen
# MultiHeadDotProductAttention, NNX MultiHeadAttention): query/key/value
# map features to (heads, head_dim), out maps (heads, head_dim) back.
_ATTENTION_OUT_AXES = {'query': 2, 'key': 2, 'value': 2, 'out': 1}


@dataclasses.dataclass(frozen=True)
class KernelGuess:
  """A kernel's layout as far as its parameters tell (no capture).

  Attributes:
    kernel: path of the kernel.
    bias: path of its bias, or None.
    n_stack: leading stack axes (``nn.scan`` / ``nnx.vmap`` over layers).
    n_in: kernel axes after the stack on the input side; the rest are
      output axes.
    conv: whether it looks like a convolution kernel.
  """

  kernel: PathKey
  bias: PathKey | None
  n_stack: int
  n_in: int
  conv: bool


def guess_kernels(leaves: Mapping[PathKey, Any]) -> dict[PathKey, KernelGuess]:
  """Layouts of the ``kernel`` leaves of ``{path: leaf}``, from shapes.

  A stock layer's bias has the shape of its outputs, and a lifted transform
  puts the same stack axes in front of the kernel and the bias: the longest
  trailing run of the kernel's shape that the bias ends with gives the
  output axes, the bias's remaining leading axes the stack (the attention
  sub-layers' own output count decides a tie). A bias-less kernel takes
  the stack axes that the other layers of its nearest enclosing module
  agree on (a LayerNorm ``scale`` counts, one axis of its own), else none;
  its outputs are one axis, or an attention sub-layer's. A kernel with one
  output axis and two or more other axes is a convolution, except the
  attention output projection. Every guess is checked against the captured
  statistics on the first update, where a wrong one is an error that asks
  for ``layers=``; a right one needs nothing.

  Args:
    leaves: parameter leaves by path (masked leaves already removed).

  Returns:
    ``{layer key: KernelGuess}``.
  """
  def out_axes(kernel, bias, name):
    fits = [k for k in range(1, len(bias) + 1)
            if len(kernel) - k >= 1 + len(bias) - k
            and kernel[len(kernel) - k:] == bias[len(bias) - k:]
            and kernel[:len(bias) - k] == bias[:len(bias) - k]]
    if not fits:
      return None
    return name if name in fits else max(fits)

  guesses, stacks = {}, {}
  for path, leaf in leaves.items():
    key, name = split_path(path)
    shape = shape_of(leaf)
    if name == 'scale' and shape:
      stacks.setdefault(key, len(shape) - 1)
    if name != 'kernel' or len(shape) < 2:
      continue
    bias = join_path(key, 'bias')
    bias = bias if bias in leaves else None
    attention = _ATTENTION_OUT_AXES.get(split_path(key)[1])
    n_out = None if bias is None else out_axes(
        shape, shape_of(leaves[bias]), attention)
    if n_out is None:
      bias = None
    else:
      stacks[key] = len(shape_of(leaves[bias])) - n_out
    guesses[key] = (path, bias, n_out, attention, shape)

  def enclosing_stack(key):
    while key:
      key = split_path(key)[0]
      inside = {n for k, n in stacks.items()
                if k == key or k.startswith(f'{key}/') or not key}
      if len(inside) == 1:
        return inside.pop()
      if inside:
        return 0
    return 0

  out = {}
  for key, (path, bias, n_out, attention, shape) in guesses.items():
    n_stack = stacks[key] if bias is not None else enclosing_stack(key)
    n_out = n_out or attention or 1
    n_in = len(shape) - n_stack - n_out
    if n_in < 1:
      continue
    conv = n_out == 1 and n_in >= 2 and attention is None
    out[key] = KernelGuess(path, bias, n_stack, n_in, conv)
  return out


def layers_hint(tree: Any) -> str:
  """How to build ``layers=`` for the framework that produced ``tree``.

  NNX gradients and parameters are an ``nnx.State`` (or, under
  ``nnx.set_graph_updates(False)`` / tree mode, an NNX object shaped like
  the model); anything else is taken to be a linen parameter dict. The NNX
  form passes the batch to ``nnx.eval_shape`` rather than closing over it,
  so a batch that holds NNX objects (an ``nnx.Rngs`` for dropout) works and
  is not advanced.
  """
  if any(c.__module__.startswith('flax.nnx') for c in type(tree).__mro__):
    return ('layers=nnx.eval_shape(step_fn, model, *batch)[2] (step_fn = '
            'fisher_optax.nnx.value_grad_and_stats(loss_fn))')
  return ('layers=jax.eval_shape(step_fn, params, *batch)[2] (step_fn = '
          'fisher_optax.linen.value_grad_and_stats(loss_fn))')


def check_layer_stats(layer_stats: Any, where: str) -> Mapping[str, LayerStats]:
  """Validates the type of a ``layer_stats`` argument."""
  if layer_stats is None:
    raise ValueError(
        f'{where} needs `layer_stats=`: pass the third output of '
        '`fisher_optax.linen.value_grad_and_stats` (or `.nnx.`) to '
        '`tx.update(grads, state, params, layer_stats=layer_stats)`.')
  if not isinstance(layer_stats, Mapping):
    raise TypeError(f'{where}: `layer_stats` must be a mapping from layer path'
                    f' to LayerStats, got {type(layer_stats).__name__}.')
  for k, v in layer_stats.items():
    if not isinstance(v, LayerStats):
      raise TypeError(f'{where}: layer_stats[{k!r}] is a {type(v).__name__},'
                      ' not a fisher_optax LayerStats.')
  return layer_stats


def check_options(where: str, *, periods: Mapping[str, Any] | None = None,
                  block_size: Any = None,
                  choices: Mapping[str, tuple[Any, tuple[Any, ...]]]
                  | None = None,
                  axes: Mapping[str, Any] | None = None) -> None:
  """Validates an optimizer's static options; errors name the option.

  Args:
    where: the factory's name, for messages.
    periods: ``{name: value}`` of refresh periods: positive Python ints
      (static; ``optax.inject_hyperparams`` needs them in ``static_args``).
    block_size: None or a positive int.
    choices: ``{name: (value, allowed values)}``.
    axes: ``{name: value}`` of mesh axis names: None or a non-empty str
      (``axis_name`` may also be a tuple of them).
  """
  for name, value in (periods or {}).items():
    if not isinstance(value, int) or value < 1:
      raise ValueError(
          f'{where}: {name} must be a positive int, got {value!r}; periods '
          'are static (pass them in static_args of optax.inject_hyperparams).')
  if block_size is not None and (not isinstance(block_size, int)
                                 or block_size < 1):
    raise ValueError(f'{where}: block_size must be None or a positive int, '
                     f'got {block_size!r}.')
  for name, (value, allowed) in (choices or {}).items():
    if value not in allowed:
      raise ValueError(f'{where}: {name} must be one of {allowed}, got '
                       f'{value!r}.')
  for name, value in (axes or {}).items():
    # lax.pmean takes a tuple of axes; spreading the inverses takes one.
    names = (value if name == 'axis_name' and isinstance(value, tuple)
             and value else (value,))
    if value is not None and not all(isinstance(n, str) and n
                                     for n in names):
      raise ValueError(
          f'{where}: {name} must be None or a mesh axis name (a non-empty '
          f'str{", or a tuple of them" if name == "axis_name" else ""}), '
          f'got {value!r}.')


def concrete(value: Any):
  """``value`` as a NumPy array, or None if it is traced, a schedule or
  None (not set: the adaptive step's learning rate)."""
  if value is None or callable(value) or isinstance(value, jax.core.Tracer):
    return None
  try:
    return np.asarray(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def check_hyperparams(where: str, *,
                      positive: Mapping[str, Any] | None = None,
                      nonnegative: Mapping[str, Any] | None = None,
                      decays: Mapping[str, Any] | None = None,
                      finite: Mapping[str, Any] | None = None) -> None:
  """Validates concrete numeric hyperparameters; errors name the argument.

  Values that are traced (``optax.inject_hyperparams`` inside ``jit``) or
  callables (schedules) cannot be checked when the optimizer is built and
  are passed through unchecked.

  Args:
    where: the factory's name, for messages.
    positive: ``{name: value}`` that must be finite and > 0 (``damping``).
    nonnegative: ``{name: value}`` that must be finite and >= 0 (``eps``,
      ``weight_decay``).
    decays: ``{name: value}`` that must lie in ``[0, 1)`` (``b1``,
      ``fisher_decay``, ``momentum``).
    finite: ``{name: value}`` that must be finite (``learning_rate``).
  """
  rules = (
      (positive, lambda v: np.isfinite(v) & (v > 0), 'a finite number > 0'),
      (nonnegative, lambda v: np.isfinite(v) & (v >= 0),
       'a finite number >= 0'),
      (decays, lambda v: (v >= 0) & (v < 1), 'in [0, 1)'),
      (finite, np.isfinite, 'finite'),
  )
  for group, ok, what in rules:
    for name, value in (group or {}).items():
      v = concrete(value)
      if v is None:
        continue
      if not np.issubdtype(v.dtype, np.number) or np.iscomplexobj(v):
        raise TypeError(f'{where}: {name} must be a real number, got '
                        f'{value!r}.')
      if not np.all(ok(v.astype(np.float64))):
        raise ValueError(f'{where}: {name} must be {what}, got {value!r}.')


def check_same_structure(where: str, name: str, tree: Any, ref_name: str,
                         ref: Any) -> None:
  """Raises if ``tree`` and ``ref`` differ in paths; names the first one.

  Masked (frozen) nodes count as leaves, so an ``optax.masked`` update tree
  matches its masked state. Shapes are compared leaf by leaf as well.
  """
  paths, leaves, _ = flatten_leaves(tree)
  ref_paths, ref_leaves, _ = flatten_leaves(ref)
  if paths != ref_paths:
    extra = [p for p in paths if p not in set(ref_paths)]
    missing = [p for p in ref_paths if p not in set(paths)]
    if extra:
      detail = f'{name} has {extra[0]!r}, which {ref_name} does not'
    elif missing:
      detail = f'{name} has no {missing[0]!r}, which {ref_name} has'
    else:
      first = next(i for i, (p, q) in enumerate(zip(paths, ref_paths))
                   if p != q)
      detail = (f'leaf {first} is {paths[first]!r} in {name} but '
                f'{ref_paths[first]!r} in {ref_name}')
    raise ValueError(f'{where}: the structure of {name} does not match '
                     f'{ref_name}: {detail}. Pass the same tree that init '
                     'saw.')
  for path, leaf, ref_leaf in zip(paths, leaves, ref_leaves):
    if is_masked(leaf) != is_masked(ref_leaf):
      raise ValueError(f'{where}: {path!r} is masked in one of {name} and '
                       f'{ref_name} but not in the other.')
    if not is_masked(leaf) and shape_of(leaf) != shape_of(ref_leaf):
      raise ValueError(f'{where}: {name} {path!r} has shape '
                       f'{shape_of(leaf)} but {ref_name} has '
                       f'{shape_of(ref_leaf)}.')


def stats_dtype(x: Any) -> Any:
  """Dtype of curvature statistics for a parameter (or dtype) ``x``.

  At least float32 (bfloat16 parameters keep float32 statistics) and float64
  for float64 parameters, so that ``jax_enable_x64`` runs stay float64.
  """
  dtype = x if isinstance(x, (np.dtype, type)) else jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.inexact):
    dtype = jnp.float32
  return jnp.promote_types(dtype, jnp.float32)


def is_float(x: Any) -> bool:
  """Whether ``x`` is a floating-point array (not masked, not integer)."""
  return (not is_masked(x)) and jnp.issubdtype(jnp.result_type(x),
                                               jnp.inexact)


def add_decayed_weights(weight_decay: Any, mask: Any = None
                        ) -> optax.GradientTransformation:
  """``optax.add_decayed_weights`` that never touches integer leaves.

  A step counter or an integer buffer kept among the parameters must not be
  decayed (optax would add ``weight_decay * step`` to its update). The
  user's ``mask`` is combined with the float-leaf mask.
  """
  def float_mask(params):
    floats = jax.tree.map(is_float, params, is_leaf=is_masked)
    if mask is None:
      return floats
    user = mask(params) if callable(mask) else mask
    # optax accepts a mask that is a prefix of the parameter tree.
    return jax.tree.map(
        lambda u, sub: jax.tree.map(lambda f: bool(f) and bool(u), sub),
        user, floats)

  return optax.add_decayed_weights(weight_decay, float_mask)


def adam_denominator(nu: jax.Array, g: jax.Array, count: jax.Array,
                     b2: Any, eps: Any) -> tuple[jax.Array, jax.Array]:
  """Adam's second moment, for the fallback every optimizer offers.

  Args:
    nu: previous second moment of ``g``, in the statistics dtype
      (``stats_dtype`` of the parameter: float32, or float64 under x64).
    g: the gradient.
    count: steps taken including this one (for the bias correction).
    b2: decay of the second moment.
    eps: added to the square root.

  Returns:
    ``(new_nu, sqrt(nu_hat) + eps)``: divide a first moment by the second.
  """
  nu = b2 * nu + (1 - b2) * jnp.square(g.astype(nu.dtype))
  nu_hat = nu / (1 - b2 ** count.astype(nu.dtype))
  return nu, jnp.sqrt(nu_hat) + eps


def shape_of(x: Any) -> tuple[int, ...]:
  return tuple(np.shape(x))


LOSS_SCALE_DOC = (
    'how many times your loss exceeds the loss the hyperparameters are '
    'set for, a mean over examples: 784 for a loss summed over 784 pixels, '
    'the batch size for a sum over the batch. Gradients and captured '
    'cotangents are divided by it, so the optimizer takes exactly the '
    'steps it takes on ``loss / loss_scale`` and the documented learning '
    'rates and dampings apply.')


def with_loss_scale(tx: optax.GradientTransformation, loss_scale: Any,
                    where: str) -> optax.GradientTransformationExtraArgs:
  """``tx`` run on the gradients and statistics of ``loss / loss_scale``.

  Every optimizer's step scales with the loss in its own way (Adam's not at
  all, SGD's and AdaFisher's linearly, the Kronecker family's and MBF's
  inversely while the damping is small: ``docs/choosing.md``). Dividing
  what the loss produces, gradients and output cotangents alike, by the
  stated scale makes a summed loss train with the settings of a mean one.
  """
  check_hyperparams(where, positive={'loss_scale': loss_scale})
  if isinstance(loss_scale, (int, float)) and loss_scale == 1:
    return optax.with_extra_args_support(tx)
  inv = 1.0 / loss_scale

  def scale(x):
    if is_masked(x) or not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
      return x
    return x * jnp.asarray(inv, jnp.result_type(x))

  def update_fn(updates, state, params=None, **extra_args):
    # Imported here: _linearization builds on this module.
    from fisher_optax import _linearization  # pylint: disable=g-import-not-at-top
    updates = jax.tree.map(scale, updates, is_leaf=is_masked)
    stats = extra_args.get('layer_stats')
    # The adaptive step's loss, from the capture step's linearization, on
    # the same scale: passed as linearization= beside the new statistics.
    lin = extra_args.get('linearization') or _linearization.linearization(
        stats)
    if lin is not None:
      extra_args['linearization'] = lin._replace(
          value=scale(jnp.asarray(lin.value)),
          value_fn=lambda p, fn=lin.value_fn: scale(jnp.asarray(fn(p))),
          loss_of=lambda p, z, fn=lin.loss_of: scale(jnp.asarray(fn(p, z))))
    if isinstance(stats, Mapping) and all(
        isinstance(v, LayerStats) for v in stats.values()):
      extra_args['layer_stats'] = {
          k: LayerStats(v.a, scale(v.g), v.meta, v.extras)
          for k, v in stats.items()}
    # The adaptive step's loss values (optax's line-search arguments).
    if extra_args.get('value') is not None:
      extra_args['value'] = scale(jnp.asarray(extra_args['value']))
    for name in ('value_fn', 'outputs_loss'):
      fn = extra_args.get(name)
      if fn is not None:
        extra_args[name] = lambda *a, fn=fn, **k: scale(
            jnp.asarray(fn(*a, **k)))
    return optax.with_extra_args_support(tx).update(
        updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def with_l2(preconditioner: optax.GradientTransformation,
            learning_rate: optax.ScalarOrSchedule, weight_decay: Any,
            mask: Any = None, *, where: str = 'optimizer'
            ) -> optax.GradientTransformationExtraArgs:
  """L2 added to the gradient, then ``preconditioner``, then ``-lr``.

  The L2 term maps ``updates`` against ``params`` before the preconditioner
  can compare them with its state, so the structures are compared first:
  a mismatch names the first differing path instead of failing inside optax.
  A constant ``learning_rate`` must be finite and ``weight_decay`` >= 0.
  """
  check_hyperparams(where, finite={'learning_rate': learning_rate},
                    nonnegative={'weight_decay': weight_decay})
  tx = optax.chain(
      add_decayed_weights(weight_decay, mask),
      preconditioner,
      optax.scale_by_learning_rate(learning_rate),
  )

  def update_fn(updates, state, params=None, **extra_args):
    if params is not None:
      check_same_structure(where, 'updates', updates, 'params', params)
    return tx.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)
