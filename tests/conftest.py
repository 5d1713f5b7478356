"""Test-session settings: XLA's cheap compiles, and compiles shared.

Both are set before any test module imports JAX (which reads them once),
and reach the worker processes of the multi-device and multi-process
tests through the environment:

* ``XLA_FLAGS``: XLA's cheap compile settings (see ``_fast_compile``).
* JAX's persistent compilation cache, so that a program compiled once in a
  session (the same model and optimizer in another test, another pytest-
  xdist worker or a worker process) is not compiled again. Its folder is
  ``$FISHER_OPTAX_TEST_COMPILE_CACHE`` when set (kept: later runs start
  warm), else a fresh one that the process that made it deletes at exit.
"""

import atexit
import os
import shutil
import tempfile

import _fast_compile

os.environ['XLA_FLAGS'] = _fast_compile.xla_flags()

if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _keep = os.environ.get('FISHER_OPTAX_TEST_COMPILE_CACHE')
  if _keep:
    os.environ['JAX_COMPILATION_CACHE_DIR'] = _keep
  else:
    # pytest-xdist's workers inherit it: one cache for the whole session.
    _cache = tempfile.mkdtemp(prefix='fisher_optax_compile_cache.')
    os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  # Every program: most of these compile in well under JAX's default 1 s.
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')


# The tests that run for minutes (worker processes, the study's quick
# check) go first: pytest-xdist hands tests out in collection order, and
# one of them picked up last would keep one core busy while the other has
# nothing left to run.
_LONG = ('test_multi_device.py::', 'test_convergence_quick.py::Convergence',
         'test_multi_process.py::')


def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: not any(n in item.nodeid for n in _LONG))
