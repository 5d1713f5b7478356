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
# # K-FAC on a character-level Transformer
#
# To run it in Colab, upload this `.ipynb` there (*File > Upload
# notebook*) and set `FISHER_OPTAX_SOURCE` in the first code cell to where
# your copy of fisher_optax is (the project has no public home yet).
#
# A small decoder-only Transformer learns tiny Shakespeare one character at
# a time. Its blocks use Flax's stock `nn.MultiHeadDotProductAttention` and
# are stacked with `nn.scan`, so their parameters carry a leading layer
# axis. This notebook shows:
#
# * that the capture sees through `nn.scan` and attention without any
#   change to the model (`fo.coverage`);
# * when an optimizer needs `layers=`, and how to get it for free with
#   `jax.eval_shape`;
# * K-FAC against Adam and Muon, tuned and without any setting (`fo.kfac()`).
#   In the project's convergence study tuned K-FAC reached Adam's final
#   training loss in 0.71x Adam's steps on this model, but a K-FAC step
#   cost about 4x an Adam step on a CPU core (`docs/choosing.md`).

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
import os
import re
import time
import urllib.request

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import fisher_optax as fo

# QUICK=1 (what CI sets) shrinks the model and the number of steps; the full
# configuration is the study's: 4 blocks of width 128, context 128, batch 16.
QUICK = os.environ.get('QUICK') == '1'
WIDTH, DEPTH, HEADS, CONTEXT = (32, 2, 2, 32) if QUICK else (128, 4, 4, 128)
BATCH = 8 if QUICK else 16
STEPS = 30 if QUICK else 300


# %% [markdown]
# ## Data
#
# Tiny Shakespeare (Karpathy's char-rnn corpus, 1.1 MB), bundled in the
# repository's `examples/data`: read from the checkout when there is one,
# otherwise downloaded from the GitHub copy named by `FISHER_OPTAX_SOURCE`. The
# first 90% trains, the last 10% is held out.

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


with open(data_file('tinyshakespeare.txt'), encoding='utf-8') as f:
  text = f.read()
codes = np.frombuffer(text.encode('utf-32-le'), np.uint32)
vocab = np.unique(codes)
ids = np.searchsorted(vocab, codes).astype(np.int32)
chars = [chr(c) for c in vocab]
cut = int(0.9 * len(ids))
train_ids, test_ids = ids[:cut], ids[cut:]
print(f'{len(text):,} characters, vocabulary of {len(chars)}')


def windows(ids, starts):
  """Inputs and next-character targets of the windows at ``starts``."""
  seq = ids[starts[:, None] + np.arange(CONTEXT + 1)]
  return seq[:, :-1], seq[:, 1:]


def batches(seed):
  rng = np.random.default_rng(seed)
  while True:
    yield windows(train_ids, rng.integers(0, len(train_ids) - CONTEXT - 1,
                                          BATCH))


# Fixed, evenly spaced held-out windows: both optimizers see the same.
test_x, test_y = windows(test_ids, np.linspace(
    0, len(test_ids) - CONTEXT - 2, 64).astype(np.int64))


# %% [markdown]
# ## The model
#
# Pre-LayerNorm blocks (causal self-attention, then an MLP) stacked by
# `nn.scan`: one block's code, `DEPTH` copies of its parameters along a
# leading axis, and one compiled block however deep the model is. Positions
# are a learned table.

# %%
class Block(nn.Module):
  width: int
  heads: int

  @nn.compact
  def __call__(self, x, _):
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(
        h, h, mask=mask)
    h = nn.LayerNorm()(x)
    x = x + nn.Dense(self.width)(nn.gelu(nn.Dense(4 * self.width)(h)))
    return x, None


class CharTransformer(nn.Module):
  vocab: int
  width: int
  depth: int
  heads: int
  context: int

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, self.width)(tokens)
    positions = self.param('positions', nn.initializers.normal(0.02),
                           (self.context, self.width))
    x = x + positions[:tokens.shape[1]]
    blocks = nn.scan(Block, variable_axes={'params': 0},
                     split_rngs={'params': True}, length=self.depth)
    x, _ = blocks(self.width, self.heads, name='blocks')(x, None)
    return nn.Dense(self.vocab)(nn.LayerNorm()(x))


model = CharTransformer(len(chars), WIDTH, DEPTH, HEADS, CONTEXT)
params = model.init(jax.random.key(0), test_x[:1])['params']
print(f'{sum(p.size for p in jax.tree.leaves(params)):,} parameters')
attention = params['blocks']['MultiHeadDotProductAttention_0']
print('stacked query kernel:', attention['query']['kernel'].shape,
      '(layers, width, heads, head size)')


def loss_fn(params, x, y):
  logits = model.apply({'params': params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


step_fn = fo.linen.value_grad_and_stats(loss_fn)

# %% [markdown]
# ## What is captured
#
# The capture follows `nn.scan` on its own: the statistics of the scanned
# layers get the same leading layer axis as their parameters. Attention's
# `query`, `key`, `value` and `out` projections are `DenseGeneral` layers and
# are captured; the learned `positions` table is a raw `self.param`, so it
# gets the optimizer's fallback (Adam), as `fo.coverage` says.

# %%
x0, y0 = next(batches(0))
_, _, layer_stats = jax.jit(step_fn)(params, x0, y0)
query = layer_stats['blocks/MultiHeadDotProductAttention_0/query']
print('query statistics: a', query.a.shape, 'g', query.g.shape)
print(fo.coverage(params, layer_stats))

# %% [markdown]
# ## When is `layers=` needed?
#
# The Kronecker optimizers (K-FAC, EKFAC, TKFAC, TEKFAC) and MBF allocate
# their factors in `init(params)`, before any statistics exist, so they
# guess each layer's layout (which axes of a kernel are inputs, outputs, or
# a stack from `nn.scan`) from the parameters alone. The guess is right for
# stock layers: `Dense`, `Conv`, `Embed`, `DenseGeneral` with a bias, Flax
# attention with or without biases, and stacks of them under `nn.scan`, as
# here. The parameters cannot tell a grouped convolution, or a bias-less
# `DenseGeneral` with several output axes; for those, pass the statistics'
# shapes as `layers=`. `jax.eval_shape` gets them without computing
# anything. It is never wrong to pass it:

# %%
layers = jax.eval_shape(step_fn, params, x0, y0)[2]
guessed = jax.tree.map(jnp.shape, fo.kfac(1e-3).init(params))
told = jax.tree.map(jnp.shape, fo.kfac(1e-3, layers=layers).init(params))
print('same factors with and without layers=:', guessed == told)


# %% [markdown]
# A layer the parameters cannot describe: a bias-less `DenseGeneral` with
# two output axes. From its kernel `(8, 4, 4)` alone, the split into input
# and output axes (8 to `4 x 4`, or `8 x 4` to 4) cannot be told. Without
# `layers=` the first update finds that the guess does not match the
# statistics and says what to do; with it, training works.

# %%
class TwoAxisHead(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.DenseGeneral((4, 4), use_bias=False)(x)
    return nn.Dense(1)(h.reshape(h.shape[0], -1))


head = TwoAxisHead()
hx = jnp.ones((16, 8))
head_params = head.init(jax.random.key(0), hx)['params']
head_step = fo.linen.value_grad_and_stats(
    lambda p, x: jnp.mean(head.apply({'params': p}, x) ** 2))


def one_update(tx):
  _, grads, stats = head_step(head_params, hx)
  return tx.update(grads, tx.init(head_params), head_params,
                   layer_stats=stats)


try:
  one_update(fo.kfac(1e-3))
except ValueError as e:
  print('without layers=:', str(e)[:400], '...')
head_layers = jax.eval_shape(head_step, head_params, hx)[2]
one_update(fo.kfac(1e-3, layers=head_layers))
print('with layers=: the update works')


# %% [markdown]
# ## K-FAC against Adam and Muon
#
# Settings from the study on this model: Adam `1e-3`; `optax.contrib.muon`
# `3e-3`; K-FAC learning rate `1e-5` and damping `1e-5`, the best of 25
# settings. K-FAC refreshes its factors every step and its inverses every
# 20 steps (the defaults).
#
# `fo.kfac()` has neither (`docs/adaptive.md`): it chooses its learning
# rate and momentum from a quadratic model of the loss and adapts its
# damping, from the loss linearized once by the capture step, split where
# it calls `model.apply` (the statistics carry it: `update` needs only
# `layer_stats=`). This is the study's
# hardest task for it: it ended within 2% of tuned K-FAC's held-out loss and
# at Adam's, but took 1.11x Adam's steps to reach Adam's training loss
# (Muon 0.99x), and its step costs about one more forward pass than K-FAC's.

# %%
def make_train_step(tx):
  @jax.jit
  def train_step(params, opt_state, x, y):
    loss, grads, layer_stats = step_fn(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   layer_stats=layer_stats)
    return optax.apply_updates(params, updates), opt_state, loss
  return train_step


test_loss = jax.jit(loss_fn)
OPTIMIZERS = {
    'adam': optax.adam(1e-3),
    'muon': optax.contrib.muon(3e-3),
    'kfac': fo.kfac(1e-5, damping=1e-5, layers=layers),
    'kfac()': fo.kfac(layers=layers),
}
results = {}
for name, tx in OPTIMIZERS.items():
  train_step = make_train_step(tx)
  p, opt_state, curve = params, tx.init(params), []
  start = time.perf_counter()
  for _, (x, y) in zip(range(STEPS), batches(seed=1)):
    p, opt_state, loss = train_step(p, opt_state, x, y)
    curve.append(loss)
  curve = np.asarray(jax.device_get(curve)) / np.log(2)
  results[name] = dict(losses=curve, params=p)
  held_out = float(test_loss(p, test_x, test_y)) / np.log(2)
  print(f'{name:6s} final training loss {curve[-5:].mean():.3f} bits/char   '
        f'held-out {held_out:.3f} bits/char   '
        f'{time.perf_counter() - start:.1f} s')

# %%
window = max(1, STEPS // 20)
fig, ax = plt.subplots(figsize=(8, 5))
for name, r in results.items():
  ax.plot(np.convolve(r['losses'], np.ones(window) / window, 'valid'),
          label=name)
ax.set(xlabel='step', ylabel='training loss (bits per character)',
       title=f'{DEPTH} blocks of width {WIDTH}, context {CONTEXT}, '
             f'batch {BATCH}')
ax.legend()
plt.show()


# %% [markdown]
# A sample from the K-FAC model, greedy after a prompt (short training runs
# give Shakespeare-shaped noise).

# %%
@jax.jit
def next_char(params, window, length):
  # Padded on the right: the causal mask keeps the padding out of the
  # prediction at position length - 1.
  logits = model.apply({'params': params}, window[None])[0]
  return jnp.argmax(logits[length - 1])


prompt = 'ROMEO:\n'
tokens = [chars.index(c) for c in prompt]
for _ in range(20 if QUICK else 120):
  window = np.array(tokens[-CONTEXT:], np.int32)
  length = len(window)
  window = np.pad(window, (0, CONTEXT - length))
  tokens.append(int(next_char(results['kfac']['params'], window, length)))
print(''.join(chars[t] for t in tokens))
