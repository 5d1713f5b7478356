"""XLA settings that make the test suite's compiles cheap on a CPU.

XLA's backend compile is most of this suite's time on a CPU: 75% of a
test file's seconds (tests/test_loss_scale.py: 58 of 77 s in 84 compiles),
tracing and running the small models the rest. The tests check the numbers
of small models, not the speed of XLA's optimised code, so they compile
with LLVM at -O0, without XLA's MLIR fusion emitters, without LLVM's
expensive passes and without parallel codegen: the whole suite runs about
three times faster, with the same library code. Worker processes (forced
devices, several processes) get the same flags through :func:`xla_flags`.

``FISHER_OPTAX_TEST_XLA_DEFAULT=1`` runs everything with XLA's defaults.

What the flags change about the numbers: the program is the same, its
code generation is not. Fusion decisions differ (an elementwise result
may be computed once, or again inside each consumer's fusion), LLVM
contracts a multiply and an add into one fused multiply-add in some
places and not others, and reductions may sum in another order. So
float32 results differ from the default compile's in their last bits,
as they differ between CPUs and thread counts, never by more than
rounding in one step. Over many steps such a difference can grow; where
one ulp decides a branch or a sign it flips the outcome (AdaFisher's
min-max once turned an ulp into a negative preconditioner, see
docs/reliability.md).

How to tell whether a failure comes from the flags: run the failing test
again with ``FISHER_OPTAX_TEST_XLA_DEFAULT=1``. If it passes there, the
test or the code is sensitive to rounding, which a user's GPU, TPU or
other CPU would hit too: find the step where the two runs leave each
other (rounding-level differences that become large), and rerun that
computation in float64 (``jax_enable_x64``) to see which is the exact
behaviour. Fix the numerics or the test's margin; never the flags.
"""

import os

FLAGS = ('--xla_backend_optimization_level=0',
         '--xla_cpu_use_fusion_emitters=false',
         '--xla_llvm_disable_expensive_passes=true',
         # One LLVM module per program: splitting a small program for
         # parallel codegen costs more than it saves on two cores.
         '--xla_cpu_parallel_codegen_split_count=1')


def xla_flags(*extra: str, base: str | None = None) -> str:
  """``base`` (default: ``$XLA_FLAGS``) with the fast flags and ``extra``.

  A flag already in ``base`` keeps its value.
  """
  base = os.environ.get('XLA_FLAGS', '') if base is None else base
  flags = base.split()
  names = {f.split('=', 1)[0] for f in flags}
  chosen = () if os.environ.get('FISHER_OPTAX_TEST_XLA_DEFAULT') else FLAGS
  for flag in (*chosen, *extra):
    if flag.split('=', 1)[0] not in names:
      flags.append(flag)
      names.add(flag.split('=', 1)[0])
  return ' '.join(flags)
