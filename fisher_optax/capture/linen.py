"""Capture of per-layer statistics from Flax linen models.

:func:`value_grad_and_stats` wraps the user's own loss function. Inside one
``jax.value_and_grad`` it records, for every stock layer the loss runs, the
layer's input and the cotangent of the loss with respect to the layer output.
The model and the loss are not modified.

How: while the wrapped loss is traced, ``flax.linen``'s ``apply`` is routed
through a shim that makes two private collections mutable and feeds zero
"perturbations" (``Module.perturb``); an ``nn.intercept_methods`` interceptor
sows each layer's input and adds the perturbation to its output. The gradient
with respect to the perturbation is ``dL/dy``; it comes out of the same
backward pass as the parameter gradients. The shapes of the perturbations are
found with ``jax.eval_shape`` first, which costs no FLOPs.

Lifted transforms (``nn.scan``, ``nn.vmap``, ``nn.remat``, ``nn.jit``,
``nn.map_variables``, ``nn.RNN``) pass only the collections they are told
about. While the loss is traced, the capture adds its collections at axis 0
to every ``nn.scan`` / ``nn.vmap`` that does not name them (the others pass
every collection), so a model needs no edit; ``**capture_axes()`` in a
transform's ``variable_axes`` says the same explicitly. A lifted axis over
which the layer's parameters are stacked (``nn.scan`` over layers) is a
stack axis of the statistics; one over which they are broadcast (the time
steps of ``nn.RNN``, an ``nn.vmap`` with ``variable_axes={'params': None}``)
is weight sharing, and its entries become calls.

Example:
  >>> import flax.linen as nn, jax, jax.numpy as jnp
  >>> import fisher_optax as fo
  >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
  >>> x = jnp.ones((4, 2))
  >>> params = model.init(jax.random.key(0), x)['params']
  >>> loss_fn = lambda p, x: jnp.mean(model.apply({'params': p}, x) ** 2)
  >>> loss, grads, stats = fo.linen.value_grad_and_stats(loss_fn)(params, x)
  >>> {name: (st.a.shape, st.g.shape) for name, st in stats.items()}
  {'layers_0': ((1, 4, 2), (1, 4, 8)), 'layers_2': ((1, 4, 8), (1, 4, 3))}
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable, Mapping

import flax.linen as nn
from flax.core import lift as flax_lift
from flax.core import scope as flax_scope
from flax.linen import module as flax_module
import jax
import jax.numpy as jnp

from fisher_optax import _base
from fisher_optax import _linearization
from fisher_optax._train_state import TrainState  # noqa: F401  re-exported
from fisher_optax.capture import _layers

INPUTS = 'fo_inputs'
PERTURBATIONS = 'fo_perturbations'
EXTRAS = 'fo_extras'
COLLECTIONS = (INPUTS, PERTURBATIONS, EXTRAS)
_LOCK = threading.RLock()


def capture_axes(axis: int = 0) -> dict[str, int]:
  """``variable_axes`` entries that let a lifted transform pass captures.

  Args:
    axis: the axis the transform maps over (``0`` for ``nn.scan`` over
      layers).

  Returns:
    ``{collection: axis}`` for fisher_optax's private collections.

  Example:
    Three stacked layers under ``nn.scan``: their statistics get the stack
    axis in front, like the stacked parameters.

    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import fisher_optax as fo
    >>> class Block(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, _):
    ...     return jnp.tanh(nn.Dense(4)(x)), None
    >>> Stack = nn.scan(Block, length=3, split_rngs={'params': True},
    ...                 variable_axes={'params': 0, **fo.linen.capture_axes()})
    >>> model = Stack()
    >>> x = jnp.ones((8, 4))
    >>> params = model.init(jax.random.key(0), x, None)['params']
    >>> loss_fn = lambda p: jnp.mean(model.apply({'params': p}, x, None)[0]
    ...                              ** 2)
    >>> _, _, stats = fo.linen.value_grad_and_stats(loss_fn)(params)
    >>> stats['Dense_0'].a.shape, stats['Dense_0'].meta.stack_ndim
    ((3, 1, 8, 4), 1)
  """
  return {c: axis for c in COLLECTIONS}


def register_layer(module_type: type, kind: str,
                   params: Mapping[str, str] | None = None,
                   describe: Callable[..., dict] | None = None) -> None:
  """Registers a custom linen module class for capture.

  The module's ``__call__(x)`` must compute the layer of ``kind`` from its
  first positional argument: ``'dense'`` is ``y = x @ kernel + bias``,
  ``'conv'`` a ``lax.conv_general_dilated`` with NHWC/HWIO layout,
  ``'embed'`` a table lookup, ``'norm'`` ``y = xhat * scale + bias``.

  Args:
    module_type: the ``nn.Module`` subclass.
    kind: ``'dense'``, ``'conv'``, ``'embed'`` or ``'norm'``.
    params: role -> parameter name, e.g. ``{'kernel': 'w', 'bias': 'b'}``.
      Defaults to the stock names of that kind.
    describe: optional ``describe(module, input_shape) -> dict`` returning the
      geometry of that kind (see ``capture/_layers.py``).

  Example:
    A dense layer with its own parameter names; its statistics give its
    kernel gradient, ``sum_rows a^T g``:

    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import fisher_optax as fo
    >>> class MyDense(nn.Module):
    ...   features: int
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     w = self.param('w', nn.initializers.lecun_normal(),
    ...                    (x.shape[-1], self.features))
    ...     b = self.param('b', nn.initializers.zeros, (self.features,))
    ...     return x @ w + b
    >>> fo.linen.register_layer(MyDense, 'dense',
    ...                         params={'kernel': 'w', 'bias': 'b'})
    >>> model = MyDense(3)
    >>> x = jax.random.normal(jax.random.key(0), (4, 2))
    >>> params = model.init(jax.random.key(1), x)['params']
    >>> loss_fn = lambda p: jnp.mean(jnp.sin(model.apply({'params': p}, x)))
    >>> _, grads, stats = fo.linen.value_grad_and_stats(loss_fn)(params)
    >>> st = stats['']
    >>> print(st.meta.kind, st.a.shape, st.g.shape)
    dense (1, 4, 2) (1, 4, 3)
    >>> bool(jnp.allclose(grads['w'], st.a[0].T @ st.g[0], atol=1e-6))
    True
  """
  _layers.register_layer('linen', module_type, kind, params, describe)


for _cls, _kind, _describe in (
    (nn.Dense, 'dense', None),
    (nn.DenseGeneral, 'dense', _layers.describe_dense_general),
    (nn.Conv, 'conv', None),
    (nn.Embed, 'embed', None),
    (nn.LayerNorm, 'norm', None),
    (nn.RMSNorm, 'norm', None),
    (nn.BatchNorm, 'norm', None),
    (nn.GroupNorm, 'norm', None),
):
  register_layer(_cls, _kind, describe=_describe)


# Modules whose layers are not modules, computed instead by an equivalent
# written with stock layers of the same parameter names and shapes:
# OptimizedLSTMCell concatenates its gate kernels (built by DenseParams
# modules that only return them) into one matmul; LSTMCell computes the same
# gates with one Dense per gate under the same names, which capture sees.
_SUBSTITUTES = {
    nn.OptimizedLSTMCell: nn.LSTMCell.__call__.__wrapped__,
}


class _Trace:
  """Python-side bookkeeping of one traced call of the wrapped loss."""

  def __init__(self, discover: bool, perturbations=None, param_ids=None,
               replay=None):
    self.discover = discover
    self.perturbations = perturbations
    # (outputs, states) per apply call: apply returns them, runs nothing.
    self.replay = replay
    self.param_ids = param_ids or {}
    self.applies = []  # per apply call: captured collections (JAX values)
    self.prefixes = []  # per apply call: path of its params in user params
    self.layers = {}  # (apply index, module path) -> static layer info
    self.skipped = {}  # (apply index, module path) -> why it was not captured
    self.outputs = []  # per apply call: the model output (JAX values)
    self.states = []  # per apply call: the user's mutable collections
    self.lifts = []  # kinds of the lifted transforms now running
    self.active = set()  # ids of the modules whose capture is running
    self.pending_lift = None  # set between a lift's axes and its pack


def _module_params(module, spec):
  return {n: module.get_variable('params', n) for n in spec.params.values()
          if module.has_variable('params', n)}


def _interceptor(trace: _Trace):
  """Sows inputs and perturbs outputs of every registered layer call."""

  def tap(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == '__call__':
      substitute = _SUBSTITUTES.get(_layers.defining_class(
          type(module), '__call__'))
      if substitute is not None:
        return substitute(module, *args, **kwargs)
    spec = _layers.lookup('linen', type(module))
    # A registered subclass calling super().__call__ is captured once, by
    # its outermost call.
    if (spec is None or context.method_name != '__call__' or not args
        or id(module) in trace.active):
      return next_fun(*args, **kwargs)
    x = args[0]
    path = '/'.join(module.path)
    try:
      _layers.check_not_overridden('linen', type(module))
      config = spec.describe(module, tuple(jnp.shape(x)))
    except _layers.Unsupported as e:
      trace.skipped[(len(trace.applies), path)] = str(e)
      return next_fun(*args, **kwargs)
    calls = module.get_variable(INPUTS, 'a', ()) if module.has_variable(
        INPUTS, 'a') else ()
    n = len(calls)
    trace.active.add(id(module))
    try:
      y = next_fun(*args, **kwargs)
    finally:
      trace.active.discard(id(module))
    params = _module_params(module, spec)
    trace.layers[(len(trace.applies), path)] = (
        spec, type(module).__name__, config,
        {n: jnp.shape(v) for n, v in params.items()}, tuple(trace.lifts))
    module.sow(INPUTS, 'a', x)
    module.sow(INPUTS, 'marker', _layers.marker())
    if spec.kind == 'norm':
      module.sow(EXTRAS, 'xhat', _layers.normalised_input(
          y, params, config['feature_axes']))
    return module.perturb(f'g{n}', y, collection=PERTURBATIONS)

  return tap


def _param_prefix(trace: _Trace, variables) -> str:
  """Where this apply call's params live inside the differentiated params."""
  inner = _base.flatten_with_paths(dict(variables).get('params', {}))
  prefixes = set()
  for path, leaf in inner.items():
    user = trace.param_ids.get(id(leaf))
    if user is not None and (user == path or user.endswith('/' + path)):
      prefixes.add(user[: len(user) - len(path)].rstrip('/'))
  if len(prefixes) == 1:
    return prefixes.pop()
  user_paths = set(trace.param_ids.values())
  for prefix in ('', 'params'):
    if inner and all(_base.join_path(prefix, p) in user_paths
                     for p in inner):
      return prefix
  raise ValueError(
      'fisher_optax could not find the parameters that `model.apply` was '
      'called with inside the params given to value_grad_and_stats (paths '
      f'{sorted(inner)[:4]}...). Pass the params you differentiate to '
      '`model.apply({"params": params}, ...)` (possibly a sub-tree of them).')


# Lifted axes of a capture, by what the transform does with the parameters:
STACK = 'stack'  # mapped: one parameter slice per entry (nn.scan of layers)
CALL = 'call'    # broadcast by nn.scan: weight sharing over steps
BATCH = 'batch'  # broadcast by nn.vmap: the entries are examples


def _lift_hooks(trace: _Trace, split_in_out_axes, pack):
  """Wraps Flax's lifting so captures pass through and their axes are known.

  ``nn.scan`` and ``nn.vmap`` read their ``variable_axes`` with
  ``_split_in_out_axes`` and give every collection that it (or their
  broadcast / carry filters) does not name to no one, so a layer inside them
  could not pass its capture out: the capture collections are mapped over
  axis 0, which is what ``capture_axes()`` asks for explicitly. Each such
  transform then calls ``pack``; the body it returns runs with the kind of
  its lifted axis (:data:`STACK`, :data:`CALL`, :data:`BATCH`) pushed on
  ``trace.lifts``, so a layer call knows what each lifted axis of its
  capture is.
  """

  def split(variable_axes):
    axes = dict(variable_axes)
    for c in COLLECTIONS:
      if not any(flax_scope.in_filter(f, c) for f in axes):
        axes[c] = 0
    params_axis = next((ax for f, ax in axes.items()
                        if flax_scope.in_filter(f, 'params')), None)
    params_axis = getattr(params_axis, 'axis', params_axis)  # In / Out
    trace.pending_lift = isinstance(params_axis, int)
    return split_in_out_axes(axes)

  def packed(fn, *args, **kwargs):
    body = pack(fn, *args, **kwargs)
    mapped, trace.pending_lift = trace.pending_lift, None
    if mapped is None:  # remat, jit, map_variables...: no lifted axis
      return body
    name = kwargs.get('name', args[3] if len(args) > 3 else None)
    kind = STACK if mapped else (BATCH if name == 'vmap' else CALL)

    @functools.wraps(body)
    def run(*a, **k):
      trace.lifts.append(kind)
      try:
        return body(*a, **k)
      finally:
        trace.lifts.pop()

    return run

  return split, packed


@contextlib.contextmanager
def _capturing(trace: _Trace):
  """Routes ``flax.linen`` apply calls through the capture shim."""
  original = flax_module.apply
  original_lift = (flax_lift._split_in_out_axes, flax_lift.pack)

  def apply(fn, module, mutable=False, capture_intermediates=False):
    extra = [INPUTS, EXTRAS] + ([PERTURBATIONS] if trace.discover else [])
    inner = original(fn, module,
                     mutable=flax_scope.union_filters(mutable, extra),
                     capture_intermediates=capture_intermediates)

    @functools.wraps(inner)
    def call(variables, *args, **kwargs):
      k = len(trace.applies)
      if trace.replay is not None:
        outputs, states = trace.replay
        if k >= len(outputs):
          raise RuntimeError('model.apply ran more often than while the loss '
                             'was captured; the loss must call it the same '
                             'number of times on every trace.')
        trace.applies.append({})
        return outputs[k] if mutable is False else (outputs[k], states[k])
      variables = dict(variables)
      if trace.discover:
        trace.prefixes.append(_param_prefix(trace, variables))
      else:
        if k >= len(trace.perturbations):
          raise RuntimeError('model.apply ran more often than while the '
                             'capture shapes were traced; the loss must call '
                             'it the same number of times on every trace.')
        variables[PERTURBATIONS] = trace.perturbations[k]
      out, state = inner(variables, *args, **kwargs)
      state = dict(state)
      trace.applies.append({c: state.pop(c, {}) for c in (
          INPUTS, EXTRAS, PERTURBATIONS)})
      trace.outputs.append(out)
      trace.states.append(state)
      return out if mutable is False else (out, state)

    return call

  with _LOCK:
    flax_module.apply = apply
    flax_lift._split_in_out_axes, flax_lift.pack = _lift_hooks(
        trace, *original_lift)
    try:
      with nn.intercept_methods(_interceptor(trace)):
        yield
    finally:
      flax_module.apply = original
      flax_lift._split_in_out_axes, flax_lift.pack = original_lift


def _modules(tree, leaf_name: str, prefix=()):
  """Module paths below ``tree`` (nested dicts) that hold ``leaf_name``."""
  out = {}
  for k, v in dict(tree).items():
    if isinstance(v, Mapping):
      out.update(_modules(v, leaf_name, prefix + (k,)))
    elif k == leaf_name:
      out['/'.join(prefix)] = tree
  return out


def _get(tree, path: str):
  for k in path.split('/') if path else ():
    tree = tree[k]
  return tree


def value_grad_and_stats(
    loss_fn: Callable[..., Any], has_aux: bool = False, *,
    fisher: str = 'empirical',
) -> Callable[..., tuple[Any, Any, dict[str, _base.LayerStats]]]:
  """Like ``jax.value_and_grad(loss_fn)``, plus per-layer statistics.

  ``loss_fn(params, *args, **kwargs)`` is the user's loss: it calls
  ``model.apply({'params': params, ...}, ...)`` on an unmodified linen model
  (possibly several times, with ``mutable=`` collections such as
  ``batch_stats``, or on a sub-tree of ``params``). Gradients are taken with
  respect to ``params`` only.

  Args:
    loss_fn: the loss, returning a scalar, or ``(scalar, aux)`` if
      ``has_aux``.
    has_aux: whether ``loss_fn`` returns auxiliary data.
    fisher: which cotangents ``g`` the statistics get. ``'empirical'``: the
      loss's own (one backward pass, shared with the gradients).
      ``'softmax'`` / ``'gaussian'`` / ``'bernoulli'``: a Monte-Carlo Fisher,
      the cotangents of a batch-mean cross-entropy (or ``0.5 * squared
      error``, or binary cross-entropy summed over the last axis) whose
      targets are sampled from the model's own predictive distribution
      (categorical over the last axis of the output / unit-variance
      Gaussian / independent Bernoulli per logit). It costs
      one extra backward pass and no extra forward pass; the model output
      is that of the last ``model.apply`` in the loss, and ``step`` takes a
      ``fisher_key=`` PRNG key. The gradients are always the loss's.

  Returns:
    ``step(params, *args, **kwargs) -> (value, grads, layer_stats)`` where
    ``value`` is the loss (or ``(loss, aux)``), ``grads`` equals
    ``jax.grad(loss_fn)`` and ``layer_stats`` maps each captured layer's
    parameter path (``'encoder/Dense_0'``) to a
    :class:`~fisher_optax.LayerStats`. Call it inside your ``jax.jit``.

    The loss is linearized once, with the outputs of every ``model.apply``
    call as extra outputs; the gradient is its transpose (the backward pass
    of ``jax.value_and_grad``). ``layer_stats`` carries the linearization
    (:func:`fisher_optax.linearization`): the optimizers without a learning
    rate take the loss and its Gauss-Newton curvature from it, so their
    ``update`` needs only ``layer_stats=``.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import fisher_optax as fo
    >>> model = nn.Dense(3)
    >>> x = jnp.ones((4, 2))
    >>> params = model.init(jax.random.key(0), x)['params']
    >>> loss_fn = lambda p, x: jnp.mean(model.apply({'params': p}, x) ** 2)
    >>> loss, grads, stats = fo.linen.value_grad_and_stats(loss_fn)(params, x)
    >>> stats[''].a.shape, stats[''].g.shape  # (calls, batch, features)
    ((1, 4, 2), (1, 4, 3))
  """

  if fisher not in ('empirical',) + SAMPLED_FISHERS:
    raise ValueError('fisher must be one of '
                     f'{("empirical",) + SAMPLED_FISHERS}, got {fisher!r}.')

  def loss_only(out):
    return out[0] if has_aux else out

  def step(params, *args, fisher_key=None, **kwargs):
    if fisher != 'empirical' and fisher_key is None:
      raise ValueError(f"fisher={fisher!r} samples targets: call the step "
                       'function with fisher_key=<a jax.random key>.')
    param_ids = {id(leaf): path for path, leaf in
                 _base.flatten_with_paths(params).items()}
    discovery = _Trace(discover=True, param_ids=param_ids)

    def discover(p):
      discovery.param_ids = {id(leaf): path for path, leaf in
                             _base.flatten_with_paths(p).items()}
      with _capturing(discovery):
        out = loss_fn(p, *args, **kwargs)
      return out, discovery.applies

    _, shapes = jax.eval_shape(discover, params)
    _check_dropped(discovery, shapes)
    _publish_skipped(discovery)
    # zeros_like keeps what eval_shape saw of each output, including
    # shard_map's device-varying type: perturbations created invariant
    # would have their cotangents summed over the devices (check_vma).
    zeros = [jax.tree.map(jnp.zeros_like, applied[PERTURBATIONS])
             for applied in shapes]

    def wrapped(p, perturbations):
      trace = _Trace(discover=False, perturbations=perturbations)
      with _capturing(trace):
        out = loss_fn(p, *args, **kwargs)
      captured = [{c: a[c] for c in (INPUTS, EXTRAS)} for a in trace.applies]
      return ((loss_only(out), tuple(trace.outputs)),
              (out, captured, tuple(trace.states)))

    (loss, outputs), linearized, (out, captured, states) = jax.linearize(
        wrapped, params, zeros, has_aux=True)
    grads, cotangents = _transpose_gradients(
        linearized, (params, zeros), loss, outputs, fisher, fisher_key)
    stats = _assemble(discovery, params, captured, cotangents)

    def replay(p, outputs):
      trace = _Trace(discover=False, replay=(outputs, states))
      with _capturing(trace):
        return loss_only(loss_fn(p, *args, **kwargs))

    return out, grads, _linearization.attach(
        stats, _linearization.Linearization(
            value=loss,
            value_fn=lambda p: loss_only(loss_fn(p, *args, **kwargs)),
            params=params,
            outputs=outputs,
            outputs_jvp=lambda v: linearized(v, zeros)[1],
            loss_of=replay,
            outside=lambda: _linearization.outside_paths(
                replay, params, outputs)))

  return step


SAMPLED_FISHERS = ('softmax', 'gaussian', 'bernoulli')


def sampled_cotangent(fisher: str, output, key):
  """Cotangent of a loss with targets sampled from the model.

  ``'softmax'``: labels ``y ~ Categorical(softmax(output))`` over the last
  axis and the gradient of the mean cross-entropy,
  ``(softmax(output) - onehot(y)) / rows``. ``'gaussian'``: targets
  ``y ~ N(output, I)`` and the gradient of ``0.5 * mean_rows |output - y|^2``,
  ``-noise / rows``. ``'bernoulli'``: every output is a logit, targets
  ``y ~ Bernoulli(sigmoid(output))`` and the gradient of the mean over rows
  of the binary cross-entropy summed over the last axis (an autoencoder's
  pixels), ``(sigmoid(output) - y) / rows``. ``rows`` counts all but the
  last axis, as a batch-mean loss would. In expectation over the samples
  the outer products of the resulting per-example gradients are the true
  Fisher of that likelihood.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import fisher_optax as fo
    >>> logits = jnp.zeros((4, 3))
    >>> g = fo.linen.sampled_cotangent('softmax', logits, jax.random.key(0))
    >>> g.shape, bool(jnp.allclose(g.sum(-1), 0.0, atol=1e-6))
    ((4, 3), True)
  """
  output = jax.lax.stop_gradient(output).astype(jnp.float32)
  rows = max(1, output.size // output.shape[-1])
  if fisher == 'softmax':
    labels = jax.random.categorical(key, output, axis=-1)
    probs = jax.nn.softmax(output, axis=-1)
    return (probs - jax.nn.one_hot(labels, output.shape[-1])) / rows
  if fisher == 'bernoulli':
    probs = jax.nn.sigmoid(output)
    labels = jax.random.bernoulli(key, probs).astype(output.dtype)
    return (probs - labels) / rows
  return -jax.random.normal(key, output.shape) / rows


def _transpose_gradients(linearized, primals, loss, outputs, fisher: str, key):
  """The gradient and the layers' cotangents, by transposing the loss's
  linearization (``primals``: the parameters and the perturbations).

  ``fisher`` other than ``'empirical'``: the cotangents come from a second
  transpose, of a loss on the last model output with sampled targets
  (:func:`sampled_cotangent`); the gradient is the loss's.
  """
  transpose = jax.linear_transpose(linearized, *primals)
  zero = jax.tree.map(jnp.zeros_like, outputs)
  grads, cotangents = transpose((jnp.ones_like(loss), zero))
  if fisher != 'empirical':
    if not outputs or not isinstance(outputs[-1], jax.Array) or (
        outputs[-1].ndim < 1):
      raise ValueError(
          'a sampled Fisher needs the model output: the last model call in '
          'the loss must return one array of predictions (logits or means).')
    sampled = zero[:-1] + (sampled_cotangent(fisher, outputs[-1], key),)
    _, cotangents = transpose((jnp.zeros_like(loss), sampled))
  return grads, cotangents


def _publish_skipped(trace: _Trace) -> None:
  """Records, by parameter path, which layers ran uncaptured and why."""
  full = lambda k, path: _base.join_path(trace.prefixes[k], path)
  for k, path in trace.layers:
    _layers.SKIPPED.pop(full(k, path), None)
  for (k, path), reason in trace.skipped.items():
    _layers.SKIPPED[full(k, path)] = reason


def _check_dropped(trace: _Trace, shapes) -> None:
  for (k, path), (_, module_name, *_) in trace.layers.items():
    if path not in _modules(shapes[k][INPUTS], 'a'):
      raise ValueError(
          f'layer {path!r} ({module_name}) ran inside a lifted transform '
          '(nn.scan, nn.vmap, nn.remat, nn.jit, ...) that dropped '
          "fisher_optax's capture collections. Add them to the transform's "
          "variable_axes, e.g. nn.scan(..., variable_axes={'params': 0, "
          '**fisher_optax.linen.capture_axes()}).')


def _assemble(trace: _Trace, params, captured, cotangents):
  """Groups the captured calls of every layer by parameter path."""
  outer = _base.flatten_with_paths(params)
  calls: dict[str, dict[str, Any]] = {}
  for k, applied in enumerate(captured):
    prefix = trace.prefixes[k]
    for path, node in _modules(applied[INPUTS], 'a').items():
      spec, module_name, config, inner, lifts = trace.layers[(k, path)]
      key = _base.join_path(prefix, path) if path else prefix
      lifts = _lifted_axes(key, module_name, jnp.ndim(node['marker'][0]),
                           lifts, inner, outer)
      entry = calls.setdefault(key, {
          'spec': spec, 'module': module_name, 'config': config,
          'lifts': lifts, 'a': [], 'g': [], 'extras': {}})
      entry['a'].extend(node['a'])
      grads = _get(cotangents[k], path)
      entry['g'].extend(grads[f'g{n}'] for n in range(len(node['a'])))
      extras = _get(applied[EXTRAS], path) if path in _modules(
          applied[EXTRAS], 'xhat') else {}
      for name, values in dict(extras).items():
        entry['extras'].setdefault(name, []).extend(values)
  stats = {}
  for key, e in calls.items():
    shapes = {n: _base.shape_of(outer[_base.join_path(key, n)])
              for n in e['spec'].params.values()
              if _base.join_path(key, n) in outer}
    stats[key] = _layers.build(key, e['spec'], e['module'], e['config'],
                               shapes, e['lifts'], e['a'], e['g'],
                               e['extras'])
  return stats


def _lifted_axes(key: str, module_name: str, ndim: int, lifts, inner,
                 outer) -> tuple[str, ...]:
  """The kind of each of a capture's ``ndim`` lifted leading axes.

  ``lifts`` are the kinds the lift hooks saw around the call, outermost
  first. Where they cannot account for the axes (a capture collection mapped
  by a transform the hooks do not know), the axes are the parameters' stack
  axes if the parameter shapes agree, and an error otherwise.
  """
  stack = {len(outer[_base.join_path(key, n)].shape) - len(shape)
           for n, shape in inner.items() if _base.join_path(key, n) in outer}
  if len(lifts) != ndim:
    lifts = (STACK,) * ndim
  want = lifts.count(STACK)
  if stack and stack != {want}:
    raise ValueError(
        f'layer {key!r} ({module_name}): its parameters have '
        f'{sorted(stack)} stack axes, but it ran under {want} lifted '
        f'transforms that map the parameters ({lifts}).')
  return tuple(lifts)
