"""experiments/compress.py --out_of_core: a layer-wise recipe run block by block from the checkpoint on disk gives
the in-memory recipe's compressed model; stages that cannot run block by block are refused up front."""

import numpy as np
import pytest

CFG = dict(model='tiny', calib_data='default', eval_data='default', calib_samples=32, eval_samples=16, seq_len=16,
           batch_size=16, seed=0, per_stage_eval=False, measure=False)


@pytest.mark.slow
def test_out_of_core_equals_the_in_memory_recipe(tmp_path):
  # several stages: each is calibrated on the hidden states it sees in memory (its own stream on disk)
  from jaxcompress.recipes import pipeline as compress
  cfg = {**CFG, 'recipe': 'sparsegpt(sparsity=0.5) > gptq(bits=4, group_size=16)'}
  ref = compress.run({**cfg, 'output_dir': str(tmp_path / 'mem'), 'export': 'jxc'}, save=True, verbose=False)
  got = compress.run({**cfg, 'out_of_core': True, 'output_dir': str(tmp_path / 'ooc')}, save=True, verbose=False)
  assert (tmp_path / 'ooc' / 'blocks' / 'manifest.json').is_file()
  # compressed.jxc written a block at a time from out/blocks/: the bytes the in-memory run writes from its tree
  assert (tmp_path / 'ooc' / 'compressed.jxc').read_bytes() == (tmp_path / 'mem' / 'compressed.jxc').read_bytes()
  assert got['params_hash'] == ref['params_hash']
  assert got['leaf_kinds'] == ref['leaf_kinds'] and got['quality'] == ref['quality']
  # every pruned kernel quantized under its mask
  assert got['leaf_kinds']['Masked'] == got['leaf_kinds']['Quantized'] > 0
  # its dense export is streamed from out/blocks/ a part at a time (as the packed formats are, which hold no
  # Masked leaf): the values of its compressed.jxc
  from jaxcompress import core, models
  params = core.flatten(core.serialize.load(tmp_path / 'ooc' / 'compressed.jxc'))
  dense = core.flatten(models.from_pretrained(tmp_path / 'ooc' / 'hf')[1])
  for p, w in params.items():
    np.testing.assert_array_equal(dense[p], np.asarray(core.materialize(w)), err_msg=p)


@pytest.mark.slow
def test_owl_out_of_core_equals_owl_in_memory(tmp_path):
  """OWL's block sparsities out of core come from a first pass streamed from the checkpoint: the same model."""
  from jaxcompress.recipes import pipeline as compress
  cfg = {**CFG, 'recipe': 'owl(sparsity=0.5, owl_lambda=0.1) > gptq(bits=4, group_size=16)'}
  ref = compress.run({**cfg, 'output_dir': str(tmp_path / 'mem')}, save=False, verbose=False)
  got = compress.run({**cfg, 'out_of_core': True, 'output_dir': str(tmp_path / 'ooc')}, save=False, verbose=False)
  assert 'dense' in (tmp_path / 'ooc' / 'blocks' / 'manifest.json').read_text()
  assert got['params_hash'] == ref['params_hash'] and got['quality'] == ref['quality']


@pytest.mark.parametrize('recipe', ['smoothquant(migration=0.5)', 'svd_llm(keep=0.5)'])  # asvd: svd_llm's path
def test_methods_calibrated_on_the_original_model_run_out_of_core(tmp_path, recipe):
  """Stages whose statistics are those of the uncompressed model (run_sequential(calibrate_on='original')):
  out of core, block i is calibrated on the uncompressed blocks' outputs, as in memory."""
  from jaxcompress.recipes import pipeline as compress
  cfg = {**CFG, 'recipe': recipe}
  ref = compress.run({**cfg, 'output_dir': str(tmp_path / 'mem')}, save=False, verbose=False)
  got = compress.run({**cfg, 'out_of_core': True, 'output_dir': str(tmp_path / 'ooc')}, save=False, verbose=False)
  assert (tmp_path / 'ooc' / 'blocks' / 'manifest.json').is_file()
  assert got['params_hash'] == ref['params_hash']
  assert got['leaf_kinds'] == ref['leaf_kinds'] and got['quality'] == ref['quality']


def test_stages_that_cannot_run_block_by_block_are_refused(tmp_path):
  from jaxcompress.recipes import pipeline as compress
  for recipe, why in (('sparsegpt > distill(steps=2)', 'trains'), ('magnitude', 'is not calibrated'),
                      ('svd_llm(budget=0.5)', 'whole uncompressed model.*give keep= instead'),
                      ('mixed(group_size=16)', 'whole uncompressed model'), ('gqa(kv_heads=1)', 'architecture')):
    with pytest.raises(ValueError, match=why):
      compress.run({**CFG, 'recipe': recipe, 'out_of_core': True, 'output_dir': str(tmp_path / 'x')}, save=False,
                   verbose=False)
