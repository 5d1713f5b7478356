r"""AdaFisher on MNIST with a small Flax NNX CNN.

The NNX version of ``examples/mnist.py`` (same network, data split and
learning rate), trained with ``nnx.Optimizer`` and AdaFisher only. The layer
statistics that AdaFisher needs are captured by
:func:`fisher_optax.nnx.value_grad_and_stats` and passed to
``optimizer.update`` as the ``layer_stats`` keyword argument.

Usage::

  python examples/mnist_nnx.py [--steps 300] [--batch-size 128] [--seed 0]
"""

import argparse
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

import _mnist_data
import fisher_optax as fo
from mnist import ADAFISHER_KWARGS
from mnist import BEST_LR


class CNN(nnx.Module):
  """Two conv layers with average pooling, then two dense layers."""

  def __init__(self, num_classes: int = 10, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, kernel_size=(3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, kernel_size=(3, 3), rngs=rngs)
    self.linear1 = nnx.Linear(7 * 7 * 32, 64, rngs=rngs)
    self.linear2 = nnx.Linear(64, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.avg_pool(nnx.relu(self.conv1(x)), (2, 2), strides=(2, 2))
    x = nnx.avg_pool(nnx.relu(self.conv2(x)), (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nnx.relu(self.linear1(x))
    return self.linear2(x)


def loss_fn(model: CNN, x: jax.Array, y: jax.Array) -> jax.Array:
  logits = model(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


step_fn = fo.nnx.value_grad_and_stats(loss_fn)


@nnx.jit
def train_step(model: CNN, optimizer: nnx.Optimizer, x, y) -> jax.Array:
  loss, grads, layer_stats = step_fn(model, x, y)
  optimizer.update(model, grads, layer_stats=layer_stats)
  return loss


@nnx.jit
def num_correct(model: CNN, x, y) -> jax.Array:
  return jnp.sum(jnp.argmax(model(x), axis=-1) == y)


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--seed', type=int, default=0,
                      help='seed of the initialization and batch order')
  return parser.parse_args()


def main() -> None:
  args = parse_args()
  if args.steps < 1:
    raise ValueError(f'--steps must be positive, got {args.steps}.')
  (train_x, train_y), (test_x, test_y) = _mnist_data.load_split()
  batches = _mnist_data.batches(
      train_x, train_y, args.batch_size, seed=args.seed
  )

  learning_rate = BEST_LR['adafisher']
  model = CNN(rngs=nnx.Rngs(args.seed))
  tx = fo.adafisher(learning_rate, **ADAFISHER_KWARGS)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  losses = []
  start = time.perf_counter()
  for step in (bar := tqdm.trange(args.steps, desc='adafisher', unit='step')):
    x, y = next(batches)
    losses.append(train_step(model, optimizer, x, y))
    if step % 50 == 0 or step == args.steps - 1:
      bar.set_postfix(loss=f'{float(losses[-1]):.4f}')
  jax.block_until_ready(losses[-1])
  elapsed = time.perf_counter() - start

  losses = np.asarray(jax.device_get(losses))
  last = min(50, len(losses))
  correct = sum(
      int(num_correct(model, test_x[i:i + 1000], test_y[i:i + 1000]))
      for i in range(0, len(test_x), 1000)
  )
  print(
      f'AdaFisher (NNX), lr={learning_rate:g}, {args.steps} steps of batch '
      f'{args.batch_size}, {elapsed:.1f} s including compilation.'
  )
  print(f'train loss (mean of last {last} steps): {losses[-last:].mean():.4f}')
  print(f'held-out test accuracy: {correct / len(test_x):.2%}')


if __name__ == '__main__':
  main()
