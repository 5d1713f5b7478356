"""Capture of per-layer statistics from Flax NNX models.

:func:`value_grad_and_stats` wraps ``loss_fn(model, *args)``. While it runs,
the ``__call__`` of every registered layer class is wrapped (and restored
afterwards): it sows its input with ``Module.sow`` and perturbs its output
with ``Module.perturb`` inside ``nnx.capture``; the gradient with respect to
the zero perturbation is ``dL/dy``, computed in the same backward pass as the
parameter gradients. ``nnx.scan`` and ``nnx.vmap`` stacks are handled by
``nnx.capture`` itself.

NNX objects among the loss's other arguments (an ``nnx.Rngs`` for dropout,
a second model, ``nnx.Variable`` s) are passed *through* the NNX transforms
as arguments, never closed over: perturbation shapes are found with
``nnx.eval_shape``, which works on copies and writes nothing back, and the
one real pass is a ``jax.linearize`` of the loss over the split state of
``(model, objects)``, whose new state (RNG counters, BatchNorm statistics)
is written back once, exactly as ``nnx.value_and_grad(loss_fn)`` would.
Other arguments stay closed over (Python flags stay static). Only the
modules of ``model`` are captured; layers of other models run unchanged.

Example:
  >>> from flax import nnx
  >>> import jax.numpy as jnp
  >>> import fisher_optax as fo
  >>> model = nnx.Sequential(nnx.Linear(2, 8, rngs=nnx.Rngs(0)), nnx.relu,
  ...                        nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
  >>> loss_fn = lambda m, x: jnp.mean(m(x) ** 2)
  >>> x = jnp.ones((4, 2))
  >>> loss, grads, stats = fo.nnx.value_grad_and_stats(loss_fn)(model, x)
  >>> {name: (st.a.shape, st.g.shape) for name, st in stats.items()}
  {'layers/0': ((1, 4, 2), (1, 4, 8)), 'layers/2': ((1, 4, 8), (1, 4, 3))}
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable, Mapping

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from fisher_optax import _base
from fisher_optax import _linearization
from fisher_optax.capture import _layers
from fisher_optax.capture import linen as capture_linen

_LOCK = threading.RLock()


def register_layer(module_type: type, kind: str,
                   params: Mapping[str, str] | None = None,
                   describe: Callable[..., dict] | None = None) -> None:
  """Registers a custom NNX module class for capture.

  See :func:`fisher_optax.linen.register_layer`; ``params`` names the
  module's ``nnx.Param`` attributes.

  Args:
    module_type: the ``nnx.Module`` subclass.
    kind: ``'dense'``, ``'conv'``, ``'embed'`` or ``'norm'``.
    params: role -> attribute name, e.g. ``{'kernel': 'w', 'bias': 'b'}``.
      Defaults to the stock names of that kind.
    describe: optional ``describe(module, input_shape) -> dict`` returning the
      geometry of that kind (see ``capture/_layers.py``).

  Example:
    >>> from flax import nnx
    >>> import jax, jax.numpy as jnp
    >>> import fisher_optax as fo
    >>> class MyLinear(nnx.Module):
    ...   def __init__(self, din, dout, *, rngs):
    ...     self.w = nnx.Param(jax.random.normal(rngs.params(), (din, dout)))
    ...     self.b = nnx.Param(jnp.zeros((dout,)))
    ...   def __call__(self, x):
    ...     return x @ self.w[...] + self.b[...]
    >>> fo.nnx.register_layer(MyLinear, 'dense',
    ...                       params={'kernel': 'w', 'bias': 'b'})
    >>> model = MyLinear(2, 3, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(1), (4, 2))
    >>> loss_fn = lambda m, x: jnp.mean(jnp.sin(m(x)))
    >>> _, grads, stats = fo.nnx.value_grad_and_stats(loss_fn)(model, x)
    >>> st = stats['']
    >>> print(st.meta.kind, st.a.shape, st.g.shape)
    dense (1, 4, 2) (1, 4, 3)
    >>> bool(jnp.allclose(grads['w'][...], st.a[0].T @ st.g[0], atol=1e-6))
    True
  """
  _layers.register_layer('nnx', module_type, kind, params, describe)


for _cls, _kind, _describe in (
    (nnx.Linear, 'dense', None),
    (nnx.LinearGeneral, 'dense', _layers.describe_dense_general),
    (nnx.Conv, 'conv', None),
    (nnx.Embed, 'embed', None),
    (nnx.LayerNorm, 'norm', None),
    (nnx.RMSNorm, 'norm', None),
    (nnx.BatchNorm, 'norm', None),
    (nnx.GroupNorm, 'norm', None),
):
  register_layer(_cls, _kind, describe=_describe)


def _module_params(module, spec):
  out = {}
  for name in spec.params.values():
    p = getattr(module, name, None)
    if isinstance(p, nnx.Variable):
      out[name] = p[...]
  return out


def _sown_calls(module, name: str) -> int:
  for var in getattr(module, '__captures__', ()):
    if type(var) is nnx.Intermediate and name in var:  # pylint: disable=unidiomatic-typecheck
      return len(var[name])
  return 0


_ACTIVE = threading.local()


@contextlib.contextmanager
def _capturing():
  """Wraps ``__call__`` of the registered classes while the loss runs.

  Only modules that ``nnx.capture`` prepared (those of the model, also when
  ``nnx.scan`` / ``nnx.vmap`` hand out slices of them) are captured: a
  layer of another model passed to the loss has no capture collections,
  and sowing there would add variables to the user's object. A registered
  subclass calling ``super().__call__`` is captured once, by the outermost
  wrapper (a per-instance re-entrancy guard).
  """
  saved = {}

  def wrap(original):

    @functools.wraps(original)
    def call(self, x, *args, **kwargs):
      active = _ACTIVE.__dict__.setdefault('ids', set())
      spec = _layers.lookup('nnx', type(self))
      if (id(self) in active or spec is None
          or '__captures__' not in vars(self)):
        return original(self, x, *args, **kwargs)
      try:
        _layers.check_not_overridden('nnx', type(self))
        config = spec.describe(self, tuple(jnp.shape(x)))
      except _layers.Unsupported:
        return original(self, x, *args, **kwargs)
      n = _sown_calls(self, 'fo_a')
      active.add(id(self))
      try:
        y = original(self, x, *args, **kwargs)
      finally:
        active.discard(id(self))
      self.sow(nnx.Intermediate, 'fo_a', x)
      # Lifted transforms add their axes in front; the last axis's length
      # is the parameters' own rank, so stack and broadcast axes can be
      # told apart afterwards.
      inner = [jnp.ndim(v) for v in _module_params(self, spec).values()]
      self.sow(nnx.Intermediate, 'fo_marker',
               np.zeros((inner[0] if inner else 0,), np.int8))
      if spec.kind == 'norm':
        self.sow(nnx.Intermediate, 'fo_xhat', _layers.normalised_input(
            y, _module_params(self, spec), config['feature_axes']))
      return self.perturb(f'fo_g{n}', y)

    return call

  with _LOCK:
    for cls in _layers._REGISTRY['nnx']:  # pylint: disable=protected-access
      saved[cls] = cls.__dict__.get('__call__')
      cls.__call__ = wrap(cls.__call__)
    saved[nnx.RNN] = nnx.RNN.__dict__.get('__call__')
    nnx.RNN.__call__ = _scan_captures(nnx.RNN.__call__)
    try:
      yield
    finally:
      for cls, original in saved.items():
        if original is None:
          del cls.__call__
        else:
          cls.__call__ = original


_CAPTURES = nnx.filterlib.Any(nnx.Intermediate, nnx.Perturbation)


def _scan_captures(rnn_call):
  """``nnx.RNN.__call__`` with the capture state scanned over time.

  ``nnx.RNN`` carries its cell through ``nnx.scan`` (``state_axes``
  ``{...: Carry}``); a sown input would change the carry's structure on the
  first step. Mapping the capture's variables over axis 0 instead stacks
  one entry per time step, as ``nn.RNN`` does in linen.
  """

  @functools.wraps(rnn_call)
  def call(self, *args, **kwargs):
    original = self.state_axes
    self.state_axes = nnx.StateAxes({_CAPTURES: 0, **original})
    try:
      return rnn_call(self, *args, **kwargs)
    finally:
      self.state_axes = original

  return call


def _value(v):
  return v.get_value() if isinstance(v, nnx.Variable) else v


@contextlib.contextmanager
def _root_output(model, outputs: list, replay=None):
  """Records what calls of ``model`` itself return; with ``replay``, those
  calls return its entries instead, in order, and run nothing."""
  cls = type(model)
  saved = cls.__dict__.get('__call__')
  original = cls.__call__

  @functools.wraps(original)
  def call(self, *args, **kwargs):
    if self is not model:
      return original(self, *args, **kwargs)
    if replay is not None:
      if len(outputs) >= len(replay):
        raise RuntimeError('the model ran more often than while the loss was '
                           'captured; the loss must call it the same number '
                           'of times on every trace.')
      out = replay[len(outputs)]
    else:
      out = original(self, *args, **kwargs)
    outputs.append(out)
    return out

  with _LOCK:
    cls.__call__ = call
    try:
      yield
    finally:
      if saved is None:
        del cls.__call__
      else:
        cls.__call__ = saved


def value_grad_and_stats(
    loss_fn: Callable[..., Any], has_aux: bool = False, *,
    fisher: str = 'empirical',
) -> Callable[..., tuple[Any, Any, dict[str, _base.LayerStats]]]:
  """Like ``nnx.value_and_grad(loss_fn)``, plus per-layer statistics.

  Args:
    loss_fn: ``loss_fn(model, *args, **kwargs)`` calling the unmodified NNX
      model; returns a scalar, or ``(scalar, aux)`` if ``has_aux``. The
      other arguments may hold NNX objects (an ``nnx.Rngs`` for dropout, a
      second model), as with ``nnx.value_and_grad``; only ``model`` is
      differentiated and captured.
    has_aux: whether ``loss_fn`` returns auxiliary data.
    fisher: ``'empirical'``, ``'softmax'``, ``'gaussian'`` or
      ``'bernoulli'``; see
      :func:`fisher_optax.linen.value_grad_and_stats`. For the sampled
      Fishers the model output is what the last call of ``model`` itself
      returns, and ``step`` takes ``fisher_key=``.

  Returns:
    ``step(model, *args, **kwargs) -> (value, grads, layer_stats)``;
    ``grads`` is the ``nnx.State`` of ``nnx.Param`` gradients and
    ``layer_stats`` maps module paths (``'blocks/linear'``) to
    :class:`~fisher_optax.LayerStats`. State that the loss updates, in the
    model or in NNX objects among the arguments (``BatchNorm`` statistics,
    RNG counters), is written back once, as with ``nnx.value_and_grad``.
    Call it inside ``nnx.jit`` or ``jax.jit``. As in linen, the loss is
    linearized once with the model's outputs (what calls of ``model``
    itself return) as extra outputs, and ``layer_stats`` carries the
    linearization (:func:`fisher_optax.linearization`) for the optimizers
    without a learning rate.

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> import fisher_optax as fo
    >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> loss_fn = lambda m, x: jnp.mean(m(x) ** 2)
    >>> loss, grads, stats = fo.nnx.value_grad_and_stats(loss_fn)(
    ...     model, jnp.ones((4, 2)))
    >>> stats[''].a.shape, stats[''].g.shape
    ((1, 4, 2), (1, 4, 3))
  """

  if fisher not in ('empirical',) + capture_linen.SAMPLED_FISHERS:
    raise ValueError(f'fisher must be empirical, softmax or gaussian, got '
                     f'{fisher!r}.')

  def loss_only(out):
    return out[0] if has_aux else out

  def step(model, *args, fisher_key=None, **kwargs):
    if fisher != 'empirical' and fisher_key is None:
      raise ValueError(f"fisher={fisher!r} samples targets: call the step "
                       'function with fisher_key=<a jax.random key>.')
    # Every NNX object the loss sees travels as an argument of an NNX
    # transform: closed over, an nnx.Rngs would advance inside the inner
    # trace (TraceContextError). Other arguments stay closed over, so Python
    # values (train=True) stay static, as under nnx.value_and_grad.
    objects, rebuild = _split_objects(args, kwargs)
    if any(o is model for o in objects):
      # As nnx.value_and_grad: one object cannot be both differentiated and
      # not.
      raise ValueError('Inconsistent aliasing: the model is also one of the '
                       "loss's other arguments; pass it once.")
    perturbations = nnx.eval_shape(
        functools.partial(_discover, loss_fn, rebuild), model, objects)
    # zeros_like keeps shard_map's device-varying type (see linen.py).
    zeros = jax.tree.map(jnp.zeros_like, perturbations)

    # The model's parameters, and the rest of the state of the model and of
    # the other NNX objects (BatchNorm statistics, RNG counters, other
    # models), which the loss updates and which is written back once.
    graphdef, params, rest = nnx.split((model, objects), _model_param, ...)
    # Detached from the model's Variables, which the step updates below:
    # the loss after the step must see the state the capture step saw.
    params, rest = jax.tree.map(lambda x: x, (params, rest))
    param_paths = _base.flatten_leaves(_model_grads(params))[0]
    param_def = jax.tree.structure(params, is_leaf=_base.is_masked)

    def run(params, rest, perturbations=None, replay=None):
      # New Variables, of the trace this runs in (the adaptive step's
      # lax.cond): the split's own would refuse the loss's state updates.
      m, o = nnx.merge(graphdef, *jax.tree.map(lambda x: x, (params, rest)))
      args, kwargs = rebuild(o)
      outputs = []
      with _root_output(m, outputs, replay):
        if perturbations is None:
          return loss_fn(m, *args, **kwargs), None, outputs, None
        with _capturing():
          out, inter = nnx.capture(loss_fn, nnx.Intermediate,
                                   init=perturbations)(m, *args, **kwargs)
      return out, inter, outputs, nnx.split((m, o), _model_param, ...)[2]

    def wrapped(params, perturbations, rest):
      out, inter, outputs, new_rest = run(params, rest, perturbations)
      return (loss_only(out), tuple(outputs)), (out, inter, new_rest)

    # The rest is a primal too, so that the loss updates it at its trace
    # level; its tangents are zero.
    (loss, outputs), linearized_all, (out, inter, new_rest) = jax.linearize(
        wrapped, params, zeros, rest, has_aux=True)
    rest_tangents = jax.tree.map(_zero_tangent, rest)
    linearized = lambda p, z: linearized_all(p, z, rest_tangents)
    grads, cotangents = capture_linen._transpose_gradients(
        linearized, (params, zeros), loss, outputs, fisher, fisher_key)
    nnx.update((model, objects), new_rest)
    stats = _assemble(model, inter, cotangents)

    def as_params(tree):
      # The update's parameter-shaped trees (an nnx.State of the model's
      # nnx.Param, plain or pure) as the split's.
      leaves = jax.tree.leaves(tree, is_leaf=_base.is_masked)
      if len(leaves) != len(param_paths):
        raise ValueError(
            f'the parameters given to tx.update have {len(leaves)} leaves, '
            f'the captured model {len(param_paths)} ({param_paths[:4]}...): '
            'pass nnx.state(model, nnx.Param).')
      return jax.tree.unflatten(param_def, leaves)

    def loss_of(p, outputs):
      return loss_only(run(as_params(p), rest, replay=outputs)[0])

    model_params = _model_grads(params)
    return out, _model_grads(grads), _linearization.attach(
        stats, _linearization.Linearization(
            value=loss,
            value_fn=lambda p: loss_only(run(as_params(p), rest)[0]),
            params=model_params,
            outputs=outputs,
            outputs_jvp=lambda v: linearized(as_params(v), zeros)[1],
            loss_of=loss_of,
            outside=lambda: _linearization.outside_paths(
                loss_of, model_params, outputs)))

  return step


def _zero_tangent(x):
  if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(jnp.shape(x), jax.dtypes.float0)


def _split_objects(args, kwargs):
  """The NNX objects among ``(args, kwargs)``, and how to put them back.

  Returns ``(objects, rebuild)``: a list of the NNX graph nodes (modules,
  ``nnx.Rngs``, variables) found in the pytree of arguments, and
  ``rebuild(objects) -> (args, kwargs)`` with every other leaf unchanged.
  """
  is_object = nnx.graph.is_graph_node
  leaves, treedef = jax.tree.flatten((args, kwargs), is_leaf=is_object)
  where = [is_object(leaf) for leaf in leaves]
  objects = [leaf for leaf, w in zip(leaves, where) if w]

  def rebuild(objects):
    it = iter(objects)
    return jax.tree.unflatten(
        treedef, [next(it) if w else leaf for leaf, w in zip(leaves, where)])

  return objects, rebuild


def _discover(loss_fn, rebuild, m, objects):
  """The loss's perturbations; run under ``nnx.eval_shape`` (on copies)."""
  args, kwargs = rebuild(objects)
  with _capturing():
    _, perturbations, _ = nnx.capture(loss_fn, nnx.Perturbation,
                                      nnx.Intermediate)(m, *args, **kwargs)
  return perturbations


def _model_param(path, value) -> bool:
  """Filter: the ``nnx.Param`` s of the model, first in ``(model, objects)``."""
  return bool(path) and path[0] == 0 and isinstance(value, nnx.Param)


def _model_grads(grads):
  """Gradients split from ``(model, objects)``, keyed like the model."""
  return grads[0] if 0 in grads else nnx.State({})


def _assemble(model, inter, cotangents):
  modules = {'/'.join(str(k) for k in path): m
             for path, m in nnx.iter_modules(model)}
  for path, module in modules.items():
    if _layers.lookup('nnx', type(module)) is None:
      continue
    try:
      _layers.check_not_overridden('nnx', type(module))
      _layers.SKIPPED.pop(path, None)
    except _layers.Unsupported as e:
      _layers.SKIPPED[path] = str(e)
  params = _base.flatten_with_paths(nnx.state(model, nnx.Param))
  inter = _nested(inter)
  cotangents = _nested(cotangents)
  stats = {}
  for path, node in _walk(inter):
    if 'fo_a' not in node:
      continue
    module = modules[path]
    spec = _layers.lookup('nnx', type(module))
    a_calls = list(node['fo_a'])
    shapes = {n: _base.shape_of(params[_base.join_path(path, n)])
              for n in spec.params.values()
              if _base.join_path(path, n) in params}
    lifts = _lifted_axes(spec, node['fo_marker'][0], shapes, a_calls[0])
    in_shape = tuple(a_calls[0].shape[len(lifts):])
    config = spec.describe(module, in_shape)
    g_node = _get(cotangents, path)
    g_calls = [g_node[f'fo_g{n}'] for n in range(len(a_calls))]
    extras = {'xhat': list(node['fo_xhat'])} if 'fo_xhat' in node else {}
    stats[path] = _layers.build(path, spec, type(module).__name__, config,
                                shapes, lifts, a_calls, g_calls, extras)
  return stats


def _lifted_axes(spec, marker, shapes, a) -> tuple[str, ...]:
  """The kind of each lifted leading axis of one layer's capture.

  ``marker`` has one leading axis per lifted transform and a last axis as
  long as the parameters' rank inside them: the parameters' extra axes
  outside are stack axes (taken to be the outer ones). The other lifted
  axes broadcast the parameters: calls (``nnx.RNN``'s time steps), unless a
  dense layer's call then has no batch axis left (a per-example
  ``nnx.vmap``), where they are the batch.
  """
  lifted = marker.ndim - 1
  if not shapes:
    return ('stack',) * lifted
  stack = len(next(iter(shapes.values()))) - marker.shape[-1]
  broadcast = lifted - stack
  no_batch = spec.kind == 'dense' and a.ndim - lifted <= 1
  return ('stack',) * stack + ('batch' if no_batch else 'call',) * broadcast


def _nested(state) -> dict:
  """An ``nnx.State`` as plain nested dicts of arrays / tuples of arrays."""
  if isinstance(state, (nnx.State, Mapping)):
    return {str(k): _nested(v) for k, v in state.items()}
  return _value(state)


def _walk(tree, prefix=()):
  if isinstance(tree, dict):
    yield '/'.join(prefix), tree
    for k, v in tree.items():
      if isinstance(v, dict):
        yield from _walk(v, prefix + (k,))


def _get(tree, path: str):
  for k in path.split('/') if path else ():
    tree = tree[k]
  return tree
