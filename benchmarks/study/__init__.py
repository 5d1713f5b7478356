"""The convergence study of ``benchmarks/convergence.py``, in five parts.

``tasks`` holds the five tasks (models, data, losses); ``cache`` the run
records on disk (where they live, each task's budget, a run's score, the
best setting among a spec's runs; no JAX); ``optimizers`` the study's
optimizers, their specs and the jitted step that a run trains with;
``runner`` one run, the sweep protocol, the step-time profiles and the CI
check; ``report`` the tables and plots written from the cache. Each module
imports only those before it in this order (``tasks``, ``cache``,
``optimizers``, ``runner``, ``report``), except that ``report`` does not
import ``runner``: it reads only what the runs cached. Importing the package
imports none of them; the folder above it (``benchmarks/``) is on
``sys.path``, as the scripts there put it.
"""
