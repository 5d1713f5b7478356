"""The convergence study's run records and their cache on disk.

A run is one setting (task, optimizer spec, learning rate, damping, seed)
trained for one budget (steps, seconds, size). Its record is one JSON file
under ``<cache>/<task>/``, named by a digest of that configuration
(:func:`config_of`, :func:`cache_path`). This module holds what the runner
that writes records and the report that reads them both need to know about
them: where they live, each task's budget, a run's score and the best
setting among a spec's runs. It imports no JAX.
"""

import collections
import glob
import hashlib
import json
import math
import os
from typing import Any

Record = dict[str, Any]

RESULTS = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'results')
# Each task's budget of steps per run (``--budget-steps`` sets another).
STEPS = {'autoencoder': 300, 'cnn': 400, 'transformer': 200,
         'regression': 1000, 'resnet': 200}


def config_of(task: str, spec: str, lr: float, damping: float | None,
              seed: int, steps: int, budget_seconds: float, size: str
              ) -> dict[str, Any]:
  return {'task': task, 'size': size, 'optimizer': spec, 'lr': lr,
          'damping': damping, 'seed': seed, 'steps': steps,
          'budget_seconds': budget_seconds}


def cache_path(cache_dir: str, config: dict[str, Any]) -> str:
  key = json.dumps(config, sort_keys=True)
  digest = hashlib.sha1(key.encode()).hexdigest()[:12]
  safe = config['optimizer'].replace(':', '+').replace('=', '-')
  return os.path.join(cache_dir, config['task'], f'{safe}__{digest}.json')


def read_record(path: str) -> Record:
  """The record cached at ``path``."""
  with open(path) as f:
    return json.load(f)


def write_record(path: str, record: Record) -> None:
  """Caches ``record`` at ``path``, through a ``.tmp`` file renamed whole."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + '.tmp', 'w') as f:
    json.dump(record, f)
  os.replace(path + '.tmp', path)


def load_records(task_dir: str) -> list[Record]:
  """Every run record (``*.json``, not the ``.tmp`` being written)."""
  return [read_record(path)
          for path in sorted(glob.glob(os.path.join(task_dir, '*.json')))]


def score(record: Record) -> float:
  """The sweep's criterion: final validation loss (inf when diverged)."""
  if record['diverged']:
    return math.inf
  return record['final']['validation']['loss']


def _budget(record: Record) -> tuple[Any, ...]:
  return (record['steps'], record.get('budget_seconds', 0.0) or 0.0,
          record.get('size', 'full'))


def select_budget(task: str, records: list[Record]
                  ) -> tuple[list[Record], int, int]:
  """The runs of the task's majority budget.

  Args:
    task: the task's name (its ``STEPS`` breaks ties).
    records: all its runs.

  Returns:
    ``(kept, steps, ignored)``: the runs of the budget with most runs, its
    steps, and how many runs of other budgets were left out.
  """
  counts = collections.Counter(_budget(r) for r in records)
  default = STEPS.get(task)
  budget = max(counts, key=lambda b: (counts[b], b[0] == default, b[0]))
  kept = [r for r in records if _budget(r) == budget]
  return kept, budget[0], len(records) - len(kept)


def best_setting(records: list[Record]) -> tuple[Record, list[Record]]:
  """The best seed-0 run of one spec, and all runs at its setting."""
  sweep = [r for r in records if r['seed'] == 0] or records
  best = min(sweep, key=lambda r: (score(r), r['lr'], r['damping'] or 0.0))
  seeds = sorted((r for r in records if r['lr'] == best['lr']
                  and r['damping'] == best['damping']),
                 key=lambda r: r['seed'])
  return best, seeds
