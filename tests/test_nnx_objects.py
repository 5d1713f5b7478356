"""NNX objects passed to the loss: fisher_optax.nnx against nnx.value_and_grad.

Flax's NNX examples pass an ``nnx.Rngs`` to the loss, keep BatchNorm
statistics and dropout RNG streams in the model, and sometimes pass a second
model (a teacher, a target network). Every test here steps one copy of the
objects with ``fo.nnx.value_grad_and_stats`` and an identical copy with plain
``nnx.value_and_grad`` of the same loss, for several steps, and requires the
same loss, gradients, RNG counters and BatchNorm statistics: the capture's
shape pass must not advance or mutate anything, the real pass must advance
it exactly once. The captured ``g`` is checked against ``jax.grad`` with
respect to a perturbation added by hand to a layer's output, with the same
dropout mask.
"""

import re

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from _tolerance import assert_close
from _tolerance import assert_trees_close
import fisher_optax as fo
from fisher_optax import _base


def _normal(i, shape):
  return np.random.default_rng(i).standard_normal(shape).astype(np.float32)


def _pure(tree):
  """Plain NumPy leaves of an nnx.State / NNX object (keys -> key data)."""
  if not isinstance(tree, nnx.State):
    tree = nnx.state(tree)

  def leaf(x):
    x = x[...] if isinstance(x, nnx.Variable) else x
    if jax.dtypes.issubdtype(jnp.asarray(x).dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)
  return jax.tree.map(leaf, nnx.to_pure_dict(tree),
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def _counts(rngs):
  """{stream: count} of an nnx.Rngs or nnx.RngStream."""
  return {v.tag: int(v[...]) for _, v in
          nnx.to_flat_state(nnx.state(rngs, nnx.RngCount))}


# ----------------------------------------------------------------------------
# Models and losses.


class Net(nnx.Module):
  """Linear -> BatchNorm (train) -> relu -> Dropout -> Linear.

  ``own_rngs``: the Dropout keeps its RNG stream; else the caller passes an
  ``nnx.Rngs`` at call time, as in Flax's NNX examples. ``delta`` is added
  to the first layer's output: the reference for its captured ``g``.
  Returns ``(y, h)``, ``h`` the dropped hidden activation, or ``y`` alone
  if not ``hidden``.
  """

  def __init__(self, rngs, own_rngs=False, hidden=True):
    self.hidden = hidden
    self.linear = nnx.Linear(3, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.8, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs if own_rngs else None)
    self.out = nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, x, rngs=None, delta=0.0):
    h = self.linear(x) + delta
    h = self.drop(nnx.relu(self.bn(h)), rngs=rngs)
    return (self.out(h), h) if self.hidden else self.out(h)


class Teacher(nnx.Module):
  """A second model: BatchNorm in train mode, so its state changes too."""

  def __init__(self, rngs):
    self.linear = nnx.Linear(3, 2, rngs=rngs)
    self.bn = nnx.BatchNorm(2, momentum=0.7, rngs=rngs)

  def __call__(self, x):
    return self.bn(self.linear(x))


def _loss(y, t, seed=5):
  return jnp.mean(jnp.sin(y - t) * _normal(seed, y.shape))


def loss_rngs_arg(model, x, t, rngs, delta=0.0):
  y, h = model(x, rngs=rngs, delta=delta)
  return _loss(y, t), h


def loss_rngs_kwarg(model, x, t, rngs=None, delta=0.0):
  return loss_rngs_arg(model, x, t, rngs, delta)


def loss_rngs_in_dict(model, batch, delta=0.0):
  return loss_rngs_arg(model, batch['x'], batch['t'], batch['rngs'], delta)


def loss_own_rngs(model, x, t, delta=0.0):
  y, h = model(x, delta=delta)
  return _loss(y, t), h


def loss_teacher(model, teacher, x, rngs, delta=0.0):
  y, h = model(x, rngs=rngs, delta=delta)
  return _loss(y, teacher(x)), h


_X = _normal(0, (6, 3))
_T = 0.5 * _normal(1, (6, 2))

# name, loss, own_rngs, with_teacher, how the objects are passed.
_CASES = (
    ('rngs_arg', loss_rngs_arg, False, False, 'arg'),
    ('rngs_kwarg', loss_rngs_kwarg, False, False, 'kwarg'),
    ('rngs_in_dict', loss_rngs_in_dict, False, False, 'dict'),
    ('rngs_in_model', loss_own_rngs, True, False, 'none'),
    ('second_model', loss_teacher, False, True, 'teacher'),
)


def _make(own_rngs, with_teacher, hidden=True):
  """(model, rngs, teacher) with fixed seeds; rngs is None when in model."""
  model = Net(nnx.Rngs(0, dropout=3), own_rngs=own_rngs, hidden=hidden)
  rngs = None if own_rngs else nnx.Rngs(dropout=7)
  teacher = Teacher(nnx.Rngs(11)) if with_teacher else None
  return model, rngs, teacher


def _call_args(how, rngs, teacher):
  """(args, kwargs) after the model, as the loss of ``how`` takes them."""
  if how == 'arg':
    return (_X, _T, rngs), {}
  if how == 'kwarg':
    return (_X, _T), {'rngs': rngs}
  if how == 'dict':
    return ({'x': _X, 't': _T, 'rngs': rngs},), {}
  if how == 'none':
    return (_X, _T), {}
  return (teacher, _X, rngs), {}


def _objects(model, rngs, teacher):
  return {'model': model, 'rngs': rngs, 'teacher': teacher}


def _jitted(fn, mode):
  """``fn(model, *args, **kwargs)`` under nnx.jit, jax.jit, or eagerly.

  ``mode='jax_jit'`` splits every NNX object (model, Rngs, teacher) outside,
  merges inside a ``jax.jit`` and returns their new state, which is written
  back with ``nnx.update``: the functional form.
  """
  if mode == 'nnx_jit':
    return nnx.jit(fn)
  if mode == 'eager':
    return fn

  @jax.jit
  def pure(graphdef, state, arrays):
    model, args, kwargs = nnx.merge(graphdef, state, arrays)
    out = fn(model, *args, **kwargs)
    return out, nnx.state((model, args, kwargs), nnx.Variable)

  def call(model, *args, **kwargs):
    graphdef, state, arrays = nnx.split((model, args, kwargs),
                                        nnx.Variable, ...)
    out, new_state = pure(graphdef, state, arrays)
    nnx.update((model, args, kwargs), new_state)
    return out

  return call


class NNXObjectsTest(parameterized.TestCase):

  @parameterized.named_parameters(
      (f'{case[0]}_{mode}', case, mode)
      for case in _CASES for mode in ('nnx_jit', 'jax_jit'))
  def test_same_as_nnx_value_and_grad(self, case, mode):
    """Reference: an identical copy stepped by nnx.value_and_grad, 3 steps."""
    _, loss_fn, own_rngs, with_teacher, how = case
    mine = _objects(*_make(own_rngs, with_teacher))
    ref = _objects(*_make(own_rngs, with_teacher))
    step = _jitted(fo.nnx.value_grad_and_stats(loss_fn, has_aux=True), mode)
    plain = _jitted(nnx.value_and_grad(loss_fn, has_aux=True), mode)
    rngs_of = (lambda o: o['model'].drop.rngs) if own_rngs else (
        lambda o: o['rngs'])
    count0 = _counts(rngs_of(mine))
    for i in range(3):
      args, kwargs = _call_args(how, mine['rngs'], mine['teacher'])
      (loss, h), grads, stats = step(mine['model'], *args, **kwargs)
      args, kwargs = _call_args(how, ref['rngs'], ref['teacher'])
      (ref_loss, ref_h), ref_grads = plain(ref['model'], *args, **kwargs)
      msg = f'step {i}'
      assert_close(loss, ref_loss, err_msg=msg)
      # Same dropout mask: the stream advanced identically.
      np.testing.assert_array_equal(np.asarray(h) == 0,
                                    np.asarray(ref_h) == 0, err_msg=msg)
      assert_trees_close(_pure(grads), _pure(ref_grads))
      # RNG counters, BatchNorm statistics, every other variable: equal.
      assert_trees_close(_pure(nnx.state(mine['model'])),
                         _pure(nnx.state(ref['model'])))
      if with_teacher:
        assert_trees_close(_pure(nnx.state(mine['teacher'])),
                           _pure(nnx.state(ref['teacher'])))
      self.assertEqual(_counts(rngs_of(mine)), _counts(rngs_of(ref)), msg)
      self.assertEqual(_counts(rngs_of(mine))['dropout'],
                       count0['dropout'] + i + 1, msg)
      self.assertEqual(set(stats), {'linear', 'bn', 'out'})
      # Apply the same SGD step to both, so the three steps differ.
      for o, g in ((mine, grads), (ref, ref_grads)):
        params = nnx.state(o['model'], nnx.Param)
        nnx.update(o['model'], jax.tree.map(lambda p, d: p - 0.5 * d,
                                             params, g))
    # The BatchNorm statistics moved (train mode), so the check above bites.
    self.assertGreater(
        float(np.max(np.abs(np.asarray(mine['model'].bn.mean[...])))), 0.0)
    # Nothing was added to the user's objects (no capture variables).
    for name in ('model', 'teacher'):
      if mine[name] is not None:
        self.assertNotIn('__captures__', vars(mine[name]))
        for _, m in nnx.iter_modules(mine[name]):
          self.assertFalse(
              {k for k in vars(m) if k.startswith('fo_')}, type(m).__name__)

  @parameterized.named_parameters(('nnx_jit', 'nnx_jit'),
                                  ('jax_jit', 'jax_jit'), ('eager', 'eager'))
  def test_captured_g_with_dropout(self, mode):
    """Reference: jax.grad w.r.t. a perturbation of linear's output.

    The reference runs from a copy of the same state, so its dropout mask is
    the one the capture pass used; ``g`` of ``linear`` passes back through
    that mask and through BatchNorm's batch statistics.
    """
    model, rngs, _ = _make(False, False)
    ref_model, ref_rngs, _ = _make(False, False)
    step = _jitted(fo.nnx.value_grad_and_stats(loss_rngs_arg, has_aux=True),
                   mode)
    (_, h), _, stats = step(model, _X, _T, rngs)

    @nnx.jit
    def reference(m, r):
      return nnx.grad(lambda d, m, r: loss_rngs_arg(m, _X, _T, r, d),
                      has_aux=True)(jnp.zeros((6, 8)), m, r)

    want_g, ref_h = reference(ref_model, ref_rngs)
    np.testing.assert_array_equal(np.asarray(h) == 0, np.asarray(ref_h) == 0)
    assert_close(h, ref_h)
    # Dropout was active: about half the units of h are dropped.
    self.assertBetween(float(np.mean(np.asarray(h) == 0)), 0.2, 0.9)
    s = stats['linear']
    self.assertEqual(s.g.shape, (1, 6, 8))
    assert_close(s.g[0], want_g)
    assert_close(s.a[0], _X)
    # The head's input is the dropped activation.
    assert_close(stats['out'].a[0], h)

  @parameterized.named_parameters(('graph_no_updates', True, False),
                                  ('tree_mode', False, False))
  def test_other_nnx_graph_modes(self, graph, graph_updates):
    """Reference: nnx.value_and_grad under the same nnx graph mode."""
    with nnx.set_graph_mode(graph), nnx.set_graph_updates(graph_updates):
      model, rngs, _ = _make(False, False)
      ref_model, ref_rngs, _ = _make(False, False)
      step = nnx.jit(fo.nnx.value_grad_and_stats(loss_rngs_arg, has_aux=True))
      plain = nnx.jit(nnx.value_and_grad(loss_rngs_arg, has_aux=True))
      for _ in range(2):
        (loss, _), grads, stats = step(model, _X, _T, rngs)
        (ref_loss, _), ref_grads = plain(ref_model, _X, _T, ref_rngs)
        assert_close(loss, ref_loss)
        # Here nnx.value_and_grad also returns the BatchNorm statistics'
        # (zero) gradients; the capture returns the nnx.Param ones.
        if not isinstance(ref_grads, nnx.State):
          ref_grads = nnx.state(ref_grads)
        assert_trees_close(_pure(grads),
                           _pure(nnx.filter_state(ref_grads, nnx.Param)))
        assert_trees_close(_pure(nnx.state(model)),
                           _pure(nnx.state(ref_model)))
        self.assertEqual(set(stats), {'linear', 'bn', 'out'})
      self.assertEqual(_counts(rngs), {'dropout': 2})
      self.assertEqual(_counts(ref_rngs), {'dropout': 2})

  def test_sampled_fisher_with_rngs_arg(self):
    """Reference: nnx.value_and_grad on a copy; RNG advanced once."""
    model, rngs, _ = _make(False, False, hidden=False)
    ref_model, ref_rngs, _ = _make(False, False, hidden=False)

    def loss_fn(m, x, t, r):
      return _loss(m(x, rngs=r), t)

    step = nnx.jit(fo.nnx.value_grad_and_stats(loss_fn, fisher='gaussian'))
    plain = nnx.jit(nnx.value_and_grad(loss_fn))
    for i in range(2):
      loss, grads, stats = step(model, _X, _T, rngs,
                                fisher_key=jax.random.key(i))
      ref_loss, ref_grads = plain(ref_model, _X, _T, ref_rngs)
      assert_close(loss, ref_loss)
      assert_trees_close(_pure(grads), _pure(ref_grads))
      assert_trees_close(_pure(nnx.state(model)), _pure(nnx.state(ref_model)))
      self.assertEqual(_counts(rngs), _counts(ref_rngs))
      self.assertEqual(_counts(rngs)['dropout'], i + 1)
      self.assertEqual(set(stats), {'linear', 'bn', 'out'})
    self.assertNotIn('__captures__', vars(model))

  def test_python_flag_and_string_stay_static(self):
    """Reference: nnx.value_and_grad; train=False draws no random bits."""

    def loss_fn(m, x, t, rngs, train, reduction):
      h = nnx.relu(m.bn(m.linear(x)))
      h = m.drop(h, deterministic=not train, rngs=rngs)
      err = jnp.sin(m.out(h) - t)
      return jnp.mean(err) if reduction == 'mean' else jnp.sum(err)

    step = nnx.jit(fo.nnx.value_grad_and_stats(loss_fn),
                   static_argnames=('train', 'reduction'))
    plain = nnx.jit(nnx.value_and_grad(loss_fn),
                    static_argnames=('train', 'reduction'))
    for train in (False, True):
      model, rngs, _ = _make(False, False)
      ref_model, ref_rngs, _ = _make(False, False)
      loss, grads, _ = step(model, _X, _T, rngs, train=train,
                            reduction='sum')
      ref_loss, ref_grads = plain(ref_model, _X, _T, ref_rngs, train=train,
                                  reduction='sum')
      assert_close(loss, ref_loss)
      assert_trees_close(_pure(grads), _pure(ref_grads))
      self.assertEqual(_counts(rngs), {'dropout': int(train)})
      self.assertEqual(_counts(ref_rngs), {'dropout': int(train)})

  def test_same_rngs_passed_twice(self):
    """Reference: nnx.value_and_grad; one shared stream, advanced twice."""
    model, rngs, _ = _make(False, False)
    ref_model, ref_rngs, _ = _make(False, False)

    def loss_fn(m, x, t, r1, r2):
      y1, _ = m(x, rngs=r1)
      y2, _ = m(x, rngs=r2)
      return _loss(y1 + y2, t)

    step = nnx.jit(fo.nnx.value_grad_and_stats(loss_fn))
    plain = nnx.jit(nnx.value_and_grad(loss_fn))
    loss, grads, stats = step(model, _X, _T, rngs, rngs)
    ref_loss, ref_grads = plain(ref_model, _X, _T, ref_rngs, ref_rngs)
    assert_close(loss, ref_loss)
    assert_trees_close(_pure(grads), _pure(ref_grads))
    assert_trees_close(_pure(nnx.state(model)), _pure(nnx.state(ref_model)))
    self.assertEqual(_counts(rngs), {'dropout': 2})
    self.assertEqual(_counts(ref_rngs), {'dropout': 2})
    # Both calls are calls of the same layers.
    self.assertEqual(stats['linear'].a.shape, (2, 6, 3))

  def test_model_passed_twice_same_error(self):
    """Reference: nnx.value_and_grad rejects it with the same error."""
    model, rngs, _ = _make(False, False)

    def loss_fn(m, m_again, x, t, r):
      return _loss(m(x, rngs=r)[0] + m_again(x, rngs=r)[0], t)

    for fn in (nnx.value_and_grad(loss_fn),
               fo.nnx.value_grad_and_stats(loss_fn)):
      with self.assertRaisesRegex(ValueError, 'Inconsistent aliasing'):
        nnx.jit(fn)(model, model, _X, _T, rngs)
    self.assertEqual(_counts(rngs), {'dropout': 0})


# ----------------------------------------------------------------------------
# The layers= recipe of NNX error messages.


class MultiOut(nnx.Module):
  """A bias-less multi-output LinearGeneral: init(params) cannot tell its
  (3, 2, 4) kernel from a 1-D conv's, so it guesses the factors wrong."""

  def __init__(self, rngs):
    self.proj = nnx.LinearGeneral(3, (2, 4), use_bias=False, rngs=rngs)
    self.drop = nnx.Dropout(0.25)
    self.out = nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, x, rngs):
    h = self.drop(jnp.tanh(self.proj(x)), rngs=rngs)
    return self.out(h.reshape(h.shape[0], -1))


def _multi_loss(model, x, t, rngs):
  return jnp.mean((model(x, rngs) - t) ** 2)


def _hint_expression(hint):
  """The Python expression after ``layers=`` in a layers_hint text."""
  match = re.match(r'layers=(.*?) \(step_fn = (.*)\)$', hint)
  if match is None:
    raise AssertionError(f'unexpected layers_hint form: {hint!r}')
  return match.group(1), match.group(2)


class LayersHintTest(absltest.TestCase):

  def test_nnx_hint_is_nnx_and_builds_working_layers(self):
    """Reference: the printed expression, evaluated, trains K-FAC steps."""
    model = MultiOut(nnx.Rngs(0))
    rngs = nnx.Rngs(dropout=1)
    hint = _base.layers_hint(nnx.state(model, nnx.Param))
    self.assertIn('nnx', hint)
    self.assertNotIn('linen', hint)
    expression, step_fn_text = _hint_expression(hint)
    self.assertIn('fisher_optax.nnx.value_grad_and_stats', step_fn_text)
    step_fn = fo.nnx.value_grad_and_stats(_multi_loss)
    batch = (_X, _T, rngs)
    namespace = {'nnx': nnx, 'jax': jax, 'step_fn': step_fn, 'model': model,
                 'batch': batch}
    layers = eval(expression, namespace)  # pylint: disable=eval-used
    # Shape-only: building layers= did not advance the user's RNG stream.
    self.assertEqual(_counts(rngs), {'dropout': 0})
    self.assertEqual(layers['proj'].a.shape, (1, 6, 3))
    self.assertEqual(layers['proj'].g.shape, (1, 6, 2, 4))

    # Without layers=, K-FAC cannot infer the multi-output factors.
    def train(tx, steps):
      m = MultiOut(nnx.Rngs(0))
      r = nnx.Rngs(dropout=1)
      optimizer = nnx.Optimizer(m, tx, wrt=nnx.Param)

      @nnx.jit
      def train_step(m, optimizer, r):
        loss, grads, stats = step_fn(m, _X, _T, r)
        optimizer.update(m, grads, layer_stats=stats)
        return loss

      losses = [float(train_step(m, optimizer, r)) for _ in range(steps)]
      return losses, m, r

    with self.assertRaises(ValueError):
      train(fo.kfac(0.1), 1)
    losses, m, r = train(fo.kfac(0.1, layers=layers), 3)
    self.assertTrue(np.all(np.isfinite(losses)), losses)
    self.assertEqual(_counts(r), {'dropout': 3})
    initial = nnx.state(MultiOut(nnx.Rngs(0)), nnx.Param)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                         _pure(nnx.state(m, nnx.Param)), _pure(initial))
    self.assertGreater(moved['proj']['kernel'], 0.0)

  def test_nnx_hint_for_tree_mode_grads(self):
    """Tree-mode NNX gradients are module-shaped, not an nnx.State."""
    with nnx.set_graph_mode(False):
      model = MultiOut(nnx.Rngs(0))
      grads = nnx.grad(lambda m: jnp.sum(m.proj.kernel[...]))(model)
    self.assertNotIsInstance(grads, nnx.State)
    self.assertIn('nnx.eval_shape', _base.layers_hint(grads))

  def test_linen_hint_for_a_dict(self):
    hint = _base.layers_hint({'params': {}})
    self.assertIn('jax.eval_shape', hint)
    self.assertIn('fisher_optax.linen.value_grad_and_stats', hint)


if __name__ == '__main__':
  absltest.main()
