"""Imports kfac-jax, patched to run on the installed JAX.

kfac-jax 0.0.8 (the latest PyPI release) does not run on JAX 0.9.2 or newer:
its jaxpr interpreter, ``tag_graph_matcher.eval_jaxpr_eqn``, unpacks two
values from ``Primitive.get_bind_params``, which returns one since JAX 0.9.2,
so the first curvature update fails with ``ValueError: too many values to
unpack``. kfac-jax's GitHub ``main`` has the fix (``get_bind_params`` returns
the bind parameters alone); :func:`import_kfac_jax` installs that version of
the function, and only for the pairing that needs it. The benchmark
``benchmarks/kronecker.py`` and the test ``tests/test_kfac_jax_parity.py``
both import kfac-jax through it.

Install kfac-jax with ``pip install -e '.[kfac]'``.
"""

import importlib
import re
from types import ModuleType

import jax

# get_bind_params returns only the bind parameters from this JAX on.
_JAX_NEW_BIND_PARAMS = (0, 9, 2)
# Last kfac-jax release with the old eval_jaxpr_eqn (fixed on GitHub main).
_KFAC_JAX_LAST_UNFIXED = (0, 0, 8)


def version_tuple(text: str) -> tuple[int, ...]:
  """``'0.9.2rc1'`` -> ``(0, 9, 2)``: leading numeric components only."""
  out = []
  for part in text.split('.'):
    match = re.match(r'\d+', part)
    if match is None:
      break
    out.append(int(match.group()))
    if match.end() != len(part):
      break
  return tuple(out)


def needs_patch(jax_version: str, kfac_jax_version: str) -> bool:
  """Whether this JAX / kfac-jax pairing needs the ``eval_jaxpr_eqn`` fix."""
  return (version_tuple(jax_version) >= _JAX_NEW_BIND_PARAMS
          and version_tuple(kfac_jax_version) <= _KFAC_JAX_LAST_UNFIXED)


def import_kfac_jax() -> ModuleType | None:
  """Returns the ``kfac_jax`` module, patched if needed; None if absent.

  The patch replaces ``kfac_jax._src.tag_graph_matcher.eval_jaxpr_eqn`` by
  the version on kfac-jax's GitHub ``main`` (commit ``222c299``, "Require all
  positional arguments passed to bind to be JAX values"). kfac-jax's tracer
  looks the function up on the module at call time
  (``tgm.eval_jaxpr_eqn``), so replacing the module attribute suffices. It
  is applied once, only for JAX >= 0.9.2 with kfac-jax <= 0.0.8.
  """
  try:
    kfac_jax = importlib.import_module('kfac_jax')
  except ImportError:
    return None
  tgm = importlib.import_module('kfac_jax._src.tag_graph_matcher')
  if (needs_patch(jax.__version__, kfac_jax.__version__)
      and not getattr(tgm.eval_jaxpr_eqn, '_fisher_optax_patched', False)):
    tgm.eval_jaxpr_eqn = _eval_jaxpr_eqn(tgm)
  return kfac_jax


def _eval_jaxpr_eqn(tgm: ModuleType):
  """kfac-jax ``main``'s ``eval_jaxpr_eqn`` for JAX >= 0.9.2."""
  user_context = tgm.jex.source_info_util.user_context

  def eval_jaxpr_eqn(eqn, in_values):
    """Computes the outputs of the given Jaxpr equation."""
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    with user_context(eqn.source_info.traceback):
      output = eqn.primitive.bind(*in_values, **bind_params)
    return output if isinstance(output, list) else [output]

  eval_jaxpr_eqn._fisher_optax_patched = True  # pylint: disable=protected-access
  return eval_jaxpr_eqn
