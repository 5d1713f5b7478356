r"""Learning-rate sweep of Adam and AdaFisher on the examples' MNIST split.

Trains the small CNN of ``examples/mnist.py`` on the fixed 8,000 / 2,000
split of MNIST t10k (``examples/_mnist_data.py``) with batches of 128 for
``--steps`` steps, for every learning rate of each optimizer's grid and every
seed, and reports the held-out loss and accuracy at the end. The best
learning rate of each optimizer is the one with the lowest held-out loss
(mean over seeds). If it lies at an edge of the grid, the grid is widened by
half-decades in that direction (up to ``--max-widen`` times per side).

AdaFisher runs in ``'paper'`` mode with ``stats_every=10``, damping 1e-3 and
``fisher_decay`` 0.8 (the settings of ``examples/mnist.py``). In paper mode
the step on coordinates of low curvature is about ``lr / damping``, so its
grid starts well below Adam's.

The seed sets the parameter initialisation and the batch order, as in
``examples/mnist.py``; the data split is always the examples' split. Every
learning rate of a seed starts from the same parameters and sees the same
batches. The learning rate is an injected hyperparameter, so each optimizer
compiles once.

Usage::

  python benchmarks/lr_sweep.py [--steps 400] [--seeds 2]
"""

import argparse
import math
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import _common
import fisher_optax as fo
from study.optimizers import half_decade

import _mnist_data  # noqa: E402  (on sys.path via _common)

BATCH = 128
GRIDS = {
    'adam': (3e-4, 1e-3, 3e-3),
    'adafisher': (3e-5, 1e-4, 3e-4, 1e-3),
}
# The example's settings; weight decay stays out of the injected arguments.
ADAFISHER_KWARGS = {k: v for k, v in _common.ADAFISHER_KWARGS.items()
                    if k != 'weight_decay'}


def make_step(name: str, model):
  """``(tx, train_step)``; the learning rate lives in the optimizer state."""
  loss_fn = _common.make_loss_fn(model)
  if name == 'adam':
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=1.0)

    @jax.jit
    def train_step(params, opt_state, x, y):
      loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    return tx, train_step

  step_fn = fo.linen.value_grad_and_stats(loss_fn)
  tx = optax.inject_hyperparams(
      fo.adafisher, static_args=('stats_every', 'mode'))(
          learning_rate=1.0, **ADAFISHER_KWARGS)

  @jax.jit
  def train_step(params, opt_state, x, y):
    loss, grads, layer_stats = step_fn(params, x, y)
    updates, opt_state = tx.update(
        grads, opt_state, params, layer_stats=layer_stats)
    return optax.apply_updates(params, updates), opt_state, loss

  return tx, train_step


def make_eval_fn(model, chunk: int = 1000):
  """``evaluate(params, x, y) -> (mean loss, accuracy)`` in chunks."""

  @jax.jit
  def sums(params, x, y):
    logits = model.apply({'params': params}, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(loss), jnp.sum(jnp.argmax(logits, -1) == y)

  def evaluate(params, x, y):
    loss = correct = 0.0
    for start in range(0, len(x), chunk):
      chunk_loss, chunk_correct = sums(params, x[start:start + chunk],
                                       y[start:start + chunk])
      loss += float(chunk_loss)
      correct += float(chunk_correct)
    return loss / len(x), correct / len(x)

  return evaluate


def run(tx, train_step, evaluate, params, lr: float, seed: int, steps: int,
        data) -> dict[str, Any]:
  """Trains from ``params`` for ``steps`` steps and evaluates."""
  (train_x, train_y), (test_x, test_y) = data
  opt_state = tx.init(params)
  opt_state.hyperparams['learning_rate'] = jnp.asarray(lr, jnp.float32)
  batches = _mnist_data.batches(train_x, train_y, BATCH, seed=seed)
  losses = []
  for _ in range(steps):
    x, y = next(batches)
    params, opt_state, loss = train_step(params, opt_state, x, y)
    losses.append(loss)
  losses = np.asarray(jax.device_get(losses), np.float64)
  test_loss, test_acc = evaluate(params, test_x, test_y)
  if not np.isfinite(test_loss):
    test_loss = math.inf
  return {'train_loss': float(np.mean(losses[-50:])),
          'test_loss': test_loss, 'test_acc': test_acc}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=400)
  parser.add_argument('--seeds', type=int, default=2,
                      help='number of seeds (0, 1, ...)')
  parser.add_argument('--max-widen', type=int, default=2,
                      help='most half-decades added on each side of a grid')
  parser.add_argument('--optimizers', default='adam,adafisher')
  args = parser.parse_args(argv)

  data = _mnist_data.load_split()
  (train_x, _), (test_x, _) = data
  print(f'MNIST t10k split: {len(train_x)} train / {len(test_x)} held-out; '
        f'CNN, batch {BATCH}, {args.steps} steps, seeds '
        f'{list(range(args.seeds))}; JAX {jax.__version__} on '
        f'{jax.default_backend()}')
  print(f'adafisher: {ADAFISHER_KWARGS}')
  model = _common.CNN()
  evaluate = make_eval_fn(model)
  inits = {seed: model.init(jax.random.key(seed), train_x[:1])['params']
           for seed in range(args.seeds)}

  start = time.perf_counter()
  results = {}  # (name, lr) -> list of per-seed dicts
  best = {}
  for name in args.optimizers.split(','):
    tx, train_step = make_step(name, model)
    grid = sorted(GRIDS[name])
    done = set()
    widened = {True: 0, False: 0}
    while True:
      for lr in grid:
        if lr in done:
          continue
        t0 = time.perf_counter()
        results[(name, lr)] = [
            run(tx, train_step, evaluate, inits[seed], lr, seed, args.steps,
                data) for seed in range(args.seeds)]
        done.add(lr)
        mean_loss = statistics.mean(
            r['test_loss'] for r in results[(name, lr)])
        print(f'  {name} lr={lr:g}: held-out loss {mean_loss:.4f} '
              f'({time.perf_counter() - t0:.0f}s)', flush=True)
      score = {lr: statistics.mean(r['test_loss']
                                   for r in results[(name, lr)])
               for lr in grid}
      best[name] = min(grid, key=score.get)
      edge = {grid[0]: False, grid[-1]: True}.get(best[name])
      if edge is None or widened[edge] >= args.max_widen:
        break
      widened[edge] += 1
      grid = sorted(grid + [half_decade(grid[-1] if edge else grid[0],
                                        up=edge)])
      print(f'  {name}: best lr {best[name]:g} at the edge, adding '
            f'{grid[-1] if edge else grid[0]:g}', flush=True)

  print()
  header = ('optimizer', 'lr', 'held-out loss', 'held-out acc',
            'train loss (last 50)', 'per-seed held-out loss')
  rows = []
  for (name, lr), res in sorted(results.items()):
    mark = ' *' if best[name] == lr else ''
    rows.append((
        name, f'{lr:g}{mark}',
        f'{statistics.mean(r["test_loss"] for r in res):.4f}',
        f'{statistics.mean(r["test_acc"] for r in res):.2%}',
        f'{statistics.mean(r["train_loss"] for r in res):.4f}',
        ', '.join(f'{r["test_loss"]:.4f}' for r in res)))
  widths = [max(len(row[j]) for row in [header] + rows)
            for j in range(len(header))]
  line = lambda row: '| ' + ' | '.join(
      c.ljust(w) for c, w in zip(row, widths)) + ' |'
  print(line(header))
  print('|' + '|'.join('-' * (w + 2) for w in widths) + '|')
  for row in rows:
    print(line(row))
  print(f'* best by mean held-out loss over {args.seeds} seed(s); '
        f'accuracy on the 2,000 held-out images; sweep took '
        f'{time.perf_counter() - start:.0f}s')
  print('BEST_LR = {' + ', '.join(f"'{k}': {v:g}" for k, v in best.items())
        + '}')


if __name__ == '__main__':
  main()
