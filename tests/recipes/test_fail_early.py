"""Everything a run can know to refuse is refused before any work, as one message naming the setting, its value
and the fix: recipe arguments at parse time, the model and its data files before the weights load, each stage
against the model's shapes, NaN weights before the dense evaluation; the command lines print one line, status 2."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import cli
from jaxcompress import models, recipes
from jaxcompress.recipes import fixture, model_dirs, pipeline, preflight
from jaxcompress.recipes import setup as setup_lib
from tests.train import pretrain_runs as runs

SMALL = dict(calib_samples=16, eval_samples=8, batch_size=8, seq_len=16, timing_reps=1, measure=False)


# Parse time -------------------------------------------------------------------------------------------------------

def test_an_argument_given_twice_is_refused_not_overwritten(tmp_path):
  with pytest.raises(ValueError, match=r'rtn: bits= is given twice \(bits=4 and bits=8\); keep one'):
    recipes.parse('rtn(bits=4, bits=8)')
  file = tmp_path / 'r.json'
  file.write_text('[{"method": "rtn", "bits": 4, "bits": 8}]')
  with pytest.raises(ValueError, match=r'r\.json\': the key "bits" is given twice .*\(4 and 8\); keep one'):
    recipes.parse(str(file))


def test_a_json_recipe_that_does_not_parse_names_the_file_line_and_column(tmp_path):
  file = tmp_path / 'r.json'
  file.write_text('[{"method": "rtn",\n  "bits": 4,}]')
  with pytest.raises(ValueError, match=r"'.*r\.json' is not valid JSON: .* at line 2, column 13"):
    recipes.parse(str(file))


@pytest.mark.parametrize('text, needle', [
    ('wanda(sparsity=0.5, include=("mlp/(",))', "wanda: include=('mlp/(',): 'mlp/(' is not a valid regular "
                                                'expression (missing ), unterminated subpattern at position 4)'),
    ('magnitude(exclude="[")', "magnitude: exclude='[': '[' is not a valid regular expression"),
    ('sparsegpt(overrides=(("a(", 0.3),))', "sparsegpt: overrides=(('a(', 0.3),): 'a(' is not a valid regular"),
    ('rtn(include="mlp/(")', "rtn: include='mlp/(': 'mlp/(' is not a valid"),
])
def test_a_regex_that_does_not_compile_is_refused_at_parse_time(text, needle):
  with pytest.raises(ValueError) as e:
    recipes.parse(text)
  assert needle in str(e.value)


@pytest.mark.parametrize('text, needle', [
    ('wanda(pattern="3:2")', "wanda: pattern='3:2' needs 0 < N < M"),
    ('magnitude(pattern="0:4")', "magnitude: pattern='0:4' needs 0 < N < M"),
    ('sparsegpt(pattern="2-4")', "sparsegpt: pattern='2-4' is not one of"),
    ('sparsegpt(pattern="per_output")', "sparsegpt: pattern='per_output' is not a SparseGPT selection"),
])
def test_a_bad_n_m_pattern_is_refused_at_parse_time(text, needle):
  with pytest.raises(ValueError) as e:
    recipes.parse(text)
  assert needle in str(e.value)


# Before the weights load: the recipe against the model's shapes ---------------------------------------------------

@pytest.mark.parametrize('recipe, needle', [
    ('gptq(bits=4, group_size=48)', 'stage 1 gptq: group_size=48 does not divide the input width 32 of '
                                    'layers/0/attn/k_proj/kernel (14 of 14 kernels); give 32 or 16'),
    ('awq(group_size=24)', 'stage 1 awq: group_size=24 does not divide the input width 32'),
    ('mixed(group_size=48)', 'stage 1 mixed: group_size=48 does not divide'),
    ('magnitude(sparsity=0.5) > rtn(bits=8, group_size=100)', 'stage 2 rtn: group_size=100 divides none of the '
                                                               'input widths [32, 64]'),
    ('rtn(bits=8, group_size=100)', 'stage 1 rtn: group_size=100 divides none of the input widths [32, 64]'),
    ('qat(group_size=100, steps=1)', 'stage 1 qat: group_size=100 divides none of the input widths'),
    ('wanda(pattern="2:3")', "stage 1 wanda: pattern='2:3' groups every 3 inputs, but "
                             'layers/0/attn/k_proj/kernel has 32 inputs'),
    ('magnitude(pattern="1:5", include=("attn/",))', "stage 1 magnitude: pattern='1:5' groups every 5 inputs"),
    ('sparsegpt(include="nothing")', "stage 1 sparsegpt: include='nothing' exclude=() matches no kernel"),
    ('gqa(kv_heads=3)', 'stage 1 gqa: kv_heads=3 does not divide the 2 key/value heads (with 4 query heads); '
                        'choose one of [1, 2]'),
    ('drop_layers(layers=(0, 5))', 'stage 1 drop_layers: layers=(0, 5) names blocks [5], but the model has blocks '
                                   '0..1'),
    ('drop_layers(layers=(1, 0))', 'stage 1 drop_layers: layers=(1, 0) must be increasing without repeats'),
])
def test_a_stage_the_model_cannot_run_is_refused_from_its_shapes(recipe, needle):
  with pytest.raises(preflight.PreflightError) as e:
    preflight.check('tiny', recipes.parse(recipe))
  assert needle in str(e.value)


def test_gqa_on_a_twelve_head_model_is_refused_from_its_config():
  stages = recipes.parse('gqa(kv_heads=3)')
  llama = models.Llama(models.LlamaConfig(vocab_size=64, hidden_size=96, intermediate_size=64, num_layers=1,
                                          num_heads=12, num_kv_heads=4))
  with pytest.raises(preflight.PreflightError, match=r'kv_heads=3 does not divide the 4 key/value heads \(with 12 '):
    preflight.check_stages(llama, stages)
  bert = models.Bert(models.BertConfig(vocab_size=64, hidden_size=96, num_layers=1, num_heads=12,
                                       intermediate_size=64))
  with pytest.raises(preflight.PreflightError, match=r'Bert has no num_kv_heads; .*\(12 heads here\)'):
    preflight.check_stages(bert, stages)


def test_shapes_that_fit_pass_and_stages_after_an_architecture_change_are_its_own():
  model = preflight.check('tiny', recipes.parse('wanda(pattern="2:4") > gptq(bits=4, group_size=16)'))
  assert model.config.hidden_size == 32
  preflight.check('tiny', recipes.parse('rtn(bits=8)'))  # the default group size falls back silently
  preflight.check('tiny', recipes.parse('drop_layers(layers=(0,)) > gptq(bits=4, group_size=48)'))


def test_out_of_core_with_a_training_stage_is_refused_before_loading():
  with pytest.raises(preflight.PreflightError, match=r'out_of_core=True: stage 2 distill\(steps=2\) trains; '):
    preflight.check('tiny', recipes.parse('wanda(sparsity=0.5) > distill(steps=2)'), out_of_core=True)


# Before the weights load: the model directory and the data files --------------------------------------------------

def _checkpoint(path, config_text=None, weights=None, record=False):
  """A copy of the fixture's directory at `path`: its config.json (or config_text), its weights (a link) or the
  bytes `weights`, and with `record` its training.json."""
  path.mkdir()
  if record:
    os.symlink(fixture.FIXTURE_DIR / 'training.json', path / 'training.json')
  (path / 'config.json').write_text(config_text or (fixture.FIXTURE_DIR / 'config.json').read_text())
  if weights is None:
    os.symlink(fixture.FIXTURE_DIR / 'model.safetensors', path / 'model.safetensors')
  else:
    (path / 'model.safetensors').write_bytes(weights)
  return path


def test_a_damaged_model_directory_is_refused_naming_the_file(tmp_path):
  damaged = _checkpoint(tmp_path / 'config', config_text='{"model_type": "llama",\n')
  with pytest.raises(preflight.PreflightError, match=r"config\.json' is not valid JSON \(.* at line 2, column 1\)"):
    preflight.check_model(str(damaged))
  header = _checkpoint(tmp_path / 'header', weights=b'garbage', record=True)
  with pytest.raises(preflight.PreflightError, match=r"cannot read '.*model\.safetensors': .*truncated or corrupt"):
    preflight.check_model(str(header))
  with pytest.raises(ValueError, match=r"cannot read '.*model\.safetensors': .*truncated or corrupt"):
    model_dirs.load(str(header))  # what evaluate.py reads, through the same message


def test_a_causal_directory_without_the_training_record_is_refused(tmp_path):
  plain = _checkpoint(tmp_path / 'plain')
  with pytest.raises(preflight.PreflightError, match=r'holds a causal LM without training\.json.*'
                                                     r"Compress model='fixture' or 'tiny'"):
    preflight.check_model(str(plain))


def test_a_compression_run_directory_is_not_a_starting_model(tmp_path):
  run = _run_dir(tmp_path / 'run', source='fixture')
  with pytest.raises(preflight.PreflightError, match=r"is a compression run directory .* dense equivalent '.*hf'"):
    preflight.check_model(str(run))


def test_a_data_file_of_the_other_kind_of_model_is_refused(tmp_path):
  text = tmp_path / 'calib.txt'
  text.write_text('a sentence\n')
  with pytest.raises(preflight.PreflightError, match=r"calib_data='.*calib\.txt': a causal LM \(tiny\) takes "
                                                     r"'default' or a \.npy of token rows"):
    preflight.check_model('tiny', calib_data=str(text))
  encoder = models.Bert(models.BertConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
                                          intermediate_size=64))
  with pytest.raises(preflight.PreflightError, match=r"eval_data='rows\.npy': an encoder takes 'default' or a "
                                                     r'\.txt file'):
    preflight.check_data(encoder, 'eval_data', 'rows.npy')
  with pytest.raises(preflight.PreflightError, match=r"eval_data='missing\.npy': no such file"):
    preflight.check_model('tiny', eval_data='missing.npy')



def test_a_data_file_shorter_than_the_samples_asked_is_refused_not_cut_short(tmp_path):
  rows = tmp_path / 'rows.npy'
  np.save(rows, np.zeros((4, 17), np.int32))
  with pytest.raises(preflight.PreflightError, match=r"calib_data='.*rows\.npy' has 4 rows; calib_samples=8 asked "
                                                     r'for more\. Lower calib_samples or give more rows'):
    setup_lib.load('tiny', calib_data=str(rows), calib_samples=8, eval_samples=4)
  flat = tmp_path / 'flat.npy'
  np.save(flat, np.zeros(17, np.int32))
  with pytest.raises(preflight.PreflightError, match=r"eval_data='.*flat\.npy': rows of shape \(17,\); expected a "
                                                     r'2-D array'):
    setup_lib.load('tiny', eval_data=str(flat), calib_samples=8, eval_samples=4)

# After loading, before the dense evaluation -------------------------------------------------------------------------

def _tiny_setup(params):
  spec = preflight.model_spec('tiny')
  rows = np.zeros((8, 17), np.int32)
  return setup_lib.Setup(name='tiny', model=spec, params=params, causal=True, calib=[{'tokens': rows[:, :-1]}],
                         train=None, eval_tokens=rows, eval_mask=None)


def test_nan_weights_are_refused_before_the_dense_evaluation_and_before_writing(tmp_path):
  abstract = preflight.model_spec('tiny').abstract_params()
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
  kernel = params['layers'][1]['mlp']['down_proj']['kernel']
  params['layers'][1]['mlp']['down_proj']['kernel'] = kernel.at[0, :3].set(jnp.nan).at[1, 0].set(jnp.inf)
  out = tmp_path / 'out'
  with pytest.raises(preflight.PreflightError, match=r"model='tiny': 4 weights are NaN or inf, in 1 tensor\(s\): "
                                                     r'layers/1/mlp/down_proj/kernel \(4\)\. .*export or download'):
    pipeline.compress(_tiny_setup(params), 'rtn(bits=8, group_size=16)', output_dir=out, **SMALL)
  assert not out.exists()


def test_compress_refuses_a_stage_before_loading_or_writing(tmp_path):
  out = tmp_path / 'out'
  with pytest.raises(preflight.PreflightError, match='stage 1 gptq: group_size=48 does not divide'):
    pipeline.compress('tiny', 'gptq(bits=4, group_size=48)', output_dir=out, **SMALL)
  assert not out.exists() and not list(tmp_path.iterdir())


# Command lines: JSON flags and files, templates, run directories as models ------------------------------------------

def test_json_flag_and_file_errors_name_the_flag_file_line_and_column(tmp_path):
  with pytest.raises(ValueError, match=r'--grid=\'{"bits": \[4\' is not valid JSON: .* at line 1, column 12'):
    cli.json_value('--grid', '{"bits": [4')
  file = tmp_path / 's.json'
  file.write_text('{"recipes": ["rtn(bits={bits})"],\n "grid": {"bits": [4,]}}')
  with pytest.raises(ValueError, match=r"--sweep='.*s\.json': '.*s\.json' is not valid JSON: .* line 2, column 22"):
    cli.json_file('--sweep', str(file))
  assert cli.as_flag("model='x': no") == "--model='x': no" and cli.as_flag('recipe: stage 1') == '--recipe: stage 1'


def test_sweep_flags_are_checked_with_the_flag_in_the_message(tmp_path):
  from experiments import sweep
  with pytest.raises(ValueError, match=r"recipe template 'rtn\(bits={bits\)': expected '}' before end of string; "
                                       'write each grid setting as {name}'):
    sweep.sweep_points(['rtn(bits={bits)'], '{"bits": [4]}', None)
  listed = tmp_path / 'list.json'
  listed.write_text('[{"recipes": []}]')
  with pytest.raises(ValueError, match=r"--sweep='.*list\.json' holds a JSON list; write an object"):
    sweep.sweep_points(None, '{}', str(listed))
  with pytest.raises(ValueError, match=r"--grid='\[4\]' is a JSON list; write an object"):
    sweep.sweep_points(['rtn(bits={bits})'], '[4]', None)
  with pytest.raises(ValueError, match=r"--recipes point 'rtn\(bits=4, bits=8\)': rtn: bits= is given twice"):
    sweep.sweep_points(['rtn(bits=4, bits=8)'], '{}', None)
  templates, grid, points = sweep.sweep_points(['rtn(bits={bits}, group_size=16)'], '{"bits": [4, 8]}', None)
  assert [r for r, _ in points] == ['rtn(bits=4, group_size=16)', 'rtn(bits=8, group_size=16)']


def _run_dir(path, source):
  """The files that make a directory a compression run directory (model_dirs.is_run_dir), compressing `source`."""
  (path / model_dirs.RUN_ARCHITECTURE).mkdir(parents=True)
  (path / model_dirs.RUN_ARCHITECTURE / 'config.json').write_text('{}')
  (path / model_dirs.RUN_FILE).write_bytes(b'')
  (path / 'config.json').write_text(json.dumps({'model': source, 'recipe': 'rtn(bits=8)'}))
  return path


def test_a_run_directory_takes_the_tokenizer_of_the_model_it_compressed(tmp_path):
  assert model_dirs.tokenizer_dir(_run_dir(tmp_path / 'a', 'fixture')) == fixture.FIXTURE_DIR
  assert model_dirs.tokenizer_dir(_run_dir(tmp_path / 'b', 'tiny')) is None  # nothing to find: --tokenizer
  assert model_dirs.tokenizer_dir('fixture') == fixture.FIXTURE_DIR


@pytest.mark.slow  # five command lines started at once, each importing jax: ~15 s on two cores
@pytest.mark.subprocess
def test_the_command_lines_print_one_line_and_exit_2(tmp_path):
  damaged = _checkpoint(tmp_path / 'damaged', config_text='{"model_type": "llama",\n')
  script = lambda name: str(runs.ROOT / 'experiments' / f'{name}.py')
  out = tmp_path / 'out'
  cases = {
      'duplicate': ([script('compress'), '--recipe=rtn(bits=4, bits=8)'], '--recipe: rtn: bits= is given twice'),
      'shape': ([script('compress'), '--model=tiny', '--recipe=gptq(bits=4, group_size=48)', f'--output_dir={out}'],
                '--recipe: stage 1 gptq: group_size=48 does not divide'),
      'flag': ([script('compress'), '--calib_samples=0'], 'flag --calib_samples=0: 0 is not'),
      'template': ([script('sweep'), '--model=tiny', '--recipes=rtn(bits={bits)', '--grid={"bits": [4]}',
                    f'--output_dir={out}'], "recipe template 'rtn(bits={bits)': expected '}'"),
      'evaluate': ([script('evaluate'), f'--model={damaged}', '--reference=fixture', f'--output_dir={out}'],
                   f"--model='{damaged}': '{damaged}/config.json' is not valid JSON"),
  }
  procs = {k: subprocess.Popen([sys.executable, *cmd], env=runs.env(1), cwd=runs.ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k, (cmd, _) in cases.items()}
  for k, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=300)
    lines = [line for line in stderr.splitlines() if line.startswith('error: ')]
    assert proc.returncode == 2, (k, stderr[-3000:])
    assert len(lines) == 1 and cases[k][1] in lines[0], (k, stderr[-3000:])
    assert 'Traceback' not in stderr and 'USAGE' not in stderr and '--helpfull' not in stderr, (k, stderr[-3000:])
  assert not out.exists()
