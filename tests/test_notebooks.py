"""Cheap checks of the notebooks in ``examples/notebooks``.

Each notebook is a jupytext pair: ``<name>.py`` (percent format) is the
source and ``<name>.ipynb`` is generated from it, stored without outputs.
These tests check the pairs are in sync and that every notebook has what a
fresh Colab runtime needs (how to open it there, a guarded install cell
from ``FISHER_OPTAX_SOURCE``: the project has no public home, so no badge
may point at one) and the ``QUICK`` switch CI runs it with. Executing the
notebooks is the job of ``.ci/notebooks``.
"""

import ast
import json
import pathlib

from absl.testing import absltest
from absl.testing import parameterized

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / 'examples' / 'notebooks'
NAMES = ('getting_started', 'colab_tpu', 'autoencoder', 'transformer_lm')
SOURCE = "os.environ.setdefault('FISHER_OPTAX_SOURCE', '')"


def _cells(name):
  with open(NOTEBOOKS / f'{name}.ipynb', encoding='utf-8') as f:
    return json.load(f)['cells']


def _source(cell):
  return ''.join(cell['source'])


class NotebooksTest(parameterized.TestCase):

  def test_every_source_is_listed(self):
    found = sorted(p.stem for p in NOTEBOOKS.glob('*.py'))
    self.assertEqual(found, sorted(NAMES))
    self.assertEqual(sorted(p.stem for p in NOTEBOOKS.glob('*.ipynb')),
                     sorted(NAMES))

  @parameterized.parameters(*NAMES)
  def test_pair_in_sync(self, name):
    try:
      import jupytext  # pylint: disable=g-import-not-at-top
    except ImportError:
      self.skipTest('jupytext is not installed (pip install -e .[notebooks])')
    want = jupytext.read(NOTEBOOKS / f'{name}.py')
    got = jupytext.read(NOTEBOOKS / f'{name}.ipynb')
    # Cell ids are random in jupytext's output: compare type and source.
    self.assertEqual(
        [(c.cell_type, c.source) for c in got.cells],
        [(c.cell_type, c.source) for c in want.cells],
        f'{name}.ipynb is stale: run jupytext --sync on {name}.py')

  @parameterized.parameters(*NAMES)
  def test_no_stored_outputs(self, name):
    for cell in _cells(name):
      if cell['cell_type'] == 'code':
        self.assertEqual(cell['outputs'], [], _source(cell)[:200])
        self.assertIsNone(cell['execution_count'])

  @parameterized.parameters(*NAMES)
  def test_title_and_how_to_open_in_colab(self, name):
    cells = _cells(name)
    first = _source(cells[0])
    self.assertEqual(cells[0]['cell_type'], 'markdown')
    self.assertTrue(first.startswith('# '), first[:80])
    self.assertIn('Upload', first)
    self.assertIn('FISHER_OPTAX_SOURCE', first)
    # No link to a repository that does not exist.
    for cell in cells:
      self.assertNotIn('fisher-optax/fisher_optax', _source(cell))

  @parameterized.parameters(*NAMES)
  def test_guarded_install_cell(self, name):
    code = [c for c in _cells(name) if c['cell_type'] == 'code']
    install = _source(code[0])
    self.assertIn(SOURCE, install)
    self.assertIn('fisher_optax @ {source}', install)
    # The install runs only under a test that fails where fisher_optax is
    # importable, so CI (which has it installed) skips it.
    tree = ast.parse(install)
    guards = [n for n in tree.body if isinstance(n, ast.If)]
    self.assertLen(guards, 1)
    self.assertIn("find_spec('fisher_optax') is None",
                  ast.unparse(guards[0].test))
    self.assertNotIn('import fisher_optax', install)
    # fisher_optax is imported only after the install cell.
    self.assertIn('import fisher_optax as fo', _source(code[1]))

  @parameterized.parameters(*NAMES)
  def test_quick_switch(self, name):
    sources = '\n'.join(_source(c) for c in _cells(name)
                        if c['cell_type'] == 'code')
    self.assertIn("QUICK = os.environ.get('QUICK') == '1'", sources)
    # Every code cell is valid Python (no magics left in the sources).
    for cell in _cells(name):
      if cell['cell_type'] == 'code':
        ast.parse(_source(cell))


if __name__ == '__main__':
  absltest.main()
