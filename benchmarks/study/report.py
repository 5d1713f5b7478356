r"""Tables and plots of the convergence study, from its cache of runs.

``convergence.py --report`` calls :func:`write_all`, which reads every run
record under ``<cache>/<task>/*.json`` and writes, per task,
``<task>.md`` with the curves ``<task>_steps.png`` and
``<task>_seconds.png``, and ``summary.md`` across tasks.

Definitions (the tables repeat them in words):

* A task's runs are those of its majority budget (``steps``,
  ``budget_seconds``, ``size``); runs of another budget belong to another
  study and are only counted.
* The best setting of an optimizer spec is the ``(lr, damping)`` of its
  seed-0 run with the lowest ``cache.score`` (final validation loss,
  inf when diverged), ties to the smaller learning rate; its seeds are every
  run of that spec at that setting.
* A run's final training loss is the mean of its curve's blocks over the
  last 10% of the steps it did.
* The target is the mean final training loss of Adam's (spec ``'adam'``)
  best-setting seeds.
* A run reaches the target at the first curve step where the trailing mean
  of the training loss over ~5% of the steps (at least one block) is at or
  below it; a diverged run does not count as reaching it, so a method that
  blows up later gets no credit for passing through the target.
  Ratios compare the mean steps (seconds) over the seeds that reached it
  with Adam's, computed the same way on Adam's seeds.
"""

import collections
from collections.abc import Iterable
import inspect
import json
import math
import os
from typing import Any

from matplotlib import colormaps
from matplotlib.figure import Figure
import numpy as np

from study import cache
from study import optimizers as optimizers_lib

Record = cache.Record

TASK_TEXT = {
    'autoencoder': 'The MBF paper\'s MNIST deep autoencoder '
                   '(784-1000-500-250-30 and its mirror, ReLU), binary '
                   'cross-entropy summed over the 784 pixels.',
    'cnn': 'The CNN of `examples/mnist.py` classifying MNIST digits, mean '
           'cross-entropy.',
    'transformer': 'A character-level decoder-only Transformer on tiny '
                   'Shakespeare (4 pre-LayerNorm blocks of width 128, 4 '
                   'causal heads, context 128), mean cross-entropy per '
                   'character.',
    'regression': 'A tanh MLP 64-128-128-1 fitted to a teacher network on '
                  'inputs whose covariance has condition number 1e6 in a '
                  'rotated basis, mean squared error: the case where '
                  'inverting K-FAC\'s input factor should matter most.',
    'resnet': 'A small ResNet with BatchNorm (a 3x3 stem and one residual '
              'block per stage of 16, 32, 64 channels) classifying MNIST '
              'digits, mean cross-entropy; BatchNorm uses batch statistics '
              'throughout. The case where the issue reported AdaFisher\'s '
              '`mode=\'paper\'` and MBF\'s damping falling behind.',
}


# key in record['final']['test'], column name, higher is better, scale.
METRICS = {
    'autoencoder': ('loss', 'test BCE (summed over pixels)', False, 1.0),
    'cnn': ('accuracy', 'test accuracy %', True, 100.0),
    'transformer': ('bits_per_char', 'test bits per character', False,
                    1.0),
    'regression': ('loss', 'test mean squared error', False, 1.0),
    'resnet': ('accuracy', 'test accuracy %', True, 100.0),
}
_DEFAULT_METRIC = ('loss', 'test loss', False, 1.0)

TAIL_FRACTION = 0.10     # of the steps: the final training loss
WINDOW_FRACTION = 0.05   # of the steps: the trailing mean's window
DASH = '—'

# One colour per optimizer, the same in every task's plots.
_COLOURS = list(colormaps['tab10'].colors) + ['black']
_EXTRA_COLOURS = list(colormaps['tab20'].colors[1::2])


# ---------------------------------------------------------------------------
# Specs.


def is_base(spec: str) -> bool:
  return ':' not in spec


# ---------------------------------------------------------------------------
# Per-run quantities.


def _block_size(record: Record) -> int:
  steps = record['curve']['step']
  return max(1, steps[0]) if steps else 1


def final_train_loss(record: Record) -> float:
  """Mean of the curve's blocks over the last 10% of the steps done."""
  if record['diverged'] or not record['curve']['loss']:
    return math.inf
  done = record.get('steps_done') or record['curve']['step'][-1]
  start = done - max(1, round(TAIL_FRACTION * done))
  tail = [loss for step, loss in zip(record['curve']['step'],
                                     record['curve']['loss'])
          if step > start]
  return float(np.mean(tail or record['curve']['loss'][-1:]))


def trailing_loss(record: Record) -> np.ndarray:
  """The training loss's trailing mean over ~5% of the steps, per block."""
  loss = np.asarray(record['curve']['loss'], dtype=np.float64)
  window = max(1, round(WINDOW_FRACTION * record['steps']
                        / _block_size(record)))
  cumsum = np.concatenate([[0.0], np.cumsum(loss)])
  ends = np.arange(1, len(loss) + 1)
  starts = np.maximum(0, ends - window)
  with np.errstate(invalid='ignore'):
    return (cumsum[ends] - cumsum[starts]) / (ends - starts)


def time_to_target(record: Record, target: float
                   ) -> tuple[int, float] | None:
  """``(step, seconds)`` where the trailing mean first reaches ``target``."""
  if record['diverged'] or not math.isfinite(target):
    return None
  hits = np.flatnonzero(trailing_loss(record) <= target)
  if not hits.size:
    return None
  i = int(hits[0])
  return record['curve']['step'][i], record['curve']['seconds'][i]


# ---------------------------------------------------------------------------
# Per-task analysis.


def _reach(seeds: list[Record], target: float) -> dict[str, Any]:
  hits = [h for h in (time_to_target(r, target) for r in seeds) if h]
  return {
      'reached': len(hits), 'seeds': len(seeds),
      'steps': float(np.mean([h[0] for h in hits])) if hits else None,
      'seconds': float(np.mean([h[1] for h in hits])) if hits else None,
  }


def _ratio(value, reference):
  if value is None or reference is None or not reference:
    return None
  return value / reference


def analyse(task: str, records: list[Record]) -> dict[str, dict[str, Any]]:
  """Summary numbers of every spec of one task's (selected) runs.

  Args:
    task: the task's name.
    records: its runs of one budget.

  Returns:
    spec -> dict with ``lr``, ``damping``, ``diverged`` (the best setting
    diverged), ``seeds``, ``reached`` (seeds that reached the target),
    ``steps`` / ``seconds`` (mean over those, None if none), ``steps_ratio``
    / ``seconds_ratio`` (to Adam's, None without Adam or a reach),
    ``step_time_ratio``, ``final_train_loss``, ``metric_mean``,
    ``metric_std`` (in the table's unit, over the seeds that did not
    diverge), ``metric_diverged`` (seeds left out of those), ``test_loss``
    and ``target`` (Adam's final training loss, None without Adam).
  """
  key, _, _, scale = METRICS.get(task, _DEFAULT_METRIC)
  by_spec = collections.defaultdict(list)
  for r in records:
    by_spec[r['optimizer']].append(r)
  chosen = {spec: cache.best_setting(rs) for spec, rs in by_spec.items()}

  target = adam_reach = adam_step_s = None
  if 'adam' in chosen:
    adam_seeds = chosen['adam'][1]
    target = float(np.mean([final_train_loss(r) for r in adam_seeds]))
    adam_reach = _reach(adam_seeds, target)
    adam_step_s = float(np.mean([r['step_seconds_mean']
                                 for r in adam_seeds]))

  out = {}
  for spec, (best, seeds) in chosen.items():
    ok = [r for r in seeds if not r['diverged']]
    metric = [r['final']['test'].get(key, math.nan) * scale for r in ok]
    metric = [m for m in metric if math.isfinite(m)]
    test_loss = [r['final']['test']['loss'] for r in ok]
    reach = (_reach(seeds, target) if target is not None
             else _reach([], math.nan))
    reach['seeds'] = len(seeds)
    out[spec] = {
        'lr': best['lr'], 'damping': best['damping'],
        'diverged': bool(cache.score(best) == math.inf),
        **reach,
        'steps_ratio': _ratio(reach['steps'],
                              adam_reach and adam_reach['steps']),
        'seconds_ratio': _ratio(reach['seconds'],
                                adam_reach and adam_reach['seconds']),
        # Seconds from a side-by-side profile, not from runs measured
        # beside other processes (see apply_timing).
        'profiled': all(r.get('timing') == 'profile' for r in seeds),
        'step_time_ratio': _ratio(
            float(np.mean([r['step_seconds_mean'] for r in seeds])),
            adam_step_s),
        'final_train_loss': (float(np.mean([final_train_loss(r)
                                            for r in ok])) if ok
                             else math.inf),
        'metric_mean': float(np.mean(metric)) if metric else None,
        'metric_std': (float(np.std(metric, ddof=1)) if len(metric) > 1
                       else 0.0 if metric else None),
        'metric_diverged': len(seeds) - len(metric),
        'test_loss': float(np.mean(test_loss)) if test_loss else None,
        'validation_loss': (float(np.mean([cache.score(r)
                                           for r in ok])) if ok
                            else math.inf),
        'target': target,
    }
  return out


def library_damping(spec: str) -> float | None:
  """The damping the spec's optimizer gets when the user sets none."""
  opt = optimizers_lib.OPTIMIZERS[optimizers_lib.parse_spec(spec)[0]]
  if not opt.curvature or opt.factory is None:
    return None
  param = inspect.signature(opt.factory).parameters.get('damping')
  return None if param is None else float(param.default)


def by_damping(records: list[Record]) -> dict[float, tuple[float, float]]:
  """damping -> (best lr, its final validation loss) over seed-0 runs."""
  out = {}
  for r in records:
    if r['seed'] != 0 or r['damping'] is None:
      continue
    got = (cache.score(r), r['lr'])
    if r['damping'] not in out or got < out[r['damping']][::-1]:
      out[r['damping']] = (r['lr'], got[0])
  return out


def _damping_table(records: list[Record]) -> list[str]:
  """Each curvature spec's best validation loss at every damping tried."""
  specs = sorted({r['optimizer'] for r in records
                  if r['damping'] is not None})
  if not specs:
    return []
  dampings = sorted({r['damping'] for r in records
                     if r['damping'] is not None})
  lines = ['| optimizer | ' + ' | '.join(f'{d:g}' for d in dampings)
           + ' | default / tuned |',
           '|---|' + '---:|' * (len(dampings) + 1)]
  for spec in specs:
    table = by_damping([r for r in records if r['optimizer'] == spec])
    tuned = min((v for _, v in table.values()), default=math.inf)
    default = library_damping(spec)
    cells = []
    for d in dampings:
      if d not in table:
        cells.append(DASH)
        continue
      lr, val = table[d]
      mark = ' (default)' if default is not None and math.isclose(
          d, default) else ''
      cells.append(f'{_sig(val)} @ {lr:g}{mark}')
    # Not run at the default damping (or no damping): no gap to show.
    at_default = table[default][1] if default in table else None
    gap = (DASH if at_default is None else 'diverged'
           if not math.isfinite(at_default) else
           f'{at_default / tuned - 1:+.1%}')
    lines.append(f'| {spec} | ' + ' | '.join(cells) + f' | {gap} |')
  return lines


# ---------------------------------------------------------------------------
# Formatting.


def _sig(x: float | None, digits: int = 4) -> str:
  """``digits`` significant digits, trailing zeros kept (``98.00``)."""
  if x is None:
    return DASH
  if not math.isfinite(x):
    return 'diverged' if x > 0 else str(x)
  text = f'{x:#.{digits}g}'
  mantissa, e, exponent = text.partition('e')
  return mantissa.rstrip('.') + (e + exponent if e else '')


def _hyper(x: float | None) -> str:
  return DASH if x is None else f'{x:.3g}'


def _no_reach(row: dict[str, Any]) -> str | None:
  """Why a row has no steps to the target, or None when it has them."""
  if row['diverged']:
    return 'diverged'
  if row['target'] is None:
    return DASH
  if not row['reached']:
    return 'never'
  return None


def _reach_cell(row: dict[str, Any], which: str) -> str:
  """``'312 (0.62)'``, ``'... 2/3'``, ``'never'`` or ``'diverged'``."""
  status = _no_reach(row)
  if status:
    return status
  value = row[which]
  text = (f'{value:.4g}' if which == 'steps' else _sig(value, 3))
  ratio = row[f'{which}_ratio']
  text += f' ({DASH if ratio is None else f"{ratio:.2f}"})'
  if row['reached'] < row['seeds']:
    text += f' {row["reached"]}/{row["seeds"]}'
  return text


def _metric_cell(row: dict[str, Any]) -> str:
  if row['diverged'] or row['metric_mean'] is None:
    return 'diverged'
  text = f'{_sig(row["metric_mean"])} ± {_sig(row["metric_std"], 2)}'
  if row['metric_diverged']:
    text += f' ({row["metric_diverged"]}/{row["seeds"]} diverged)'
  return text


def _sort_key(task: str):
  higher = METRICS.get(task, _DEFAULT_METRIC)[2]

  def key(item):
    spec, row = item
    if row['diverged'] or row['metric_mean'] is None:
      return (1, 0.0, spec)
    return (0, -row['metric_mean'] if higher else row['metric_mean'], spec)

  return key


def _table(task: str, rows: dict[str, dict[str, Any]]) -> list[str]:
  name = METRICS.get(task, _DEFAULT_METRIC)[1]
  lines = [
      f'| optimizer | lr | damping | {name} (mean ± std over seeds) | '
      'test loss | final train loss | steps to Adam\'s loss (ratio) | '
      'seconds to it (ratio) | step time / Adam | seeds |',
      '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for spec, row in sorted(rows.items(), key=_sort_key(task)):
    diverged = row['diverged']
    step_time = row['step_time_ratio']
    lines.append(
        f'| {spec} | {_hyper(row["lr"])} | {_hyper(row["damping"])} | '
        f'{_metric_cell(row)} | '
        f'{"diverged" if diverged else _sig(row["test_loss"])} | '
        f'{_sig(row["final_train_loss"])} | '
        f'{_reach_cell(row, "steps")} | {_reach_cell(row, "seconds")} | '
        f'{DASH if step_time is None else f"{step_time:.2f}"} | '
        f'{row["seeds"]} |')
  return lines


def _sweep_table(records: list[Record], rows: dict[str, dict[str, Any]]
                 ) -> list[str]:
  lines = ['| optimizer | lr | damping | final validation loss | best |',
           '|---|---:|---:|---:|:---:|']
  sweep = sorted((r for r in records if r['seed'] == 0),
                 key=lambda r: (r['optimizer'], r['damping'] or 0.0,
                                r['lr']))
  for r in sweep:
    row = rows[r['optimizer']]
    mark = ('*' if (r['lr'], r['damping']) == (row['lr'], row['damping'])
            else '')
    lines.append(f'| {r["optimizer"]} | {_hyper(r["lr"])} | '
                 f'{_hyper(r["damping"])} | '
                 f'{_sig(cache.score(r))} | {mark} |')
  return lines


def _distinct(records: Iterable[Record], key: str) -> str:
  values = sorted({str(r.get(key, '')) for r in records})
  return ', '.join(f'`{v}`' if v else '(none)' for v in values)


# ---------------------------------------------------------------------------
# Plots.


def _colour(spec: str, order: list[str]):
  name = spec.split(':')[0]
  known = list(optimizers_lib.OPTIMIZERS)
  if name in known and known.index(name) < len(_COLOURS):
    return _COLOURS[known.index(name)]
  return _EXTRA_COLOURS[order.index(spec) % len(_EXTRA_COLOURS)]


def plot(task: str, records: list[Record], rows: dict[str, dict[str, Any]],
         x_axis: str, path: str) -> None:
  """Trailing training loss of each base spec's best setting.

  Args:
    task: the task's name (the title).
    records: the task's runs of one budget.
    rows: :func:`analyse`'s result.
    x_axis: ``'step'`` or ``'seconds'``; with seconds, a block's x is the
      mean over seeds of their training seconds at its end.
    path: the PNG to write.
  """
  fig = Figure(figsize=(8, 5), dpi=120)
  ax = fig.add_subplot()
  specs = [s for s in sorted(rows) if is_base(s)]
  positive = True
  for spec in specs:
    row = rows[spec]
    seeds = [r for r in records if r['optimizer'] == spec
             and r['lr'] == row['lr'] and r['damping'] == row['damping']
             and not r['diverged']]
    if row['diverged'] or not seeds:
      continue
    n = min(len(r['curve']['loss']) for r in seeds)
    curves = np.stack([trailing_loss(r)[:n] for r in seeds])
    x = np.mean([r['curve'][x_axis][:n] for r in seeds], axis=0)
    colour = _colour(spec, specs)
    settings = ('no arguments' if row['lr'] is None else
                f'lr {row["lr"]:.3g}' + (
                    '' if row['damping'] is None
                    else f', damping {row["damping"]:.3g}'))
    ax.plot(x, curves.mean(0), color=colour, lw=1.5,
            label=f'{spec} ({settings})')
    ax.fill_between(x, curves.min(0), curves.max(0), color=colour,
                    alpha=0.2, lw=0)
    positive &= bool(np.all(curves > 0))
  target = rows['adam']['target'] if 'adam' in rows else None
  if target is not None:
    ax.axhline(target, color='grey', ls='--', lw=1,
               label=f"Adam's final loss {target:.4g}")
  if positive:
    ax.set_yscale('log')
  ax.set_xlabel('step' if x_axis == 'step' else 'training seconds')
  ax.set_ylabel('training loss (trailing mean)')
  ax.set_title(f'{task}: training loss against '
               f'{"steps" if x_axis == "step" else "seconds"} '
               '(mean over seeds, min-max shaded)')
  ax.grid(True, which='both', alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)


# ---------------------------------------------------------------------------
# Files.


def write_task(task: str, records: list[Record], steps: int, ignored: int,
               results_dir: str, timed: dict[str, Any] | None = None
               ) -> dict[str, dict[str, Any]]:
  """Writes ``<task>.md`` and its two plots; returns :func:`analyse`'s."""
  rows = analyse(task, records)
  for x_axis, suffix in (('step', 'steps'), ('seconds', 'seconds')):
    plot(task, records, rows, x_axis,
         os.path.join(results_dir, f'{task}_{suffix}.png'))
  target = rows['adam']['target'] if 'adam' in rows else None
  lines = [
      f'# Convergence study: {task}', '',
      TASK_TEXT.get(task, f'Task `{task}`.'), '',
      f'Produced by `python benchmarks/convergence.py --task {task}` (the '
      'runs) and `python benchmarks/convergence.py --report` (this file).',
      f'{len(records)} runs of {steps} steps on machine '
      f'{_distinct(records, "machine")}, backend '
      f'{_distinct(records, "backend")}, JAX {_distinct(records, "jax")}, '
      f'XLA_FLAGS {_distinct(records, "xla_flags")}.',
  ]
  if ignored:
    lines.append(f'{ignored} cached runs of another budget (steps, '
                 'seconds or size) were ignored.')
  if timed:
    lines.append(
        'Seconds are those of a side-by-side step-time profile '
        f'(`python benchmarks/convergence.py --timing --task {task}`: '
        f'{timed["repeats"]} interleaved blocks of {timed["period"]} steps '
        'per optimizer, median per step, XLA_FLAGS '
        f'`{timed["xla_flags"]}`, {timed["date"]}) for the optimizers it '
        'profiled ('
        + ', '.join(f'`{s}`' for s in timed['profiles'])
        + '); other runs keep the seconds they measured.'
        + (' Profiled in a later run beside Adam and scaled to the Adam '
           'profile above (ratios to Adam as measured in that run): '
           + ', '.join(f'`{s}` (x{f:.3g}{_run_note(timed, s)})'
                       for s, f in timed['rescaled'].items()) + '.'
           if timed.get('rescaled') else ''))
  lines += [
      '',
      'Each optimizer at its best setting (lowest final validation loss of '
      'the seed-0 sweep), over its seeds. *Final train loss*: mean training '
      'loss over the last 10% of the steps. *Steps to Adam\'s loss*: first '
      'step where the training loss, averaged over a trailing window of 5% '
      'of the steps, reaches Adam\'s final train loss '
      + (f'({target:.4g}); ' if target is not None else '(no Adam runs); ')
      + 'mean over the seeds that reached it ("k/n" when only k of n did, '
      'a diverged seed never does), with the ratio to Adam\'s own steps '
      'computed the same way. Std is over seeds (ddof 1).',
      '', '## Base optimizers', '',
      *_table(task, {s: r for s, r in rows.items() if is_base(s)}),
  ]
  variants = {s: r for s, r in rows.items() if not is_base(s)}
  if variants:
    lines += ['', '## Variants', '',
              'Specs with settings after colons (the investigation).', '',
              *_table(task, variants)]
  lines += ['', '## Curves', '',
            f'![{task}: loss against steps]({task}_steps.png)', '',
            f'![{task}: loss against seconds]({task}_seconds.png)', '']
  damping = _damping_table(records)
  if damping:
    lines += ['## Damping', '',
              'Final validation loss (seed 0) at the best learning rate of '
              'each damping tried, and how far the library\'s default '
              'damping (with its best learning rate) lands from the tuned '
              'setting.', '', *damping, '']
  lines += ['## Sweep', '',
            'Every seed-0 run; * marks the chosen setting.', '',
            *_sweep_table(records, rows), '']
  with open(os.path.join(results_dir, f'{task}.md'), 'w') as f:
    f.write('\n'.join(lines))
  return rows


# Seeds of a finished sweep's best setting (convergence.py's default).
FULL_SEEDS = 3


def _summary_cell(rows: dict[str, dict[str, Any]], spec: str) -> str:
  if spec not in rows:
    return DASH
  row = rows[spec]
  status = _no_reach(row)
  if status:
    unfinished = status == 'never' and row['seeds'] < FULL_SEEDS
    return status + (' ‡' if unfinished else '')
  ratios = ' / '.join(DASH if r is None else f'{r:.2f}'
                      for r in (row['steps_ratio'], row['seconds_ratio']))
  # Marked where the task has a profile but this optimizer is not in it.
  profiled = any(r.get('profiled') for r in rows.values())
  if (profiled and not row.get('profiled', True)
      and row['seconds_ratio'] is not None):
    ratios += '†'
  if row['reached'] < row['seeds']:
    ratios += f' ({row["reached"]}/{row["seeds"]})'
  if row['seeds'] < FULL_SEEDS:
    ratios += ' ‡'
  return ratios


def _run_note(timed, spec) -> str:
  """', blocks of P steps x R, date' of the later run that profiled spec."""
  run = timed.get('rescaled_runs', {}).get(spec)
  if run is None:
    return ''
  return (f'; {run["repeats"]} blocks of {run["period"]} steps, '
          f'{run["date"]}')


def _no_argument_table(summary, tasks) -> list[str]:
  """The optimizers that take no learning rate, against tuned K-FAC."""
  specs = sorted({s for rows in summary.values() for s in rows
                  if optimizers_lib.OPTIMIZERS[
                      optimizers_lib.parse_spec(s)[0]].adaptive})
  if not specs:
    return []

  def cell(task, spec):
    row = summary[task].get(spec)
    kfac = summary[task].get('kfac')
    # The same preconditioner with a tuned learning rate and damping.
    name = optimizers_lib.parse_spec(spec)[0]
    own_name = name.removesuffix('_adaptive')
    own = (summary[task].get(own_name)
           if own_name not in ('kfac', name) else None)
    if row is None:
      return DASH
    relative = ''
    if kfac is not None and math.isfinite(row['validation_loss']):
      relative = f'; {row["validation_loss"] / kfac["validation_loss"]:.2f}'
      if own is not None and math.isfinite(own['validation_loss']):
        relative += (f' (own '
                     f'{row["validation_loss"] / own["validation_loss"]:.2f})')
    diverged = (f', {row["metric_diverged"]} diverged'
                if row['metric_diverged'] else '')
    return _summary_cell(summary[task], spec) + relative + diverged

  return [
      '## Optimizers without a learning rate', '',
      'Run at their defaults, no sweep (`fo.adaptive`; kfac-jax\'s adaptive '
      'mode as its examples configure it; `optax.contrib`\'s tuning-free '
      'first-order optimizers). Each cell: steps / seconds to '
      'Adam\'s final training loss as above; then the final validation '
      'loss as a ratio to tuned K-FAC\'s (`kfac` at its best setting, mean '
      'over seeds) and, as "own", to that of the same preconditioner with '
      'a tuned learning rate and damping (`ekfac` for `ekfac_adaptive`).',
      '',
      '| optimizer | ' + ' | '.join(tasks) + ' |',
      '|---|' + '---:|' * len(tasks),
      *(f'| {spec} | ' + ' | '.join(cell(t, spec) for t in tasks) + ' |'
        for spec in specs),
      '']


def write_summary(summary: dict[str, dict[str, dict[str, Any]]],
                  path: str) -> None:
  """``summary.md``: base optimizers x tasks, steps / time ratio to Adam."""
  tasks = list(summary)
  known = list(optimizers_lib.OPTIMIZERS)
  specs = sorted({s for rows in summary.values() for s in rows
                  if is_base(s)},
                 key=lambda s: (known.index(s) if s in known
                                else len(known), s))
  lines = [
      '# Convergence study: summary', '',
      'Steps / wall-clock seconds to reach Adam\'s final training loss, as '
      'a ratio to Adam\'s (below 1: faster than Adam); "never" when no seed '
      'reached it, "(k/n)" when only k of n seeds did, — when not run or '
      'without Adam. † seconds measured beside other runs, not from a '
      'side-by-side step-time profile (`--timing`): unreliable. ‡ fewer '
      f'than {FULL_SEEDS} seeds: the sweep is not finished, the setting is '
      'provisional. Each optimizer at its best setting per task; details '
      'in `<task>.md`. Written by `python benchmarks/convergence.py '
      '--report`.', '',
      '| optimizer | ' + ' | '.join(tasks) + ' |',
      '|---|' + '---:|' * len(tasks),
  ]
  for spec in specs:
    lines.append(f'| {spec} | ' + ' | '.join(
        _summary_cell(summary[t], spec) for t in tasks) + ' |')
  lines.append('')
  lines += _no_argument_table(summary, tasks)
  for task in tasks:
    adam = summary[task].get('adam')
    if adam is None or adam['target'] is None:
      lines.append(f'* {task}: no Adam runs, no target.')
      continue
    steps = (DASH if adam['steps'] is None
             else f'{adam["steps"]:.4g} steps, {_sig(adam["seconds"], 3)} s')
    unprofiled = ('' if any(r.get('profiled')
                            for r in summary[task].values())
                  else ' No side-by-side step-time profile yet: its seconds '
                  'were measured during the sweep, beside other runs.')
    lines.append(f'* {task}: Adam\'s target {adam["target"]:.4g} '
                 f'(final training loss), reached in {steps} '
                 f'({adam["reached"]}/{adam["seeds"]} seeds).{unprofiled}')
  lines.append('')
  with open(path, 'w') as f:
    f.write('\n'.join(lines))


def _profile_seconds(profile: list[float], steps: int) -> float:
  """Seconds of ``steps`` steps whose times repeat ``profile``."""
  full, part = divmod(steps, len(profile))
  return float(full * sum(profile) + sum(profile[:part]))


def apply_timing(records: list[Record], profiles: dict[str, list[float]]
                 ) -> int:
  """Replaces measured seconds by those of a side-by-side step profile.

  ``profiles[spec]`` holds the time of each step of one period (see
  ``runner.time_steps``); a run's training seconds after ``k`` steps
  become the sum of the profile over steps ``0..k-1`` taken cyclically, and
  its mean step time the profile's mean. Runs of specs without a profile
  keep what they measured.

  Returns:
    how many records were changed.
  """
  changed = 0
  for record in records:
    profile = profiles.get(record['optimizer'])
    if not profile:
      continue
    for part in ('curve', 'eval'):
      record[part]['seconds'] = [_profile_seconds(profile, k)
                                 for k in record[part]['step']]
    record['step_seconds_mean'] = float(np.mean(profile))
    record['step_seconds_median'] = float(np.median(profile))
    record['timing'] = 'profile'
    changed += 1
  return changed


def write_all(cache_dir: str, results_dir: str, timing_dir: str | None = None
              ) -> dict[str, dict[str, dict[str, Any]]]:
  """Writes every task's table and plots and ``summary.md``.

  Args:
    cache_dir: holds one folder of run records per task.
    results_dir: where the Markdown and PNG files go.

  Returns:
    task -> spec -> :func:`analyse`'s numbers.
  """
  os.makedirs(results_dir, exist_ok=True)
  order = list(cache.STEPS)
  tasks = sorted((d for d in os.listdir(cache_dir)
                  if os.path.isdir(os.path.join(cache_dir, d))),
                 key=lambda t: (order.index(t) if t in order
                                else len(order), t))
  summary = {}
  for task in tasks:
    records = cache.load_records(os.path.join(cache_dir, task))
    if not records:
      continue
    kept, steps, ignored = cache.select_budget(task, records)
    timing_path = timing_dir and os.path.join(timing_dir, f'{task}.json')
    timed = None
    if timing_path and os.path.exists(timing_path):
      with open(timing_path) as f:
        timed = json.load(f)
      apply_timing(kept, timed['profiles'])
    summary[task] = write_task(task, kept, steps, ignored, results_dir,
                               timed)
  write_summary(summary, os.path.join(results_dir, 'summary.md'))
  return summary
