"""A model zoo: public-style Flax models trained by every optimizer, unedited.

Each model below is written the way public Flax code writes it (the Flax
examples, big_vision, the vision_transformer repository, the Flax and NNX
guides), with nothing added for fisher_optax: stock layers, ``nn.Dropout``
with a ``'dropout'`` rng, ``BatchNorm`` statistics returned through
``mutable=``, ``nn.RNN`` cells, ``nn.scan`` over depth, NNX models with
``nnx.Rngs`` and ``nnx.Optimizer``. Each model is trained for a few jitted
steps on a fixed batch by each optimizer of the package, and must lower its
loss, stay finite and move every trainable parameter. ``fo.coverage`` of
each model says which parameters get curvature and which the fallback.

The optimizers are built as a user builds them: the learning rate, and
``loss_scale=`` for the VAE's loss summed over pixels. No ``layers=``: since
``init(params)`` infers stacked, attention and multi-output layouts, every
model here trains without it (before that, the Kronecker optimizers and MBF
needed it for the attention, scanned and recurrent models). ``_optimizer``
is the one place to pass it again should a model need it.
"""

import dataclasses
import functools
import inspect
from typing import Any, Callable

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fisher_optax as fo

STEPS = 5
BATCH = 8

# Learning rates at the default dampings that lower every model's loss
# within 5 steps: AdaFisher's is its default, MBF's its former fixed one,
# the Kronecker family's is in natural-gradient units (docs/choosing.md).
LEARNING_RATES = {
    'adafisher': 1e-3,
    'adafisherw': 1e-3,
    'kfac': 1e-3,
    'ekfac': 1e-3,
    'tkfac': 1e-3,
    'tekfac': 1e-3,
    'mini_block_fisher': 1e-5,
}
OPTIMIZERS = tuple(LEARNING_RATES)


# Compiling dominates these tests; XLA's backend optimisations double its
# time and buy nothing for 5 steps of tiny models. Models are initialised
# under it too (as the Flax ImageNet example does with jax.jit): eagerly,
# every op compiles on its own. (nnx.jit has no compiler_options, so the
# nnx.Optimizer path compiles at the default.)
_jit = functools.partial(
    jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def _optimizer(name, loss_scale=1.0, layers=None):
  """The optimizer `name` at its zoo learning rate.

  Args:
    name: a key of `LEARNING_RATES`.
    loss_scale: how many times a mean the loss is (a sum over pixels).
    layers: the layer_stats of one step (shapes only), passed to the
      factories that take `layers=`; None (the user's default) when every
      model trains without it.

  Returns:
    The optimizer.
  """
  factory = getattr(fo, name)
  kwargs = {}
  if layers is not None and 'layers' in inspect.signature(
      factory).parameters:
    kwargs['layers'] = layers
  return factory(LEARNING_RATES[name], loss_scale=loss_scale, **kwargs)


def _normal(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(
      np.float32)


def _integers(seed, high, shape):
  return np.random.default_rng(seed).integers(0, high, shape).astype(
      np.int32)


def _dropout_key(step):
  return jax.random.fold_in(jax.random.key(42), step)


# ---------------------------------------------------------------------------
# 1. Transformer LM (after the Flax lm1b / wmt examples): pre-LN decoder
#    blocks, learned positions, causal self-attention, tied output head.


class MlpBlock(nn.Module):
  mlp_dim: int
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, inputs, deterministic=True):
    x = nn.Dense(self.mlp_dim)(inputs)
    x = nn.gelu(x)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    x = nn.Dense(inputs.shape[-1])(x)
    return nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)


class DecoderBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, inputs, decoder_mask=None, deterministic=True):
    x = nn.LayerNorm()(inputs)
    x = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dropout_rate=self.dropout_rate,
        deterministic=deterministic)(x, mask=decoder_mask)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    x = x + inputs
    z = nn.LayerNorm()(x)
    z = MlpBlock(self.mlp_dim, self.dropout_rate)(z, deterministic)
    return x + z


class TransformerLM(nn.Module):
  vocab_size: int = 16
  max_len: int = 8
  emb_dim: int = 16
  num_heads: int = 2
  num_layers: int = 2
  mlp_dim: int = 32
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, tokens, train=False):
    embed = nn.Embed(self.vocab_size, self.emb_dim,
                     embedding_init=nn.initializers.normal(stddev=1.0),
                     name='embed')
    x = embed(tokens)
    pos = self.param('pos_embedding', nn.initializers.normal(stddev=0.02),
                     (1, self.max_len, self.emb_dim))
    x = x + pos[:, :tokens.shape[1]]
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
    mask = nn.make_causal_mask(tokens)
    for i in range(self.num_layers):
      x = DecoderBlock(self.num_heads, self.mlp_dim, self.dropout_rate,
                       name=f'decoderblock_{i}')(x, mask, not train)
    x = nn.LayerNorm(name='decoder_norm')(x)
    return embed.attend(x)


# ---------------------------------------------------------------------------
# 2. ResNet (the Flax ImageNet example, scaled down).

ModuleDef = Any


class ResNetBlock(nn.Module):
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = self.norm()(y)
    y = self.act(y)
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides,
                           name='conv_proj')(residual)
      residual = self.norm(name='norm_proj')(residual)
    return self.act(residual + y)


class ResNet(nn.Module):
  stage_sizes: tuple[int, ...] = (1, 1)
  num_classes: int = 4
  num_filters: int = 8
  act: Callable = nn.relu

  @nn.compact
  def __call__(self, x, train=True):
    conv = functools.partial(nn.Conv, use_bias=False)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9, epsilon=1e-5)
    x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)],
             name='conv_init')(x)
    x = norm(name='bn_init')(x)
    x = nn.relu(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    for i, block_size in enumerate(self.stage_sizes):
      for j in range(block_size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = ResNetBlock(self.num_filters * 2**i, strides=strides, conv=conv,
                        norm=norm, act=self.act)(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


# ---------------------------------------------------------------------------
# 3. LSTM sequence classifier.


class LSTMClassifier(nn.Module):
  vocab_size: int = 16
  embed_dim: int = 8
  hidden_size: int = 16
  num_classes: int = 4

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab_size, self.embed_dim)(tokens)
    x = nn.RNN(nn.OptimizedLSTMCell(self.hidden_size))(x)
    return nn.Dense(self.num_classes)(x[:, -1])


# ---------------------------------------------------------------------------
# 4. Seq2seq (after the Flax seq2seq example): an LSTM encoder whose final
#    state starts a GRU decoder, trained with teacher forcing.


class Seq2seq(nn.Module):
  vocab_size: int = 12
  hidden_size: int = 16

  @nn.compact
  def __call__(self, encoder_inputs, decoder_inputs):
    encoder = nn.RNN(nn.LSTMCell(self.hidden_size), return_carry=True,
                     name='encoder')
    (_, h), _ = encoder(jax.nn.one_hot(encoder_inputs, self.vocab_size))
    decoder = nn.RNN(nn.GRUCell(self.hidden_size), name='decoder')
    y = decoder(jax.nn.one_hot(decoder_inputs, self.vocab_size),
                initial_carry=h)
    return nn.Dense(self.vocab_size, name='logits')(y)


# ---------------------------------------------------------------------------
# 5. VAE (the Flax VAE example, scaled down; the noise from a 'sample' rng).


class Encoder(nn.Module):
  latents: int

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(32, name='fc1')(x)
    x = nn.relu(x)
    mean_x = nn.Dense(self.latents, name='fc2_mean')(x)
    logvar_x = nn.Dense(self.latents, name='fc2_logvar')(x)
    return mean_x, logvar_x


class Decoder(nn.Module):

  @nn.compact
  def __call__(self, z):
    z = nn.Dense(32, name='fc1')(z)
    z = nn.relu(z)
    return nn.Dense(64, name='fc2')(z)


class VAE(nn.Module):
  latents: int = 4

  def setup(self):
    self.encoder = Encoder(self.latents)
    self.decoder = Decoder()

  def __call__(self, x):
    mean, logvar = self.encoder(x)
    std = jnp.exp(0.5 * logvar)
    eps = jax.random.normal(self.make_rng('sample'), logvar.shape)
    z = mean + eps * std
    return self.decoder(z), mean, logvar


def binary_cross_entropy_with_logits(logits, labels):
  logits = nn.log_sigmoid(logits)
  return -jnp.sum(labels * logits + (1. - labels) * jnp.log(
      -jnp.expm1(logits)))


def kl_divergence(mean, logvar):
  return -0.5 * jnp.sum(1 + logvar - jnp.square(mean) - jnp.exp(logvar))


# ---------------------------------------------------------------------------
# 6. ViT (after big_vision's vit.py and the vision_transformer repository).


class Encoder1DBlock(nn.Module):
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic=True):
    y = nn.LayerNorm()(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, kernel_init=nn.initializers.xavier_uniform(),
        deterministic=deterministic)(y, y)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    x = x + y
    y = nn.LayerNorm()(x)
    y = nn.Dense(self.mlp_dim,
                 kernel_init=nn.initializers.xavier_uniform())(y)
    y = nn.gelu(y)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    y = nn.Dense(x.shape[-1],
                 kernel_init=nn.initializers.xavier_uniform())(y)
    return x + y


class ViT(nn.Module):
  num_classes: int = 4
  patch_size: tuple[int, int] = (4, 4)
  width: int = 16
  depth: int = 2
  mlp_dim: int = 32
  num_heads: int = 2
  dropout: float = 0.1

  @nn.compact
  def __call__(self, image, *, train=False):
    x = nn.Conv(self.width, self.patch_size, strides=self.patch_size,
                padding='VALID', name='embedding')(image)
    n, h, w, c = x.shape
    x = jnp.reshape(x, [n, h * w, c])
    cls = self.param('cls', nn.initializers.zeros, (1, 1, c))
    x = jnp.concatenate([jnp.tile(cls, [n, 1, 1]), x], axis=1)
    x = x + self.param('pos_embedding', nn.initializers.normal(stddev=0.02),
                       (1, x.shape[1], c))
    x = nn.Dropout(rate=self.dropout)(x, not train)
    for lyr in range(self.depth):
      x = Encoder1DBlock(self.mlp_dim, self.num_heads, self.dropout,
                         name=f'encoderblock_{lyr}')(x, not train)
    x = nn.LayerNorm(name='encoder_norm')(x)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                    name='head')(x[:, 0])


# ---------------------------------------------------------------------------
# 7. MLP-Mixer (the vision_transformer repository's models_mixer.py).


class MixerMlpBlock(nn.Module):
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(self.mlp_dim)(x)
    y = nn.gelu(y)
    return nn.Dense(x.shape[-1])(y)


class MixerBlock(nn.Module):
  tokens_mlp_dim: int
  channels_mlp_dim: int

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm()(x)
    y = jnp.swapaxes(y, 1, 2)
    y = MixerMlpBlock(self.tokens_mlp_dim, name='token_mixing')(y)
    y = jnp.swapaxes(y, 1, 2)
    x = x + y
    y = nn.LayerNorm()(x)
    return x + MixerMlpBlock(self.channels_mlp_dim, name='channel_mixing')(y)


class MlpMixer(nn.Module):
  patches: tuple[int, int] = (4, 4)
  num_classes: int = 4
  num_blocks: int = 2
  hidden_dim: int = 16
  tokens_mlp_dim: int = 8
  channels_mlp_dim: int = 32

  @nn.compact
  def __call__(self, inputs, *, train=False):
    del train
    x = nn.Conv(self.hidden_dim, self.patches, strides=self.patches,
                name='stem')(inputs)
    n, h, w, c = x.shape
    x = jnp.reshape(x, (n, h * w, c))
    for _ in range(self.num_blocks):
      x = MixerBlock(self.tokens_mlp_dim, self.channels_mlp_dim)(x)
    x = nn.LayerNorm(name='pre_head_layer_norm')(x)
    x = jnp.mean(x, axis=1)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                    name='head')(x)


# ---------------------------------------------------------------------------
# 8. U-Net (a small denoiser in the style of the Flax diffusion tutorials).


class ConvBlock(nn.Module):
  features: int
  num_groups: int = 4

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, (3, 3))(x)
    x = nn.GroupNorm(num_groups=self.num_groups)(x)
    x = nn.swish(x)
    x = nn.Conv(self.features, (3, 3))(x)
    x = nn.GroupNorm(num_groups=self.num_groups)(x)
    return nn.swish(x)


class UNet(nn.Module):
  features: tuple[int, ...] = (8, 16)
  out_channels: int = 1

  @nn.compact
  def __call__(self, x):
    skips = []
    for f in self.features[:-1]:
      x = ConvBlock(f)(x)
      skips.append(x)
      x = nn.Conv(f, (3, 3), strides=(2, 2))(x)
    x = ConvBlock(self.features[-1])(x)
    for f, skip in zip(reversed(self.features[:-1]), reversed(skips)):
      x = nn.ConvTranspose(f, (2, 2), strides=(2, 2))(x)
      x = jnp.concatenate([x, skip], axis=-1)
      x = ConvBlock(f)(x)
    return nn.Conv(self.out_channels, (1, 1))(x)


# ---------------------------------------------------------------------------
# 9. NNX CNN (the Flax NNX MNIST tutorial, with BatchNorm and an nnx.Rngs
#    passed to the loss).


class CNN(nnx.Module):

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 8, kernel_size=(3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(8, rngs=rngs)
    self.conv2 = nnx.Conv(8, 16, kernel_size=(3, 3), rngs=rngs)
    self.bn2 = nnx.BatchNorm(16, rngs=rngs)
    self.avg_pool = functools.partial(nnx.avg_pool, window_shape=(2, 2),
                                      strides=(2, 2))
    self.linear1 = nnx.Linear(16 * 2 * 2, 32, rngs=rngs)
    self.dropout = nnx.Dropout(rate=0.1)
    self.linear2 = nnx.Linear(32, 4, rngs=rngs)

  def __call__(self, x, rngs=None):
    x = self.avg_pool(nnx.relu(self.bn1(self.conv1(x))))
    x = self.avg_pool(nnx.relu(self.bn2(self.conv2(x))))
    x = x.reshape(x.shape[0], -1)
    x = self.dropout(nnx.relu(self.linear1(x)), rngs=rngs)
    return self.linear2(x)


# ---------------------------------------------------------------------------
# 10. NNX stack of blocks created with nnx.vmap and applied with nnx.scan
#     (the Flax "scan over layers" guide, as of NNX 0.11: the Dropout
#     streams are split when the blocks are created).


class Block(nnx.Module):

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.linear = nnx.Linear(dim, dim, rngs=rngs)
    self.bn = nnx.BatchNorm(dim, rngs=rngs)
    self.dropout = nnx.Dropout(0.1, rngs=rngs)

  def __call__(self, x):
    return nnx.gelu(self.dropout(self.bn(self.linear(x))))


class ScannedMLP(nnx.Module):

  def __init__(self, dim: int, n_layers: int, *, rngs: nnx.Rngs):
    self.n_layers = n_layers
    self.embed = nnx.Linear(4, dim, rngs=rngs)

    @nnx.split_rngs(splits=n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create_block(rngs: nnx.Rngs):
      return Block(dim, rngs=rngs)

    self.blocks = create_block(rngs)
    self.head = nnx.Linear(dim, 3, rngs=rngs)

  def __call__(self, x):

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(x, model):
      return model(x)

    return self.head(forward(self.embed(x), self.blocks))


# ---------------------------------------------------------------------------
# 11. linen stack of residual blocks under nn.scan over depth, with only
#     'params' in variable_axes (no fo.linen.capture_axes()).


class ScanBlock(nn.Module):
  dim: int

  @nn.compact
  def __call__(self, x, _):
    y = nn.LayerNorm()(x)
    y = nn.Dense(self.dim)(y)
    return x + nn.gelu(y), None


class ScannedResMLP(nn.Module):
  dim: int = 16
  depth: int = 3
  num_classes: int = 4

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.dim)(x)
    blocks = nn.scan(ScanBlock, variable_axes={'params': 0},
                     split_rngs={'params': True}, length=self.depth)
    x, _ = blocks(self.dim, name='blocks')(x, None)
    return nn.Dense(self.num_classes)(x)


# ---------------------------------------------------------------------------
# Tasks: a model, its initial variables, a loss written as public code
# writes it, and the fixed batch.


@dataclasses.dataclass
class LinenTask:
  """A linen model's training problem.

  Attributes:
    params: the initial parameters.
    loss_fn: `loss_fn(params, *args)`, returning the loss or `(loss, aux)`.
    args: `args(carry, step) -> tuple`, the loss's arguments after params.
    has_aux: whether `loss_fn` returns `(loss, aux)`.
    carry: state threaded through the steps (BatchNorm statistics).
    next_carry: `next_carry(aux) -> carry`.
    loss_scale: the loss's size against a batch mean (a sum over pixels).
  """
  params: Any
  loss_fn: Callable[..., Any]
  args: Callable[[Any, Any], tuple[Any, ...]]
  has_aux: bool = False
  carry: Any = None
  next_carry: Callable[[Any], Any] = lambda aux: None
  loss_scale: float = 1.0


@dataclasses.dataclass
class NNXTask:
  """An NNX model's training problem.

  Attributes:
    model: the initial model (tests train `nnx.clone`s of it).
    loss_fn: `loss_fn(model, *args)`.
    args: `args() -> tuple`, fresh arguments after the model (they may hold
      an `nnx.Rngs`, which training advances).
    use_nnx_optimizer: train with `nnx.Optimizer` under `nnx.jit`, else with
      `nnx.split`/`nnx.merge` and `tx.update` under `jax.jit`.
    loss_scale: the loss's size against a batch mean.
  """
  model: nnx.Module
  loss_fn: Callable[..., Any]
  args: Callable[[], tuple[Any, ...]]
  use_nnx_optimizer: bool = True
  loss_scale: float = 1.0


def cross_entropy_loss(logits, labels):
  one_hot = jax.nn.one_hot(labels, logits.shape[-1])
  return optax.softmax_cross_entropy(logits=logits, labels=one_hot).mean()


def _transformer():
  model = TransformerLM()
  tokens = _integers(0, model.vocab_size, (BATCH, model.max_len + 1))
  params = _jit(model.init)(jax.random.key(0), tokens[:, :-1])['params']

  def loss_fn(params, tokens, dropout_rng):
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits = model.apply({'params': params}, inputs, train=True,
                         rngs={'dropout': dropout_rng})
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, targets).mean()

  return LinenTask(params, loss_fn,
                   lambda carry, step: (tokens, _dropout_key(step)))


def _resnet():
  model = ResNet()
  images = _normal(1, (BATCH, 16, 16, 3))
  labels = _integers(2, model.num_classes, (BATCH,))
  variables = _jit(model.init)(jax.random.key(0), images)
  weight_decay = 1e-4

  def loss_fn(params, batch_stats, images, labels):
    logits, new_model_state = model.apply(
        {'params': params, 'batch_stats': batch_stats}, images,
        mutable=['batch_stats'])
    loss = cross_entropy_loss(logits, labels)
    weight_penalty_params = jax.tree_util.tree_leaves(params)
    weight_l2 = sum(jnp.sum(x ** 2) for x in weight_penalty_params
                    if x.ndim > 1)
    weight_penalty = weight_decay * 0.5 * weight_l2
    loss = loss + weight_penalty
    return loss, (new_model_state, logits)

  return LinenTask(
      variables['params'], loss_fn,
      lambda batch_stats, step: (batch_stats, images, labels),
      has_aux=True, carry=variables['batch_stats'],
      next_carry=lambda aux: aux[0]['batch_stats'])


def _lstm():
  model = LSTMClassifier()
  tokens = _integers(3, model.vocab_size, (BATCH, 8))
  labels = _integers(4, model.num_classes, (BATCH,))
  params = _jit(model.init)(jax.random.key(0), tokens)['params']

  def loss_fn(params, tokens, labels):
    logits = model.apply({'params': params}, tokens)
    return cross_entropy_loss(logits, labels)

  return LinenTask(params, loss_fn, lambda carry, step: (tokens, labels))


def _seq2seq():
  model = Seq2seq()
  questions = _integers(5, model.vocab_size, (BATCH, 8))
  answers = _integers(6, model.vocab_size, (BATCH, 8))
  # Teacher forcing: the decoder reads the answer shifted right behind a
  # start token (0) and predicts the answer.
  decoder_inputs = np.pad(answers[:, :-1], ((0, 0), (1, 0)))
  params = _jit(model.init)(jax.random.key(0), questions,
                            decoder_inputs)['params']

  def loss_fn(params, encoder_inputs, decoder_inputs, targets):
    logits = model.apply({'params': params}, encoder_inputs, decoder_inputs)
    return cross_entropy_loss(logits, targets)

  return LinenTask(params, loss_fn,
                   lambda carry, step: (questions, decoder_inputs, answers))


def _vae():
  model = VAE()
  images = (_normal(7, (BATCH, 64)) > 0).astype(np.float32)
  params = _jit(model.init)({'params': jax.random.key(0),
                       'sample': jax.random.key(1)}, images)['params']

  def loss_fn(params, batch, z_rng):
    recon_x, mean, logvar = model.apply({'params': params}, batch,
                                        rngs={'sample': z_rng})
    bce_loss = jax.vmap(binary_cross_entropy_with_logits)(recon_x, batch)
    kld_loss = jax.vmap(kl_divergence)(mean, logvar)
    return jnp.mean(bce_loss + kld_loss)

  return LinenTask(params, loss_fn,
                   lambda carry, step: (images, _dropout_key(step)),
                   loss_scale=64.0)


def _vit():
  model = ViT()
  images = _normal(8, (BATCH, 16, 16, 3))
  labels = _integers(9, model.num_classes, (BATCH,))
  params = _jit(model.init)(jax.random.key(0), images)['params']

  def loss_fn(params, images, labels, dropout_rng):
    logits = model.apply({'params': params}, images, train=True,
                         rngs={'dropout': dropout_rng})
    return cross_entropy_loss(logits, labels)

  return LinenTask(params, loss_fn,
                   lambda carry, step: (images, labels, _dropout_key(step)))


def _mixer():
  model = MlpMixer()
  images = _normal(10, (BATCH, 16, 16, 3))
  labels = _integers(11, model.num_classes, (BATCH,))
  params = _jit(model.init)(jax.random.key(0), images)['params']

  def loss_fn(params, images, labels):
    logits = model.apply({'params': params}, images, train=True)
    return cross_entropy_loss(logits, labels)

  return LinenTask(params, loss_fn, lambda carry, step: (images, labels))


def _unet():
  model = UNet()
  clean = _normal(12, (BATCH, 8, 8, 1))
  noisy = clean + 0.5 * _normal(13, clean.shape)
  params = _jit(model.init)(jax.random.key(0), noisy)['params']

  def loss_fn(params, noisy, clean):
    return jnp.mean((model.apply({'params': params}, noisy) - clean) ** 2)

  return LinenTask(params, loss_fn, lambda carry, step: (noisy, clean))


def _scanned_linen():
  model = ScannedResMLP()
  x = _normal(14, (BATCH, 8))
  labels = _integers(15, model.num_classes, (BATCH,))
  params = _jit(model.init)(jax.random.key(0), x)['params']

  def loss_fn(params, x, labels):
    return cross_entropy_loss(model.apply({'params': params}, x), labels)

  return LinenTask(params, loss_fn, lambda carry, step: (x, labels))


def _nnx_cnn():
  model = CNN(rngs=nnx.Rngs(0))
  images = _normal(16, (BATCH, 8, 8, 1))
  labels = _integers(17, 4, (BATCH,))

  def loss_fn(model, images, labels, rngs):
    logits = model(images, rngs=rngs)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits=logits, labels=labels).mean()

  return NNXTask(model, loss_fn,
                 lambda: (images, labels, nnx.Rngs(dropout=1)))


def _nnx_scan():
  model = ScannedMLP(16, 3, rngs=nnx.Rngs(0))
  x = _normal(18, (BATCH, 4))
  labels = _integers(19, 3, (BATCH,))

  def loss_fn(model, x, labels):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits=logits, labels=labels).mean()

  return NNXTask(model, loss_fn, lambda: (x, labels),
                 use_nnx_optimizer=False)


TASKS = {
    'transformer': _transformer,
    'resnet': _resnet,
    'lstm': _lstm,
    'seq2seq': _seq2seq,
    'vae': _vae,
    'vit': _vit,
    'mixer': _mixer,
    'unet': _unet,
    'nnx_cnn': _nnx_cnn,
    'nnx_scan': _nnx_scan,
    'linen_scan': _scanned_linen,
}


# ---------------------------------------------------------------------------
# Training and coverage.


@functools.cache
def _task(model):
  """TASKS[model]() with its parameters and the layer_stats of one step.

  Built once per process: eager `init` of these models costs as much CPU
  as a compile, and nothing mutates a task (NNX tests train clones).

  Args:
    model: a key of TASKS.

  Returns:
    `(task, params, layers)`: `params` the trainable parameters, `layers`
    the layer_stats shapes from `eval_shape`.
  """
  task = TASKS[model]()
  if isinstance(task, LinenTask):
    step_fn = fo.linen.value_grad_and_stats(task.loss_fn,
                                            has_aux=task.has_aux)
    layers = jax.eval_shape(step_fn, task.params,
                            *task.args(task.carry, 0))[2]
    return task, task.params, layers
  step_fn = fo.nnx.value_grad_and_stats(task.loss_fn)
  layers = nnx.eval_shape(step_fn, task.model, *task.args())[2]
  return task, nnx.state(task.model, nnx.Param), layers


def _train_linen(task, tx):
  """(losses, initial params, final params) after STEPS jitted steps."""
  step_fn = fo.linen.value_grad_and_stats(task.loss_fn, has_aux=task.has_aux)

  @_jit
  def train_step(params, opt_state, carry, step):
    out, grads, stats = step_fn(params, *task.args(carry, step))
    if task.has_aux:
      loss, aux = out
      carry = task.next_carry(aux)
    else:
      loss = out
    updates, opt_state = tx.update(grads, opt_state, params,
                                   layer_stats=stats)
    return optax.apply_updates(params, updates), opt_state, carry, loss

  params, carry = task.params, task.carry
  opt_state = _jit(tx.init)(params)
  losses = []
  for step in range(STEPS):
    params, opt_state, carry, loss = train_step(params, opt_state, carry,
                                                step)
    losses.append(float(loss))
  return losses, task.params, params


def _train_nnx(task, tx):
  """(losses, initial params, final params) after STEPS jitted steps."""
  model, args = nnx.clone(task.model), task.args()
  step_fn = fo.nnx.value_grad_and_stats(task.loss_fn)
  initial = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  losses = []
  if task.use_nnx_optimizer:
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, *args):
      loss, grads, stats = step_fn(model, *args)
      optimizer.update(model, grads, layer_stats=stats)
      return loss

    for _ in range(STEPS):
      losses.append(float(train_step(model, optimizer, *args)))
  else:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @_jit
    def train_step(params, rest, opt_state, *args):
      model = nnx.merge(graphdef, params, rest)
      loss, grads, stats = step_fn(model, *args)
      updates, opt_state = tx.update(grads, opt_state, params,
                                     layer_stats=stats)
      params = optax.apply_updates(params, updates)
      _, _, rest = nnx.split(model, nnx.Param, ...)
      return params, rest, opt_state, loss

    opt_state = _jit(tx.init)(params)
    for _ in range(STEPS):
      params, rest, opt_state, loss = train_step(params, rest, opt_state,
                                                 *args)
      losses.append(float(loss))
    nnx.update(model, params, rest)
  return losses, initial, nnx.state(model, nnx.Param)


def _elements(shape):
  return int(np.prod(shape)) if isinstance(shape, tuple) else 0


def coverage_rows(model):
  """`fo.coverage` of a zoo model, from the layer_stats shapes of one step."""
  _, params, layers = _task(model)
  return fo.coverage(params, layers)


def fallback_parameters(model):
  """{parameter path: element count} of the parameters with no curvature."""
  return {path: _elements(shape)
          for path, shape, _, preconditioner in coverage_rows(model)
          if preconditioner.startswith(('fallback', 'frozen'))}


def coverage_table(models=None):
  """A Markdown table: model, parameters, share with curvature, fallbacks."""
  lines = ['| model | parameters | share with curvature | fallback |',
           '|---|---|---|---|']
  for model in models or TASKS:
    total = sum(_elements(shape) for _, shape, _, _ in coverage_rows(model))
    fallback = fallback_parameters(model)
    share = 1 - sum(fallback.values()) / total
    names = ', '.join(f'`{p}`' for p in sorted(fallback)) or '-'
    lines.append(f'| {model} | {total} | {share:.1%} | {names} |')
  return '\n'.join(lines)


# Parameters that get the optimizers' fallback, and why: the layers fo
# captures are listed in docs/capture.md; everything else is a raw
# self.param or a layer it does not capture.
EXPECTED_FALLBACK = {
    'transformer': {'pos_embedding'},  # a raw self.param
    'resnet': set(),
    'lstm': set(),
    'seq2seq': set(),
    'vae': set(),
    'vit': {'cls', 'pos_embedding'},  # raw self.params
    'mixer': set(),
    # ConvTranspose is not captured (docs/capture.md).
    'unet': {'ConvTranspose_0/bias', 'ConvTranspose_0/kernel'},
    'nnx_cnn': set(),
    'nnx_scan': set(),
    'linen_scan': set(),
}

# Model and optimizer pairs that fail for a reason in the library:
# {(model, optimizer or None for all): 'one line why'}.
_LIBRARY_FAILURES = {}

# The models whose compile takes longest train by default with one
# optimizer of each code path (AdaFisher, K-FAC for the Kronecker engine,
# MBF); the variants, which share those paths (AdaFisherW; EKFAC, TKFAC and
# TEKFAC), run on them with `-m slow`. The small models run everything.
_HEAVY = ('transformer', 'resnet', 'vit', 'mixer', 'unet', 'nnx_cnn',
          'seq2seq')
_VARIANTS = ('adafisherw', 'ekfac', 'tkfac', 'tekfac')


def _cases(slow):
  return [(f'{model}_{opt}', model, opt) for model in TASKS
          for opt in OPTIMIZERS
          if (model in _HEAVY and opt in _VARIANTS) == slow]


class _TrainMixin:

  def check_trains(self, model, opt):
    why = (_LIBRARY_FAILURES.get((model, opt))
           or _LIBRARY_FAILURES.get((model, None)))
    if why:
      self.skipTest(f'library: {why}')
    task = _task(model)[0]
    tx = _optimizer(opt, task.loss_scale)
    if isinstance(task, LinenTask):
      losses, initial, final = _train_linen(task, tx)
    else:
      losses, initial, final = _train_nnx(task, tx)
    self.assertTrue(np.all(np.isfinite(losses)), losses)
    self.assertLess(losses[-1], losses[0], losses)
    paths = [jax.tree_util.keystr(path) for path, _ in
             jax.tree_util.tree_leaves_with_path(initial)]
    unchanged = [
        path for path, old, new in zip(paths, jax.tree.leaves(initial),
                                       jax.tree.leaves(final))
        if not np.any(np.asarray(new) != np.asarray(old))]
    self.assertEqual(unchanged, [], f'parameters that did not move: '
                     f'{unchanged}; losses {losses}')


class ModelZooTest(_TrainMixin, parameterized.TestCase):

  @parameterized.named_parameters(_cases(slow=False))
  def test_trains(self, model, opt):
    self.check_trains(model, opt)


@pytest.mark.slow
class ModelZooVariantsTest(_TrainMixin, parameterized.TestCase):

  @parameterized.named_parameters(_cases(slow=True))
  def test_trains(self, model, opt):
    self.check_trains(model, opt)


class ModelZooCoverageTest(parameterized.TestCase):

  @parameterized.named_parameters((model, model) for model in TASKS)
  def test_coverage(self, model):
    print(f'\n{model}:\n{coverage_rows(model)}')
    self.assertEqual(set(fallback_parameters(model)),
                     EXPECTED_FALLBACK[model])

  def test_coverage_table(self):
    table = coverage_table()
    print('\n' + table)
    self.assertEqual(len(table.splitlines()), 2 + len(TASKS))


if __name__ == '__main__':
  absltest.main()
