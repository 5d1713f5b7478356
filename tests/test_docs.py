"""The documentation site: every public name has an API entry and an example.

The site itself is built by `.ci/docs` (Sphinx, warnings as errors, then its
doctest builder). These tests need no Sphinx: they read the API pages'
autodoc directives. `.ci/docs` runs them again with FISHER_OPTAX_DOCS_HTML
set to the built site, where `test_built_site_has_every_name` also checks
the site's object inventory.
"""

import inspect
import os
import pathlib
import re
import types

from absl.testing import absltest

import fisher_optax as fo

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / 'docs'
_DIRECTIVE = re.compile(
    r'^\.\. auto(?:function|class|module|data)::\s+(fisher_optax\.[\w.]+)',
    re.MULTILINE)


def _documented() -> set[str]:
  """Targets of the autodoc directives on the API pages."""
  names = set()
  for page in sorted((DOCS / 'api').glob('*.md')):
    names |= set(_DIRECTIVE.findall(page.read_text()))
  return names


def _capture_names(module: types.ModuleType) -> list[str]:
  """Public functions and classes of ``fo.linen`` / ``fo.nnx``."""
  return sorted(
      name for name, value in vars(module).items()
      if not name.startswith('_')
      and (inspect.isfunction(value) or inspect.isclass(value))
      and getattr(value, '__module__', '').startswith('fisher_optax'))


def public_names() -> list[str]:
  """Every public name, spelled as users import it (``fisher_optax.x``)."""
  names = [f'fisher_optax.{n}' for n in fo.__all__]
  for sub in ('linen', 'nnx'):
    names += [f'fisher_optax.{sub}.{n}'
              for n in _capture_names(getattr(fo, sub))]
  return names


def _resolve(name: str):
  obj = fo
  for part in name.split('.')[1:]:
    obj = getattr(obj, part)
  return obj


class DocsTest(absltest.TestCase):

  def test_capture_names_are_found(self):
    # Guards the discovery itself: a broken filter would check nothing.
    self.assertContainsSubset(
        {'value_grad_and_stats', 'register_layer', 'capture_axes',
         'TrainState'}, _capture_names(fo.linen))
    self.assertContainsSubset({'value_grad_and_stats', 'register_layer'},
                              _capture_names(fo.nnx))

  def test_every_public_name_has_an_api_entry(self):
    missing = sorted(set(public_names()) - _documented())
    self.assertEmpty(
        missing, 'public names without an autodoc entry in docs/api/*.md: '
        f'{missing}')

  def test_api_entries_exist(self):
    for name in sorted(_documented()):
      with self.subTest(name):
        _resolve(name)  # raises AttributeError for a stale entry

  def test_every_public_docstring_has_an_example(self):
    names = ['fisher_optax'] + public_names()
    missing = [n for n in names
               if '>>>' not in (inspect.getdoc(_resolve(n)) or '')]
    self.assertEmpty(missing, f'docstrings without a >>> example: {missing}')

  def test_every_benchmark_page_is_on_the_site(self):
    toctree = (DOCS / 'benchmarks.md').read_text()
    results = sorted((ROOT / 'benchmarks' / 'results').glob('*.md'))
    self.assertNotEmpty(results)
    for page in results:
      if page.stem == 'summary':
        continue
      with self.subTest(page.stem):
        stub = DOCS / 'benchmarks' / page.name
        self.assertTrue(stub.exists(), f'add {stub.relative_to(ROOT)}')
        self.assertIn(f'../../benchmarks/results/{page.name}',
                      stub.read_text())
        self.assertRegex(toctree, rf'(?m)^benchmarks/{page.stem}$')

  def test_built_site_has_every_name(self):
    html = os.environ.get('FISHER_OPTAX_DOCS_HTML')
    if not html:
      self.skipTest('set FISHER_OPTAX_DOCS_HTML to a built site (.ci/docs)')
    # Sphinx is only installed with the docs extra.
    from sphinx.util import inventory  # pylint: disable=g-import-not-at-top
    with open(pathlib.Path(html) / 'objects.inv', 'rb') as f:
      inv = inventory.InventoryFile.load(f, '', lambda base, uri: uri)
    data = inv.data if hasattr(inv, 'data') else inv
    objects = set()
    for kind, entries in data.items():
      if kind.startswith('py:'):
        objects |= set(entries)
    missing = sorted(set(public_names()) - objects)
    self.assertEmpty(missing, f'public names not on the built site: {missing}')


if __name__ == '__main__':
  absltest.main()
