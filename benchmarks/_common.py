"""Models and jitted train steps shared by the benchmark scripts.

The CNN is the one of ``examples/mnist.py``; the MLP is 784-512-512-10. Both
take MNIST-shaped images ``(batch, 28, 28, 1)``.
"""

from collections.abc import Callable
import dataclasses
import os
import re
import resource
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax

import fisher_optax as fo

# The benchmarks measure the example's model, loss and AdaFisher settings.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'examples'))
from mnist import ADAFISHER_KWARGS  # noqa: E402,F401  pylint: disable=g-import-not-at-top
from mnist import CNN  # noqa: E402  pylint: disable=g-import-not-at-top
from mnist import make_loss_fn  # noqa: E402,F401  pylint: disable=g-import-not-at-top

Params = Any
# train_step(params, opt_state, images, labels) -> (params, opt_state, loss)
TrainStep = Callable[..., tuple[Params, optax.OptState, jax.Array]]


class MLP(nn.Module):
  """784-512-512-10 with ReLU."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(512)(x))
    x = nn.relu(nn.Dense(512)(x))
    return nn.Dense(self.num_classes)(x)


MODELS = {'mlp': MLP, 'cnn': CNN}


def _jit(fn, donate: bool):
  return jax.jit(fn, donate_argnums=(0, 1) if donate else ())


def make_gradient_step(tx: optax.GradientTransformation,
                       loss_fn: Callable[..., jax.Array],
                       donate: bool = False) -> TrainStep:
  """``tx`` on plain gradients of ``loss_fn(params, *batch)``."""

  def train_step(params, opt_state, *batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return _jit(train_step, donate)


def make_adam_step(model: nn.Module, learning_rate: float,
                   donate: bool = False
                   ) -> tuple[optax.GradientTransformation, TrainStep]:
  """Adam on plain gradients from :func:`jax.value_and_grad`."""
  tx = optax.adam(learning_rate)
  return tx, make_gradient_step(tx, make_loss_fn(model), donate)


def make_adafisher_step(model: nn.Module, learning_rate: float,
                        donate: bool = False, **kwargs
                        ) -> tuple[optax.GradientTransformation, TrainStep]:
  """AdaFisher on gradients and statistics captured from the model.

  Args:
    model: the Flax module.
    learning_rate: AdaFisher's learning rate.
    donate: donate ``params`` and ``opt_state`` to the jitted step.
    **kwargs: passed to :func:`fisher_optax.adafisher` (``damping``,
      ``stats_every``, ``mode``, ...).

  Returns:
    ``(tx, train_step)``.
  """
  step_fn = fo.linen.value_grad_and_stats(make_loss_fn(model))
  tx = fo.adafisher(learning_rate, **kwargs)

  def train_step(params, opt_state, x, y):
    loss, grads, layer_stats = step_fn(params, x, y)
    updates, opt_state = tx.update(
        grads, opt_state, params, layer_stats=layer_stats)
    return optax.apply_updates(params, updates), opt_state, loss

  return tx, _jit(train_step, donate)


def make_capture_adam_step(model: nn.Module, learning_rate: float,
                           donate: bool = False
                           ) -> tuple[optax.GradientTransformation, TrainStep]:
  """Adam fed by the capturing step; the statistics are returned, unused.

  This isolates the cost of the capture (the extra perturbation inputs, the
  sown activations and the cotangents kept alive as outputs) from the cost of
  AdaFisher's update. Returning ``layer_stats`` keeps XLA from removing them,
  as AdaFisher's ``lax.cond`` operands do.
  """
  step_fn = fo.linen.value_grad_and_stats(make_loss_fn(model))
  tx = optax.adam(learning_rate)

  def train_step(params, opt_state, x, y):
    loss, grads, layer_stats = step_fn(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, (loss,
                                                             layer_stats)

  return tx, _jit(train_step, donate)


def print_table(header, rows) -> None:
  """Prints ``rows`` under ``header`` as an aligned markdown table."""
  widths = [max(len(str(row[j])) for row in [header] + list(rows))
            for j in range(len(header))]
  line = lambda row: '| ' + ' | '.join(
      str(c).ljust(w) for c, w in zip(row, widths)) + ' |'
  print(line(header))
  print('|' + '|'.join('-' * (w + 2) for w in widths) + '|')
  for row in rows:
    print(line(row))


@dataclasses.dataclass
class Runner:
  """One optimizer: ``run(n)`` steps it, ``sync()`` waits for it."""

  label: str
  periods: tuple[int, int] | None
  run: Callable[[int], None]
  sync: Callable[[], None]
  state: Callable[[], Any]  # current opt_state (ours) or None
  setup_s: float = 0.0
  compiled: Any = None  # the compiled step, where there is one
  # Minor page faults per step in each timed block (interleaved): a step
  # whose temporaries the allocator maps afresh on every call faults on
  # every page it touches (docs/getting_started.md, "Speed on a CPU").
  faults: list[float] = dataclasses.field(default_factory=list)


def optax_runner(label, periods, tx, train_step, params, batch) -> Runner:
  """A jitted optax train step with its own copy of the parameters.

  ``train_step(params, opt_state, *batch) -> (params, opt_state, out)`` is
  compiled here (``setup_s`` records how long that took).
  """
  holder = {'params': jax.tree.map(lambda p: p.copy(), params)}
  holder['opt_state'] = tx.init(holder['params'])
  holder['out'] = None
  start = time.perf_counter()
  compiled = train_step.lower(holder['params'], holder['opt_state'],
                              *batch).compile()

  def run(n):
    for _ in range(n):
      holder['params'], holder['opt_state'], holder['out'] = compiled(
          holder['params'], holder['opt_state'], *batch)

  def sync():
    jax.block_until_ready((holder['params'], holder['opt_state'],
                           holder['out']))

  runner = Runner(label, periods, run, sync, lambda: holder['opt_state'],
                  compiled=compiled)
  runner.setup_s = time.perf_counter() - start
  return runner


def warm_up(runners: list[Runner], steps: int) -> None:
  """Runs ``steps`` untimed steps of each runner (adds to ``setup_s``)."""
  for r in runners:
    start = time.perf_counter()
    r.run(steps)
    r.sync()
    r.setup_s += time.perf_counter() - start


def interleaved(runners: list[Runner], repeats: int, block: int
                ) -> list[list[float]]:
  """Seconds per step of every runner in every repeat, measured side by side.

  Every repeat times one block of ``block`` contiguous steps of each runner
  in turn, the order reversed on every other repeat, so that machine drift
  hits all of them alike.

  Returns:
    ``times[runner][repeat]``.
  """
  times = [[] for _ in runners]
  for rep in range(repeats):
    order = list(enumerate(runners))
    if rep % 2:
      order.reverse()
    for i, r in order:
      r.sync()
      faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      start = time.perf_counter()
      r.run(block)
      r.sync()
      times[i].append((time.perf_counter() - start) / block)
      r.faults.append(
          (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
          / block)
  return times


def allocator() -> str:
  """How this process allocates host memory, for a table's header.

  XLA:CPU allocates a step's temporaries afresh on every call; under
  glibc's defaults an allocation above 32 MiB is a fresh mapping whose
  every page faults when touched (docs/getting_started.md).
  """
  preload = os.environ.get('LD_PRELOAD', '')
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  if preload:
    return f'LD_PRELOAD={preload}'
  if tunables:
    return f'GLIBC_TUNABLES={tunables}'
  return 'glibc malloc defaults'


_COLLECTIVE = re.compile(
    r'= (.*?) (all-gather|all-reduce|reduce-scatter|all-to-all|'
    r'collective-permute)(?:-start)?\(')
_ARRAY = re.compile(r'(pred|s8|s16|s32|s64|u8|u32|bf16|f16|f32|f64)'
                    r'\[([\d,]*)\]')
_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'bf16': 2, 'f16': 2,
          's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'f64': 8}


def collectives(hlo: str) -> tuple[dict[str, int], int]:
  """Counts of each collective in compiled HLO text and their result bytes."""
  counts, total = {}, 0
  for line in hlo.splitlines():
    m = _COLLECTIVE.search(line)
    if not m:
      continue
    counts[m.group(2)] = counts.get(m.group(2), 0) + 1
    for dtype, dims in _ARRAY.findall(m.group(1)):
      size = int(np.prod([int(d) for d in dims.split(',') if d] or [1]))
      total += size * _BYTES[dtype]
  return counts, total
