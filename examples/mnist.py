r"""AdaFisher versus Adam on MNIST with a small Flax linen CNN.

Both optimizers train the same network from the same initial parameters on
the same sequence of batches, for the same number of steps. The script prints
a table of final training loss, held-out accuracy and wall time, and saves the
loss curves to ``<out>/mnist_loss.png``.

The data is the MNIST test set (t10k) bundled in ``examples/data``, split into
8,000 training and 2,000 held-out images with a fixed seed (see
``examples/_mnist_data.py``). The defaults finish in a few minutes on a
two-core CPU, including compilation.

Usage::

  python examples/mnist.py [--steps 400] [--batch-size 128] [--seed 0]
      [--out examples/out]

AdaFisher is fed the per-layer statistics that
:func:`fisher_optax.linen.value_grad_and_stats` captures in the same forward
and backward pass that computes the gradient.
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

# Learning rates from the sweep in benchmarks/lr_sweep.py (same CNN, data
# split, batch size and number of steps as this script).
# Held-out loss at the best lr, 400 steps, mean of 2 seeds: adam 0.087,
# adafisher 0.112 (grids: adam 3e-4..1e-2, adafisher 3e-5..1e-2).
BEST_LR = {'adam': 3e-3, 'adafisher': 3e-3}

# AdaFisher's settings besides the learning rate (the paper's defaults, with
# statistics refreshed every 10 steps); shared with mnist_nnx.py and the sweep.
ADAFISHER_KWARGS = dict(b1=0.9, damping=1e-3, fisher_decay=0.8,
                        stats_every=10, weight_decay=0.0, mode='paper')

# Number of final steps whose mean training loss is reported.
LAST_STEPS = 50

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
    logits = model.apply({'params': params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return loss_fn


def make_adam_step(
    model: nn.Module, learning_rate: float
) -> tuple[optax.GradientTransformation, TrainStep]:
  """Adam on plain gradients from :func:`jax.value_and_grad`."""
  loss_fn = make_loss_fn(model)
  tx = optax.adam(learning_rate)

  @jax.jit
  def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return tx, train_step


def make_adafisher_step(
    model: nn.Module, learning_rate: float
) -> tuple[optax.GradientTransformation, TrainStep]:
  """AdaFisher on gradients and layer statistics captured from the model."""
  step_fn = fo.linen.value_grad_and_stats(make_loss_fn(model))
  tx = fo.adafisher(learning_rate, **ADAFISHER_KWARGS)

  @jax.jit
  def train_step(params, opt_state, x, y):
    loss, grads, layer_stats = step_fn(params, x, y)
    updates, opt_state = tx.update(
        grads, opt_state, params, layer_stats=layer_stats
    )
    return optax.apply_updates(params, updates), opt_state, loss

  return tx, train_step


OPTIMIZERS = {'adam': make_adam_step, 'adafisher': make_adafisher_step}


def train(
    name: str,
    make_step: Callable[..., tuple[optax.GradientTransformation, TrainStep]],
    model: nn.Module,
    params: Params,
    batches: Iterator[Batch],
    steps: int,
    learning_rate: float,
) -> dict[str, Any]:
  """Runs ``steps`` training steps and times them.

  Args:
    name: label for the progress bar.
    make_step: ``make_step(model, learning_rate) -> (tx, train_step)``.
    model: the Flax module.
    params: initial parameters.
    batches: iterator of ``(images, labels)`` numpy batches.
    steps: number of steps.
    learning_rate: passed to ``make_step``.

  Returns:
    A dict with the final ``params``, the per-step ``losses`` (numpy), the
    wall time of all steps ``time_total`` and the wall time without the first
    step ``time_steady``. The first call compiles ``train_step``.
  """
  tx, train_step = make_step(model, learning_rate)
  opt_state = tx.init(params)
  losses = []
  bar = tqdm.trange(steps, desc=f'{name:>9}', unit='step', leave=True)
  start = time.perf_counter()
  first_step_end = start
  for step in bar:
    x, y = next(batches)
    params, opt_state, loss = train_step(params, opt_state, x, y)
    losses.append(loss)
    if step == 0:
      jax.block_until_ready(loss)
      first_step_end = time.perf_counter()
    if step % 50 == 0 or step == steps - 1:
      bar.set_postfix(loss=f'{float(loss):.4f}')
  jax.block_until_ready((params, opt_state))
  end = time.perf_counter()
  return {
      'params': params,
      'losses': np.asarray(jax.device_get(losses), dtype=np.float64),
      'time_total': end - start,
      'time_steady': end - first_step_end,
  }


def make_accuracy_fn(
    model: nn.Module, chunk: int = 1000
) -> Callable[[Params, np.ndarray, np.ndarray], float]:
  """Returns ``accuracy(params, images, labels)``, evaluated in chunks."""

  @jax.jit
  def num_correct(params, x, y):
    logits = model.apply({'params': params}, x)
    return jnp.sum(jnp.argmax(logits, axis=-1) == y)

  def accuracy(params, images, labels):
    correct = 0
    for start in range(0, len(images), chunk):
      x, y = images[start:start + chunk], labels[start:start + chunk]
      correct += int(num_correct(params, x, y))
    return correct / len(images)

  return accuracy


def smooth(values: np.ndarray, window: int = 20) -> np.ndarray:
  """Trailing moving average; the first points average what is available."""
  cumsum = np.cumsum(np.insert(values, 0, 0.0))
  counts = np.minimum(np.arange(1, len(values) + 1), window)
  idx = np.arange(1, len(values) + 1)
  return (cumsum[idx] - cumsum[idx - counts]) / counts


def plot_losses(results: dict[str, dict[str, Any]], path: str) -> None:
  """Saves raw (faint) and smoothed training-loss curves to ``path``."""
  # The object-oriented API needs no pyplot and no display backend.
  fig = figure.Figure(figsize=(6.4, 4.0))
  ax = fig.subplots()
  for i, (name, res) in enumerate(results.items()):
    color = f'C{i}'
    steps = np.arange(1, len(res['losses']) + 1)
    ax.plot(steps, res['losses'], color=color, alpha=0.25, linewidth=0.8)
    ax.plot(
        steps,
        smooth(res['losses']),
        color=color,
        label=f"{name} (lr={res['learning_rate']:g})",
    )
  ax.set_yscale('log')
  ax.set_xlabel('step')
  ax.set_ylabel('training loss (faint: per step; line: 20-step mean)')
  ax.set_title('MNIST CNN (linen): AdaFisher vs Adam')
  ax.grid(True, which='both', alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def print_table(results: dict[str, dict[str, Any]]) -> None:
  """Prints one row per optimizer."""
  header = (
      f'{"optimizer":<10} {"lr":>8} {"train loss":>11} {"test acc":>9} '
      f'{"time (s)":>9} {"excl. compile (s)":>18}'
  )
  print(header)
  print('-' * len(header))
  for name, res in results.items():
    print(
        f'{name:<10} {res["learning_rate"]:>8.0e} '
        f'{res["final_loss"]:>11.4f} {res["test_accuracy"]:>9.2%} '
        f'{res["time_total"]:>9.1f} {res["time_steady"]:>18.1f}'
    )
  print(
      f'train loss: mean over the last {LAST_STEPS} steps. time: all steps, '
      'including the first (compiling) call; excl. compile: all steps after '
      'the first.'
  )


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
  accuracy = make_accuracy_fn(model)
  params = model.init(jax.random.key(args.seed), train_x[:1])['params']

  results = {}
  for name, make_step in OPTIMIZERS.items():
    learning_rate = BEST_LR[name]
    batches = _mnist_data.batches(
        train_x, train_y, args.batch_size, seed=args.seed
    )
    res = train(
        name, make_step, model, params, batches, args.steps, learning_rate
    )
    res['learning_rate'] = learning_rate
    res['final_loss'] = float(np.mean(res['losses'][-LAST_STEPS:]))
    res['test_accuracy'] = accuracy(res['params'], test_x, test_y)
    results[name] = res

  print()
  print_table(results)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, 'mnist_loss.png')
  plot_losses(results, path)
  print(f'Saved loss curves to {path}')


if __name__ == '__main__':
  main()
