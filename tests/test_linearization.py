"""The one-keyword adaptive step: the capture step's linearization.

* ``ShortFormTest``: ``tx.update(grads, state, params, layer_stats=stats)``
  equals the five-keyword form (``value=``, ``value_fn=``, ``outputs_fn=``,
  ``outputs_loss=`` written by hand) over 5 steps, for K-FAC, EKFAC and MBF
  without arguments, on a BatchNorm ResNet with dropout (``mutable=``,
  ``has_aux``, ``rngs``), an ``nn.scan`` Transformer with dropout, an NNX
  model under ``nnx.Optimizer`` and a sampled (``fisher='softmax'``)
  capture, whose quadratic model stays the user's loss.
* ``PiecesTest``: ``fo.linearization``'s pieces against ``jax.jvp`` of the
  model, the loss and a dense Gauss-Newton matrix with an L2 penalty.
* ``ErrorTest``: a loss whose model outputs cannot be found, statistics
  that crossed a ``jax.jit`` boundary.
"""

import functools

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import flax.linen as nn
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax

import fisher_optax as fo
from fisher_optax import _curvature_products

from _tolerance import assert_close
from _tolerance import assert_trees_close

STEPS = 5
OPTIMIZERS = ('kfac', 'ekfac', 'mini_block_fisher')
LOGGED = ('learning_rate', 'momentum', 'damping', 'rho', 'rejected')


def _ce(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                         labels).mean()


class ResNet(nn.Module):
  """Conv, BatchNorm, dropout and a residual block."""

  @nn.compact
  def __call__(self, x, train=True):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9)
    x = nn.relu(norm()(nn.Conv(6, (3, 3), (2, 2), use_bias=False)(x)))
    x = nn.Dropout(0.2, deterministic=not train)(x)
    y = nn.relu(norm()(nn.Conv(6, (3, 3), use_bias=False)(x)))
    y = norm()(nn.Conv(6, (3, 3), use_bias=False)(y))
    x = nn.relu(x + y)
    return nn.Dense(4)(jnp.mean(x, axis=(1, 2)))


class Block(nn.Module):
  """A pre-LN decoder block, scanned over depth."""

  @nn.compact
  def __call__(self, x, _):
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    y = nn.MultiHeadDotProductAttention(2)(nn.LayerNorm()(x), mask=mask)
    x = x + nn.Dropout(0.1, deterministic=False)(y)
    y = nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(24)(nn.LayerNorm()(x))))
    return x + y, None


class Transformer(nn.Module):
  vocab: int = 11

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, 12)(tokens)
    blocks = nn.scan(Block, variable_axes={'params': 0},
                     split_rngs={'params': True, 'dropout': True}, length=2)
    x, _ = blocks(name='blocks')(x, None)
    return nn.Dense(self.vocab)(nn.LayerNorm()(x))


def _resnet():
  """(params, carry, step(carry, i) -> (loss_fn, args, keywords, carry))."""
  model = ResNet()
  rng = np.random.default_rng(0)
  x = rng.standard_normal((8, 8, 8, 3)).astype(np.float32)
  y = rng.integers(0, 4, (8,))
  variables = model.init(jax.random.key(0), x, train=False)

  def loss_fn(params, batch_stats, key):
    logits, state = model.apply(
        {'params': params, 'batch_stats': batch_stats}, x,
        rngs={'dropout': key}, mutable=['batch_stats'])
    return _ce(logits, y), state['batch_stats']

  def by_hand(batch_stats, key):
    apply = lambda p: model.apply(
        {'params': p, 'batch_stats': batch_stats}, x, rngs={'dropout': key},
        mutable=['batch_stats'])[0]
    return dict(value_fn=lambda p: loss_fn(p, batch_stats, key)[0],
                outputs_fn=apply, outputs_loss=lambda z: _ce(z, y))

  def args(carry, i):
    return carry, jax.random.fold_in(jax.random.key(1), i)

  return (variables['params'], variables['batch_stats'], loss_fn, True,
          args, by_hand, lambda aux: aux)


def _transformer():
  model = Transformer()
  tokens = np.random.default_rng(1).integers(0, 11, (4, 7))
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  params = model.init(jax.random.key(0), inputs)['params']

  def loss_fn(params, key):
    return _ce(model.apply({'params': params}, inputs,
                           rngs={'dropout': key}), targets)

  def by_hand(key):
    apply = lambda p: model.apply({'params': p}, inputs,
                                  rngs={'dropout': key})
    return dict(value_fn=lambda p: loss_fn(p, key), outputs_fn=apply,
                outputs_loss=lambda z: _ce(z, targets))

  def args(carry, i):
    del carry
    return (jax.random.fold_in(jax.random.key(1), i),)

  return params, None, loss_fn, False, args, by_hand, lambda aux: None


TASKS = {'resnet': _resnet, 'transformer': _transformer}


def _train_linen(task, name, short, fisher='empirical'):
  params, carry, loss_fn, has_aux, args, by_hand, next_carry = TASKS[task]()
  step_fn = fo.linen.value_grad_and_stats(loss_fn, has_aux=has_aux,
                                          fisher=fisher)
  tx = getattr(fo, name)()
  extra = {} if fisher == 'empirical' else {'fisher_key': jax.random.key(7)}

  @jax.jit
  def step(params, state, carry, i):
    a = args(carry, i)
    value, grads, stats = step_fn(params, *a, **extra)
    loss, aux = value if has_aux else (value, None)
    keywords = {} if short else dict(value=loss, **by_hand(*a))
    updates, state = tx.update(grads, state, params, layer_stats=stats,
                               **keywords)
    return optax.apply_updates(params, updates), state, next_carry(aux)

  state = tx.init(params)
  for i in range(STEPS):
    params, state, carry = step(params, state, carry, i)
  return params, state


class NNXNet(nnx.Module):

  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 6, (3, 3), rngs=rngs)
    self.norm = nnx.BatchNorm(6, rngs=rngs)
    self.drop = nnx.Dropout(0.2, rngs=rngs)
    self.head = nnx.Linear(6, 4, rngs=rngs)

  def __call__(self, x):
    x = self.drop(nnx.relu(self.norm(self.conv(x))))
    return self.head(jnp.mean(x, axis=(1, 2)))

  def features(self, x):
    return jnp.mean(nnx.relu(self.norm(self.conv(x))), axis=(1, 2))


_X = np.random.default_rng(2).standard_normal((8, 6, 6, 3)).astype(
    np.float32)
_Y = np.random.default_rng(3).integers(0, 4, (8,))


def _train_nnx(name, short):
  model = NNXNet(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, getattr(fo, name)(), wrt=nnx.Param)
  loss_fn = lambda m, x, y: _ce(m(x), y)
  step_fn = fo.nnx.value_grad_and_stats(loss_fn)

  @nnx.jit
  def step(model, optimizer):
    # The state the capture step sees (dropout's RNG counter before it
    # advances), for the by-hand functions.
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    rest = jax.tree.map(lambda a: a, rest)
    loss, grads, stats = step_fn(model, _X, _Y)
    keywords = {}
    if not short:
      apply = lambda p: nnx.merge(graphdef, p,
                                  jax.tree.map(lambda a: a, rest))(_X)
      keywords = dict(value=loss, value_fn=lambda p: _ce(apply(p), _Y),
                      outputs_fn=apply, outputs_loss=lambda z: _ce(z, _Y))
    optimizer.update(model, grads, layer_stats=stats, **keywords)

  for _ in range(STEPS):
    step(model, optimizer)
  return nnx.state(model, nnx.Param), optimizer.opt_state


class ShortFormTest(parameterized.TestCase):

  def assert_same_run(self, short, five):
    (p_short, s_short), (p_five, s_five) = short, five
    assert_trees_close(jax.tree.map(np.asarray, p_short),
                       jax.tree.map(np.asarray, p_five), rtol=1e-4,
                       scale_atol=1e-5)
    for field in LOGGED:
      assert_close(np.asarray(getattr(s_short, field)),
                   np.asarray(getattr(s_five, field)), rtol=1e-4,
                   err_msg=field)
    self.assertEqual(int(np.asarray(s_short.rejected)), 0)

  @parameterized.product(task=tuple(TASKS), name=OPTIMIZERS)
  def test_linen(self, task, name):
    self.assert_same_run(_train_linen(task, name, short=True),
                         _train_linen(task, name, short=False))

  @parameterized.parameters(*OPTIMIZERS)
  def test_nnx_optimizer(self, name):
    self.assert_same_run(_train_nnx(name, short=True),
                         _train_nnx(name, short=False))

  def test_sampled_fisher_keeps_the_loss(self):
    """The preconditioner's statistics are sampled; the quadratic model,
    the loss and the reduction ratio are the user's loss."""
    self.assert_same_run(
        _train_linen('resnet', 'kfac', short=True, fisher='softmax'),
        _train_linen('resnet', 'kfac', short=False, fisher='softmax'))


class LossScaleTest(absltest.TestCase):

  def test_summed_loss_with_loss_scale_equals_the_mean(self):
    """``loss_scale=`` divides the linearization's loss and curvature too."""
    model = nn.Sequential([nn.Dense(8), nn.tanh, nn.Dense(3)])
    x = np.random.default_rng(5).standard_normal((16, 4)).astype(np.float32)
    y = np.arange(16) % 3
    params = model.init(jax.random.key(0), x)['params']
    mean = lambda p: _ce(model.apply({'params': p}, x), y)

    def train(loss_fn, tx):
      step_fn = fo.linen.value_grad_and_stats(loss_fn)

      @jax.jit
      def step(p, state):
        _, grads, stats = step_fn(p)
        updates, state = tx.update(grads, state, p, layer_stats=stats)
        return optax.apply_updates(p, updates), state

      p, state = params, tx.init(params)
      for _ in range(STEPS):
        p, state = step(p, state)
      return p, state

    self.assertEqual(ShortFormTest().assert_same_run(
        train(lambda p: 16.0 * mean(p), fo.kfac(loss_scale=16.0)),
        train(mean, fo.kfac())), None)


def _remat_vmap():
  """``nn.remat`` and a per-example ``nn.vmap`` (parameters broadcast)."""

  class Inner(nn.Module):

    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(nn.tanh(nn.Dense(6)(x)))

  class Outer(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.remat(Inner)()(x)
      return nn.vmap(nn.Dense, variable_axes={'params': None},
                     split_rngs={'params': False}, in_axes=0)(4)(x)

  model = Outer()
  x = np.random.default_rng(6).standard_normal((5, 2)).astype(np.float32)
  params = model.init(jax.random.key(0), x)['params']
  return model, params, x


class PiecesTest(parameterized.TestCase):

  def test_lifted_transforms(self):
    """J v and the replayed loss through nn.remat and nn.vmap."""
    model, params, x = _remat_vmap()
    apply = lambda p: model.apply({'params': p}, x)
    loss_fn = lambda p: jnp.mean(jnp.sin(apply(p)))
    v = jax.tree.map(jnp.ones_like, params)

    @jax.jit
    def pieces(params):
      loss, grads, stats = fo.linen.value_grad_and_stats(loss_fn)(params)
      lin = fo.linearization(stats)
      return (loss, grads, lin.outputs_jvp(v)[0],
              jax.jvp(apply, (params,), (v,))[1],
              lin.outputs_loss(lin.outputs))

    loss, grads, jv, ref_jv, replayed = pieces(params)
    assert_trees_close(grads, jax.grad(loss_fn)(params))
    assert_close(jv, ref_jv, rtol=1e-4)
    assert_close(replayed, loss)

  def test_pieces_against_the_model(self):
    params, carry, loss_fn, _, args, by_hand, _ = _resnet()
    a = args(carry, 0)
    hand = by_hand(*a)
    step_fn = fo.linen.value_grad_and_stats(loss_fn, has_aux=True)
    v = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype))
                     .reshape(p.shape), params)

    @jax.jit
    def pieces(params):
      (loss, _), grads, stats = step_fn(params, *a)
      lin = fo.linearization(stats)
      jv = jax.jvp(hand['outputs_fn'], (params,), (v,))[1]
      return (loss, grads, lin.value, lin.value_fn(params),
              lin.outputs_loss(lin.outputs), lin.outputs[0],
              hand['outputs_fn'](params), lin.outputs_jvp(v)[0], jv,
              lin.outside())

    (loss, grads, value, again, replayed, outputs, ref_outputs, jv,
     ref_jv, outside) = pieces(params)
    ref_loss, ref_grads = jax.value_and_grad(hand['value_fn'])(params)
    assert_close(loss, ref_loss)
    assert_trees_close(grads, ref_grads)
    for x in (value, again, replayed):
      assert_close(x, ref_loss)
    assert_close(outputs, ref_outputs)
    assert_close(jv, ref_jv, rtol=1e-4)
    self.assertEqual(outside, ())

  def test_l2_penalty_is_curved_exactly(self):
    """A penalty read outside the model: C = J^T H J + wd I, densely."""
    model = nn.Sequential([nn.Dense(5), nn.tanh, nn.Dense(3)])
    x = np.random.default_rng(4).standard_normal((6, 4)).astype(np.float64)
    y = np.arange(6) % 3
    wd = 0.3

    with jax.enable_x64():
      params = model.init(jax.random.key(0), x)['params']
      apply = lambda p: model.apply({'params': p}, x)
      l2 = lambda p: 0.5 * wd * sum(jnp.sum(k ** 2) for k in
                                    jax.tree.leaves(p) if k.ndim == 2)
      loss_fn = lambda p: _ce(apply(p), y) + l2(p)
      _, _, stats = fo.linen.value_grad_and_stats(loss_fn)(params)
      lin = fo.linearization(stats)
      self.assertEqual(lin.outside(), ('layers_0/kernel', 'layers_2/kernel'))
      vectors = [jax.tree.map(lambda p, k=k: jnp.sin(
          k + jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape), params)
                 for k in (0.0, 1.0)]
      c = _curvature_products.linearization_products(lin, params, vectors,
                                                     None)
      flat, unravel = ravel_pytree(params)
      jac = jax.jacfwd(lambda f: apply(unravel(f)).ravel())(flat)
      logits = apply(params)
      h = jax.hessian(lambda z: _ce(z.reshape(logits.shape), y))(
          logits.ravel())
      penalty = jax.hessian(lambda f: l2(unravel(f)))(flat)
      dense = jac.T @ h @ jac + penalty
      vs = np.stack([ravel_pytree(v)[0] for v in vectors])
      # float32 parameters (Flax's default param_dtype): float32 rounding.
      assert_close(c, vs @ dense @ vs.T, rtol=1e-5)
      # Without the penalty's curvature it would be off by wd |v|^2.
      self.assertGreater(wd * float(vs[0] @ vs[0]), 1e-2 * abs(
          float(c[0, 0])))


class ErrorTest(absltest.TestCase):

  def test_nnx_loss_without_a_model_call(self):
    """The loss calls a method, not the model: no outputs, no silent
    empirical Fisher."""
    model = NNXNet(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, fo.kfac(), wrt=nnx.Param)
    step_fn = fo.nnx.value_grad_and_stats(
        lambda m: jnp.mean(m.head(m.features(_X)) ** 2))

    @nnx.jit
    def step(model, optimizer):
      _, grads, stats = step_fn(model)
      optimizer.update(model, grads, layer_stats=stats)

    with self.assertRaisesRegex(ValueError, 'found no model outputs.*NNX: '
                                r'model\(\.\.\.\)'):
      step(model, optimizer)

  def test_linen_loss_without_a_model_call(self):
    """A plain function of the parameters: nothing captured, no model."""
    params = {'w': jnp.ones((3,))}
    loss_fn = lambda p: jnp.sum(jnp.sin(p['w']) ** 2)
    _, grads, stats = fo.linen.value_grad_and_stats(loss_fn)(params)
    self.assertEqual(stats, {})
    tx = fo.kfac()
    with self.assertRaisesRegex(ValueError, 'captured no layer.*model.apply'):
      tx.update(grads, tx.init(params), params, layer_stats=stats)

  def test_update_of_a_part_of_the_parameters(self):
    model = nn.Sequential([nn.Dense(4), nn.tanh, nn.Dense(3)])
    x = jnp.ones((4, 2))
    params = model.init(jax.random.key(0), x)['params']
    loss_fn = lambda p: jnp.mean(model.apply({'params': p}, x) ** 2)
    _, grads, stats = fo.linen.value_grad_and_stats(loss_fn)(params)
    part = {'layers_2': params['layers_2']}
    tx = fo.kfac()
    with self.assertRaisesRegex(ValueError, 'have 2 leaves.*differentiated '
                                '4.*outputs_loss= to update a part'):
      tx.update({'layers_2': grads['layers_2']}, tx.init(part), part,
                layer_stats={'layers_2': stats['layers_2']},
                linearization=fo.linearization(stats))

  def test_statistics_across_a_jit_boundary(self):
    model = nn.Dense(3)
    x = jnp.ones((4, 2))
    params = model.init(jax.random.key(0), x)['params']
    loss_fn = lambda p: jnp.mean(model.apply({'params': p}, x) ** 2)
    _, grads, stats = jax.jit(fo.linen.value_grad_and_stats(loss_fn))(params)
    tx = fo.kfac()
    with self.assertRaisesRegex(ValueError, 'no linearization.*same traced '
                                'function'):
      jax.jit(tx.update)(grads, tx.init(params), params, layer_stats=stats)

  def test_transformed_statistics_keep_it_when_the_arrays_stay(self):
    """nnx.Optimizer's nnx.as_pure maps the statistics to themselves."""
    model = nn.Dense(3)
    x = jnp.ones((4, 2))
    params = model.init(jax.random.key(0), x)['params']
    loss_fn = lambda p: jnp.mean(model.apply({'params': p}, x) ** 2)
    _, _, stats = fo.linen.value_grad_and_stats(loss_fn)(params)
    self.assertIsNotNone(fo.linearization(jax.tree.map(lambda a: a, stats)))
    self.assertIsNone(fo.linearization(jax.tree.map(jnp.copy, stats)))


if __name__ == '__main__':
  absltest.main()
