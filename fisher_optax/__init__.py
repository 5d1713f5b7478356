"""fisher_optax: Fisher-information optimizers as Optax transformations.

Capture per-layer statistics from a Flax model with
:func:`fisher_optax.linen.value_grad_and_stats` (or ``fisher_optax.nnx``),
then pass them to an optimizer's ``update(..., layer_stats=...)``.

Example:
  >>> import flax.linen as nn, jax, jax.numpy as jnp, optax
  >>> import fisher_optax as fo
  >>> model = nn.Dense(1)
  >>> x = jax.random.normal(jax.random.key(0), (32, 3))
  >>> y = x @ jnp.array([[1.0], [-2.0], [0.5]])
  >>> params = model.init(jax.random.key(1), x)['params']
  >>> loss_fn = lambda p: jnp.mean((model.apply({'params': p}, x) - y) ** 2)
  >>> step_fn = fo.linen.value_grad_and_stats(loss_fn)
  >>> tx = fo.kfac(learning_rate=0.5, damping=1e-3)
  >>> opt_state = tx.init(params)
  >>> first = loss_fn(params)
  >>> @jax.jit
  ... def train_step(params, opt_state):
  ...   loss, grads, stats = step_fn(params)
  ...   updates, opt_state = tx.update(grads, opt_state, params,
  ...                                  layer_stats=stats)
  ...   return optax.apply_updates(params, updates), opt_state, loss
  >>> for _ in range(30):
  ...   params, opt_state, loss = train_step(params, opt_state)
  >>> bool(loss_fn(params) < 0.01 * first)
  True
"""

from fisher_optax import capture as _capture  # noqa: F401
from fisher_optax._adafisher import adafisher
from fisher_optax._adafisher import adafisherw
from fisher_optax._adafisher import scale_by_adafisher
from fisher_optax._adafisher import ScaleByAdaFisherState
from fisher_optax._adaptive import adaptive
from fisher_optax._adaptive import AdaptiveState
from fisher_optax._base import LayerMeta
from fisher_optax._base import LayerStats
from fisher_optax._graft import graft
from fisher_optax._graft import GraftState
from fisher_optax._kfac import ekfac
from fisher_optax._kfac import kfac
from fisher_optax._kfac import scale_by_ekfac
from fisher_optax._kfac import scale_by_kfac
from fisher_optax._kronecker import KroneckerState
from fisher_optax._linearization import Linearization
from fisher_optax._linearization import linearization
from fisher_optax._mini_block_fisher import mini_block_fisher
from fisher_optax._mini_block_fisher import mini_block_fisher_warm_start
from fisher_optax._mini_block_fisher import scale_by_mini_block_fisher
from fisher_optax._mini_block_fisher import ScaleByMiniBlockFisherState
from fisher_optax._pairing import coverage
from fisher_optax._pairing import Coverage
from fisher_optax._sharding import assert_replicated
from fisher_optax._sharding import state_shardings
from fisher_optax._tkfac import scale_by_tekfac
from fisher_optax._tkfac import scale_by_tkfac
from fisher_optax._tkfac import tekfac
from fisher_optax._tkfac import tkfac
from fisher_optax.capture import linen
from fisher_optax.capture import nnx

__version__ = '0.1.0'

__all__ = (
    'AdaptiveState',
    'Coverage',
    'GraftState',
    'KroneckerState',
    'LayerMeta',
    'LayerStats',
    'Linearization',
    'ScaleByAdaFisherState',
    'ScaleByMiniBlockFisherState',
    'adafisher',
    'adafisherw',
    'adaptive',
    'assert_replicated',
    'coverage',
    'ekfac',
    'graft',
    'kfac',
    'linearization',
    'linen',
    'mini_block_fisher',
    'mini_block_fisher_warm_start',
    'nnx',
    'scale_by_adafisher',
    'scale_by_ekfac',
    'scale_by_kfac',
    'scale_by_mini_block_fisher',
    'scale_by_tekfac',
    'scale_by_tkfac',
    'state_shardings',
    'tekfac',
    'tkfac',
)
