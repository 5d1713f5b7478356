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
# # Getting started with fisher_optax
#
# To run it in Colab, upload this `.ipynb` there (*File > Upload
# notebook*) and set `FISHER_OPTAX_SOURCE` in the first code cell to where
# your copy of fisher_optax is (the project has no public home yet).
#
# `fisher_optax` has second-order optimizers (AdaFisher, K-FAC, EKFAC,
# TKFAC, TEKFAC and Mini-Block Fisher) written as Optax gradient
# transformations. They precondition the gradient with per-layer statistics
# (each layer's inputs and output gradients) that `fisher_optax` captures
# from stock Flax layers in the same forward and backward pass that computes
# the gradient. This notebook:
#
# 1. captures the statistics of a small Flax linen MLP on MNIST and shows
#    what each parameter gets (`fo.coverage`);
# 2. trains it with every optimizer of the library, with Adam and Muon, and
#    with `fo.kfac()`, which takes no learning rate or damping at all, and
#    plots the loss against the steps;
# 3. reads the optimizers' states (curvature factors, the count of
#    non-finite values that were kept out of the parameters);
# 4. does the same with a Flax NNX model and `nnx.Optimizer`.

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
import gzip
import os
import re
import time
import urllib.request

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import fisher_optax as fo

# QUICK=1 (what CI sets) shrinks the model, the data and the number of steps
# so that the notebook runs in seconds on a CPU; the full configuration takes
# a few minutes on a Colab CPU.
QUICK = os.environ.get('QUICK') == '1'
STEPS = 30 if QUICK else 400
HIDDEN = 32 if QUICK else 256
BATCH = 64 if QUICK else 128
print(jax.devices(), 'QUICK' if QUICK else 'full configuration')


# %% [markdown]
# ## Data
#
# The MNIST test set (t10k, 10,000 images) that the repository bundles in
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
test_x, test_y = images[perm[8000:]], labels[perm[8000:]]


def batches(seed):
  """Shuffled training batches of ``BATCH`` images, forever."""
  rng = np.random.default_rng(seed)
  while True:
    order = rng.permutation(len(train_x))
    for i in range(0, len(order) - BATCH + 1, BATCH):
      yield train_x[order[i:i + BATCH]], train_y[order[i:i + BATCH]]


print(train_x.shape, test_x.shape)

# %% [markdown]
# ## A linen model and its layer statistics
#
# `fo.linen.value_grad_and_stats(loss_fn)` wraps your own loss function:
# neither the model nor the loss changes. It returns the loss, the gradients
# (equal to `jax.grad(loss_fn)`) and `layer_stats`, a dict keyed by each
# layer's parameter path. Each entry holds the layer's input `a` and the
# gradient of the loss with respect to its output `g`, with shapes
# `(calls, batch, features)`.


# %%
class MLP(nn.Module):
  """A two-layer perceptron on flattened MNIST images."""

  hidden: int

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(10)(x)


model = MLP(HIDDEN)
params = model.init(jax.random.key(0), train_x[:1])['params']


def loss_fn(params, x, y):
  logits = model.apply({'params': params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


step_fn = fo.linen.value_grad_and_stats(loss_fn)
x0, y0 = next(batches(0))
loss, grads, layer_stats = jax.jit(step_fn)(params, x0, y0)
for path, stats in layer_stats.items():
  print(f'{path}: a {stats.a.shape}, g {stats.g.shape}, {stats.meta.kind}')

# %% [markdown]
# `fo.coverage` says which preconditioner each parameter gets. Parameters of
# layers that are not captured (a raw `self.param`, an `nn.ConvTranspose`)
# get the optimizer's fallback (Adam by default) and are listed with why.

# %%
print(fo.coverage(params, layer_stats))

# %% [markdown]
# ## Every optimizer on the same model
#
# Each optimizer is an `optax.GradientTransformationExtraArgs`: its `update`
# takes the statistics as `layer_stats=`. The training step is the usual
# Optax one; nothing is jitted inside the library, `jax.jit` is yours.
#
# `fo.kfac()` with no learning rate chooses its own step (`docs/adaptive.md`):
# every step it picks the learning rate and momentum that minimise a local
# quadratic model of the loss, and every 5 steps it adapts its damping by
# how well that model predicted the loss. Its `update` needs nothing beyond
# `layer_stats=`: the capture step linearized the loss once, split where it
# calls `model.apply`, and the statistics carry that linearization, from
# which the quadratic model takes the loss, the loss after a step and the
# exact Gauss-Newton curvature along the step, with no second pass through
# the model. Optax's optimizers ignore `layer_stats=` inside `optax.chain`,
# so one training step serves them all. In the project's convergence study
# it beat K-FAC tuned over 25 settings on four tasks of five and came within
# 2% of it on the fifth (`docs/choosing.md`).
#
# AdaFisher runs at its defaults (the official code's settings). The
# others' learning rates and dampings follow `docs/choosing.md`: the
# Kronecker family (K-FAC, EKFAC, TKFAC, TEKFAC) takes its learning rate in
# units of a natural-gradient step; MBF wants small learning rates at its
# default damping `1e-4`.

# %%
OPTIMIZERS = {
    'adam': optax.adam(3e-3),
    'muon': optax.contrib.muon(3e-3),
    'kfac()': fo.kfac(),
    'adafisher': fo.adafisher(),
    'adafisherw': fo.adafisherw(weight_decay=1e-2),
    'kfac': fo.kfac(3e-3, damping=1e-2),
    'ekfac': fo.ekfac(3e-3, damping=1e-2),
    'tkfac': fo.tkfac(3e-3, damping=1e-2),
    'tekfac': fo.tekfac(3e-3, damping=1e-2),
    'mini_block_fisher': fo.mini_block_fisher(3e-5, damping=1e-4),
}


def make_train_step(tx):
  """A jitted training step of ``tx``."""

  @jax.jit
  def train_step(params, opt_state, x, y):
    loss, grads, layer_stats = step_fn(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   layer_stats=layer_stats)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


@jax.jit
def accuracy(params, x, y):
  return jnp.mean(jnp.argmax(model.apply({'params': params}, x), -1) == y)


losses, states, final_params = {}, {}, {}
for name, tx in OPTIMIZERS.items():
  train_step = make_train_step(tx)
  p, opt_state, curve = params, tx.init(params), []
  start = time.perf_counter()
  for _, (x, y) in zip(range(STEPS), batches(seed=1)):
    p, opt_state, loss = train_step(p, opt_state, x, y)
    curve.append(loss)
  losses[name] = np.asarray(jax.device_get(curve))
  states[name], final_params[name] = opt_state, p
  print(f'{name:18s} final loss {losses[name][-5:].mean():.3f}  '
        f'held-out accuracy {accuracy(p, test_x, test_y):.3f}  '
        f'({time.perf_counter() - start:.1f} s with compilation)')


# %%
def smooth(curve, window=max(1, STEPS // 20)):
  return np.convolve(curve, np.ones(window) / window, mode='valid')


fig, ax = plt.subplots(figsize=(8, 5))
for name, curve in losses.items():
  ax.plot(smooth(curve), label=name, lw=2.5 if name == 'adam' else 1.5)
ax.set(xlabel='step', ylabel='training loss (moving average)', yscale='log',
       title=f'MLP on MNIST, batch {BATCH}')
ax.legend()
plt.show()

# %% [markdown]
# ## Reading the optimizer state
#
# The states are ordinary Optax states (tuples of named tuples), so
# `optax.tree_utils.tree_get` finds a field by name. Every optimizer counts
# the non-finite values (a gradient, a statistic, a factor or an inverse) it
# refused to use in `nonfinite`: it keeps the previous value instead of
# letting a NaN reach the parameters.

# %%
for name, state in states.items():
  if name not in ('adam', 'muon'):
    print(f'{name:18s} nonfinite = '
          f'{int(optax.tree_utils.tree_get(state, "nonfinite"))}')

# %% [markdown]
# `fo.kfac()` keeps what it chose in its state (`fo.AdaptiveState`): the
# damping λ, the last learning rate α and momentum μ, the reduction ratio ρ
# (the loss change a step achieved over the change its quadratic model
# predicted; near 1 when the model is right), and how many steps it
# rejected because they would have raised the loss.

# %%
adaptive_state = optax.tree_utils.tree_get(states['kfac()'], 'AdaptiveState')
for field in ('damping', 'learning_rate', 'momentum', 'rho', 'rejected'):
  print(f'{field:13s} {float(getattr(adaptive_state, field)):.3g}')

# %% [markdown]
# K-FAC keeps, for each dense layer, an input factor `A` (the covariance of
# the layer's inputs, bias column included) and an output factor `G` (the
# covariance of the output gradients), and their damped inverses. Their
# spectra show how far the curvature is from the identity that a
# first-order method assumes.

# %%
kfac_factors = optax.tree_utils.tree_get(states['kfac'], 'stats')
for layer, factors in kfac_factors.items():
  for factor_name, factor in factors.items():
    eig = np.linalg.eigvalsh(np.asarray(factor, np.float64))
    print(f'{layer} {factor_name} {factor.shape}: eigenvalues '
          f'{eig.min():.2e} .. {eig.max():.2e}')

# %% [markdown]
# AdaFisher keeps a diagonal Kronecker-factored Fisher `h` per layer (the
# diagonal of each factor, min-max normalised into [0, 1], then averaged),
# and MBF its small blocks (here the dense layers' chunks of
# the gradient's second moment).

# %%
adafisher_state = states['adafisher']
for layer, h in optax.tree_utils.tree_get(adafisher_state, 'h').items():
  print('AdaFisher', layer, {k: v.shape for k, v in h.items()})
mbf_stats = optax.tree_utils.tree_get(states['mini_block_fisher'], 'stats')
for layer, blocks in mbf_stats.items():
  print('MBF', layer, {k: v.shape for k, v in blocks.items()})


# %% [markdown]
# ## Flax NNX
#
# With NNX, `fo.nnx.value_grad_and_stats(loss_fn)` takes a loss of the
# model, `loss_fn(model, x, y)`, and `nnx.Optimizer` forwards the statistics
# to the optimizer: `optimizer.update(model, grads, layer_stats=...)`.

# %%
class NnxMLP(nnx.Module):
  """The same two-layer perceptron in NNX."""

  def __init__(self, hidden, *, rngs):
    self.hidden = nnx.Linear(784, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x.reshape((x.shape[0], -1)))))


def nnx_loss_fn(model, x, y):
  logits = model(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


nnx_step_fn = fo.nnx.value_grad_and_stats(nnx_loss_fn)


@nnx.jit
def nnx_train_step(model, optimizer, x, y):
  loss, grads, layer_stats = nnx_step_fn(model, x, y)
  optimizer.update(model, grads, layer_stats=layer_stats)
  return loss


nnx_model = NnxMLP(HIDDEN, rngs=nnx.Rngs(0))
optimizer = nnx.Optimizer(nnx_model, fo.adafisher(), wrt=nnx.Param)
nnx_losses = [nnx_train_step(nnx_model, optimizer, x, y)
              for _, (x, y) in zip(range(STEPS), batches(seed=1))]
nnx_losses = np.asarray(jax.device_get(nnx_losses))
print(f'NNX AdaFisher final loss {nnx_losses[-5:].mean():.3f}')

# The coverage of an NNX model takes its parameter state.
_, _, nnx_stats = nnx.jit(nnx_step_fn)(nnx_model, x0, y0)
print(fo.coverage(nnx.state(nnx_model, nnx.Param), nnx_stats))

# %%
fig, ax = plt.subplots(figsize=(8, 5))
ax.plot(smooth(losses['adafisher']), label='linen AdaFisher')
ax.plot(smooth(nnx_losses), label='NNX AdaFisher', ls='--')
ax.set(xlabel='step', ylabel='training loss (moving average)', yscale='log')
ax.legend()
plt.show()

# %% [markdown]
# ## Next
#
# * `colab_tpu.ipynb`: data-parallel training over all devices with a
#   `Mesh` and `NamedSharding`.
# * `autoencoder.ipynb`: MBF on the MBF paper's deep autoencoder, and
#   `loss_scale=` for a loss summed over pixels.
# * `transformer_lm.ipynb`: a character-level Transformer with attention,
#   `nn.scan` over its blocks, and when an optimizer needs `layers=`.
# * `docs/choosing.md` in the repository: which optimizer to try first, and
#   the learning rates and dampings that worked.
