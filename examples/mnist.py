r"""Adaptive K-FAC (no hyperparameters) against Adam and Muon on MNIST.

Three optimizers train the same small Flax linen CNN from the same initial
parameters on the same sequence of batches, for the same number of steps:

* ``fo.kfac()`` with no arguments: K-FAC whose learning rate, momentum and
  damping come from the local quadratic model every step
  (``docs/adaptive.md``), with the exact Gauss-Newton products of the
  model's outputs, from the capture step's own linearization (its update
  needs only ``layer_stats=``);
* ``optax.adam`` and ``optax.contrib.muon`` at their best learning rates
  (Adam from ``benchmarks/lr_sweep.py`` on this script's setting, Muon from
  the convergence study's CNN sweep, ``benchmarks/results/cnn.md``).

It prints a table (steps to reach Adam's final training loss, final
training loss, held-out loss and accuracy, time per step) and saves the loss
against steps and against seconds to ``<out>/mnist_loss.png``.

The data is the MNIST test set (t10k) bundled in ``examples/data``, split into
8,000 training and 2,000 held-out images with a fixed seed (see
``examples/_mnist_data.py``). The defaults finish in a few minutes on a
two-core CPU, including compilation.

Usage::

  python examples/mnist.py [--steps 400] [--batch-size 128] [--seed 0]
      [--out examples/out]
"""

import argparse
from collections.abc import Callable, Iterator
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from matplotlib import figure
import numpy as np
import optax
import tqdm

import _mnist_data
import fisher_optax as fo

# Learning rates: Adam's from the sweep in benchmarks/lr_sweep.py (same CNN,
# data split, batch size and number of steps as this script; held-out loss
# 0.087 at 400 steps, mean of 2 seeds), Muon's from the convergence study's
# CNN sweep (benchmarks/results/cnn.md), AdaFisher's (mnist_nnx.py) from
# the study's CNN sweep at its default damping and mode.
BEST_LR = {'adam': 3e-3, 'muon': 3e-3, 'adafisher': 1e-3}

# AdaFisher's settings besides the learning rate (its defaults: the official
# code's arithmetic, mode='reference', and damping 1e-3); shared with
# mnist_nnx.py.
ADAFISHER_KWARGS = dict(b1=0.9, fisher_decay=0.8, stats_every=10,
                        weight_decay=0.0)

# Number of final steps whose mean training loss is reported.
LAST_STEPS = 50
# Window of the moving average that decides when a loss is reached.
WINDOW = 20

Params = Any
Batch = tuple[np.ndarray, np.ndarray]
# train_step(params, opt_state, images, labels) -> (params, opt_state, loss)
TrainStep = Callable[..., tuple[Params, optax.OptState, jax.Array]]


class CNN(nn.Module):
  """Two conv layers with average pooling, then two dense layers."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(16, kernel_size=(3, 3))(x)
    x = nn.avg_pool(nn.relu(x), window_shape=(2, 2), strides=(2, 2))
    x = nn.Conv(32, kernel_size=(3, 3))(x)
    x = nn.avg_pool(nn.relu(x), window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(self.num_classes)(x)


def make_loss_fn(model: nn.Module) -> Callable[..., jax.Array]:
  """Returns the mean softmax cross-entropy ``loss_fn(params, x, y)``."""

  def loss_fn(params, x, y):
    return cross_entropy(model.apply({'params': params}, x), y)

  return loss_fn


def cross_entropy(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_gradient_step(
    model: nn.Module, tx: optax.GradientTransformation
) -> tuple[optax.GradientTransformation, TrainStep]:
  """A first-order optimizer on plain gradients (``jax.value_and_grad``)."""
  loss_fn = make_loss_fn(model)

  @jax.jit
  def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return tx, train_step


def make_kfac_step(
    model: nn.Module,
) -> tuple[optax.GradientTransformation, TrainStep]:
  """``fo.kfac()``: no learning rate, momentum or damping to choose.

  Its update needs only the statistics: they carry the loss's linearization,
  from which the quadratic model takes the exact Gauss-Newton products.
  """
  loss_fn = make_loss_fn(model)
  step_fn = fo.linen.value_grad_and_stats(loss_fn)
  tx = fo.kfac()

  @jax.jit
  def train_step(params, opt_state, x, y):
    loss, grads, layer_stats = step_fn(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   layer_stats=layer_stats)
    return optax.apply_updates(params, updates), opt_state, loss

  return tx, train_step


OPTIMIZERS = {
    'fo.kfac()': (make_kfac_step, 'no arguments'),
    'adam': (lambda m: make_gradient_step(m, optax.adam(BEST_LR['adam'])),
             f'lr={BEST_LR["adam"]:g} (tuned)'),
    'muon': (lambda m: make_gradient_step(
        m, optax.contrib.muon(BEST_LR['muon'])),
             f'lr={BEST_LR["muon"]:g} (tuned)'),
}


def train(
    name: str,
    make_step: Callable[[nn.Module],
                        tuple[optax.GradientTransformation, TrainStep]],
    model: nn.Module,
    params: Params,
    batches: Iterator[Batch],
    steps: int,
) -> dict[str, Any]:
  """Runs ``steps`` training steps and times each.

  Args:
    name: label for the progress bar.
    make_step: ``make_step(model) -> (tx, train_step)``.
    model: the Flax module.
    params: initial parameters.
    batches: iterator of ``(images, labels)`` numpy batches.
    steps: number of steps.

  Returns:
    A dict with the final ``params``, the per-step ``losses`` and the
    cumulative ``seconds`` after each step (numpy; the first step, which
    compiles, is excluded from the time: ``seconds[0] = 0``), and
    ``compile_s``.
  """
  tx, train_step = make_step(model)
  opt_state = tx.init(params)
  losses, seconds = [], [0.0]
  bar = tqdm.trange(steps, desc=f'{name:>10}', unit='step', leave=True)
  start = time.perf_counter()
  compile_s = 0.0
  for step in bar:
    x, y = next(batches)
    params, opt_state, loss = train_step(params, opt_state, x, y)
    losses.append(float(loss))  # waits for the step: per-step times
    now = time.perf_counter()
    if step == 0:
      compile_s, start = now - start, now
    else:
      seconds.append(now - start)
    if step % 50 == 0 or step == steps - 1:
      bar.set_postfix(loss=f'{losses[-1]:.4f}')
  return {
      'params': params,
      'losses': np.asarray(losses, dtype=np.float64),
      'seconds': np.asarray(seconds, dtype=np.float64),
      'compile_s': compile_s,
  }


def make_evaluate_fn(
    model: nn.Module, chunk: int = 1000
) -> Callable[[Params, np.ndarray, np.ndarray], tuple[float, float]]:
  """Returns ``evaluate(params, images, labels) -> (loss, accuracy)``."""

  @jax.jit
  def sums(params, x, y):
    logits = model.apply({'params': params}, x)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(losses), jnp.sum(jnp.argmax(logits, axis=-1) == y)

  def evaluate(params, images, labels):
    loss = correct = 0.0
    for start in range(0, len(images), chunk):
      got = sums(params, images[start:start + chunk],
                 labels[start:start + chunk])
      loss, correct = loss + float(got[0]), correct + float(got[1])
    return loss / len(images), correct / len(images)

  return evaluate


def smooth(values: np.ndarray, window: int = 20) -> np.ndarray:
  """Trailing moving average; the first points average what is available."""
  cumsum = np.cumsum(np.insert(values, 0, 0.0))
  counts = np.minimum(np.arange(1, len(values) + 1), window)
  idx = np.arange(1, len(values) + 1)
  return (cumsum[idx] - cumsum[idx - counts]) / counts


def steps_to(losses: np.ndarray, target: float) -> int | None:
  """First step whose ``WINDOW``-step mean loss is at most ``target``."""
  hit = np.nonzero(smooth(losses, WINDOW) <= target)[0]
  return int(hit[0]) + 1 if hit.size else None


def plot_losses(results: dict[str, dict[str, Any]], path: str) -> None:
  """Saves smoothed training-loss curves against steps and seconds."""
  # The object-oriented API needs no pyplot and no display backend.
  fig = figure.Figure(figsize=(11, 4.0))
  axes = fig.subplots(1, 2, sharey=True)
  for i, (name, res) in enumerate(results.items()):
    label = f'{name} ({res["settings"]})'
    curve = smooth(res['losses'], WINDOW)
    axes[0].plot(np.arange(1, len(curve) + 1), curve, color=f'C{i}',
                 label=label)
    axes[1].plot(res['seconds'], curve, color=f'C{i}', label=label)
  for ax, xlabel in zip(axes, ('step', 'seconds (compilation excluded)')):
    ax.set_yscale('log')
    ax.set_xlabel(xlabel)
    ax.grid(True, which='both', alpha=0.3)
  axes[0].set_ylabel(f'training loss ({WINDOW}-step mean)')
  axes[0].legend()
  fig.suptitle('MNIST CNN (linen): fo.kfac() with no arguments, Adam, Muon')
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def print_table(results: dict[str, dict[str, Any]], target: float) -> None:
  """Prints one row per optimizer."""
  header = (f'{"optimizer":<10} {"settings":<16} {"steps to adam":>13} '
            f'{"train loss":>10} {"held-out loss":>13} {"accuracy":>8} '
            f'{"ms/step":>8}')
  print(header)
  print('-' * len(header))
  for name, res in results.items():
    steps = res['steps_to_adam']
    print(f'{name:<10} {res["settings"]:<16} '
          f'{"never" if steps is None else steps:>13} '
          f'{res["final_loss"]:>10.4f} {res["test_loss"]:>13.4f} '
          f'{res["test_accuracy"]:>8.2%} {res["ms_per_step"]:>8.1f}')
  print(f'steps to adam: first step at which the {WINDOW}-step mean training '
        f"loss reaches Adam's final one ({target:.4f}). train loss: mean over "
        f'the last {LAST_STEPS} steps. ms/step: after compilation.')


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=400,
                      help='training steps per optimizer')
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--seed', type=int, default=0,
                      help='seed of the initialization and batch order')
  parser.add_argument(
      '--out',
      default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'out'),
      help='folder for mnist_loss.png',
  )
  return parser.parse_args()


def main() -> None:
  args = parse_args()
  if args.steps < 1:
    raise ValueError(f'--steps must be positive, got {args.steps}.')
  (train_x, train_y), (test_x, test_y) = _mnist_data.load_split()
  print(
      f'MNIST t10k split: {len(train_x)} train / {len(test_x)} held-out '
      f'images; {args.steps} steps of batch {args.batch_size}; '
      f'JAX {jax.__version__} on {jax.devices()[0].platform}.'
  )

  model = CNN()
  evaluate = make_evaluate_fn(model)
  params = model.init(jax.random.key(args.seed), train_x[:1])['params']

  results = {}
  for name, (make_step, settings) in OPTIMIZERS.items():
    batches = _mnist_data.batches(
        train_x, train_y, args.batch_size, seed=args.seed
    )
    res = train(name, make_step, model, params, batches, args.steps)
    res['settings'] = settings
    res['final_loss'] = float(np.mean(res['losses'][-LAST_STEPS:]))
    res['test_loss'], res['test_accuracy'] = evaluate(
        res['params'], test_x, test_y)
    res['ms_per_step'] = 1e3 * res['seconds'][-1] / max(1, args.steps - 1)
    results[name] = res
  target = results['adam']['final_loss']
  for res in results.values():
    res['steps_to_adam'] = steps_to(res['losses'], target)

  print()
  print_table(results, target)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, 'mnist_loss.png')
  plot_losses(results, path)
  print(f'Saved loss curves to {path}')


if __name__ == '__main__':
  main()
