"""docs/new_method.md's code runs as written and does what it says."""

import contextlib
import io
import pathlib
import re

import numpy as np

from jaxcompress.recipes import registry

DOC = pathlib.Path(__file__).resolve().parents[2] / 'docs' / 'new_method.md'


def test_the_tutorial_runs_registers_and_ternarizes():
  blocks = re.findall(r'```python\n(.*?)```', DOC.read_text(), re.S)
  assert len(blocks) == 4
  out, ns = io.StringIO(), {}
  try:
    with contextlib.redirect_stdout(out):
      for code in blocks:
        exec(compile(code, str(DOC), 'exec'), ns)
    printed = out.getvalue()
    assert "ternary: unknown argument(s) ['treshold']; valid: threshold." in printed
    assert 'ternary(threshold=0.7)' in registry.describe()
    leaf, dense = ns['leaf'], np.asarray(ns['params']['layers'][0]['mlp']['up_proj']['kernel'], np.float64)
    kept = np.abs(dense) > 0.7 * np.abs(dense).mean()  # float64 reference of the same rule
    np.testing.assert_array_equal(np.asarray(leaf.mask), kept)
    alpha = np.abs(dense)[kept].mean()
    np.testing.assert_allclose(np.asarray(leaf.materialize(), np.float64), alpha * np.sign(dense) * kept, rtol=1e-5)
    assert 'Masked sparsity' in printed and '2 magnitudes' in printed  # 0 and alpha
  finally:
    registry.REGISTRY.pop('ternary', None)
