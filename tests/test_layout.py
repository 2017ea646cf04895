"""The package layout: no attribute of a jaxcompress package hides a module of the same name.

A family re-exports its methods from modules under `<family>/_src/`: `jaxcompress.pruning.wanda` is the method,
and its module is `jaxcompress.pruning._src.wanda`, so a dotted name never means a function as an attribute and a
module to `import`.
"""

import importlib
import pathlib
import pkgutil
import types

import jaxcompress

FAMILIES = ('pruning', 'quantization', 'distillation', 'lowrank', 'sharing', 'architecture')


def _packages():
  yield jaxcompress
  for info in pkgutil.walk_packages(jaxcompress.__path__, 'jaxcompress.'):
    if info.ispkg:
      yield importlib.import_module(info.name)


def test_no_attribute_shadows_a_module():
  shadowed = []
  for package in _packages():
    for info in pkgutil.iter_modules(package.__path__):
      value = getattr(package, info.name, None)
      if value is not None and not isinstance(value, types.ModuleType):
        shadowed.append(f'{package.__name__}.{info.name} is a {type(value).__name__}, and a module of that name exists')
  assert not shadowed, '\n'.join(shadowed)


def test_every_family_keeps_its_modules_under_src():
  root = pathlib.Path(jaxcompress.__file__).parent
  for family in FAMILIES:
    top = sorted(p.name for p in (root / family).glob('*.py'))
    assert top == ['__init__.py'], f'{family}/ holds {top}; a module of a family goes under {family}/_src/'
    assert (root / family / '_src' / '__init__.py').is_file()
