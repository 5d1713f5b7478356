"""The adaptive step (``fo.adaptive``) against independent references.

* ``SolveTest``: the 2x2 quadratic model's minimiser against numpy's solve.
* ``TrajectoryTest``: 20 steps on a toy problem against a numpy loop of
  Martens & Grosse's algorithm (model, coefficients, reduction ratio,
  Levenberg-Marquardt damping), in both reduction-ratio modes.
* ``DenseModelTest``: a K-FAC step's learning rate, momentum and update
  against the minimiser of the model built from a dense Fisher (``vmap``
  of per-example gradients) or Gauss-Newton matrix (``jax.jacfwd``).
* ``SafetyTest``: non-finite losses, gradients and a zero direction never
  reach the parameters; the event is counted and the damping grows.
* ``PlumbingTest``: jit without recompilation, ``inject_hyperparams``,
  ``MultiSteps``, Orbax resume, errors that name what is missing.
"""

import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax

import fisher_optax as fo
from fisher_optax import _adaptive


def _numpy_lm(lam, rho, omega, lo=1e-8, hi=1e4):
  if not np.isfinite(rho) or rho < 0.25:
    lam = lam / omega
  elif rho > 0.75:
    lam = lam * omega
  return float(np.clip(lam, lo, hi))


class SolveTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    m = rng.normal(size=(2, 2))
    self.a = m @ m.T + 0.1 * np.eye(2)
    self.b = rng.normal(size=2)

  def test_both_free_is_the_minimiser(self):
    w = jax.jit(_adaptive.solve_quadratic_model)(jnp.asarray(self.a),
                                                 jnp.asarray(self.b))
    np.testing.assert_allclose(w, -np.linalg.solve(self.a, self.b),
                               rtol=1e-5)

  def test_carried_model_is_exact_for_a_scaled_preconditioner(self):
    """With C + lambda I = kappa P^{-1}, the carried model from b alone is
    the exact damped model of (Delta, delta) = (P g, delta)."""
    rng = np.random.default_rng(1)
    m = rng.normal(size=(6, 6))
    c, lam, kappa = m @ m.T, 0.3, 2.5
    p = kappa * np.linalg.inv(c + lam * np.eye(6))
    g, delta = rng.normal(size=6), rng.normal(size=6)
    vs = [p @ g, delta]
    want = np.array([[u @ (c + lam * np.eye(6)) @ v for v in vs]
                     for u in vs])
    gram = np.array([[u @ v for v in vs] for u in vs])
    got = jax.jit(_adaptive.carried_model)(
        jnp.asarray([g @ v for v in vs]), kappa, delta @ c @ delta, lam,
        jnp.asarray(gram))
    np.testing.assert_allclose(got, want, rtol=1e-4,
                               atol=1e-5 * np.abs(want).max())

  def test_nonnegative_part(self):
    """A PSD curvature is kept as is; an indefinite one (a loss not convex
    in the outputs) loses its negative eigenvalue."""
    c = jnp.asarray(self.a, jnp.float32)
    np.testing.assert_array_equal(jax.jit(_adaptive.nonnegative_part)(c), c)
    indefinite = np.array([[1.0, 2.0], [2.0, -0.5]])
    w, v = np.linalg.eigh(indefinite)
    np.testing.assert_allclose(
        _adaptive.nonnegative_part(jnp.asarray(indefinite)),
        v @ np.diag(np.maximum(w, 0)) @ v.T, rtol=1e-6, atol=1e-6)
    self.assertLess(float(np.min(w)), 0.0)  # the case is indefinite

  def test_first_step_and_singular_solve_for_alpha(self):
    a = self.a.copy()
    a[1, :] = a[:, 1] = 0.0  # delta = 0: the first step
    w = _adaptive.solve_quadratic_model(jnp.asarray(a), jnp.asarray(self.b))
    np.testing.assert_allclose(w, [-self.b[0] / a[0, 0], 0.0], rtol=1e-6)
    v = np.array([1.0, 2.0])  # collinear directions: a rank-1 model
    a = np.outer(v, v)
    w = _adaptive.solve_quadratic_model(jnp.asarray(a), jnp.asarray(self.b))
    np.testing.assert_allclose(w, [-self.b[0] / a[0, 0], 0.0], rtol=1e-6)

  @parameterized.parameters(('learning_rate',), ('momentum',))
  def test_one_fixed_coefficient(self, fixed):
    value = 0.3
    w = _adaptive.solve_quadratic_model(jnp.asarray(self.a),
                                        jnp.asarray(self.b),
                                        **{fixed: value})
    i = 0 if fixed == 'learning_rate' else 1
    fixed_w = -value if i == 0 else value
    j = 1 - i
    expected = -(self.b[j] + self.a[j, i] * fixed_w) / self.a[j, j]
    self.assertAlmostEqual(float(w[i]), fixed_w, places=6)
    self.assertAlmostEqual(float(w[j]), expected, places=5)

  def test_levenberg_marquardt(self):
    for rho in (-1.0, 0.1, 0.5, 0.9, np.nan, np.inf):
      got = _adaptive.levenberg_marquardt(
          jnp.asarray(0.01), jnp.asarray(rho), decay=0.5, min_damping=1e-8,
          max_damping=1e4)
      want = _numpy_lm(0.01, rho, 0.5)  # non-finite: grow
      self.assertAlmostEqual(float(got), want, places=8, msg=str(rho))


def _toy_batches(steps, n=12, d=4, seed=0):
  rng = np.random.default_rng(seed)
  # Residuals large enough that log cosh is far from its quadratic model
  # at times: the damping must then grow as well as shrink.
  target = 10.0 * rng.normal(size=d)
  out = []
  for _ in range(steps):
    x = rng.normal(size=(n, d))
    out.append((x, x @ target + 0.3 * rng.normal(size=n)))
  return out


def _log_cosh(r, xp=np):
  # Stable for large |r|, where cosh overflows.
  r = xp.abs(r)
  return r + xp.log1p(xp.exp(-2.0 * r)) - np.log(2.0)


def _toy_loss(theta, x, y):
  return np.mean(_log_cosh(x @ theta - y))


def _numpy_solve(a, b, max_momentum):
  det = a[0, 0] * a[1, 1] - a[0, 1] ** 2
  if det > 1e-6 * a[0, 0] * a[1, 1]:
    w = -np.linalg.solve(a, b)
    if max_momentum is not None and not 0 <= w[1] <= max_momentum:
      mu = min(max(w[1], 0.0), max_momentum)
      w = np.array([-(b[0] + a[0, 1] * mu) / a[0, 0], mu])
    return w
  return np.array([-b[0] / a[0, 0], 0.0])


def _numpy_trajectory(batches, theta, lam, every, decay, max_momentum,
                      model_every=1):
  """Martens & Grosse's adaptive step with an identity preconditioner.

  With ``model_every`` > 1, the steps between exact models take the carried
  model (``fo.adaptive``'s docstring) while it is trusted.
  """
  omega = decay ** every
  delta = np.zeros_like(theta)
  lams, mus, rejected = [], [], 0
  kappa, reference, step_curvature = 1.0, 0.0, 0.0
  # Exact models: all, those of steps off the schedule where the last
  # exact model was not steady (reference 0), and where the carried one
  # was not trusted.
  exact_models = {'all': 0, 'unsteady': 0, 'untrusted': 0}
  for t, (x, y) in enumerate(batches):
    n = len(y)
    r = x @ theta - y
    value = _toy_loss(theta, x, y)
    g = x.T @ np.tanh(r) / n
    s = (1.0 - np.tanh(r) ** 2) / n  # Gauss-Newton of log cosh
    vs = [g, delta]  # the identity preconditioner's direction is g
    gram = np.array([[u @ v for v in vs] for u in vs])
    b = np.array([g @ v for v in vs])
    exact = True
    if model_every > 1:
      # The identity's own curvature along (g, delta) is their Gram matrix.
      carried = kappa * gram
      carried[1, 1] = step_curvature + lam * gram[1, 1]
      w_carried = _numpy_solve(carried, b, max_momentum)
      carried_undamped = carried - lam * gram
      carried_change = (0.5 * w_carried @ carried_undamped @ w_carried
                        + b @ w_carried)
      exact = (t % model_every == 0 or not
               (2.0 * reference <= carried_change < 0))
      if exact and t % model_every:
        exact_models['unsteady' if reference == 0 else 'untrusted'] += 1
    if exact:
      exact_models['all'] += 1
      c = np.array([[(x @ u) @ (s * (x @ v)) for v in vs] for u in vs])
      a = c + lam * gram
      w = _numpy_solve(a, b, max_momentum)
      undamped = c
      measured = a[0, 0] / b[0]
      steady = t > 0 and abs(np.log(measured / kappa)) < np.log(3.0)
      kappa = measured
      reference = None if steady else 0.0
    else:
      w, undamped = w_carried, carried_undamped
    change = 0.5 * w @ undamped @ w + b @ w
    if reference is None:
      reference = change
    step, taken = w[0] * g + w[1] * delta, True
    if t % every == 0:
      new_loss = _toy_loss(theta + step, x, y)
      if new_loss > value:  # rejected: no step, the damping grows
        step, lam, taken = np.zeros_like(theta), lam / omega, False
        rejected += 1
        reference = 0.0
      else:
        lam = _numpy_lm(lam, (new_loss - value) / change, omega)
    step_curvature = w @ undamped @ w if taken else 0.0
    theta = theta + step
    delta = step
    lams.append(lam)
    mus.append(w[1])
  return np.array(lams), np.array(mus), theta, rejected, exact_models


class TrajectoryTest(parameterized.TestCase):

  @parameterized.parameters((None,), (0.5,))
  def test_damping_trajectory_equals_numpy_loop(self, max_momentum):
    steps, every, decay, lam0 = 20, 2, 0.5, 1e-3
    batches = _toy_batches(steps)
    theta0 = np.zeros(4)
    want, mus, want_theta, rejected, _ = _numpy_trajectory(
        batches, theta0, lam0, every, decay, max_momentum)
    self.assertGreater(rejected, 0)  # the rejection must be exercised
    if max_momentum is not None:  # the clip must be exercised
      self.assertTrue(np.any((mus == 0.0) | (mus == max_momentum)))
    # The loop must exercise the rule both ways to test it.
    moves = np.sign(np.diff(np.concatenate([[lam0], want])))
    self.assertIn(1.0, moves)
    self.assertIn(-1.0, moves)
    with jax.enable_x64(True):
      tx = fo.adaptive(optax.identity(), damping=lam0, adapt_every=every,
                       damping_decay=decay, max_momentum=max_momentum)
      got, p, state = _jax_trajectory(tx, batches, theta0)
    self.assertEqual(int(state.rejected), rejected)
    np.testing.assert_allclose(got, want, rtol=1e-9)
    np.testing.assert_allclose(p['w'], want_theta, rtol=1e-8, atol=1e-10)

  @parameterized.parameters((None,), (0.5,))
  def test_carried_model_equals_numpy_loop(self, max_momentum):
    steps, every, decay, lam0, model_every = 60, 4, 0.5, 1e-3, 4
    batches = _toy_batches(steps)
    theta0 = np.zeros(4)
    want, _, want_theta, rejected, exact_models = _numpy_trajectory(
        batches, theta0, lam0, every, decay, max_momentum, model_every)
    # Carried steps, and exact models off the schedule for either reason,
    # must all be exercised.
    self.assertLess(exact_models['all'], steps)
    self.assertGreater(exact_models['unsteady'], 0)
    self.assertGreater(exact_models['untrusted'], 0)
    with jax.enable_x64(True):
      tx = fo.adaptive(optax.identity(), damping=lam0, adapt_every=every,
                       damping_decay=decay, max_momentum=max_momentum,
                       model_every=model_every)
      got, p, state = _jax_trajectory(tx, batches, theta0)
    self.assertEqual(int(state.rejected), rejected)
    self.assertEqual(int(state.exact_models), exact_models['all'])
    np.testing.assert_allclose(got, want, rtol=1e-9)
    # 60 steps amplify float64 rounding to ~1e-8 of the parameters' scale.
    np.testing.assert_allclose(p['w'], want_theta,
                               atol=1e-7 * np.max(np.abs(want_theta)))


def _jax_trajectory(tx, batches, theta0):
  """``tx`` on the toy loss (float64): the damping per step, params, state."""

  def loss(p, x, y):
    return jnp.mean(_log_cosh(x @ p['w'] - y, jnp))

  @jax.jit
  def step(p, state, x, y):
    value, grads = jax.value_and_grad(loss)(p, x, y)
    u, state = tx.update(
        grads, state, p, value=value,
        value_fn=lambda q: loss(q, x, y),
        outputs_fn=lambda q: x @ q['w'],
        outputs_loss=lambda z: jnp.mean(_log_cosh(z - y, jnp)))
    return optax.apply_updates(p, u), state

  p = {'w': jnp.asarray(theta0)}
  state = tx.init(p)
  got = []
  for x, y in batches:
    p, state = step(p, state, jnp.asarray(x), jnp.asarray(y))
    got.append(float(state.damping))
  return got, p, state


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.tanh(nn.Dense(5)(x)))


class DenseModelTest(parameterized.TestCase):
  """One K-FAC step's model against a dense curvature matrix (float64)."""

  @parameterized.parameters(('captured',), ('ggn',))
  def test_coefficients_minimise_the_dense_model(self, curvature):
    with jax.enable_x64(True):
      model = _MLP()
      x = jax.random.normal(jax.random.key(0), (16, 4), jnp.float64)
      y = jax.random.randint(jax.random.key(1), (16,), 0, 3)
      params = jax.tree.map(lambda a: a.astype(jnp.float64),
                            model.init(jax.random.key(2), x)['params'])

      def per_example(p, xi, yi):
        logits = model.apply({'params': p}, xi[None])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yi)

      def outputs_loss(z):
        return jnp.mean(
            optax.softmax_cross_entropy_with_integer_labels(z, y))

      outputs_fn = lambda p: model.apply({'params': p}, x)
      loss_fn = lambda p: outputs_loss(outputs_fn(p))
      step_fn = fo.linen.value_grad_and_stats(loss_fn)
      damping = 0.05
      make_inner = lambda: fo.scale_by_kfac(momentum=0.0, inverse_every=1)
      tx = fo.adaptive(make_inner(), damping=damping, adapt_every=100,
                       max_momentum=None)
      extra = (dict(outputs_fn=outputs_fn, outputs_loss=outputs_loss)
               if curvature == 'ggn' else {})

      @jax.jit
      def step(p, state):
        value, grads, stats = step_fn(p)
        u, state = tx.update(grads, state, p, layer_stats=stats,
                             value=value, value_fn=loss_fn, **extra)
        return u, state

      state = tx.init(params)
      u1, state1 = step(params, state)
      p1 = optax.apply_updates(params, u1)
      u2, state2 = step(p1, state1)

      # The step's inputs: the direction at step 2 and the last update.
      _, grads, stats = step_fn(p1)
      direction, _ = make_inner().update(
          grads, state1.inner, p1, layer_stats=stats,
          damping=state1.damping)
      flat = lambda t: np.asarray(ravel_pytree(t)[0])
      vs = [flat(direction), flat(state1.delta)]
      g = flat(grads)
      if curvature == 'ggn':
        unravel = ravel_pytree(p1)[1]
        jac = jax.jacfwd(lambda v: outputs_fn(unravel(v)).reshape(-1))(
            jnp.asarray(flat(p1)))
        out = outputs_fn(p1)
        hess = jax.hessian(lambda z: outputs_loss(z.reshape(out.shape)))(
            out.reshape(-1))
        cmat = np.asarray(jac.T @ hess @ jac)
      else:
        per = jax.vmap(jax.grad(per_example), (None, 0, 0))(p1, x, y)
        rows = np.stack([flat(jax.tree.map(lambda leaf, i=i: leaf[i], per))
                         for i in range(len(y))])
        cmat = rows.T @ rows / len(y)
      lam = float(state1.damping)  # after the first step's adaptation
      a = np.array([[u @ (cmat @ v) + lam * u @ v for v in vs]
                    for u in vs])
      b = np.array([g @ v for v in vs])
      w = -np.linalg.solve(a, b)
      self.assertAlmostEqual(float(state2.learning_rate), -w[0], delta=1e-8
                             * abs(w[0]))
      self.assertAlmostEqual(float(state2.momentum), w[1],
                             delta=1e-8 * np.abs(w).max())
      np.testing.assert_allclose(flat(u2), w[0] * vs[0] + w[1] * vs[1],
                                 rtol=1e-7, atol=1e-10 * np.abs(flat(u2)).max())
      change = 0.5 * w @ np.array([[u @ (cmat @ v) for v in vs]
                                   for u in vs]) @ w + b @ w
      self.assertAlmostEqual(float(state2.model_change), change,
                             delta=1e-8 * abs(change))


def _setup(**kwargs):
  model = _MLP()
  x = jax.random.normal(jax.random.key(0), (16, 4))
  y = jax.random.randint(jax.random.key(1), (16,), 0, 3)
  params = model.init(jax.random.key(2), x)['params']

  def loss_fn(p, x=x, y=y):
    logits = model.apply({'params': p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  tx = fo.adaptive(fo.scale_by_kfac(momentum=0.0), damping=0.1,
                   **kwargs)
  return params, loss_fn, fo.linen.value_grad_and_stats(loss_fn), tx


def _train_step(tx, step_fn, loss_fn, short=False):
  """``step(params, state) -> (params, state, updates)``, jitted.

  ``short``: only ``layer_stats=`` (the loss from its linearization).
  """
  @jax.jit
  def step(p, state):
    value, grads, stats = step_fn(p)
    loss = {} if short else dict(value=value, value_fn=loss_fn)
    u, state = tx.update(grads, state, p, layer_stats=stats, **loss)
    return optax.apply_updates(p, u), state, u
  return step


class SafetyTest(parameterized.TestCase):

  def _step(self, tx, step_fn, params, state, *, value_fn, grad_fn=None):
    @jax.jit
    def step(p, state):
      value, grads, stats = step_fn(p)
      if grad_fn is not None:
        grads = grad_fn(grads)
      return tx.update(grads, state, p, layer_stats=stats, value=value,
                       value_fn=value_fn)
    return step(params, state)

  def assert_not_taken(self, updates, state, damping=0.1):
    for leaf in jax.tree.leaves(updates):
      np.testing.assert_array_equal(leaf, 0.0)
    self.assertEqual(int(state.rejected), 1)
    omega = 0.95 ** 5
    self.assertAlmostEqual(float(state.damping), damping / omega, places=6)
    for leaf in jax.tree.leaves(state.delta):
      np.testing.assert_array_equal(leaf, 0.0)

  def test_nonfinite_loss_after_the_step_is_not_taken(self):
    params, _, step_fn, tx = _setup()
    u, state = self._step(tx, step_fn, params, tx.init(params),
                          value_fn=lambda p: jnp.nan)
    self.assert_not_taken(u, state)

  def test_step_that_raises_its_loss_is_not_taken(self):
    params, loss_fn, step_fn, tx = _setup()
    u, state = self._step(tx, step_fn, params, tx.init(params),
                          value_fn=lambda p: loss_fn(p) + 1.0)
    self.assert_not_taken(u, state)

  @parameterized.parameters((np.nan,), (np.inf,), (0.0,))
  def test_bad_or_zero_gradient_is_not_taken(self, fill):
    params, loss_fn, step_fn, tx = _setup()

    def poison(grads):
      return jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(fill)
                          if fill != 0.0 else jnp.zeros_like(g), grads)

    u, state = self._step(tx, step_fn, params, tx.init(params),
                          value_fn=loss_fn, grad_fn=poison)
    self.assert_not_taken(u, state)

  def test_recovers_after_a_rejected_step(self):
    params, loss_fn, step_fn, tx = _setup()
    state = tx.init(params)
    _, state = self._step(tx, step_fn, params, state,
                          value_fn=lambda p: jnp.nan)
    u, state = self._step(tx, step_fn, params, state, value_fn=loss_fn)
    self.assertGreater(float(state.learning_rate), 0.0)
    self.assertLess(float(loss_fn(optax.apply_updates(params, u))),
                    float(loss_fn(params)))


class PlumbingTest(parameterized.TestCase):

  def test_trains_without_recompiling(self):
    params, loss_fn, step_fn, tx = _setup()
    step = _train_step(tx, step_fn, loss_fn)
    state = tx.init(params)
    first = float(loss_fn(params))
    for _ in range(12):
      params, state, _ = step(params, state)
    self.assertEqual(step._cache_size(), 1)  # pylint: disable=protected-access
    self.assertLess(float(loss_fn(params)), 0.5 * first)
    self.assertEqual(int(state.rejected), 0)
    self.assertTrue(np.isfinite(float(state.rho)))

  def test_inject_hyperparams(self):
    params, loss_fn, step_fn, _ = _setup()
    tx = optax.inject_hyperparams(fo.adaptive)(
        fo.scale_by_kfac(momentum=0.0), damping=0.1, min_damping=0.5)
    step = _train_step(tx, step_fn, loss_fn)
    state = tx.init(params)
    _, state, _ = step(params, state)
    self.assertGreaterEqual(float(state.inner_state.damping), 0.5)
    # Same dtype and (strong) type as injected: no recompilation.
    state.hyperparams['max_damping'] = jnp.asarray(0.2, jnp.float32)
    state.hyperparams['min_damping'] = jnp.asarray(0.0, jnp.float32)
    for _ in range(5):  # up to the next adaptation step
      _, state, _ = step(params, state)
    self.assertLessEqual(float(state.inner_state.damping), 0.2 + 1e-7)
    self.assertEqual(step._cache_size(), 1)  # pylint: disable=protected-access

  @parameterized.parameters(False, True)
  def test_multi_steps(self, short):
    params, loss_fn, step_fn, tx = _setup()
    tx = optax.MultiSteps(tx, every_k_schedule=2)
    step = _train_step(tx, step_fn, loss_fn, short)
    state = tx.init(params)
    for i in range(4):
      params, state, u = step(params, state)
      moved = any(bool(jnp.any(leaf != 0)) for leaf in jax.tree.leaves(u))
      self.assertEqual(moved, i % 2 == 1, i)
    self.assertEqual(int(state.inner_opt_state.count), 2)

  def test_orbax_resume_is_bitwise(self):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    params, loss_fn, step_fn, tx = _setup(adapt_every=2)
    train = _train_step(tx, step_fn, loss_fn)
    step = lambda p, state: train(p, state)[:2]
    state = tx.init(params)
    for _ in range(3):
      params, state = step(params, state)
    path = tempfile.mkdtemp() + '/ckpt'
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(path, {'params': params, 'state': state})
    with ocp.StandardCheckpointer() as ckptr:
      restored = ckptr.restore(path, jax.tree.map(
          ocp.utils.to_shape_dtype_struct, {'params': params,
                                            'state': state}))
    a = (params, state)
    b = (restored['params'], restored['state'])
    for _ in range(3):
      a = step(*a)
      b = step(*b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)

  def test_fixed_learning_rate_and_momentum_adapt_the_damping_only(self):
    params, loss_fn, step_fn, _ = _setup()
    tx = fo.adaptive(fo.scale_by_kfac(momentum=0.0), damping=0.1,
                     learning_rate=0.1, momentum=0.5, adapt_every=3)
    step = _train_step(tx, step_fn, loss_fn)
    state = tx.init(params)
    dampings = []
    first = float(loss_fn(params))
    for _ in range(7):
      params, state, _ = step(params, state)
      self.assertAlmostEqual(float(state.learning_rate), 0.1, places=6)
      self.assertAlmostEqual(float(state.momentum), 0.5, places=6)
      dampings.append(float(state.damping))
    # The damping moves on steps 0, 3 and 6 only, by a factor of 0.95^3.
    self.assertEqual(dampings[1:3], [dampings[0]] * 2)
    self.assertEqual(dampings[4:6], [dampings[3]] * 2)
    omega = 0.95 ** 3
    for before, after in ((0.1, dampings[0]), (dampings[0], dampings[3])):
      ratio = after / before
      self.assertTrue(any(abs(ratio - r) < 1e-5 * r
                          for r in (1.0, omega, 1 / omega)), ratio)
    self.assertLess(float(loss_fn(params)), first)

  def test_carried_steps_skip_the_model_pass(self):
    """The curvature products (here a pass through outputs_fn) run on the
    exact models' steps only."""
    passes = []

    def outputs_fn(q, x):
      jax.debug.callback(lambda: passes.append(1))
      return x @ q['w']

    tx = fo.adaptive(optax.identity(), damping=1e-3, adapt_every=4,
                     model_every=4)

    @jax.jit
    def step(p, state, x, y):
      loss = lambda q: jnp.mean(_log_cosh(outputs_fn(q, x) - y, jnp))
      value, grads = jax.value_and_grad(loss)(p)
      u, state = tx.update(
          grads, state, p, value=value, value_fn=loss,
          outputs_fn=lambda q: outputs_fn(q, x),
          outputs_loss=lambda z: jnp.mean(_log_cosh(z - y, jnp)))
      return optax.apply_updates(p, u), state

    p = {'w': jnp.zeros(4)}
    state = tx.init(p)
    batches = _toy_batches(40)
    for x, y in batches:
      p, state = step(p, state, jnp.asarray(x), jnp.asarray(y))
      jax.effects_barrier()
    exact = int(state.exact_models)
    self.assertLess(exact, len(batches))
    # Per step: the gradient's pass and, every 4th, the loss after the
    # step; and one more on each exact model's step.
    self.assertLen(passes, len(batches) + len(batches) // 4 + exact)

  def test_errors_name_what_is_missing(self):
    params, loss_fn, step_fn, tx = _setup()
    value, grads, stats = step_fn(params)
    state = tx.init(params)
    with self.assertRaisesRegex(ValueError, 'value_fn='):
      tx.update(grads, state, params, layer_stats=stats, value=value)
    with self.assertRaisesRegex(ValueError, 'layer_stats='):
      tx.update(grads, state, params, value=value, value_fn=loss_fn)
    with self.assertRaisesRegex(ValueError, 'outputs_loss='):
      tx.update(grads, state, params, value=value, value_fn=loss_fn,
                outputs_fn=lambda p: p)
    with self.assertRaisesRegex(ValueError, 'max_momentum'):
      fo.adaptive(fo.scale_by_kfac(), max_momentum=1.0)
    with self.assertRaisesRegex(ValueError, 'damping_decay'):
      fo.adaptive(fo.scale_by_kfac(), damping_decay=1.5)
    with self.assertRaisesRegex(ValueError, 'model_every=2 must divide '
                                'adapt_every=5'):
      fo.adaptive(fo.scale_by_kfac(), model_every=2)
    with self.assertRaisesRegex(ValueError, 'model_every'):
      fo.adaptive(fo.scale_by_kfac(), model_every=0)
    for name in ('kfac', 'ekfac', 'tkfac', 'mini_block_fisher'):
      with self.assertRaisesRegex(
          ValueError, f'^{name}: model_every=5 must divide inverse_every=7'):
        getattr(fo, name)(None, model_every=5, inverse_every=7)

  @parameterized.parameters(('kfac',), ('tkfac',), ('ekfac',), ('tekfac',),
                            ('mini_block_fisher',))
  def test_no_argument_optimizers_train(self, name):
    params, loss_fn, step_fn, _ = _setup()
    tx = getattr(fo, name)(None) if name == 'mini_block_fisher' else (
        getattr(fo, name)())
    self.assertIsInstance(tx.init(params), fo.AdaptiveState)
    step = _train_step(tx, step_fn, loss_fn)
    state = tx.init(params)
    first = float(loss_fn(params))
    for _ in range(10):
      params, state, _ = step(params, state)
    self.assertLess(float(loss_fn(params)), 0.7 * first)


if __name__ == '__main__':
  absltest.main()
