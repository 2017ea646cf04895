"""A compression run owns its output directory: another run's directory is refused (or replaced whole with
overwrite), a rerun of the same configuration replaces its own result, a failed run leaves the earlier one as it
was, and an out-of-core run stopped part way resumes from its staging directory."""

import json

import pytest

from jaxcompress.recipes import pipeline

SMALL = dict(calib_samples=16, eval_samples=8, batch_size=8, seq_len=16, measure=False, per_stage_eval=False)
RECIPE = 'magnitude(sparsity=0.5)'


def snapshot(out):
  """{relative path: bytes} of every file under out."""
  return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob('*')) if p.is_file()}


def names(out):
  return sorted(p.name for p in out.iterdir())


def saving_run(out):
  """A directory as a saving run of RECIPE leaves it (model files, report files, config.json saying save=True)."""
  for name in ('compressed.jxc', 'hf/config.json', 'orbax/_CHECKPOINT_METADATA', 'results.json', 'report.md'):
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    (out / name).write_text('earlier run')
  config = {'model': 'tiny', 'recipe': RECIPE, 'calib_data': 'default', 'eval_data': 'default', 'seed': 0,
            'timing_reps': 5, 'out_of_core': False, 'output_dir': str(out), 'save': True, **SMALL}
  (out / 'config.json').write_text(json.dumps(config))


def test_another_runs_directory_is_refused_and_overwrite_replaces_it_whole(tmp_path):
  out = tmp_path / 'run'
  saving_run(out)
  before = snapshot(out)
  with pytest.raises(ValueError, match=r"output_dir='.*run' holds another run \(its config.json differs: save: True "
                                       r'-> False; files: compressed.jxc, config.json, hf/, orbax/, .*\)\. Pass '
                                       r'overwrite=True \(--overwrite\) to replace that run as a whole'):
    pipeline.compress('tiny', RECIPE, output_dir=out, save=False, **SMALL)
  assert snapshot(out) == before and names(tmp_path) == ['run']
  pipeline.compress('tiny', RECIPE, output_dir=out, save=False, overwrite=True, **SMALL)
  assert not {'compressed.jxc', 'hf', 'orbax'} & set(names(out)) and names(tmp_path) == ['run']  # no mix
  assert json.loads((out / 'config.json').read_text())['save'] is False
  first = json.loads((out / 'results.json').read_text())
  assert first['recipe'] == RECIPE
  # the same configuration again (the directory spelled otherwise): it replaces its own result
  again = pipeline.compress('tiny', RECIPE, output_dir=f'{out}/', save=False, **SMALL)
  assert again.params_hash == first['params_hash'] and names(tmp_path) == ['run']


def test_a_failed_run_leaves_the_earlier_run_untouched(tmp_path, monkeypatch):
  out = tmp_path / 'run'
  pipeline.compress('tiny', RECIPE, output_dir=out, save=False, **SMALL)
  before = snapshot(out)
  # refused inputs: nothing written, not even config.json
  with pytest.raises(Exception, match='missing.txt'):
    pipeline.compress('tiny', RECIPE, output_dir=out, save=False, eval_data=str(tmp_path / 'missing.txt'),
                      overwrite=True, **SMALL)
  assert snapshot(out) == before and names(tmp_path) == ['run']
  # a failure part way: the new run's files are dropped, the earlier run stays whole

  def broken(*args, **kwargs):
    raise RuntimeError('stage failed')

  from jaxcompress import recipes
  monkeypatch.setattr(recipes, 'run', broken)
  with pytest.raises(RuntimeError, match='stage failed'):
    pipeline.compress('tiny', RECIPE, output_dir=out, save=False, seed=1, overwrite=True, **SMALL)
  assert snapshot(out) == before and names(tmp_path) == ['run']


def test_a_directory_holding_other_files_is_never_replaced(tmp_path):
  (tmp_path / 'notes.txt').write_text('mine')
  for overwrite in (False, True):
    with pytest.raises(ValueError, match=r"holds files a compression run does not write \(notes.txt\); give an empty "
                                         'or new directory'):
      pipeline.compress('tiny', RECIPE, output_dir=tmp_path, overwrite=overwrite, **SMALL)
  assert names(tmp_path) == ['notes.txt']
  (tmp_path / 'file').write_text('')
  with pytest.raises(ValueError, match=r"output_dir='.*file' is a file"):
    pipeline.compress('tiny', RECIPE, output_dir=tmp_path / 'file', **SMALL)


@pytest.mark.slow  # two out-of-core runs of the tiny model
def test_an_out_of_core_run_stopped_part_way_resumes_from_its_staging_directory(tmp_path, monkeypatch):
  from jaxcompress import calibration
  real = calibration.compress_checkpoint
  done = []

  def stop_after_block_0(*args, on_block=None, **kwargs):
    def record(i, rec):
      done.append(i)
      if i == 0 and done == [0]:
        raise KeyboardInterrupt
    return real(*args, on_block=record, **kwargs)

  monkeypatch.setattr(calibration, 'compress_checkpoint', stop_after_block_0)
  out, cfg = tmp_path / 'run', dict(SMALL, out_of_core=True, save=False)
  recipe = 'wanda(sparsity=0.5)'
  with pytest.raises(KeyboardInterrupt) as stopped:
    pipeline.compress('tiny', recipe, output_dir=out, **cfg)
  staging = tmp_path / 'run.partial'
  assert names(tmp_path) == ['run.partial'] and "stays in '" in ''.join(stopped.value.__notes__)
  assert (staging / 'blocks' / 'manifest.json').is_file() and not (out / 'config.json').exists()
  with pytest.raises(ValueError, match=r"'.*run.partial' holds an unfinished out-of-core run \(another "
                                       r'configuration: seed: 0 -> 1\); rerun with its settings to resume it'):
    pipeline.compress('tiny', recipe, output_dir=out, seed=1, **cfg)
  result = pipeline.compress('tiny', recipe, output_dir=out, **cfg)
  assert done == [0, 1] and names(tmp_path) == ['run']  # block 0 kept, not recomputed
  manifest = json.loads((out / 'blocks' / 'manifest.json').read_text())
  assert manifest['complete'] and result.output_dir == str(out)


def test_config_comparison_ignores_the_spelling_of_the_directory():
  from jaxcompress.recipes import run_dir
  a = {'model': 'tiny', 'seed': 0, 'output_dir': 'runs/x'}
  assert run_dir.same(a, {**a, 'output_dir': '/abs/runs/x'})
  assert run_dir.diff(a, {**a, 'seed': 2, 'extra': 1}) == 'extra: unset -> 1, seed: 0 -> 2'
