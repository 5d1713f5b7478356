"""Cross-optimizer acceptance checks: bad inputs and faults (issue 10).

Written from the issue's specification, not from the implementation: every
optimizer (AdaFisher in both modes, AdaFisherW, K-FAC, TKFAC, EKFAC, TEKFAC,
Mini-Block Fisher) must

a. reject bad concrete hyperparameters when it is built, naming the argument,
   and still train under ``optax.inject_hyperparams`` (traced, unchecked);
b. keep every parameter finite behind a zero-initialised output head;
c. keep parameters finite when one step's statistics hold Inf or NaN, and
   count it in the state's ``nonfinite``;
d. run in float64 under ``jax_enable_x64`` and agree with float32;
e. train under ``optax.multi_transform`` / ``optax.masked`` with a frozen
   layer or a frozen bias, without ``layers=``;
f. serve two different models from one optimizer object;
g. name the path of a gradient tree that does not match the parameters;
h. name the layer whose ``layer_stats`` do not fit its metadata;
i. never move an integer parameter through weight decay.

Models are tiny and every step runs under ``jax.jit``.
"""

import functools
import math
import re

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import fisher_optax as fo

from _tolerance import assert_close
from _tolerance import tree_scale

_KRONECKER = {'kfac': fo.kfac, 'tkfac': fo.tkfac, 'ekfac': fo.ekfac,
              'tekfac': fo.tekfac}

# name -> (factory, keyword arguments). Periods of 1 so that every step
# refreshes statistics and inverses and the faults below reach them; damping
# 1e-2 keeps the float32 solves within 1e-4 of float64 (theme d).
_D = 1e-2
_OPTIMIZERS = {
    'adafisher': (fo.adafisher, dict(learning_rate=1e-3, stats_every=1,
                                     mode='paper')),
    'adafisher_reference': (fo.adafisher, dict(
        learning_rate=1e-3, stats_every=1, mode='reference')),
    'adafisherw': (fo.adafisherw, dict(learning_rate=1e-3, stats_every=1,
                                       mode='paper')),
    **{name: (f, dict(learning_rate=1e-2, inverse_every=1))
       for name, f in _KRONECKER.items()},
    'kfac_eigen': (fo.kfac, dict(learning_rate=1e-2, inverse_every=1,
                                 damping_mode='eigen')),
    'tkfac_eigen': (fo.tkfac, dict(learning_rate=1e-2, inverse_every=1,
                                   damping_mode='eigen')),
    'mini_block_fisher': (fo.mini_block_fisher, dict(
        learning_rate=1e-2, inverse_every=1)),
}
_PUBLIC = ('adafisher', 'adafisherw', 'kfac', 'tkfac', 'ekfac', 'tekfac',
           'mini_block_fisher')
_ALL = tuple(_OPTIMIZERS)
# Statistics from layer_stats (MBF builds its own from the gradients).
_FROM_LAYER_STATS = ('adafisher', 'adafisher_reference', 'adafisherw',
                     *_KRONECKER)


def _cases(names):
  return [(name, name) for name in names]


def _make(name, **kw):
  factory, base = _OPTIMIZERS[name]
  return factory(**{'damping': _D, **base, **kw})


class Mlp(nn.Module):
  """Dense - tanh - Dense - tanh - Dense."""

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(8)(x))
    x = nn.tanh(nn.Dense(8)(x))
    return nn.Dense(3)(x)


class ConvNet(nn.Module):
  """Conv with bias - tanh - Dense - tanh - zero-initialised Dense head."""

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Conv(4, (3, 3), padding='VALID')(x))
    x = nn.tanh(nn.Dense(6)(x.reshape(x.shape[0], -1)))
    return nn.Dense(3, kernel_init=nn.initializers.zeros,
                    bias_init=nn.initializers.zeros)(x)


class NormNet(nn.Module):
  """Dense - LayerNorm - tanh - Dense."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(8)(x)
    x = nn.tanh(nn.LayerNorm()(x))
    return nn.Dense(3)(x)


class OtherNet(nn.Module):
  """Different layer names and sizes from Mlp."""

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(5, name='enc')(x))
    return nn.Dense(2, name='dec')(x)


def _data(model, shape=(16, 4), out=3, seed=0, dtype=jnp.float32):
  x = jax.random.normal(jax.random.key(seed), shape, dtype)
  y = jax.random.normal(jax.random.key(seed + 1), (shape[0], out), dtype)
  params = model.init(jax.random.key(seed + 2), x)['params']
  params = jax.tree.map(lambda p: p.astype(dtype), params)
  return params, x, y


def _loss(model):
  return lambda p, x, y: jnp.mean((model.apply({'params': p}, x) - y) ** 2)


def _step_fn(tx, model):
  """One jitted training step; returns new params, state, loss, updates."""
  value_grad_and_stats = fo.linen.value_grad_and_stats(_loss(model))

  @jax.jit
  def step(params, state, x, y):
    loss, grads, stats = value_grad_and_stats(params, x, y)
    updates, state = tx.update(grads, state, params, layer_stats=stats)
    return optax.apply_updates(params, updates), state, loss, updates

  return step


@functools.cache
def _shared_mlp_step(name):
  """One optimizer and its jitted Mlp step, shared by tests (one compile)."""
  tx, model = _make(name), Mlp()
  return tx, model, _step_fn(tx, model)


def _train(tx, model, params, x, y, steps=3, step=None):
  step = step or _step_fn(tx, model)
  state = tx.init(params)
  losses, updates = [], []
  for _ in range(steps):
    params, state, loss, u = step(params, state, x, y)
    losses.append(float(loss))
    updates.append(u)
  return params, state, losses, updates


def _not_finite(tree):
  """Paths of the leaves of ``tree`` with a non-finite entry."""
  return [jax.tree_util.keystr(path)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
          if not np.all(np.isfinite(np.asarray(leaf)))]


def _nonfinite_count(state):
  """Sum of every ``nonfinite`` counter in a (chained) optimizer state."""
  counts = [int(leaf) for path, leaf in
            jax.tree_util.tree_flatten_with_path(state)[0]
            if 'nonfinite' in jax.tree_util.keystr(path)]
  return sum(counts) if counts else None


def _flat(tree):
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _fail_all(test, problems):
  if problems:
    test.fail('\n'.join(problems))


class HyperparameterTest(parameterized.TestCase):
  """a. Concrete bad values fail at construction, naming the argument."""

  @staticmethod
  def _bad_values(name):
    nan = float('nan')
    bad = [('damping', 0.0), ('damping', -1.0), ('damping', nan),
           ('learning_rate', nan), ('stats_every', 0)]
    decays = (('fisher_decay', 'b1') if name.startswith('adafisher')
              else ('fisher_decay', 'momentum'))
    bad += [(d, v) for d in decays for v in (1.0, -0.1)]
    if not name.startswith('adafisher'):
      bad += [('inverse_every', 0), ('inverse_method', 'bogus')]
    return bad

  @parameterized.named_parameters(_cases(_PUBLIC))
  def test_bad_hyperparameter_is_named(self, name):
    problems = []
    for arg, value in self._bad_values(name):
      try:
        _make(name, **{arg: value})
      except ValueError as e:
        if not re.search(r'\b' + arg + r'\b', str(e)):
          problems.append(f'{arg}={value!r}: ValueError does not name '
                          f'{arg}: {e}')
      except Exception as e:  # pylint: disable=broad-except
        problems.append(f'{arg}={value!r}: {type(e).__name__}, not '
                        f'ValueError: {e}')
      else:
        problems.append(f'{arg}={value!r} accepted at construction')
    _fail_all(self, problems)

  @parameterized.named_parameters(_cases(_PUBLIC))
  def test_good_hyperparameters_build(self, name):
    _make(name, damping=1e-3, fisher_decay=0.0)

  @parameterized.named_parameters(_cases(_PUBLIC))
  def test_inject_hyperparams_trains(self, name):
    factory, base = _OPTIMIZERS[name]
    # Periods are static; every numeric default becomes a hyperparameter.
    periods = (('stats_every',) if name.startswith('adafisher')
               else ('stats_every', 'inverse_every'))
    tx = optax.inject_hyperparams(factory, static_args=periods)(
        **{**base, 'damping': _D})
    model = Mlp()
    params, x, y = _data(model)
    new, state, losses, _ = _train(tx, model, params, x, y)
    self.assertEqual(_not_finite(new), [])
    self.assertLess(losses[-1], losses[0])
    self.assertAlmostEqual(float(state.hyperparams['damping']), _D,
                           places=7)


class ZeroHeadTest(parameterized.TestCase):
  """b. A zero-initialised head: the layers below see zero cotangents."""

  @parameterized.named_parameters(_cases(_ALL))
  def test_zero_head_stays_finite(self, name):
    model = ConvNet()
    params, x, y = _data(model, shape=(4, 5, 5, 2))
    new, _, losses, _ = _train(_make(name), model, params, x, y)
    self.assertEqual(_not_finite(new), [], f'losses {losses}')
    self.assertTrue(all(math.isfinite(v) for v in losses), losses)


def _poisoned_step_fn(tx, model, keys):
  """A step that can overwrite one entry of a or g of ``layer_stats[key]``.

  ``flags[k, 0]`` (``flags[k, 1]``) poisons ``a`` (``g``) of ``keys[k]``; all
  flags are traced, so clean and poisoned steps share one compilation.
  """
  value_grad_and_stats = fo.linen.value_grad_and_stats(_loss(model))

  def poison(x, on, value):
    first = jnp.zeros(x.shape, bool).at[(0,) * x.ndim].set(True)
    return jnp.where(first & on, value.astype(x.dtype), x)

  @jax.jit
  def step(params, state, x, y, flags, value):
    _, grads, stats = value_grad_and_stats(params, x, y)
    stats = dict(stats)
    for k, key in enumerate(keys):
      st = stats[key]
      stats[key] = fo.LayerStats(poison(st.a, flags[k, 0], value),
                                 poison(st.g, flags[k, 1], value), st.meta,
                                 st.extras)
    updates, state = tx.update(grads, state, params, layer_stats=stats)
    return optax.apply_updates(params, updates), state

  return step


class NonFiniteStatisticsTest(parameterized.TestCase):
  """c. Inf/NaN in one step's statistics: kept out of every parameter."""

  @parameterized.named_parameters(_cases(_FROM_LAYER_STATS))
  def test_nonfinite_statistics(self, name):
    model = NormNet()
    keys = ('Dense_0', 'LayerNorm_0')
    params, x, y = _data(model)
    tx = _make(name)
    step = _poisoned_step_fn(tx, model, keys)
    clean = jnp.zeros((len(keys), 2), bool)
    problems = []
    for k, key in enumerate(keys):
      for f, field in enumerate(('a', 'g')):
        for value in (jnp.inf, jnp.nan):
          what = f'{key}.{field} = {value}'
          p, state = step(params, tx.init(params), x, y, clean, 0.0)
          p, state = step(p, state, x, y, clean.at[k, f].set(True),
                          jnp.float32(value))
          bad = _not_finite(p)
          if bad:
            problems.append(f'{what}: non-finite after the step: {bad}')
          count = _nonfinite_count(state)
          # A norm layer's statistic may be built from xhat and g alone, so
          # a poisoned ``a`` must be counted only for the dense layer.
          if count is None:
            problems.append(f'{what}: no nonfinite counter in the state')
          elif count == 0 and (field == 'g' or key == 'Dense_0'):
            problems.append(f'{what}: nonfinite counter stayed 0')
          for _ in range(3):
            p, state = step(p, state, x, y, clean, 0.0)
          bad = _not_finite(p)
          if bad:
            problems.append(f'{what}: non-finite 3 clean steps later: {bad}')
          frozen = [path for path, v in _flat(p).items()
                    if np.array_equal(v, _flat(params)[path])]
          if frozen:
            problems.append(f'{what}: these stopped training: {frozen}')
    _fail_all(self, problems)


class Float64Test(parameterized.TestCase):
  """d. float64 parameters under x64: float64 updates, same as float32."""

  @parameterized.named_parameters(_cases(_PUBLIC))
  def test_float64_matches_float32(self, name):
    tx, model, step = _shared_mlp_step(name)
    params32, x32, y32 = _data(model)
    _, _, _, want = _train(tx, model, params32, x32, y32, step=step)
    with jax.enable_x64(True):
      params, x, y = jax.tree.map(
          lambda v: jnp.asarray(np.asarray(v, np.float64)),
          (params32, x32, y32))
      _, _, _, got = _train(_make(name), model, params, x, y)
      dtypes = {str(v.dtype) for u in got for v in jax.tree.leaves(u)}
      got = jax.tree.map(lambda v: np.asarray(v, np.float64), got)
    self.assertEqual(dtypes, {'float64'})
    for t, (g, w) in enumerate(zip(got, want)):
      scale = tree_scale(g)
      for path, v in _flat(g).items():
        assert_close(_flat(w)[path], v, rtol=1e-3, scale_atol=1e-4,
                     scale=scale, err_msg=f'step {t} {path}')


def _freeze_labels(params, frozen):
  """'frozen' for the paths in ``frozen`` (as 'layer' or 'layer/leaf')."""
  def label(path, _):
    keys = [str(getattr(k, 'key', k)) for k in path]
    hit = keys[0] in frozen or '/'.join(keys) in frozen
    return 'frozen' if hit else 'fo'
  return jax.tree_util.tree_map_with_path(label, params)


class FrozenParametersTest(parameterized.TestCase):
  """e. multi_transform / masked: frozen leaves stay, the rest trains.

  One run freezes (i) the whole layer Dense_0 and (ii) only the bias of
  Dense_1; the statistics of both stay in ``layer_stats`` (no ``layers=``).
  """

  _FROZEN = ('Dense_0', 'Dense_1/bias')

  def _check(self, name, wrap):
    model = Mlp()
    params, x, y = _data(model)
    labels = _freeze_labels(params, self._FROZEN)
    tx = wrap(_make(name), labels)
    new, _, losses, _ = _train(tx, model, params, x, y)
    self.assertEqual(_not_finite(new), [], losses)
    old, new, labels = _flat(params), _flat(new), _flat(labels)
    for path, value in new.items():
      if labels[path] == 'frozen':
        np.testing.assert_array_equal(value, old[path], err_msg=path)
      else:
        self.assertFalse(np.array_equal(value, old[path]), path)

  @parameterized.named_parameters(_cases(_PUBLIC))
  def test_multi_transform(self, name):
    self._check(name, lambda tx, labels: optax.multi_transform(
        {'fo': tx, 'frozen': optax.set_to_zero()}, labels))

  @parameterized.named_parameters(_cases(_PUBLIC))
  def test_masked(self, name):
    # optax.masked passes masked-out updates through unchanged (the raw
    # gradient), so a second masked set_to_zero freezes them.
    def wrap(tx, labels):
      train = jax.tree.map(lambda s: s == 'fo', labels)
      freeze = jax.tree.map(lambda s: s == 'frozen', labels)
      return optax.chain(optax.masked(tx, train),
                         optax.masked(optax.set_to_zero(), freeze))
    self._check(name, wrap)


class TwoModelsTest(parameterized.TestCase):
  """f. One optimizer object, two models with other names and sizes."""

  @parameterized.named_parameters(_cases(_PUBLIC))
  def test_one_optimizer_two_models(self, name):
    tx, m1, step1 = _shared_mlp_step(name)
    m2 = OtherNet()
    p1, x1, y1 = _data(m1)
    p2, x2, y2 = _data(m2, shape=(12, 6), out=2, seed=5)
    s1, s2 = tx.init(p1), tx.init(p2)
    step2 = _step_fn(tx, m2)
    q1, q2 = p1, p2
    for _ in range(2):
      q1, s1, _, _ = step1(q1, s1, x1, y1)
      q2, s2, _, _ = step2(q2, s2, x2, y2)
    for p, q in ((p1, q1), (p2, q2)):
      self.assertEqual(_not_finite(q), [])
      for path, v in _flat(q).items():
        self.assertFalse(np.array_equal(v, _flat(p)[path]), path)


class MismatchedGradientsTest(parameterized.TestCase):
  """g. A grads tree unlike params/state: ValueError with the path."""

  def _check(self, name, edit, pattern):
    model = Mlp()
    params, x, y = _data(model)
    tx = _make(name)
    _, grads, stats = jax.jit(fo.linen.value_grad_and_stats(_loss(model)))(
        params, x, y)
    grads = jax.tree.map(lambda v: v, grads)  # a copy to edit
    edit(grads)
    state = tx.init(params)
    with self.assertRaisesRegex(ValueError, pattern):
      jax.jit(lambda g, s: tx.update(g, s, params, layer_stats=stats))(
          grads, state)

  @parameterized.named_parameters(_cases(_PUBLIC))
  def test_extra_leaf(self, name):
    self._check(name, lambda g: g.update(extra=jnp.zeros(3)), 'extra')

  @parameterized.named_parameters(_cases(_PUBLIC))
  def test_missing_leaf(self, name):
    self._check(name, lambda g: g['Dense_2'].pop('bias'),
                r'Dense_2\W+bias')

  @parameterized.named_parameters(_cases(_PUBLIC))
  def test_wrong_shape(self, name):
    def edit(g):
      g['Dense_2']['kernel'] = jnp.zeros((8, 4))
    self._check(name, edit, r'Dense_2\W+kernel')


class BadLayerStatsTest(parameterized.TestCase):
  """h. layer_stats that do not fit the layer: ValueError with its key."""

  def _check(self, name, edit):
    model = Mlp()
    params, x, y = _data(model)
    tx = _make(name)
    _, grads, stats = jax.jit(fo.linen.value_grad_and_stats(_loss(model)))(
        params, x, y)
    stats = dict(stats)
    st = stats['Dense_1']
    stats['Dense_1'] = fo.LayerStats(*edit(st.a, st.g), st.meta, st.extras)
    state = tx.init(params)
    with self.assertRaisesRegex(ValueError, 'Dense_1'):
      jax.jit(lambda s: tx.update(grads, s, params, layer_stats=stats))(state)

  @parameterized.named_parameters(_cases(_PUBLIC))
  def test_wrong_feature_size(self, name):
    self._check(name, lambda a, g: (a[..., :7], g))

  @parameterized.named_parameters(_cases(_PUBLIC))
  def test_batch_sizes_differ(self, name):
    self._check(name, lambda a, g: (a, g[:, :-1]))


class IntegerLeafTest(parameterized.TestCase):
  """i. Weight decay never moves an integer leaf."""

  @parameterized.named_parameters(
      ('adafisherw', 'adafisherw'),
      ('adafisher_l2', 'adafisher'),
      ('kfac_l2', 'kfac'),
      ('tkfac_l2', 'tkfac'),
      ('ekfac_l2', 'ekfac'),
      ('tekfac_l2', 'tekfac'),
      ('mini_block_fisher', 'mini_block_fisher'),
  )
  def test_integer_leaf_not_decayed(self, name):
    model = Mlp()
    params, x, y = _data(model)
    tx = _make(name, weight_decay=0.1)
    value_grad_and_stats = fo.linen.value_grad_and_stats(_loss(model))
    count = jnp.array([5, 7], jnp.int32)

    @jax.jit
    def step(params, state):
      net = {k: v for k, v in params.items() if k != 'count'}
      _, grads, stats = value_grad_and_stats(net, x, y)
      grads = dict(grads, count=jnp.zeros_like(params['count']))
      updates, state = tx.update(grads, state, params, layer_stats=stats)
      return optax.apply_updates(params, updates), state, updates

    p = dict(params, count=count)
    state = tx.init(p)
    for _ in range(3):
      p, state, updates = step(p, state)
      np.testing.assert_array_equal(updates['count'], 0)
    self.assertEqual(p['count'].dtype, jnp.int32)
    np.testing.assert_array_equal(p['count'], count)
    self.assertEqual(_not_finite({k: v for k, v in p.items()
                                  if k != 'count'}), [])


if __name__ == '__main__':
  absltest.main()
