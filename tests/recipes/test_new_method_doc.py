"""docs/new_method.md's code runs as written and does what it says; its method, installed as a package of its own
with a `jaxcompress.methods` entry point, is listed and run by the real command line."""

import contextlib
import io
import os
import pathlib
import re
import subprocess
import sys
import tomllib

import numpy as np

import pytest
from jaxcompress import registry

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOC = ROOT / 'docs' / 'new_method.md'


def _blocks(lang: str) -> list[str]:
  return re.findall(rf'```{lang}\n(.*?)```', DOC.read_text(), re.S)


def test_the_tutorial_runs_registers_and_ternarizes():
  blocks = _blocks('python')
  assert len(blocks) == 2
  out, ns = io.StringIO(), {}
  try:
    with contextlib.redirect_stdout(out):
      for code in blocks:
        exec(compile(code, str(DOC), 'exec'), ns)
    printed = out.getvalue()
    assert "ternary: unknown argument(s) ['treshold']; valid: threshold." in printed
    assert 'ternary: threshold=-1.0 is outside (0.0, inf).' in printed
    assert 'ternary(threshold=0.7)' in registry.describe()
    leaf, dense = ns['leaf'], np.asarray(ns['params']['layers'][0]['mlp']['up_proj']['kernel'], np.float64)
    kept = np.abs(dense) > 0.7 * np.abs(dense).mean()  # float64 reference of the same rule
    np.testing.assert_array_equal(np.asarray(leaf.mask), kept)
    alpha = np.abs(dense)[kept].mean()
    np.testing.assert_allclose(np.asarray(leaf.materialize(), np.float64), alpha * np.sign(dense) * kept, rtol=1e-5)
    assert 'Masked sparsity' in printed and '2 magnitudes' in printed  # 0 and alpha
    direct = ns['direct']['layers'][0]['mlp']['up_proj']['kernel']  # called directly = run by name
    np.testing.assert_array_equal(np.asarray(direct.materialize()), np.asarray(leaf.materialize()))
  finally:
    registry.REGISTRY.pop('ternary', None)


def _install(where: pathlib.Path) -> dict:
  """The doc's method as a package of its own: my_methods.py and a dist-info naming it in the entry-point group
  (what `pip install` of a pyproject with that [project.entry-points] table leaves in site-packages)."""
  (where / 'my_methods.py').write_text(_blocks('python')[0])
  (group, points), = tomllib.loads(_blocks('toml')[0])['project']['entry-points'].items()
  assert group == registry.ENTRY_POINTS
  info = where / 'my_methods-0.1.dist-info'
  info.mkdir()
  (info / 'METADATA').write_text('Metadata-Version: 2.1\nName: my-methods\nVersion: 0.1\n')
  (info / 'entry_points.txt').write_text(f'[{group}]\n' + ''.join(f'{k} = {v}\n' for k, v in points.items()))
  return {**os.environ, 'PYTHONPATH': str(where), 'JAX_PLATFORMS': 'cpu'}


@pytest.mark.slow
@pytest.mark.subprocess
def test_an_installed_package_registers_its_method_for_the_command_line(tmp_path):
  env = _install(tmp_path)
  script = str(ROOT / 'experiments' / 'compress.py')
  listed = subprocess.run([sys.executable, script, '--list_methods'], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
  assert listed.returncode == 0, listed.stderr[-2000:]
  assert 'ternary(threshold=0.7)' in listed.stdout and 'Ternary Weight Networks' in listed.stdout
  ran = subprocess.run([sys.executable, script, '--model=tiny', '--recipe=ternary(threshold=0.7)', '--save=false',
                        '--measure=false', '--calib_samples=16', '--eval_samples=16', '--batch_size=8',
                        f'--output_dir={tmp_path / "run"}'], env=env, capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
  assert ran.returncode == 0, ran.stderr[-2000:]
  assert 'stage 1 ternary(threshold=0.7)' in ran.stdout
