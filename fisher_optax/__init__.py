"""fisher_optax: Fisher-information optimizers as Optax transformations."""

from fisher_optax._base import LayerMeta
from fisher_optax._base import LayerStats
from fisher_optax.capture import linen
from fisher_optax.capture import nnx

__version__ = '0.1.0'

__all__ = (
    'LayerMeta',
    'LayerStats',
    'linen',
    'nnx',
)
