# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Data-parallel training on a Colab TPU (or any set of devices)
#
# To run it in Colab, upload this `.ipynb` there (*File > Upload
# notebook*) and set `FISHER_OPTAX_SOURCE` in the first code cell to where
# your copy of fisher_optax is (the project has no public home yet).
#
# This notebook trains a small ResNet (with BatchNorm) on MNIST with K-FAC,
# TKFAC and AdaFisher, and with Adam and Muon for comparison, split over
# every device it finds: the batch is sharded along
# a `'data'` mesh axis with `NamedSharding`, the parameters and the
# optimizer states are replicated, and `jax.jit` does the rest. The library
# needs no change for this: the statistics it averages over the batch (the
# Kronecker factors, AdaFisher's diagonals, BatchNorm's moments) become
# all-reduces that XLA inserts where the batch axis is sharded.
#
# It runs unchanged on one CPU, on 8 simulated CPU devices
# (`XLA_FLAGS=--xla_force_host_platform_device_count=8`, how CI runs it)
# and on a TPU (Runtime >
# Change runtime type > TPU). It prints the devices, the time of a training
# step after compilation, and the throughput.

# %%
# On a fresh runtime (Colab) install fisher_optax; where it is already
# importable (a local checkout, CI) nothing is installed. Set the source to
# your copy: a 'git+https://github.com/<owner>/<repo>' URL, or the path of
# a wheel or checkout uploaded to the runtime.
import importlib.util
import os

if importlib.util.find_spec('fisher_optax') is None:
  # Your copy of fisher_optax: put it between the quotes, or set the
  # environment variable (%env FISHER_OPTAX_SOURCE=...).
  os.environ.setdefault('FISHER_OPTAX_SOURCE', '')
  source = os.environ['FISHER_OPTAX_SOURCE']
  if not source:
    raise RuntimeError('Set FISHER_OPTAX_SOURCE (first code cell) to your '
                       'copy of fisher_optax: a git+https URL or a path.')
  from IPython import get_ipython
  get_ipython().run_line_magic(
      'pip', f'install -q "fisher_optax @ {source}"' if '://' in source
      else f'install -q "{source}"')

# %%
import functools
import gzip
import os
import re
import time
import urllib.request

import flax.linen as nn
import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import fisher_optax as fo

# QUICK=1 (what CI sets) shrinks the model and the number of steps.
QUICK = os.environ.get('QUICK') == '1'
STEPS = 30 if QUICK else 300
STAGES = (8, 16) if QUICK else (16, 32, 64)

# %% [markdown]
# ## Devices and the mesh
#
# One mesh axis, `'data'`, over all devices. The global batch must be a
# multiple of the number of devices: each device gets an equal slice.

# %%
devices = jax.devices()
num_devices = len(devices)
print(f'{num_devices} device(s), backend {jax.default_backend()}:')
for d in devices:
  print(' ', d)

mesh = Mesh(np.asarray(devices), ('data',))
data_sharding = NamedSharding(mesh, P('data'))  # split the batch axis
replicated = NamedSharding(mesh, P())           # a full copy on each device

# The study's batch (128) rounded to a multiple of the device count; its
# learning rates were tuned at that batch. On a TPU, a larger batch raises
# the throughput (and may want other learning rates).
per_device = max(1, (64 if QUICK else 128) // num_devices)
BATCH = per_device * num_devices
print(f'global batch {BATCH} = {per_device} per device x {num_devices}')


# %% [markdown]
# ## Data
#
# The MNIST test set (t10k, 10,000 images) bundled in the repository's
# `examples/data`: read from the checkout when there is one, otherwise
# downloaded from the GitHub copy named by `FISHER_OPTAX_SOURCE`. 8,000 images
# train, the other 2,000 are held out.

# %%
def data_file(name):
  """A bundled data file: the checkout's copy, an uploaded one in data/, or
  a download from the GitHub copy that FISHER_OPTAX_SOURCE names."""
  for folder in ('../data', 'examples/data', 'data'):
    if os.path.exists(os.path.join(folder, name)):
      return os.path.join(folder, name)
  match = re.match(r'git\+https://github\.com/([^/]+/[^/@]+?)(?:\.git)?'
                   r'(?:@(.+))?$', os.environ.get('FISHER_OPTAX_SOURCE', ''))
  if match is None:
    raise FileNotFoundError(
        f'{name}: upload examples/data/{name} of your copy to data/, or set '
        'FISHER_OPTAX_SOURCE to a git+https://github.com/... copy.')
  os.makedirs('data', exist_ok=True)
  url = (f'https://raw.githubusercontent.com/{match[1]}/'
         f'{match[2] or "main"}/examples/data/{name}')
  urllib.request.urlretrieve(url, os.path.join('data', name))
  return os.path.join('data', name)


def load_mnist():
  """Images ``(10000, 28, 28, 1)`` in [0, 1] and int32 labels."""
  with gzip.open(data_file('mnist_t10k-images-idx3-ubyte.gz')) as f:
    images = np.frombuffer(f.read(), np.uint8, offset=16)
  with gzip.open(data_file('mnist_t10k-labels-idx1-ubyte.gz')) as f:
    labels = np.frombuffer(f.read(), np.uint8, offset=8)
  images = images.reshape(-1, 28, 28, 1).astype(np.float32) / 255.0
  return images, labels.astype(np.int32)


images, labels = load_mnist()
perm = np.random.default_rng(0).permutation(len(images))
train_x, train_y = images[perm[:8000]], labels[perm[:8000]]
# The held-out set is sharded too, so its size is a multiple of the devices.
num_test = 2000 // num_devices * num_devices
test_x = jax.device_put(images[perm[8000:8000 + num_test]], data_sharding)
test_y = jax.device_put(labels[perm[8000:8000 + num_test]], data_sharding)


def batches(seed):
  """Shuffled training batches, already split over the devices."""
  rng = np.random.default_rng(seed)
  while True:
    order = rng.permutation(len(train_x))
    for i in range(0, len(order) - BATCH + 1, BATCH):
      idx = order[i:i + BATCH]
      yield (jax.device_put(train_x[idx], data_sharding),
             jax.device_put(train_y[idx], data_sharding))


# %% [markdown]
# ## A small ResNet with BatchNorm
#
# A 3x3 stem and one residual block per stage (the second and later stages
# halve the resolution). BatchNorm normalises with the moments of the whole
# global batch: under `jit` its batch mean over a sharded axis is an
# all-reduce, exactly as the library's statistics are.

# %%
class ResidualBlock(nn.Module):
  features: int
  stride: int
  train: bool

  @nn.compact
  def __call__(self, x):
    norm = functools.partial(nn.BatchNorm, use_running_average=not self.train,
                             momentum=0.9)
    h = nn.Conv(self.features, (3, 3), self.stride, use_bias=False)(x)
    h = nn.relu(norm()(h))
    h = norm()(nn.Conv(self.features, (3, 3), use_bias=False)(h))
    if x.shape != h.shape:
      x = norm()(nn.Conv(self.features, (1, 1), self.stride,
                         use_bias=False)(x))
    return nn.relu(x + h)


class ResNet(nn.Module):
  stages: tuple[int, ...]

  @nn.compact
  def __call__(self, x, train):
    x = nn.Conv(self.stages[0], (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    for i, features in enumerate(self.stages):
      x = ResidualBlock(features, 1 if i == 0 else 2, train)(x)
    return nn.Dense(10)(x.mean((1, 2)))


model = ResNet(STAGES)
variables = model.init(jax.random.key(0), train_x[:2], train=True)
params = jax.device_put(variables['params'], replicated)
batch_stats = jax.device_put(variables['batch_stats'], replicated)
print(f'{sum(p.size for p in jax.tree.leaves(params)):,} parameters')


def loss_fn(params, batch_stats, x, y):
  logits, updates = model.apply(
      {'params': params, 'batch_stats': batch_stats}, x, train=True,
      mutable=['batch_stats'])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, updates['batch_stats']


# has_aux=True: the loss also returns BatchNorm's updated running averages.
step_fn = fo.linen.value_grad_and_stats(loss_fn, has_aux=True)


# %% [markdown]
# ## The jitted, data-parallel training step
#
# The step is the one you would write for one device. `out_shardings` keeps
# the parameters, BatchNorm's averages and the optimizer state replicated;
# the inputs' shardings (batch split, the rest replicated) tell XLA the
# rest.

# %%
def make_train_step(tx):

  def train_step(params, batch_stats, opt_state, x, y):
    (loss, new_stats), grads, layer_stats = step_fn(params, batch_stats,
                                                    x, y)
    # `fo.kfac()` (no learning rate) takes its quadratic model from the
    # linearization that `layer_stats` carries: the same batch, BatchNorm
    # statistics and training mode as the loss.
    updates, opt_state = tx.update(grads, opt_state, params,
                                   layer_stats=layer_stats)
    batch_stats = new_stats
    return (optax.apply_updates(params, updates), batch_stats, opt_state,
            loss)

  return jax.jit(train_step, out_shardings=replicated,
                 donate_argnums=(0, 1, 2))


@jax.jit
def accuracy(params, batch_stats, x, y):
  logits = model.apply({'params': params, 'batch_stats': batch_stats}, x,
                       train=False)
  return jnp.mean(jnp.argmax(logits, -1) == y)


# %% [markdown]
# Learning rates and dampings from the project's convergence study on this
# ResNet (`docs/choosing.md`, `benchmarks/results/resnet.md`): Adam 1e-2;
# `optax.contrib.muon` 1e-2; K-FAC 1e-3 with damping 1e-4 and the study's
# advice for this net, statistics every 10 steps and inverses every 100
# (0.75x Adam's steps and 0.85x its time to Adam's final loss there, one
# CPU core); TKFAC 1e-3 with damping 1e-4; AdaFisher at its defaults (the
# official code's settings, within 10% of its tuned result there).
# `fo.kfac()` takes none of these (`docs/adaptive.md`): on this ResNet it
# ended at the study's lowest held-out loss (0.052 against tuned K-FAC's
# 0.064 and Adam's 0.081) and reached Adam's final training loss in 0.64x
# its steps, each step costing about one forward pass more than K-FAC's.

# %%
OPTIMIZERS = {
    'adam': optax.adam(1e-2),
    'muon': optax.contrib.muon(1e-2),
    'kfac()': fo.kfac(),
    'kfac': fo.kfac(1e-3, damping=1e-4, stats_every=10, inverse_every=100),
    'tkfac': fo.tkfac(1e-3, damping=1e-4),
    'adafisher': fo.adafisher(),
}

results = {}
for name, tx in OPTIMIZERS.items():
  train_step = make_train_step(tx)
  # A copy: the step donates (reuses) the buffers of its inputs.
  p = jax.tree.map(jnp.copy, params)
  s = jax.tree.map(jnp.copy, batch_stats)
  opt_state = jax.jit(tx.init, out_shardings=replicated)(p)
  data = batches(seed=1)
  curve = []
  start = time.perf_counter()
  p, s, opt_state, loss = train_step(p, s, opt_state, *next(data))
  loss.block_until_ready()
  compile_time = time.perf_counter() - start
  curve.append(loss)
  start = time.perf_counter()
  for _ in range(STEPS - 1):
    p, s, opt_state, loss = train_step(p, s, opt_state, *next(data))
    curve.append(loss)
  jax.block_until_ready((p, s, opt_state))
  step_time = (time.perf_counter() - start) / (STEPS - 1)
  results[name] = dict(
      losses=np.asarray(jax.device_get(curve)), step_time=step_time,
      accuracy=float(accuracy(p, s, test_x, test_y)))
  print(f'{name:10s} first step (compiles) {compile_time:6.1f} s   '
        f'step {1e3 * step_time:7.1f} ms   '
        f'{BATCH / step_time:9,.0f} examples/s   '
        f'final loss {results[name]["losses"][-5:].mean():.3f}   '
        f'held-out accuracy {results[name]["accuracy"]:.3f}')
print('the optimizer state of the last run lives on',
      jax.tree.leaves(opt_state)[0].sharding)

# %% [markdown]
# The step time includes the host feeding each batch (`device_put` of a
# numpy batch), as a simple input pipeline would; on a TPU a larger model or
# batch is needed before the devices, not the host, set the pace.

# %%
window = max(1, STEPS // 20)
fig, ax = plt.subplots(figsize=(8, 5))
for name, r in results.items():
  ax.plot(np.convolve(r['losses'], np.ones(window) / window, 'valid'),
          label=f'{name} ({1e3 * r["step_time"]:.0f} ms/step)')
ax.set(xlabel='step', ylabel='training loss (moving average)', yscale='log',
       title=f'ResNet on MNIST, {num_devices} {jax.default_backend()} '
             f'device(s), batch {BATCH}')
ax.legend()
plt.show()
