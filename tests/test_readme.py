"""The README's example runs as written and does what it says."""

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest

from jaxcompress import core

README = Path(__file__).resolve().parents[1] / 'README.md'


def _example() -> str:
  text = README.read_text()
  block = re.search(r'<!-- readme-example:start -->\s*```python\n(.*?)```\s*<!-- readme-example:end -->', text, re.S)
  assert block, 'README lost its example block'
  return block.group(1)


def test_readme_example_runs_and_prunes_thirty_percent():
  code = _example()
  assert len([l for l in code.splitlines() if l.strip() and not l.strip().startswith('#')]) <= 12
  out = io.StringIO()
  namespace: dict = {}
  with contextlib.redirect_stdout(out):
    exec(compile(code, str(README), 'exec'), namespace)
  printed = out.getvalue()
  selection, pruned, params = namespace['selection'], namespace['pruned'], namespace['params']
  assert len(selection) == 30 and 'Selection(30 weights)' in printed
  assert all(not p.startswith('layers/0/') for p in selection)
  for path in selection:
    leaf = core.paths.get(pruned, path)
    assert isinstance(leaf, core.Masked)
    np.testing.assert_allclose(leaf.sparsity(), 0.3, atol=0.002)
  untouched = core.paths.get(pruned, 'layers/0/attn/q_proj/kernel')
  assert not core.is_compressed(untouched)
  before, after = core.stats.totals(params), core.stats.totals(pruned)
  kept = sum(np.prod(s) for s in selection.shapes)
  assert before.nonzero - after.nonzero == pytest.approx(0.3 * kept, abs=0.002 * kept)
  assert 'compression (baseline disk / disk)' in printed and 'layers/5' in printed

