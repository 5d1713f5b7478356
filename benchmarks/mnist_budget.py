r"""Held-out loss on MNIST after the same wall-clock budget per optimizer.

Each optimizer trains the example CNN (``examples/mnist.py``) from the same
initialisation on the same batch order for ``--budget`` seconds of training
(compilation excluded), at each learning rate of its grid; the table reports
the held-out loss and accuracy at every learning rate and marks the best.
K-FAC and TKFAC refresh statistics every 10 steps and inverses every 100.

Usage::

  python benchmarks/mnist_budget.py [--budget 30] [--seed 0]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import optax

import _common
import _mnist_data  # noqa: E402  (on sys.path via _common)
import fisher_optax as fo
from lr_sweep import BATCH
from lr_sweep import make_eval_fn

KRON = dict(damping=1e-2, momentum=0.9, stats_every=10, inverse_every=100)
OPTIMIZERS = {
    'adam': (optax.adam, {}, (1e-3, 3e-3, 1e-2)),
    'adafisher': (fo.adafisher, _common.ADAFISHER_KWARGS, (1e-3, 3e-3, 1e-2)),
    'kfac': (fo.kfac, KRON, (1e-3, 3e-3, 1e-2)),
    'tkfac': (fo.tkfac, KRON, (1e-3, 3e-3, 1e-2)),
}
STATIC = ('stats_every', 'inverse_every', 'mode')


def make_step(name, model):
  """``(tx, train_step)`` with the learning rate in the optimizer state."""
  factory, kwargs, _ = OPTIMIZERS[name]
  loss_fn = _common.make_loss_fn(model)
  static = tuple(k for k in STATIC if k in kwargs)
  tx = optax.inject_hyperparams(factory, static_args=static)(
      learning_rate=1.0, **kwargs)
  if name == 'adam':
    grad_fn = lambda p, x, y: (*jax.value_and_grad(loss_fn)(p, x, y), None)
  else:
    grad_fn = fo.linen.value_grad_and_stats(loss_fn)

  @jax.jit
  def train_step(params, opt_state, x, y):
    loss, grads, stats = grad_fn(params, x, y)
    extra = {} if stats is None else {'layer_stats': stats}
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state, loss

  return tx, train_step


def train_for(budget, tx, train_step, params, lr, data, seed):
  (train_x, train_y), _ = data
  batches = _mnist_data.batches(train_x, train_y, BATCH, seed=seed)
  opt_state = tx.init(params)
  opt_state.hyperparams['learning_rate'] = jnp.asarray(lr, jnp.float32)
  # Compile on a throw-away step, then train from the same start.
  x, y = next(batches)
  jax.block_until_ready(train_step(params, opt_state, x, y))
  steps, start = 0, time.perf_counter()
  while time.perf_counter() - start < budget:
    x, y = next(batches)
    params, opt_state, loss = train_step(params, opt_state, x, y)
    loss.block_until_ready()
    steps += 1
  return params, steps


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--budget', type=float, default=30.0,
                      help='seconds of training per run')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--optimizers', default=','.join(OPTIMIZERS))
  args = parser.parse_args(argv)
  data = _mnist_data.load_split()
  model = _common.CNN()
  init = model.init(jax.random.key(args.seed), data[0][0][:1])['params']
  evaluate = make_eval_fn(model)
  rows = []
  for name in args.optimizers.split(','):
    tx, train_step = make_step(name, model)
    for lr in OPTIMIZERS[name][2]:
      params, steps = train_for(args.budget, tx, train_step, init, lr, data,
                                args.seed)
      loss, acc = evaluate(params, *data[1])
      rows.append((name, lr, steps, loss, acc))
      print(f'  {name} lr={lr:g}: {steps} steps, held-out loss {loss:.4f}',
            flush=True)
  best = {}
  for name, lr, _, loss, _ in rows:
    if name not in best or loss < best[name][1]:
      best[name] = (lr, loss)
  print(f'\n{args.budget:g} s of training per run, batch {BATCH}, '
        f'JAX {jax.__version__} on {jax.default_backend()}')
  print('| optimizer | lr | steps | held-out loss | held-out acc |')
  print('|---|---|---|---|---|')
  for name, lr, steps, loss, acc in rows:
    mark = ' *' if best[name][0] == lr else ''
    print(f'| {name} | {lr:g}{mark} | {steps} | {loss:.4f} | {acc:.2%} |')
  print('* best learning rate of each optimizer (held-out loss)')


if __name__ == '__main__':
  main()
