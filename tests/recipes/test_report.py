"""The report is an API: `recipes.pipeline.compress` returns a typed, frozen result whose Markdown, JSON and plot
are report.md, results.json and stages.png; compress.py is its command line and runs methods of other modules."""

import dataclasses
import json
import re
import subprocess
import sys
import textwrap

import pytest

from jaxcompress.recipes import pipeline
from jaxcompress.recipes.report import CompressionResult
from tests.train import pretrain_runs as runs

SCRIPT = runs.ROOT / 'experiments' / 'compress.py'
SMALL = dict(calib_samples=16, eval_samples=8, batch_size=8, seq_len=16, timing_reps=1)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  out = tmp_path_factory.mktemp('run')
  return pipeline.compress('tiny', 'magnitude(sparsity=0.5) > rtn(bits=8, group_size=16)', output_dir=out, **SMALL)


@pytest.mark.slow
def test_the_result_is_typed_frozen_and_holds_the_compressed_model(run):
  import numpy as np

  from jaxcompress import core
  assert isinstance(run, CompressionResult) and run.model == 'tiny'
  assert run.recipe == 'magnitude(sparsity=0.5) > rtn(bits=8, group_size=16)'
  with pytest.raises(dataclasses.FrozenInstanceError):
    run.recipe = 'x'  # noqa
  assert [s['stage'] for s in run.stages] == ['magnitude(sparsity=0.5)', 'rtn(bits=8, group_size=16)']
  assert run.metric == ('perplexity', False) and run.quality['perplexity'] > 1
  assert run.size['compression'] > 1 and run.leaf_kinds['Masked'] > 0 and run.measure['speedup'] > 0
  logits = run.compressed_model.apply(run.compressed_params, np.zeros((1, 8), np.int32))
  assert np.isfinite(np.asarray(logits)).all()
  assert any(core.is_compressed(w) for w in core.flatten(run.compressed_params).values())


def test_markdown_has_the_criteria_rows(run):
  text = run.to_markdown()
  assert text.startswith('# Compression report: tiny\n')
  for row in ('| size on disk |', '| bits per weight |', '| compression rate (disk) |',
              '| quality: held-out perplexity |', '| quality drop |', '| inference speed-up', '| weights in memory |',
              '| peak process RSS', '| time to compress |', '| fine-tuning step time', '| fine-tuning state',
              '| energy per token', '**Combined figure: quality drop per bit saved', '## Stages', '## Hardware fit'):
    assert row in text, row
  assert '| magnitude(sparsity=0.5) |' in text and 'Masked: gpu' in text


def test_json_round_trips_and_is_what_the_run_directory_holds(run, tmp_path):
  data = run.to_json()
  assert list(data) == ['model', 'recipe', 'quality_dense', 'quality', 'size', 'compress_s', 'stages', 'params_hash',
                        'leaf_kinds', 'measure', 'exports']
  back = CompressionResult.from_json(json.loads(json.dumps(data)))
  assert back == run and back.to_json() == data and back.to_markdown() == run.to_markdown()
  out = run.output_dir
  assert json.loads((pipeline.pathlib.Path(out) / 'results.json').read_text()) == data
  assert (pipeline.pathlib.Path(out) / 'report.md').read_text() == run.to_markdown()
  assert CompressionResult.read(out) == run
  run.plot(tmp_path / 'stages.png')
  assert (tmp_path / 'stages.png').stat().st_size > 1000
  with pytest.raises(ValueError, match='params_hash'):
    CompressionResult.from_json({k: v for k, v in data.items() if k != 'params_hash'})


def test_without_output_dir_nothing_is_written_and_the_result_is_the_same(run, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  stages = [{'method': 'magnitude', 'sparsity': 0.5}, {'method': 'rtn', 'bits': 8, 'group_size': 16}]  # JSON form
  again = pipeline.compress('tiny', stages, **SMALL, measure=False)
  assert again.output_dir is None and list(tmp_path.iterdir()) == [] and again.recipe == run.recipe
  assert again.params_hash == run.params_hash and again.quality == run.quality and again.measure is None
  assert '| inference speed-up (forward, same run, interleaved) | nan ms |' in again.to_markdown()


PLUGIN = '''
import dataclasses

from jaxcompress import registry


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScaleConfig:
  factor: float = 0.5  # what every block kernel is multiplied by


def scale_kernels(model, params, calib, *, config=ScaleConfig()):
  return model, model.select(params).map(lambda _, w: w * config.factor, params)


registry.register('scale_kernels', ScaleConfig, scale_kernels, family='quantization', paper='a test plugin')
'''


@pytest.mark.slow
@pytest.mark.subprocess
def test_compress_py_imports_a_module_whose_method_it_lists_and_runs(tmp_path):
  (tmp_path / 'my_methods.py').write_text(textwrap.dedent(PLUGIN))
  env = {**runs.env(1), 'PYTHONPATH': str(tmp_path)}
  listed = subprocess.run([sys.executable, str(SCRIPT), '--import=my_methods', '--list_methods'], env=env,
                          capture_output=True, text=True, timeout=300, cwd=runs.ROOT)
  assert listed.returncode == 0, listed.stderr[-3000:]
  assert '  scale_kernels(factor=0.5)' in listed.stdout and 'a test plugin' in listed.stdout
  out = tmp_path / 'out'
  ran = subprocess.run([sys.executable, str(SCRIPT), '--import=my_methods', '--model=tiny',
                        '--recipe=scale_kernels(factor=0.25) > magnitude(sparsity=0.5)', f'--output_dir={out}',
                        '--measure=false', '--calib_samples=16', '--eval_samples=8', '--batch_size=8'],
                       env=env, capture_output=True, text=True, timeout=600, cwd=runs.ROOT)
  assert ran.returncode == 0, ran.stderr[-3000:]
  assert '  stage 1 scale_kernels(factor=0.25):' in ran.stdout and '# Compression report: tiny' in ran.stdout
  results = json.loads((out / 'results.json').read_text())
  assert results['recipe'] == 'scale_kernels(factor=0.25) > magnitude(sparsity=0.5)'
  assert (out / 'compressed.jxc').is_file() and (out / 'orbax').is_dir()
  logs = ran.stdout + ran.stderr  # quiet by default: no absl / orbax / XLA INFO lines
  assert not re.search(r'^I\d{4} ', logs, re.M) and 'orbax-checkpoint' not in logs, logs[-3000:]
  missing = subprocess.run([sys.executable, str(SCRIPT), '--import=no_such_module', '--list_methods'], env=env,
                           capture_output=True, text=True, timeout=300, cwd=runs.ROOT)
  assert missing.returncode != 0 and "'no_such_module'" in missing.stderr


def test_a_run_directory_loads_as_a_model_for_evaluate(run):
  from jaxcompress.recipes import model_dirs, report
  model, params, kind = model_dirs.load(run.output_dir)
  assert kind == 'run' and type(model) is type(run.compressed_model)
  for name in ('vocab_size', 'hidden_size', 'intermediate_size', 'num_layers', 'num_heads', 'num_kv_heads'):
    assert getattr(model.config, name) == getattr(run.compressed_model.config, name), name
  assert report.params_hash(params) == run.params_hash
