"""Comparisons for float32 results, shared by the tests.

A float32 result differs in its last bits between CPUs, thread counts and
XLA versions (the summation order changes), so a small entry of a product can
be off by far more than ``rtol`` of itself while the whole result is right to
``rtol``. These helpers keep ``rtol`` (so a wrong answer still fails) and add
an ``atol`` tied to the scale of the whole expected result:
``atol = scale_atol * max|desired|``. When one result is spread over several
leaves (an update tree), pass ``scale=tree_scale(whole)``: a leaf that is
zero up to rounding (a bias in front of a norm layer) is then compared at the
scale of the update it belongs to, not at its own.
"""

import jax
import numpy as np


def tree_scale(tree):
  """``max |leaf|`` over every leaf of ``tree`` (a dict, list or array)."""
  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
  return max((float(np.max(np.abs(x))) for x in leaves if x.size),
             default=0.0)


def assert_close(actual, desired, rtol=1e-5, scale_atol=1e-6, err_msg='',
                 scale=None):
  """``assert_allclose`` with ``atol = scale_atol * scale``.

  Args:
    actual: the computed array (float32 usually).
    desired: the reference array, broadcastable against ``actual``.
    rtol: relative tolerance per entry.
    scale_atol: absolute tolerance as a fraction of ``scale``.
    err_msg: passed to ``np.testing.assert_allclose``.
    scale: the scale of the whole result; ``max|desired|`` when None.
  """
  actual = np.asarray(actual)
  desired = np.asarray(desired)
  if scale is None:
    scale = tree_scale(desired)
  np.testing.assert_allclose(actual, desired, rtol=rtol,
                             atol=scale_atol * scale, err_msg=err_msg)


def assert_trees_close(actual, desired, rtol=1e-5, scale_atol=1e-6):
  """``assert_close`` leaf by leaf, at the scale of the whole tree."""
  actual_leaves, actual_def = jax.tree.flatten(actual)
  paths, desired_def = jax.tree_util.tree_flatten_with_path(desired)
  if actual_def != desired_def:
    raise AssertionError(f'tree structures differ: {actual_def} vs '
                         f'{desired_def}')
  scale = tree_scale(desired)
  for (path, d), a in zip(paths, actual_leaves):
    assert_close(a, d, rtol=rtol, scale_atol=scale_atol, scale=scale,
                 err_msg=jax.tree_util.keystr(path))

