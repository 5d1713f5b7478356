r"""Coverage of the model zoo: which share of each model gets curvature.

For every model of ``tests/test_model_zoo.py`` (public-style Flax models,
linen and NNX, unedited) this prints, as a Markdown table, the number of
trainable parameters (elements), the share of them that a captured layer
covers (``fo.coverage`` says a layer kind, not ``fallback`` or
``frozen``), and the parameters left to the optimizers' fallback. Only
shapes are computed (``eval_shape`` of one capturing step), so it takes
about a minute on a CPU, most of it in the models' ``init``.

"Curvature" is the capture's view: every optimizer preconditions the
captured dense and conv layers with its curvature, but MBF, by its design,
also gives norm, embedding and conv-bias parameters its fallback.

Usage::

  python benchmarks/model_zoo_coverage.py [--models vit,unet] [--rows]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from tests import test_model_zoo as zoo  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', default=','.join(zoo.TASKS),
                      help='comma-separated zoo models (default: all)')
  parser.add_argument('--rows', action='store_true',
                      help='also print each model\'s full coverage table')
  args = parser.parse_args()
  models = args.models.split(',')
  unknown = sorted(set(models) - set(zoo.TASKS))
  if unknown:
    parser.error(f'unknown models {unknown}; choose from {list(zoo.TASKS)}')
  print(zoo.coverage_table(models))
  if args.rows:
    for model in models:
      print(f'\n### {model}\n\n```\n{zoo.coverage_rows(model)}\n```')


if __name__ == '__main__':
  main()
