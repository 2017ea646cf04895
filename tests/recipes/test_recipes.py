"""Recipes: parsing and planning fail before any work; a run is reproducible, also across 2 processes."""

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxcompress import core, recipes, registry
from tests.train import pretrain_runs as runs

SCRIPT = runs.ROOT / 'experiments' / 'compress.py'
EXAMPLE = 'sparsegpt(sparsity=0.5, pattern="2:4") > gptq(bits=4, group_size=128) > distill(steps=500)'


def test_parse_the_example_and_its_json_form(tmp_path):
  stages = recipes.parse(EXAMPLE)
  assert [s.name for s in stages] == ['sparsegpt', 'gptq', 'distill']
  assert stages[0].config.pattern == '2:4' and stages[0].config.sparsity == 0.5
  assert stages[1].config.bits == 4 and stages[1].config.group_size == 128 and stages[1].config.damp == 0.01
  assert stages[2].config.steps == 500
  file = tmp_path / 'r.json'
  file.write_text(json.dumps([{'method': 'sparsegpt', 'sparsity': 0.5, 'pattern': '2:4'},
                              {'method': 'gptq', 'bits': 4, 'group_size': 128}, {'method': 'distill', 'steps': 500}]))
  assert [s.config for s in recipes.parse(str(file))] == [s.config for s in stages]
  assert recipes.to_string(recipes.parse(recipes.to_string(stages))) == recipes.to_string(stages)


@pytest.mark.parametrize('text, needle', [
    ('gptq > nosuch(bits=3)', 'registered methods: act_quant, asvd, awq'),
    ('gptq(bitz=3)', "unknown argument(s) ['bitz']; valid: bits, group_size"),
    ('gptq(bits="4")', "bits='4' is not a int"),
    ('gptq(bits=12)', 'bits=12 is outside [2, 8]'),
    ('magnitude(sparsity=1.5)', 'sparsity=1.5 is outside (0.0, 1.0)'),
    ('svd(keep=0.5) > gptq(bits=4)', 'stage 2 gptq cannot run on blocks weights already lowrank (by stage 1 svd)'),
    ('gptq(bits=4) > wanda(sparsity=0.5)', 'stage 2 wanda cannot run on blocks weights already quantized'),
    ('gptq(bits=4) > rtn(bits=8)', 'already quantized'),
    ('gptq(bits=4) >', 'empty stage'),
    ('gptq(bits=x)', 'is not a literal'),
])
def test_bad_recipes_fail_at_parse_time_naming_the_valid_choices(text, needle):
  with pytest.raises(ValueError) as e:
    recipes.parse(text)
  assert needle in str(e.value)


def test_embeddings_and_blocks_are_planned_apart():
  stages = recipes.parse('gptq(bits=4) > rtn(bits=8, include=(), embeddings=True)')
  states = recipes.plan(stages)
  assert states[1] == {'blocks': frozenset({'quantized'}), 'embeddings': frozenset()}
  with pytest.raises(ValueError, match='embeddings weights already quantized'):
    recipes.parse('rtn(bits=8, embeddings=True) > rtn(bits=4, include=(), embeddings=True)')


def test_every_method_is_listed_with_its_fields_and_paper():
  text = recipes.describe()
  for name, m in recipes.REGISTRY.items():
    assert f'  {name}(' in text and m.paper in text
  for name in ('magnitude', 'wanda', 'sparsegpt', 'rtn', 'gptq', 'awq', 'smoothquant', 'llm_int8', 'nonuniform',
               'mixed', 'pq', 'svd', 'fwsvd', 'asvd', 'svd_llm', 'lora', 'qlora', 'share', 'tie_embeddings', 'gqa',
               'distill', 'recover'):
    assert name in recipes.REGISTRY
  assert 'smoothquant(migration=0.5' in text and "llm_int8(migration=None, outlier_threshold=6.0" in text


def _tiny():
  from jaxcompress.recipes import setup as compress
  return compress.tiny_model(0)


def test_a_method_registered_in_one_line_runs_in_a_recipe():
  @dataclasses.dataclass(frozen=True, kw_only=True)
  class HalveConfig:
    factor: float = 0.5  # what every block kernel is multiplied by

  def halve(model, params, calib, *, config=HalveConfig()):
    return model, model.select(params).map(lambda _, w: w * config.factor, params)

  recipes.register('halve_test', HalveConfig, halve, family='quantization', paper='none')
  try:
    model, params = _tiny()
    stages = recipes.parse('halve_test(factor=0.25) > magnitude(sparsity=0.5)')
    ctx = recipes.Context(reference_model=model, reference=params, calib=())
    _, out = recipes.run(stages, ctx, model, params)
    w, got = params['layers'][0]['mlp']['up_proj']['kernel'], out['layers'][0]['mlp']['up_proj']['kernel']
    assert isinstance(got, core.Masked)
    kept = np.asarray(got.mask)
    np.testing.assert_array_equal(np.asarray(got.materialize())[kept], np.asarray(w)[kept] * 0.25)
    assert abs(kept.mean() - 0.5) < 0.01
  finally:
    del registry.REGISTRY['halve_test']


def test_ranges_are_declared_per_field_and_checked_by_name():
  @dataclasses.dataclass(frozen=True, kw_only=True)
  class ScaleConfig:
    factor: float = registry.field(0.5, range='(0.0, 1.0]')  # what every block kernel is multiplied by
    sparsity: float = 2.0  # no range declared: a field's name alone decides nothing

  recipes.register('scale_test', ScaleConfig, lambda model, params, calib, *, config: (model, params),
                   family='quantization', paper='none')
  try:
    assert recipes.parse('scale_test(factor=1.0, sparsity=3.0)')[0].config.sparsity == 3.0
    for bad in ('factor=0.0', 'factor=1.5', 'factor=float("nan")'):
      with pytest.raises(ValueError, match=r'scale_test: factor=.* (is outside \(0\.0, 1\.0\]|not a literal)'):
        recipes.parse(f'scale_test({bad})')
  finally:
    del registry.REGISTRY['scale_test']
  with pytest.raises(ValueError, match="range='0..1': write an interval such as"):
    registry.field(1, range='0..1')


def test_a_methods_module_that_fails_to_import_is_named():
  with pytest.raises(ImportError, match=r"methods module 'no_such_methods_module' \(--import\) failed to import"):
    registry.load_plugins(['no_such_methods_module'])


@pytest.mark.slow
def test_quantizers_keep_masks_of_pruned_kernels():
  # The recipe, model and calibration shapes of the runs of TINY below: its programs compile once for both tests.
  model, params = _tiny()
  rows = np.random.default_rng(0).integers(0, 64, (32, 16)).astype(np.int32)
  ctx = recipes.Context(reference_model=model, reference=params, calib=({'tokens': rows},))
  _, out = recipes.run(recipes.parse('wanda(sparsity=0.5) > gptq(bits=4, group_size=16)'), ctx, model, params)
  leaf = out['layers'][1]['attn']['q_proj']['kernel']
  assert isinstance(leaf, core.Masked) and isinstance(leaf.value, core.Quantized)
  dense = np.asarray(leaf.materialize())
  assert (dense[~np.asarray(leaf.mask)] == 0).all() and abs(np.asarray(leaf.mask).mean() - 0.5) < 0.01


def test_structured_and_moefy_stages_change_the_architecture_and_refuse_each_other():
  from jaxcompress.pruning._src.structured import block_flops, is_narrowed
  model, params = _tiny()
  rows = np.random.default_rng(0).integers(0, 64, (8, 16)).astype(np.int32)
  ctx = recipes.Context(reference_model=model, reference=params, calib=({'tokens': rows},))
  small_model, small = recipes.run(recipes.parse('structured(flops=0.5)'), ctx, model, params)
  assert is_narrowed(small_model, small) and not is_narrowed(model, params)
  dense_flops = block_flops(model, params, 16)
  assert block_flops(small_model, small, 16) <= 0.5 * dense_flops + 1e-6
  moe_model, moe = recipes.run(recipes.parse('moefy(num_experts=4, top_k=2)'), ctx, model, params)
  assert moe_model.config.moe_experts == 4 and moe_model.config.moe_top_k == 2
  assert np.isfinite(np.asarray(moe_model.apply(moe, rows))).all()
  with pytest.raises(ValueError, match='moefy'):
    recipes.parse('structured(flops=0.5) > moefy()')


def test_rtn_rules_leave_a_tied_embedding_alone_unless_asked():

  from jaxcompress import models
  model = models.Llama(models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                                          num_heads=4, num_kv_heads=2, max_position_embeddings=64,
                                          tie_embeddings=True))
  params = jax.jit(model.init)(jax.random.key(0))
  ctx = recipes.Context(reference_model=model, reference=params, calib=())
  for args, emb_quantized, blocks_quantized in (('', False, True), (', include=(), embeddings=True', True, False),
                                                (', embeddings=True', True, True)):
    _, out = recipes.run(recipes.parse(f'rtn(bits=8, group_size=32{args})'), ctx, model, params)
    flat = core.flatten(out)
    assert isinstance(flat['embed/tokens/embedding'], core.Quantized) == emb_quantized, args
    assert isinstance(flat['layers/0/attn/q_proj/kernel'], core.Quantized) == blocks_quantized, args


TINY = ['--model=tiny', '--recipe=wanda(sparsity=0.5) > gptq(bits=4, group_size=16)', '--save=false',
        '--measure=false', '--per_stage_eval=false', '--calib_samples=32', '--eval_samples=16', '--seq_len=16']
# The same run as TINY's command line (its other flags at their defaults), as compress.run's settings.
CFG = dict(model='tiny', recipe=TINY[1].split('=', 1)[1], calib_data='default', eval_data='default',
           calib_samples=32, eval_samples=16, seq_len=16, batch_size=32, seed=0, per_stage_eval=False,
           measure=False)


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  """results.json's dict of TINY's run in this process (one device), computed once for the tests below."""
  from jaxcompress.recipes import pipeline as compress
  return compress.run({**CFG, 'output_dir': str(tmp_path_factory.mktemp('tiny_run'))}, save=False, verbose=False)


@pytest.mark.slow
def test_same_recipe_and_seed_twice_give_identical_hashes_and_metrics(tiny_run, tmp_path):
  from jaxcompress.recipes import pipeline as compress
  a = tiny_run
  b = compress.run({**CFG, 'output_dir': str(tmp_path / 'b')}, save=False, verbose=False)
  assert a['params_hash'] == b['params_hash']
  assert a['quality'] == b['quality'] and a['size'] == b['size']
  c = compress.run({**CFG, 'seed': 1, 'output_dir': str(tmp_path / 'c')}, save=False, verbose=False)
  assert c['params_hash'] != a['params_hash']  # another seed: another model and data, so the hash can tell


@pytest.mark.slow
@pytest.mark.subprocess
def test_one_process_and_two_processes_give_the_same_compressed_model(tiny_run, tmp_path):
  # the 1-process run is this process's (the same bits as experiments/compress.py with TINY on 1 device)
  port = runs.free_port()
  logs = [tmp_path / f'p{i}.log' for i in range(2)]
  procs = [subprocess.Popen([sys.executable, str(SCRIPT), *TINY, f'--output_dir={tmp_path / "two"}', '--data=2',
                             f'--coordinator=localhost:{port}', '--num_processes=2', f'--process_id={i}',
                             '--cpu_collectives=gloo'],
                            env=runs.env(1), stdout=logs[i].open('w'), stderr=subprocess.STDOUT, cwd=runs.ROOT)
           for i in range(2)]
  codes = [p.wait(timeout=900) for p in procs]
  assert codes == [0, 0], [log.read_text()[-3000:] for log in logs]
  ref = json.loads(json.dumps(tiny_run))  # as results.json holds it
  for i in range(2):
    got = json.loads((tmp_path / 'two' / f'process{i}' / 'results.json').read_text())
    assert got['params_hash'] == ref['params_hash'], i
    assert got['quality'] == ref['quality']
