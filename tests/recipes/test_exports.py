"""A run writes its compressed model in the formats asked (default: what its leaves allow), and the report lists
each with its bytes."""

import json
import pathlib

import pytest

from jaxcompress import core, models
from jaxcompress.recipes import pipeline

SMALL = dict(calib_samples=8, eval_samples=8, batch_size=8, seq_len=16, measure=False, per_stage_eval=False)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  out = tmp_path_factory.mktemp('run') / 'out'
  # the tiny Llama's MLP Linears are 32 and 64 wide, so GPTQ (multiples of 32) holds them as well
  return pipeline.compress('tiny', 'rtn(bits=4, group_size=16, include=("mlp/",))', output_dir=out, **SMALL)


def test_default_writes_every_format_the_leaves_allow_and_reports_bytes(run):
  out = run.output_dir
  assert list(run.exports) == ['jxc', 'compressed-tensors', 'gptq', 'dense']
  for fmt, e in run.exports.items():
    path = pathlib.Path(out, e['path'])
    size = path.stat().st_size if fmt == 'jxc' else sum(f.stat().st_size for f in path.rglob('*') if f.is_file())
    assert e['bytes'] == size > 0, fmt
  results = json.loads(open(f'{out}/results.json').read())
  assert results['exports'] == run.exports
  report = open(f'{out}/report.md').read()
  assert '## Files written' in report and '| gptq | gptq |' in report
  for fmt in ('compressed_tensors', 'gptq'):
    _, params = models.from_pretrained(f'{out}/{fmt}')
    w = core.paths.get(params, 'layers/0/mlp/up_proj/kernel')
    assert isinstance(w, core.Quantized) and w.bits == 4 and w.group_size == 16
  assert not core.is_compressed(core.paths.get(params, 'layers/0/attn/k_proj/kernel'))


def test_a_format_named_that_cannot_hold_the_leaves_is_refused(tmp_path):
  with pytest.raises(ValueError, match="unknown format 'onnx'"):
    pipeline.compress('tiny', 'rtn(bits=4, group_size=16)', output_dir=tmp_path / 'a', export='jxc,onnx', **SMALL)
  assert not (tmp_path / 'a').exists()
  # k/v projections are 16 wide: the GPTQ layout cannot hold them, and nothing of the run is left half-written
  with pytest.raises(ValueError, match=r'layers/0/attn/k_proj/kernel.*GPTQ packs along both'):
    pipeline.compress('tiny', 'rtn(bits=4, group_size=16)', output_dir=tmp_path / 'b', export='gptq', **SMALL)
  assert not (tmp_path / 'b').exists()
