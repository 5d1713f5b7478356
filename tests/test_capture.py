"""Tests of per-layer capture: fisher_optax.linen / fisher_optax.nnx.

Every captured quantity is checked against a reference computed without the
capture machinery: ``jax.value_and_grad`` of the same loss, a functional
re-implementation of the model with explicit output perturbations, or the
closed-form relation between a layer's parameter gradient and its input ``a``
and output cotangent ``g`` (``dW = sum a^T g`` for dense layers, the same via
``lax.conv_general_dilated_patches`` for convolutions, ``sum xhat * g`` for
the scale of a normalisation layer, a scatter-add for embeddings).
"""


from absl.testing import absltest
from absl.testing import parameterized
import chex
from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import fisher_optax as fo


def _key(i):
  return jax.random.key(i)


def _normal(i, shape):
  """Float32 standard normals from NumPy (no JAX dispatch in the tests)."""
  return np.random.default_rng(i).standard_normal(shape).astype(np.float32)


def _np(x):
  """A float64 NumPy copy, for references computed outside JAX."""
  return np.asarray(x, np.float64)


def _fill(path, leaf, seed):
  """A deterministic random value for one variable, chosen by its name.

  Kernels and embeddings ~ N(0, 1/fan_in), biases ~ 0.5 N(0, 1), scales in
  (0.5, 1.5); BatchNorm statistics start at mean 0, variance 1.
  """
  names = [getattr(k, 'key', getattr(k, 'name', None)) for k in path]
  names = [str(n) for n in names if n not in (None, 'value', 'raw_value')]
  name = names[-1]
  shape = tuple(leaf.shape)
  if name == 'mean':
    return np.zeros(shape, np.float32)
  if name == 'var':
    return np.ones(shape, np.float32)
  x = _normal(seed, shape)
  if name == 'scale':
    return (1.0 + 0.5 * np.tanh(x)).astype(np.float32)
  if len(shape) == 1:
    return 0.5 * x
  return (x / np.sqrt(np.prod(shape[:-1]))).astype(np.float32)


def _fill_tree(tree, seed=1):
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  values = [_fill(path, leaf, seed + 7 * i)
            for i, (path, leaf) in enumerate(leaves)]
  return jax.tree.unflatten(jax.tree.structure(tree), values)


def _init(model, x, seed=1):
  """Linen variables of ``model`` for input ``x``: shapes from eval_shape."""
  return _fill_tree(jax.eval_shape(model.init, _key(0), x), seed)


def _nnx_model(make, seed=1):
  """An NNX model built abstractly, then filled like ``_init``."""
  graphdef, state = nnx.split(nnx.eval_shape(make))
  state = jax.tree.map(jnp.asarray, _fill_tree(state, seed))
  return nnx.merge(graphdef, state)


def assert_close(actual, desired, rtol=1e-5, atol=1e-6, err_msg=''):
  """assert_allclose with ``atol`` relative to the magnitude of ``desired``."""
  actual = np.asarray(actual)
  desired = np.asarray(desired)
  scale = float(np.max(np.abs(desired))) if desired.size else 0.0
  np.testing.assert_allclose(actual, desired, rtol=rtol,
                             atol=atol * max(scale, 1e-30), err_msg=err_msg)


def assert_trees_close(actual, desired, rtol=1e-6, atol=1e-7):
  chex.assert_trees_all_equal_structs(actual, desired)
  paths = jax.tree_util.tree_flatten_with_path(desired)[0]
  for (path, d), a in zip(paths, jax.tree.leaves(actual)):
    assert_close(a, d, rtol=rtol, atol=atol,
                 err_msg=jax.tree_util.keystr(path))


def _dense_kernel_grad(a, g):
  """sum over calls and all batch axes of a^T g (float64 NumPy)."""
  a, g = _np(a), _np(g)
  return np.einsum('ni,no->io', a.reshape(-1, a.shape[-1]),
                   g.reshape(-1, g.shape[-1]))


def _sum_all_but_last(g):
  g = _np(g)
  return g.reshape(-1, g.shape[-1]).sum(0)


# ----------------------------------------------------------------------------
# Models.


class MLPCNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), strides=2)(x)
    x = nn.relu(x)
    x = nn.Conv(3, (2, 2), padding='VALID')(x)
    x = jnp.tanh(x).reshape(x.shape[0], -1)
    x = nn.Dense(6)(x)
    x = nn.LayerNorm()(x)
    return nn.Dense(3)(jnp.tanh(x))


class BNModel(nn.Module):

  @nn.compact
  def __call__(self, x, train=True):
    x = nn.Dense(5)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(2)(jnp.tanh(x))


class TwoDense(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(4)(x))
    return nn.Dense(2)(h)


class ScanBlock(nn.Module):

  @nn.compact
  def __call__(self, c, _):
    return jnp.tanh(nn.Dense(4)(c)), None


class ScanModel(nn.Module):
  capture: bool = True

  @nn.compact
  def __call__(self, x):
    axes = {'params': 0}
    if self.capture:
      axes.update(fo.linen.capture_axes())
    blocks = nn.scan(ScanBlock, variable_axes=axes,
                     split_rngs={'params': True}, length=3)
    x, _ = blocks()(x, None)
    return nn.Dense(2)(x)


class MyDense(nn.Module):
  """A user's dense layer with non-stock parameter names."""
  features: int

  @nn.compact
  def __call__(self, x):
    w = self.param('w', nn.initializers.normal(1.0),
                   (x.shape[-1], self.features))
    b = self.param('b', nn.initializers.normal(1.0), (self.features,))
    return x @ w + b


class UnregisteredDense(nn.Module):
  """Same computation, never registered."""
  features: int

  @nn.compact
  def __call__(self, x):
    w = self.param('w', nn.initializers.normal(1.0),
                   (x.shape[-1], self.features))
    b = self.param('b', nn.initializers.normal(1.0), (self.features,))
    return x @ w + b


fo.linen.register_layer(MyDense, 'dense',
                        params={'kernel': 'w', 'bias': 'b'})


class CustomModel(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = MyDense(4)(x)
    return UnregisteredDense(2)(jnp.tanh(x))


class NNXShared(nnx.Module):

  def __init__(self, rngs):
    self.l = nnx.Linear(3, 3, rngs=rngs)

  def __call__(self, x):
    y1 = self.l(x)
    y2 = self.l(jnp.tanh(y1))
    return y1, y2


class NNXBlock(nnx.Module):

  def __init__(self, rngs):
    self.l = nnx.Linear(4, 4, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.l(x))


class NNXScanModel(nnx.Module):

  def __init__(self, rngs):

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return NNXBlock(rngs)

    self.blocks = create(rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)

    return self.head(body(x, self.blocks))


class NNXNet(nnx.Module):

  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 4, (3, 3), strides=2, rngs=rngs)
    self.linear = nnx.Linear(36, 5, rngs=rngs)
    self.norm = nnx.LayerNorm(5, rngs=rngs)
    self.out = nnx.Linear(5, 2, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv(x)).reshape(x.shape[0], -1)
    return self.out(jnp.tanh(self.norm(self.linear(x))))


class NNXBN(nnx.Module):

  def __init__(self, rngs):
    self.linear = nnx.Linear(3, 4, rngs=rngs)
    self.bn = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
    self.out = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.bn(self.linear(x))))


class NNXNorm(nnx.Module):

  def __init__(self, kind, rngs):
    if kind == 'layernorm':
      self.norm = nnx.LayerNorm(6, rngs=rngs)
    else:
      self.norm = nnx.GroupNorm(6, num_groups=2, rngs=rngs)

  def __call__(self, x):
    return self.norm(x)


def _sin_loss(y, seed=100):
  """A loss with a non-trivial, input-dependent cotangent."""
  return jnp.sum(jnp.sin(y) * _normal(seed, y.shape))


def _sin_grad(y, seed=100):
  """dL/dy of ``_sin_loss`` in float64 NumPy."""
  return np.cos(_np(y)) * _np(_normal(seed, y.shape))


def _linen_step(loss_fn, has_aux=False):
  """Jitted (capture step, plain jax.value_and_grad) of the same loss."""
  step = fo.linen.value_grad_and_stats(loss_fn, has_aux=has_aux)
  plain = jax.value_and_grad(loss_fn, has_aux=has_aux)
  both = jax.jit(lambda *args: (step(*args), plain(*args)))
  return lambda *args: jax.device_get(both(*args))


def _nnx_step(loss_fn):
  """nnx.jit capture step and plain nnx.value_and_grad, for separate models."""
  step = nnx.jit(fo.nnx.value_grad_and_stats(loss_fn))
  plain = nnx.jit(nnx.value_and_grad(loss_fn))
  return (lambda *a: jax.device_get(step(*a)),
          lambda *a: jax.device_get(plain(*a)))


# ----------------------------------------------------------------------------
# Tests.


class LinenGradsTest(parameterized.TestCase):

  @parameterized.named_parameters(('plain', False), ('has_aux', True))
  def test_grads_equal_value_and_grad_mlp_cnn(self, has_aux):
    """Reference: jax.value_and_grad of the same loss (aux passed through)."""
    model = MLPCNN()
    x = _normal(0, (4, 8, 8, 3))
    params = _init(model, x)['params']

    def loss_fn(p, x):
      y = model.apply({'params': p}, x)
      if has_aux:
        return _sin_loss(y), {'logits': y, 'norm': jnp.sum(y ** 2)}
      return _sin_loss(y)

    (out, grads, stats), (ref_out, ref_grads) = _linen_step(
        loss_fn, has_aux)(params, x)
    assert_trees_close(out, ref_out)
    assert_trees_close(grads, ref_grads)
    self.assertEqual(set(stats), {'Conv_0', 'Conv_1', 'Dense_0', 'Dense_1',
                                  'LayerNorm_0'})
    self.assertEqual(stats['Conv_0'].meta.kind, 'conv')
    self.assertEqual(stats['Dense_0'].meta.kind, 'dense')
    self.assertEqual(stats['LayerNorm_0'].meta.kind, 'norm')
    assert_close(stats['Conv_0'].a[0], x)
    y = out[1]['logits'] if has_aux else model.apply({'params': params}, x)
    assert_close(stats['Dense_1'].g[0], _sin_grad(y))

  @parameterized.named_parameters(
      ('batch_stats', ['batch_stats']),
      ('all', True),
  )
  def test_batchnorm_mutable_aux(self, mutable):
    """Reference: jax.value_and_grad; aux is the plain call's batch_stats."""
    model = BNModel()
    x = _normal(0, (6, 3))
    variables = _init(model, x)
    params, batch_stats = variables['params'], variables['batch_stats']

    def loss_fn(p, bs, x):
      y, updates = model.apply({'params': p, 'batch_stats': bs}, x,
                               mutable=mutable)
      self.assertEqual(set(updates), {'batch_stats'} | (
          {'params'} if mutable is True else set()))
      return _sin_loss(y), updates['batch_stats']

    ((loss, new_bs), grads, stats), ((ref_loss, ref_bs), ref_grads) = (
        _linen_step(loss_fn, has_aux=True)(params, batch_stats, x))
    assert_close(loss, ref_loss)
    assert_trees_close(grads, ref_grads)
    assert_trees_close(new_bs, ref_bs)
    self.assertEqual(set(stats), {'Dense_0', 'BatchNorm_0', 'Dense_1'})
    # The running statistics moved once: momentum 0.9 from (0, 1).
    h = _np(x) @ _np(params['Dense_0']['kernel']) + _np(
        params['Dense_0']['bias'])
    assert_close(new_bs['BatchNorm_0']['mean'], 0.1 * h.mean(0),
                 atol=1e-5)
    assert_close(new_bs['BatchNorm_0']['var'], 0.9 + 0.1 * h.var(0),
                 atol=1e-5)


class DenseTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('matrix', (5, 3)),
      ('tokens', (2, 4, 3)),
  )
  def test_dense_kernel_and_bias(self, shape):
    """Reference: dW = sum_{calls,batch} a^T g, db = sum g, a = the input."""
    model = TwoDense()
    x = _normal(0, shape)
    params = _init(model, x)['params']

    def loss_fn(p, x):
      return _sin_loss(model.apply({'params': p}, x))

    (_, grads, stats), (_, ref_grads) = _linen_step(loss_fn)(params, x)
    assert_trees_close(grads, ref_grads)
    s = stats['Dense_0']
    self.assertEqual(s.a.shape, (1,) + shape)
    self.assertEqual(s.g.shape, (1,) + shape[:-1] + (4,))
    assert_close(s.a[0], x)
    p0, p1 = params['Dense_0'], params['Dense_1']
    h = np.tanh(_np(x) @ _np(p0['kernel']) + _np(p0['bias']))
    assert_close(stats['Dense_1'].a[0], h)
    y = h @ _np(p1['kernel']) + _np(p1['bias'])
    assert_close(stats['Dense_1'].g[0], _sin_grad(y))
    for name in ('Dense_0', 'Dense_1'):
      s = stats[name]
      self.assertEqual(s.meta.kind, 'dense')
      self.assertEqual(s.meta.stack_ndim, 0)
      assert_close(grads[name]['kernel'], _dense_kernel_grad(s.a, s.g))
      assert_close(grads[name]['bias'], _sum_all_but_last(s.g))

  def test_dense_general_two_axes(self):
    """Reference: dW = tensordot(a, g) over calls and batch; db = sum g."""
    model = nn.DenseGeneral(features=5, axis=(-2, -1))
    x = _normal(0, (4, 3, 2))
    params = _init(model, x)['params']
    self.assertEqual(params['kernel'].shape, (3, 2, 5))

    def loss_fn(p, x):
      return _sin_loss(model.apply({'params': p}, x))

    (_, grads, stats), (_, ref_grads) = _linen_step(loss_fn)(params, x)
    assert_trees_close(grads, ref_grads)
    s = stats['']
    self.assertEqual(s.a.shape, (1, 4, 3, 2))
    self.assertEqual(s.g.shape, (1, 4, 5))
    self.assertEqual(s.meta.cfg('in_axes'), (1, 2))
    assert_close(s.a[0], x)
    y = np.einsum('bij,ijo->bo', _np(x), _np(params['kernel'])) + _np(
        params['bias'])
    assert_close(s.g[0], _sin_grad(y))
    ref = np.tensordot(_np(s.a), _np(s.g), axes=([0, 1], [0, 1]))
    assert_close(grads['kernel'], ref)
    assert_close(grads['bias'], _np(s.g).sum((0, 1)))


def _patches(a, window, strides, padding, dilation, pre_pad=None):
  """im2col of inputs ``a`` (C, N, *sp, Cin) -> (C*N, *out, Cin*prod(win))."""
  nsp = len(window)
  a = a.reshape((-1,) + a.shape[2:])
  if pre_pad is not None:
    mode, pads = pre_pad
    a = jnp.pad(a, ((0, 0),) + tuple(pads) + ((0, 0),), mode=mode)
  spec = {1: ('NWC', 'WIO', 'NWC'), 2: ('NHWC', 'HWIO', 'NHWC')}[nsp]
  return jax.lax.conv_general_dilated_patches(
      a, tuple(window), tuple(strides), padding,
      rhs_dilation=tuple(dilation), dimension_numbers=spec,
      precision=jax.lax.Precision.HIGHEST)


def _conv_kernel_grad(patches, g, kernel_shape, groups):
  """Kernel gradient from im2col patches (feature order (Cin, *window)).

  Contracts the patches with ``g`` over calls, batch and output positions;
  with groups, output channel ``o`` sees only the input channels of its
  group ``o // (Cout / groups)``. Float64 NumPy.
  """
  nsp = len(kernel_shape) - 2
  window = tuple(kernel_shape[:nsp])
  patches = _np(patches)
  g = _np(g).reshape((-1,) + g.shape[2:])
  assert patches.shape[:-1] == g.shape[:-1], (patches.shape, g.shape)
  cout = g.shape[-1]
  cin = patches.shape[-1] // int(np.prod(window))
  patches = patches.reshape(patches.shape[:-1] + (groups, cin // groups)
                            + window)
  g = g.reshape(g.shape[:-1] + (groups, cout // groups))
  if nsp == 1:
    k = np.einsum('nwgci,nwgo->icgo', patches, g)
  else:
    k = np.einsum('nxygcij,nxygo->ijcgo', patches, g)
  return k.reshape(tuple(kernel_shape))


_CONV_CASES = (
    # name, input shape, Conv kwargs, expected geometry.
    ('stride2_same', (2, 7, 8, 4),
     dict(features=6, kernel_size=(3, 3), strides=2, padding='SAME'),
     dict(strides=(2, 2), dilation=(1, 1), groups=1, padding='SAME',
          pre_pad=None)),
    ('dilation2', (2, 7, 8, 4),
     dict(features=6, kernel_size=(3, 3), kernel_dilation=2, padding='SAME'),
     dict(strides=(1, 1), dilation=(2, 2), groups=1, padding='SAME',
          pre_pad=None)),
    ('valid', (2, 7, 8, 4),
     dict(features=6, kernel_size=(3, 2), padding='VALID'),
     dict(strides=(1, 1), dilation=(1, 1), groups=1, padding='VALID',
          pre_pad=None)),
    ('explicit', (2, 7, 8, 4),
     dict(features=6, kernel_size=(3, 3), strides=(2, 1),
          padding=((1, 2), (0, 1))),
     dict(strides=(2, 1), dilation=(1, 1), groups=1,
          padding=((1, 2), (0, 1)), pre_pad=None)),
    ('circular', (2, 7, 8, 4),
     dict(features=6, kernel_size=(4, 3), padding='CIRCULAR'),
     dict(strides=(1, 1), dilation=(1, 1), groups=1, padding='VALID',
          pre_pad=('wrap', ((1, 2), (1, 1))))),
    ('groups', (2, 7, 8, 4),
     dict(features=6, kernel_size=(3, 3), feature_group_count=2,
          padding='SAME'),
     dict(strides=(1, 1), dilation=(1, 1), groups=2, padding='SAME',
          pre_pad=None)),
    ('causal_1d', (3, 9, 4),
     dict(features=5, kernel_size=(3,), kernel_dilation=2, padding='CAUSAL'),
     dict(strides=(1,), dilation=(2,), groups=1, padding='VALID',
          pre_pad=('constant', ((4, 0),)))),
)


class ConvTest(parameterized.TestCase):

  @parameterized.named_parameters(*_CONV_CASES)
  def test_conv_kernel_grad_from_patches(self, shape, kwargs, geo):
    """Reference: im2col (conv_general_dilated_patches) contracted with g."""

    class Net(nn.Module):

      @nn.compact
      def __call__(self, x):
        return nn.Conv(**kwargs)(x)

    model = Net()
    x = _normal(0, shape)
    params = _init(model, x)['params']
    window = tuple(kwargs['kernel_size'])

    def loss_fn(p, x):
      return _sin_loss(model.apply({'params': p}, x))

    @jax.jit
    def run(params, x):
      _, grads, stats = fo.linen.value_grad_and_stats(loss_fn)(params, x)
      s, meta = stats['Conv_0'], stats['Conv_0'].meta
      # Patches from the geometry written out above, and from the meta.
      ref = _patches(s.a, window, geo['strides'], geo['padding'],
                     geo['dilation'], geo['pre_pad'])
      from_meta = _patches(s.a, meta.cfg('kernel_size'), meta.cfg('strides'),
                           meta.cfg('padding'), meta.cfg('rhs_dilation'),
                           meta.cfg('pre_pad'))
      y = model.apply({'params': params}, x)
      return grads, stats, ref, from_meta, y

    grads, stats, ref, from_meta, y = jax.device_get(run(params, x))
    s = stats['Conv_0']
    kernel = grads['Conv_0']['kernel']
    meta = s.meta
    self.assertEqual(meta.kind, 'conv')
    self.assertEqual(s.a.shape, (1,) + shape)
    assert_close(s.a[0], x)
    self.assertEqual(s.g.shape, (1,) + y.shape)
    assert_close(s.g[0], _sin_grad(y))

    # Geometry read off the module.
    self.assertEqual(meta.cfg('kernel_size'), window)
    self.assertEqual(meta.cfg('strides'), geo['strides'])
    self.assertEqual(meta.cfg('rhs_dilation'), geo['dilation'])
    self.assertEqual(meta.cfg('lhs_dilation'), (1,) * len(window))
    self.assertEqual(meta.cfg('groups'), geo['groups'])
    self.assertEqual(meta.cfg('padding'), geo['padding'])
    self.assertEqual(meta.cfg('pre_pad'), geo['pre_pad'])
    self.assertEqual(meta.param_shape('kernel'), kernel.shape)

    assert_close(kernel, _conv_kernel_grad(ref, s.g, kernel.shape,
                                           geo['groups']))
    assert_close(grads['Conv_0']['bias'], _sum_all_but_last(s.g))
    # The captured geometry is enough to rebuild the same gradient.
    assert_close(kernel, _conv_kernel_grad(from_meta, s.g, kernel.shape,
                                           meta.cfg('groups')))


def _shared_reference(kernel, bias, x, t1, t2):
  """dL/dy1, dL/dy2 of the shared-layer model, via explicit perturbations."""

  def loss(eps1, eps2):
    y1 = x @ kernel + bias + eps1
    y2 = jnp.tanh(y1) @ kernel + bias + eps2
    return jnp.sum(jnp.sin(y1) * t1) + jnp.sum(jnp.sin(y2) * t2)

  zeros = jnp.zeros(x.shape[:-1] + (kernel.shape[1],))
  return jax.grad(loss, argnums=(0, 1))(zeros, zeros)


class SharedModuleTest(parameterized.TestCase):

  def test_linen_shared_dense_per_call_g(self):
    """Reference: functional model with one perturbation per call + grad."""

    class Shared(nn.Module):

      @nn.compact
      def __call__(self, x):
        d = nn.Dense(3)
        y1 = d(x)
        return y1, d(jnp.tanh(y1))

    model = Shared()
    x = _normal(0, (5, 3))
    params = _init(model, x)['params']
    t1, t2 = _normal(2, (5, 3)), _normal(3, (5, 3))

    def loss_fn(p, x):
      y1, y2 = model.apply({'params': p}, x)
      return jnp.sum(jnp.sin(y1) * t1) + jnp.sum(jnp.sin(y2) * t2)

    (_, grads, stats), (_, ref_grads) = _linen_step(loss_fn)(params, x)
    assert_trees_close(grads, ref_grads)
    self.assertEqual(set(stats), {'Dense_0'})
    s = stats['Dense_0']
    self.assertEqual(s.a.shape, (2, 5, 3))
    self.assertEqual(s.g.shape, (2, 5, 3))
    w, b = params['Dense_0']['kernel'], params['Dense_0']['bias']
    g1, g2 = jax.device_get(jax.jit(_shared_reference)(w, b, x, t1, t2))
    assert_close(s.a[0], x)
    assert_close(s.a[1], np.tanh(_np(x) @ _np(w) + _np(b)))
    assert_close(s.g[0], g1)
    assert_close(s.g[1], g2)
    assert_close(grads['Dense_0']['kernel'], _dense_kernel_grad(s.a, s.g))
    assert_close(grads['Dense_0']['bias'], _sum_all_but_last(s.g))

  def test_nnx_shared_linear_per_call_g(self):
    """Reference: functional model with one perturbation per call + grad."""
    model = _nnx_model(lambda: NNXShared(nnx.Rngs(0)))
    x = _normal(0, (5, 3))
    t1, t2 = _normal(2, (5, 3)), _normal(3, (5, 3))

    def loss_fn(m, x):
      y1, y2 = m(x)
      return jnp.sum(jnp.sin(y1) * t1) + jnp.sum(jnp.sin(y2) * t2)

    step, plain = _nnx_step(loss_fn)
    _, grads, stats = step(model, x)
    _, ref_grads = plain(model, x)
    assert_trees_close(nnx.to_pure_dict(grads), nnx.to_pure_dict(ref_grads))
    self.assertEqual(set(stats), {'l'})
    s = stats['l']
    self.assertEqual(s.a.shape, (2, 5, 3))
    self.assertEqual(s.g.shape, (2, 5, 3))
    w, b = _np(model.l.kernel), _np(model.l.bias)
    g1, g2 = jax.device_get(jax.jit(_shared_reference)(w, b, x, t1, t2))
    assert_close(s.a[0], x)
    assert_close(s.a[1], np.tanh(_np(x) @ _np(w) + _np(b)))
    assert_close(s.g[0], g1)
    assert_close(s.g[1], g2)
    assert_close(grads['l']['kernel'][...], _dense_kernel_grad(s.a, s.g))
    assert_close(grads['l']['bias'][...], _sum_all_but_last(s.g))


class ScanTest(parameterized.TestCase):

  def test_linen_scan_stacked_stats(self):
    """Reference: dW_l = einsum('lcbi,lcbo->lio', a, g) per scanned layer."""
    model = ScanModel()
    x = _normal(0, (2, 4))
    params = _init(model, x)['params']
    scan_name = next(k for k in params if k != 'Dense_0')
    path = scan_name + '/Dense_0'
    self.assertEqual(params[scan_name]['Dense_0']['kernel'].shape, (3, 4, 4))

    def loss_fn(p, x):
      return _sin_loss(model.apply({'params': p}, x))

    (_, grads, stats), (_, ref_grads) = _linen_step(loss_fn)(params, x)
    assert_trees_close(grads, ref_grads)
    self.assertEqual(set(stats), {path, 'Dense_0'})
    s = stats[path]
    self.assertEqual(s.meta.stack_ndim, 1)
    self.assertEqual(s.a.shape, (3, 1, 2, 4))
    self.assertEqual(s.g.shape, (3, 1, 2, 4))
    self.assertEqual(s.meta.param_shape('kernel'), (3, 4, 4))
    g = grads[scan_name]['Dense_0']
    assert_close(g['kernel'], np.einsum('lcbi,lcbo->lio', _np(s.a),
                                        _np(s.g)))
    assert_close(g['bias'], np.einsum('lcbo->lo', _np(s.g)))
    # Layer inputs: x, then tanh of each previous layer's output.
    p = params[scan_name]['Dense_0']
    h = _np(x)
    for layer in range(3):
      assert_close(s.a[layer, 0], h)
      h = np.tanh(h @ _np(p['kernel'][layer]) + _np(p['bias'][layer]))
    self.assertEqual(stats['Dense_0'].meta.stack_ndim, 0)
    assert_close(stats['Dense_0'].a[0], h)

  def test_linen_scan_without_capture_axes_equals_with(self):
    """Reference: the same model with capture_axes() in its variable_axes."""
    x = _normal(0, (2, 4))
    got = {}
    for capture in (True, False):
      model = ScanModel(capture=capture)
      params = _init(model, x)['params']

      def loss_fn(p, x, model=model):
        return _sin_loss(model.apply({'params': p}, x))

      got[capture] = jax.jit(fo.linen.value_grad_and_stats(loss_fn))(
          params, x)[2]
    self.assertEqual(set(got[True]), set(got[False]))
    for path, st in got[True].items():
      self.assertEqual(got[False][path].meta, st.meta)
      assert_close(got[False][path].a, st.a)
      assert_close(got[False][path].g, st.g)

  def test_nnx_vmap_scan_stacked_stats(self):
    """Reference: nnx.value_and_grad; dW_l = einsum('lcbi,lcbo->lio')."""
    model = _nnx_model(lambda: NNXScanModel(nnx.Rngs(0)))
    x = _normal(0, (2, 4))

    def loss_fn(m, x):
      return _sin_loss(m(x))

    step, plain = _nnx_step(loss_fn)
    loss, grads, stats = step(model, x)
    ref_loss, ref_grads = plain(model, x)
    assert_close(loss, ref_loss)
    assert_trees_close(nnx.to_pure_dict(grads), nnx.to_pure_dict(ref_grads))
    self.assertEqual(set(stats), {'blocks/l', 'head'})
    s = stats['blocks/l']
    self.assertEqual(s.meta.stack_ndim, 1)
    self.assertEqual(s.a.shape, (3, 1, 2, 4))
    self.assertEqual(s.g.shape, (3, 1, 2, 4))
    self.assertEqual(s.meta.param_shape('kernel'), (3, 4, 4))
    g = grads['blocks']['l']
    assert_close(g['kernel'][...], np.einsum('lcbi,lcbo->lio', _np(s.a),
                                             _np(s.g)))
    assert_close(g['bias'][...], np.einsum('lcbo->lo', _np(s.g)))
    kernel, bias = _np(model.blocks.l.kernel), _np(model.blocks.l.bias)
    h = _np(x)
    for layer in range(3):
      assert_close(s.a[layer, 0], h)
      h = np.tanh(h @ _np(kernel[layer]) + _np(bias[layer]))
    assert_close(stats['head'].a[0], h)


def _layer_norm_xhat(x, eps=1e-6):
  x = _np(x)
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps)


def _rms_norm_xhat(x, eps=1e-6):
  x = _np(x)
  return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps)


def _batch_norm_xhat(x, eps=1e-5):
  x = _np(x)
  mean = x.mean(0, keepdims=True)
  var = ((x - mean) ** 2).mean(0, keepdims=True)
  return (x - mean) / np.sqrt(var + eps)


def _group_norm_xhat(x, groups=2, eps=1e-6):
  x = _np(x)
  shape = x.shape
  xg = x.reshape(shape[0], -1, groups, shape[-1] // groups)
  mean = xg.mean((1, 3), keepdims=True)
  var = ((xg - mean) ** 2).mean((1, 3), keepdims=True)
  return ((xg - mean) / np.sqrt(var + eps)).reshape(shape)


class NormTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('layernorm', lambda: nn.LayerNorm(), (2, 3, 6), _layer_norm_xhat),
      ('rmsnorm', lambda: nn.RMSNorm(), (4, 6), _rms_norm_xhat),
      ('batchnorm', lambda: nn.BatchNorm(use_running_average=False),
       (8, 6), _batch_norm_xhat),
      ('groupnorm', lambda: nn.GroupNorm(num_groups=2), (2, 3, 3, 6),
       _group_norm_xhat),
  )
  def test_linen_norm(self, make, shape, xhat_fn):
    """Reference: d scale = sum xhat*g, d bias = sum g; xhat from formula."""
    model = make()
    x = 1.0 + 2.0 * _normal(0, shape)
    variables = _init(model, x)
    params = variables['params']
    rest = {k: v for k, v in variables.items() if k != 'params'}
    mutable = list(rest) or False

    def loss_fn(p, x):
      out = model.apply({'params': p, **rest}, x, mutable=mutable)
      return _sin_loss(out[0] if mutable else out)

    (_, grads, stats), (_, ref_grads) = _linen_step(loss_fn)(params, x)
    assert_trees_close(grads, ref_grads)
    self.assertEqual(set(stats), {''})
    s = stats['']
    self.assertEqual(s.meta.kind, 'norm')
    self.assertEqual(s.meta.cfg('feature_axes'), (len(shape) - 1,))
    self.assertEqual(s.a.shape, (1,) + shape)
    assert_close(s.a[0], x)
    xhat = s.extras['xhat']
    self.assertEqual(xhat.shape, (1,) + shape)
    assert_close(xhat[0], xhat_fn(x), atol=1e-5)
    y = xhat_fn(x) * _np(params['scale'])
    if 'bias' in params:
      y = y + _np(params['bias'])
    assert_close(s.g[0], _sin_grad(y), atol=1e-5)
    assert_close(grads['scale'], _sum_all_but_last(_np(xhat) * _np(s.g)))
    if 'bias' in params:
      assert_close(grads['bias'], _sum_all_but_last(s.g))

  @parameterized.named_parameters(
      ('layernorm', 'layernorm', _layer_norm_xhat),
      ('groupnorm', 'groupnorm', _group_norm_xhat),
  )
  def test_nnx_norm(self, kind, xhat_fn):
    """Reference: d scale = sum xhat*g, d bias = sum g; xhat from formula."""
    model = _nnx_model(lambda: NNXNorm(kind, nnx.Rngs(0)))
    x = 1.0 + 2.0 * _normal(0, (2, 3, 3, 6))

    def loss_fn(m, x):
      return _sin_loss(m(x))

    step, plain = _nnx_step(loss_fn)
    _, grads, stats = step(model, x)
    _, ref_grads = plain(model, x)
    assert_trees_close(nnx.to_pure_dict(grads), nnx.to_pure_dict(ref_grads))
    self.assertEqual(set(stats), {'norm'})
    s = stats['norm']
    self.assertEqual(s.meta.kind, 'norm')
    assert_close(s.a[0], x)
    xhat = s.extras['xhat']
    assert_close(xhat[0], xhat_fn(x), atol=1e-5)
    assert_close(grads['norm']['scale'][...],
                 _sum_all_but_last(_np(xhat) * _np(s.g)))
    assert_close(grads['norm']['bias'][...], _sum_all_but_last(s.g))


class EmbedTest(absltest.TestCase):

  def test_embed_scatter_add(self):
    """Reference: d embedding = zeros.at[ids].add(g rows), in NumPy."""

    class Net(nn.Module):

      @nn.compact
      def __call__(self, ids):
        return nn.Dense(3)(nn.Embed(10, 4)(ids))

    model = Net()
    ids = jnp.array([[1, 3, 3, 7, 0], [7, 7, 2, 9, 1], [4, 3, 1, 1, 8]],
                    jnp.int32)
    params = _init(model, ids)['params']

    def loss_fn(p, ids):
      return _sin_loss(model.apply({'params': p}, ids))

    (_, grads, stats), (_, ref_grads) = _linen_step(loss_fn)(params, ids)
    assert_trees_close(grads, ref_grads)
    s = stats['Embed_0']
    self.assertEqual(s.meta.kind, 'embed')
    self.assertEqual(s.meta.cfg('num_embeddings'), 10)
    self.assertEqual(s.a.shape, (1, 3, 5))
    self.assertTrue(jnp.issubdtype(s.a.dtype, jnp.integer))
    np.testing.assert_array_equal(s.a[0], ids)
    self.assertEqual(s.g.shape, (1, 3, 5, 4))
    ref = np.zeros((10, 4))
    np.add.at(ref, np.asarray(ids).reshape(-1), _np(s.g).reshape(-1, 4))
    assert_close(grads['Embed_0']['embedding'], ref)
    # Rows whose ids never occur get no gradient.
    for row in (5, 6):
      np.testing.assert_array_equal(grads['Embed_0']['embedding'][row], 0.0)


class CustomLayerTest(absltest.TestCase):

  def test_registered_captured_unregistered_not(self):
    """Reference: jax.grad; dW = sum a^T g, db = sum g for the custom layer."""
    model = CustomModel()
    x = _normal(0, (5, 3))
    params = _init(model, x)['params']

    def loss_fn(p, x):
      return _sin_loss(model.apply({'params': p}, x))

    (_, grads, stats), (_, ref_grads) = _linen_step(loss_fn)(params, x)
    assert_trees_close(grads, ref_grads)
    self.assertEqual(set(stats), {'MyDense_0'})
    s = stats['MyDense_0']
    self.assertEqual(s.meta.kind, 'dense')
    self.assertEqual(s.meta.module, 'MyDense')
    self.assertEqual(dict(s.meta.params), {'kernel': 'w', 'bias': 'b'})
    self.assertEqual(s.meta.param_shape('w'), (3, 4))
    assert_close(s.a[0], x)
    assert_close(grads['MyDense_0']['w'], _dense_kernel_grad(s.a, s.g))
    assert_close(grads['MyDense_0']['b'], _sum_all_but_last(s.g))


class StdConv(nn.Conv):
  """Weight standardisation as big_vision writes it: ``param`` overridden."""

  def param(self, name, *args, **kwargs):
    value = super().param(name, *args, **kwargs)
    if name == 'kernel':
      value = (value - value.mean((0, 1, 2))) / (value.std((0, 1, 2)) + 1e-5)
    return value


class ScaledDense(nn.Dense):
  """A subclass whose ``__call__`` changes the layer's function."""

  def __call__(self, x):
    return 2.0 * super().__call__(x)


class PlainSubclass(nn.Dense):
  """A subclass that changes nothing: still captured."""


class SubclassNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(StdConv(4, (3, 3))(x)).mean((1, 2))
    x = nn.relu(ScaledDense(5)(x))
    x = nn.remat(nn.Dense)(5)(x)
    return PlainSubclass(3)(x)


class NNXScaledLinear(nnx.Linear):

  def __call__(self, x):
    return 2.0 * super().__call__(x)


class SubclassTest(absltest.TestCase):

  def test_linen_overriding_subclasses_get_the_fallback(self):
    """Reference: which layers run stock code; coverage names the reason."""
    model = SubclassNet()
    x = _normal(0, (2, 6, 6, 3))
    params = _init(model, x)['params']

    def loss_fn(p, x):
      return _sin_loss(model.apply({'params': p}, x))

    (_, grads, stats), (_, ref_grads) = _linen_step(loss_fn)(params, x)
    assert_trees_close(grads, ref_grads)
    self.assertEqual(set(stats), {'CheckpointDense_0', 'PlainSubclass_0'})
    table = str(fo.coverage(params, stats))
    self.assertIn('StdConv subclasses Conv but StdConv overrides param',
                  table)
    self.assertIn('ScaledDense subclasses Dense but ScaledDense overrides '
                  '__call__', table)

  def test_linen_registered_subclass_is_captured(self):
    """Reference: dW = sum a^T g of the registered subclass's own call."""
    fo.linen.register_layer(ScaledDense, 'dense')
    try:
      model = ScaledDense(3)
      x = _normal(1, (4, 2))
      params = _init(model, x)['params']
      loss_fn = lambda p, x: _sin_loss(model.apply({'params': p}, x))
      (_, grads, stats), _ = _linen_step(loss_fn)(params, x)
    finally:
      del fo.capture._layers._REGISTRY['linen'][ScaledDense]  # pylint: disable=protected-access
    self.assertEqual(set(stats), {''})
    # y = 2 (x W + b): the registered layer's a, g give half its gradient.
    assert_close(grads['kernel'], 2 * _dense_kernel_grad(stats[''].a,
                                                         stats[''].g))

  def test_nnx_overriding_subclass_gets_the_fallback(self):
    class Net(nnx.Module):

      def __init__(self, rngs):
        self.a = NNXScaledLinear(3, 4, rngs=rngs)
        self.b = nnx.Linear(4, 2, rngs=rngs)

      def __call__(self, x):
        return self.b(jnp.tanh(self.a(x)))

    model = _nnx_model(lambda: Net(nnx.Rngs(0)))
    x = _normal(2, (5, 3))
    step, plain = _nnx_step(lambda m, x: _sin_loss(m(x)))
    _, grads, stats = step(model, x)
    _, ref_grads = plain(model, x)
    assert_trees_close(nnx.to_pure_dict(grads), nnx.to_pure_dict(ref_grads))
    self.assertEqual(set(stats), {'b'})
    self.assertIn('NNXScaledLinear subclasses Linear but NNXScaledLinear '
                  'overrides __call__',
                  str(fo.coverage(nnx.state(model, nnx.Param), stats)))


class MultiApplyTest(absltest.TestCase):

  def test_siamese_two_calls(self):
    """Reference: jax.grad; closed-form g of the last layer per call."""
    model = TwoDense()
    x1, x2 = _normal(0, (5, 3)), _normal(1, (5, 3))
    params = _init(model, x1, seed=2)['params']

    def loss_fn(p, x1, x2):
      y1 = model.apply({'params': p}, x1)
      y2 = model.apply({'params': p}, x2)
      return _sin_loss(y1 - 0.5 * y2)

    (_, grads, stats), (_, ref_grads) = _linen_step(loss_fn)(
        params, x1, x2)
    assert_trees_close(grads, ref_grads)
    self.assertEqual(set(stats), {'Dense_0', 'Dense_1'})
    for name in ('Dense_0', 'Dense_1'):
      s = stats[name]
      self.assertEqual(s.a.shape[0], 2)
      self.assertEqual(s.g.shape[0], 2)
      assert_close(grads[name]['kernel'], _dense_kernel_grad(s.a, s.g))
      assert_close(grads[name]['bias'], _sum_all_but_last(s.g))
    assert_close(stats['Dense_0'].a[0], x1)
    assert_close(stats['Dense_0'].a[1], x2)
    p0, p1 = params['Dense_0'], params['Dense_1']
    f = lambda x: np.tanh(_np(x) @ _np(p0['kernel']) + _np(p0['bias'])) @ (
        _np(p1['kernel'])) + _np(p1['bias'])
    dy = _sin_grad(f(x1) - 0.5 * f(x2))
    assert_close(stats['Dense_1'].g[0], dy)
    assert_close(stats['Dense_1'].g[1], -0.5 * dy)

  def test_params_subtree_prefix(self):
    """Reference: jax.grad; keys carry the sub-tree's prefix."""
    model = TwoDense()
    x = _normal(0, (5, 3))
    params = {'model': _init(model, x, seed=2)['params'],
              'w': jnp.array([1.5, -0.5])}

    def loss_fn(p, x):
      y = model.apply({'params': p['model']}, x)
      return _sin_loss(y * p['w'])

    (_, grads, stats), (_, ref_grads) = _linen_step(loss_fn)(params, x)
    assert_trees_close(grads, ref_grads)
    self.assertEqual(set(stats), {'model/Dense_0', 'model/Dense_1'})
    assert_close(stats['model/Dense_0'].a[0], x)
    for name in ('Dense_0', 'Dense_1'):
      s = stats['model/' + name]
      self.assertEqual(s.meta.param_shape('kernel'),
                       params['model'][name]['kernel'].shape)
      assert_close(grads['model'][name]['kernel'],
                   _dense_kernel_grad(s.a, s.g))


class NNXTest(absltest.TestCase):

  def test_grads_equal_nnx_value_and_grad(self):
    """Reference: nnx.value_and_grad of the same loss on the same model."""
    model = _nnx_model(lambda: NNXNet(nnx.Rngs(0)))
    x = _normal(0, (4, 6, 6, 3))

    def loss_fn(m, x):
      return _sin_loss(m(x))

    step, plain = _nnx_step(loss_fn)
    loss, grads, stats = step(model, x)
    ref_loss, ref_grads = plain(model, x)
    assert_close(loss, ref_loss)
    assert_trees_close(nnx.to_pure_dict(grads), nnx.to_pure_dict(ref_grads))
    self.assertEqual(set(stats), {'conv', 'linear', 'norm', 'out'})
    self.assertEqual(stats['conv'].meta.kind, 'conv')
    self.assertEqual(stats['norm'].meta.kind, 'norm')
    for name in ('linear', 'out'):
      s = stats[name]
      self.assertEqual(s.meta.kind, 'dense')
      assert_close(grads[name]['kernel'][...], _dense_kernel_grad(s.a, s.g))
    s = stats['conv']
    assert_close(s.a[0], x)
    patches = jax.device_get(jax.jit(_patches, static_argnums=(1, 2, 3, 4))(
        s.a, (3, 3), (2, 2), 'SAME', (1, 1)))
    assert_close(grads['conv']['kernel'][...],
                 _conv_kernel_grad(patches, s.g, (3, 3, 3, 4), 1))

  def test_batchnorm_running_stats_updated_once(self):
    """Reference: an identical copy stepped by plain nnx.value_and_grad."""
    model = _nnx_model(lambda: NNXBN(nnx.Rngs(0)))
    copy = nnx.clone(model)
    x = _normal(0, (8, 3))

    def loss_fn(m, x):
      return _sin_loss(m(x))

    step, plain = _nnx_step(loss_fn)
    loss, grads, stats = step(model, x)
    ref_loss, ref_grads = plain(copy, x)
    assert_close(loss, ref_loss)
    assert_trees_close(nnx.to_pure_dict(grads), nnx.to_pure_dict(ref_grads))
    assert_close(_np(model.bn.mean), _np(copy.bn.mean))
    assert_close(_np(model.bn.var), _np(copy.bn.var))
    # One update with momentum 0.9 from (mean 0, var 1).
    h = _np(x) @ _np(copy.linear.kernel) + _np(copy.linear.bias)
    assert_close(_np(model.bn.mean), 0.1 * h.mean(0), atol=1e-5)
    assert_close(_np(model.bn.var), 0.9 + 0.1 * h.var(0), atol=1e-5)
    s = stats['bn']
    assert_close(s.extras['xhat'][0], _batch_norm_xhat(h), atol=1e-5)
    assert_close(grads['bn']['scale'][...],
                 _sum_all_but_last(_np(s.extras['xhat']) * _np(s.g)))

  def test_has_aux_and_dropout_rng_advanced_once(self):
    """Reference: an identical copy stepped by plain nnx.value_and_grad."""

    class Net(nnx.Module):

      def __init__(self, rngs):
        self.linear = nnx.Linear(3, 4, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

      def __call__(self, x):
        return self.drop(self.linear(x))

    model = Net(nnx.Rngs(0, dropout=1))
    copy = nnx.clone(model)
    x = _normal(0, (6, 3))

    def loss_fn(m, x):
      y = m(x)
      return _sin_loss(y), y

    step = nnx.jit(fo.nnx.value_grad_and_stats(loss_fn, has_aux=True))
    plain = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))
    (loss, y), grads, stats = jax.device_get(step(model, x))
    (ref_loss, ref_y), ref_grads = jax.device_get(plain(copy, x))
    assert_close(loss, ref_loss)
    # Same dropout mask, and the RNG stream advanced once in both.
    np.testing.assert_array_equal(y, ref_y)
    self.assertEqual(int(model.drop.rngs.count[...]),
                     int(copy.drop.rngs.count[...]))
    assert_trees_close(nnx.to_pure_dict(grads), nnx.to_pure_dict(ref_grads))
    s = stats['linear']
    assert_close(s.a[0], x)
    assert_close(grads['linear']['kernel'][...], _dense_kernel_grad(s.a, s.g))


class RetraceTest(absltest.TestCase):

  def test_linen_traces(self):
    """Reference: a Python counter of loss_fn traces."""
    model = TwoDense()
    x = _normal(0, (5, 3))
    params = _init(model, x)['params']
    count = [0]

    def loss_fn(p, x):
      count[0] += 1
      return _sin_loss(model.apply({'params': p}, x))

    step = jax.jit(fo.linen.value_grad_and_stats(loss_fn))
    jax.block_until_ready(step(params, x))
    self.assertEqual(count[0], 2)
    jax.block_until_ready(step(params, x + 1.0))
    self.assertEqual(count[0], 2)

  def test_nnx_traces(self):
    """Reference: a Python counter of loss_fn traces."""
    model = _nnx_model(lambda: NNXShared(nnx.Rngs(0)))
    x = _normal(0, (5, 3))
    count = [0]

    def loss_fn(m, x):
      count[0] += 1
      y1, y2 = m(x)
      return _sin_loss(y1 + y2)

    step = nnx.jit(fo.nnx.value_grad_and_stats(loss_fn))
    jax.block_until_ready(step(model, x))
    self.assertEqual(count[0], 2)
    jax.block_until_ready(step(model, x + 1.0))
    self.assertEqual(count[0], 2)


if __name__ == '__main__':
  absltest.main()
