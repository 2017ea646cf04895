"""Out-of-core compression: same result as the in-memory driver, bit-identical after a crash at any point
(exception, SIGKILL, disk full), refusal of another run's directory, clear errors for mismatched batches."""

import errno
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxcompress import calibration as cal
from jaxcompress import core, models
from tests.calibration import ooc_common as oc
from tests.train import pretrain_runs as runs


@pytest.fixture(scope='module')
def src(tmp_path_factory):
  return oc.write_checkpoint(tmp_path_factory.mktemp('ckpt') / 'llama')


@pytest.fixture(scope='module')
def reference(src, tmp_path_factory):
  out = tmp_path_factory.mktemp('ref') / 'out'
  oc.run_cheap(src, out)
  return out


@pytest.mark.slow
def test_sparsegpt_gptq_output_reloads_and_equals_run_sequential(src, tmp_path):
  manifest = oc.run(src, tmp_path / 'out')
  assert manifest['complete'] and sorted(manifest['blocks']) == ['0', '1', '2']
  got = core.flatten(cal.load_compressed(tmp_path / 'out'))
  model, params = models.from_pretrained(src)
  ref, _ = cal.run_sequential(model, params, oc.batches(), cal.hessian(), oc.compress_block, per_group=True)
  ref = core.flatten(ref)
  assert sorted(got) == sorted(ref)
  assert isinstance(got['layers/1/mlp/down_proj/kernel'], core.Masked)
  for path, r in ref.items():
    np.testing.assert_array_equal(np.asarray(core.materialize(got[path])), np.asarray(core.materialize(r)),
                                  err_msg=path)


def test_crash_after_any_block_then_rerun_is_bit_identical(src, reference, tmp_path):
  want = oc.output_hashes(reference)
  for k in range(3):
    out = tmp_path / f'crash{k}'

    def after_block(i, record, k=k):
      if i == k:
        raise KeyboardInterrupt

    def mid_solve(i, block, stats, k=k):
      if i == k:  # killed while solving the last block
        raise KeyboardInterrupt
      return oc.cheap_block(i, block, stats)

    with pytest.raises(KeyboardInterrupt):
      if k < 2:
        oc.run_cheap(src, out, on_block=after_block)
      else:
        cal.compress_checkpoint(src, out, mid_solve, oc.batches(), observer=cal.hessian(), recipe={'cheap': 1},
                                per_group=True)
    manifest = json.loads((out / 'manifest.json').read_text())
    assert sorted(manifest['blocks']) == [str(i) for i in range(min(k + 1, 2))] and not manifest['complete']
    if k == 1:  # the next block's hidden states lost too: re-derived from the stored blocks
      (out / 'h_00002_s1.npy').unlink()
    oc.run_cheap(src, out)
    assert oc.output_hashes(out) == want


def test_a_resumed_run_removes_the_hidden_states_it_no_longer_needs(src, reference, tmp_path):
  # stopped after the manifest names the block, before the clean-up: the streams entering and leaving it remain
  for k in (0, 2):
    out = tmp_path / f'crash{k}'

    def after_block(i, record, k=k):
      if i == k:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
      oc.run_cheap(src, out, on_block=after_block)
    assert sorted(p.name for p in out.glob('h_*.npy')) == [f'h_{k:05d}_s1.npy', f'h_{k + 1:05d}_s1.npy']
    oc.run_cheap(src, out)
    assert not list(out.glob('h_*.npy')) and oc.output_hashes(out) == oc.output_hashes(reference)


def test_damaged_block_file_is_recomputed(src, reference, tmp_path):
  out = tmp_path / 'out'
  oc.run_cheap(src, out)
  path = out / 'block_00001.jc.safetensors'
  data = bytearray(path.read_bytes())
  data[-5] ^= 0xFF
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match='does not match the sha256'):
    cal.load_compressed(out)
  oc.run_cheap(src, out)
  assert oc.output_hashes(out) == oc.output_hashes(reference)
  cal.load_compressed(out)


def test_disk_full_mid_write_leaves_the_block_incomplete(src, reference, tmp_path, monkeypatch):
  out = tmp_path / 'out'
  real = core.serialize.save
  calls = []

  def full(path, params, metadata=None):
    calls.append(path)
    if 'block_00001' in str(path):  # block 1: half a file, then ENOSPC
      with open(path, 'wb') as f:
        f.write(b'\0' * 100)
      raise OSError(errno.ENOSPC, 'No space left on device')
    return real(path, params, metadata)

  monkeypatch.setattr(core.serialize, 'save', full)
  with pytest.raises(OSError, match='No space'):
    oc.run_cheap(src, out)
  monkeypatch.setattr(core.serialize, 'save', real)
  manifest = json.loads((out / 'manifest.json').read_text())
  assert sorted(manifest['blocks']) == ['0'] and not manifest['complete']
  assert not (out / 'block_00001.jc.safetensors').exists()
  assert not [p for p in os.listdir(out) if p.startswith('.tmp-')]
  with pytest.raises(ValueError, match='no finished compression'):
    cal.load_compressed(out)
  oc.run_cheap(src, out)
  assert oc.output_hashes(out) == oc.output_hashes(reference)


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigkill_mid_run_then_rerun_is_bit_identical(src, reference, tmp_path):
  out = tmp_path / 'out'
  code = ('import os, signal, sys; from tests.calibration import ooc_common as oc\n'
          'oc.run_cheap(sys.argv[1], sys.argv[2], on_block=lambda i, r: i == 1 and os.kill(os.getpid(), '
          'signal.SIGKILL))\n')
  proc = subprocess.run([sys.executable, '-c', code, str(src), str(out)], env=runs.env(1), cwd=runs.ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert not json.loads((out / 'manifest.json').read_text())['complete']
  oc.run_cheap(src, out)
  assert oc.output_hashes(out) == oc.output_hashes(reference)


def test_refuses_another_runs_directory(src, reference, tmp_path):
  with pytest.raises(ValueError, match=r"another run .*'recipe'"):
    cal.compress_checkpoint(src, reference, oc.cheap_block, oc.batches(), observer=cal.hessian(),
                            recipe={'cheap': 2}, per_group=True)
  with pytest.raises(ValueError, match=r"another run .*'data'"):
    cal.compress_checkpoint(src, reference, oc.cheap_block, oc.batches(seed=1), observer=cal.hessian(),
                            recipe={'cheap': 1}, per_group=True)
  other = oc.write_checkpoint(tmp_path / 'other', seed=1)
  with pytest.raises(ValueError, match=r"another run .*'input'"):
    oc.run_cheap(other, reference)
  (tmp_path / 'full').mkdir()
  (tmp_path / 'full' / 'notes.txt').write_text('x')
  with pytest.raises(ValueError, match='not empty'):
    oc.run_cheap(src, tmp_path / 'full')


def test_batches_of_different_shapes_are_refused_before_work(src, tmp_path):
  batches = oc.batches() + [{'tokens': np.zeros((2, 7), np.int32)}]
  with pytest.raises(ValueError, match=r'batch 3 has .*\(2, 7\).*batch 0'):
    cal.compress_checkpoint(src, tmp_path / 'out', oc.cheap_block, batches, observer=cal.hessian(), recipe={})
  assert not (tmp_path / 'out').exists()


def nudge(strength):
  """A cheap stage that depends on its statistics: each kernel's rows scaled by 1 + strength·diag(XᵀX)/mean."""
  def compress_block(i, block, stats):
    del i

    def one(w, st):
      d = np.diag(np.asarray(st['xtx']))
      return jax.numpy.asarray(np.asarray(w) * (1 + strength * d / d.mean())[:, None].astype(np.float32))

    return core.paths.replace(block, {p: one(core.paths.get(block, p), st) for p, st in stats.items()})
  return compress_block


# stage 2 calibrates on the model as stage 1 left it, so the stream after stage 1 sits between the input and the
# output: it can only be recomputed
STAGES = (cal.SequentialPlan(cal.hessian(), nudge(0.1), per_group=True),
          cal.SequentialPlan(cal.hessian(), nudge(-0.05), per_group=False, calibrate_on='original'),
          cal.SequentialPlan(cal.hessian(), oc.cheap_block, per_group=False))


def test_stages_equal_running_them_one_after_another_in_memory(src, tmp_path):
  manifest = cal.compress_checkpoint(src, tmp_path / 'out', list(STAGES), oc.batches(), recipe={'stages': 3})
  assert manifest['complete']
  model, params = models.from_pretrained(src)
  for plan in STAGES:
    params, _ = cal.run_sequential(model, params, oc.batches(), plan.observer, plan.compress_block,
                                   per_group=plan.per_group, calibrate_on=plan.calibrate_on)
  got, ref = core.flatten(cal.load_compressed(tmp_path / 'out')), core.flatten(params)
  assert sorted(got) == sorted(ref)
  for path, r in ref.items():
    np.testing.assert_array_equal(np.asarray(core.materialize(got[path])), np.asarray(core.materialize(r)),
                                  err_msg=path)
  # a lost file of the stream in between: the stages before are recomputed from block 0, the result is the same
  want = oc.output_hashes(tmp_path / 'out')
  out = tmp_path / 'again'

  def stop(i, record):
    if i == 1:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    cal.compress_checkpoint(src, out, list(STAGES), oc.batches(), recipe={'stages': 3}, on_block=stop)
  (out / 'h_00002_s1.npy').unlink()
  cal.compress_checkpoint(src, out, list(STAGES), oc.batches(), recipe={'stages': 3})
  assert oc.output_hashes(out) == want
  with pytest.raises(ValueError, match='observer= or per_group='):
    cal.compress_checkpoint(src, tmp_path / 'x', list(STAGES), oc.batches(), recipe={}, observer=cal.hessian())


def test_deterministic_output_equals_run_sequential_also_when_resumed(src, reference, tmp_path):
  out = tmp_path / 'out'

  def stop(i, record):
    if i == 0:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    oc.run_cheap(src, out, deterministic=True, on_block=stop)
  kept = list(out.glob('h_*.npy'))
  assert kept
  for f in kept:  # the rerun re-derives the hidden states after block 0 (embedding, forward)
    f.unlink()
  oc.run_cheap(src, out, deterministic=True)
  got = core.flatten(cal.load_compressed(out))
  model, params = models.from_pretrained(src)
  ref, _ = cal.run_sequential(model, params, oc.batches(), cal.hessian(), oc.cheap_block, per_group=True,
                              deterministic=True)
  ref = core.flatten(ref)
  assert sorted(got) == sorted(ref)
  for path, r in ref.items():
    np.testing.assert_array_equal(np.asarray(core.materialize(got[path])), np.asarray(core.materialize(r)),
                                  err_msg=path)
  with pytest.raises(ValueError, match='another run'):  # other statistics bits than the default reduction's
    oc.run_cheap(src, reference, deterministic=True)



OWL = {'sparsity': 0.5, 'distribution': 'owl', 'owl_lambda': 0.1}


@pytest.fixture(scope='module')
def owl_in_memory(src):
  """OWL's recorded plan (one block-wise plan with a dense pass), and in memory its per-layer sparsities and the
  pruned model's leaves."""
  from jaxcompress import pruning
  from jaxcompress.calibration import driver
  config = pruning.WandaConfig(**OWL)
  with cal.record_sequential() as rec:
    pruning.owl(oc.SPEC, oc.SPEC.abstract_params(), oc.batches(), config=config)
  (plan,) = rec
  assert plan.dense is not None
  model, params = models.from_pretrained(src)
  seen = []  # the summary of the in-memory dense pass, as run_sequential hands it to the compressor
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(driver, 'bind_summary', lambda fn, summary, bind=driver.bind_summary: seen.append(summary) or
               bind(fn, summary))
    _, pruned = pruning.owl(model, params, oc.batches(), config=config)
  (sparsities,) = seen
  return plan, sparsities, core.flatten(pruned)


def run_owl(src, out, plan, **kwargs):
  return cal.compress_checkpoint(src, out, [plan], oc.batches(), recipe={'owl': OWL}, **kwargs)


def assert_equal_leaves(out, want):
  got = core.flatten(cal.load_compressed(out))
  assert sorted(got) == sorted(want)
  for path, w in want.items():
    np.testing.assert_array_equal(np.asarray(core.materialize(got[path])), np.asarray(core.materialize(w)),
                                  err_msg=path)


def test_owl_out_of_core_gives_the_in_memory_sparsities_and_masks(src, owl_in_memory, tmp_path):
  """The dense pass streamed from the checkpoint computes each block's statistics and outputs in one step, as
  `calibrate` does in memory, so its column norms equal the in-memory pass's to the bit: the same per-layer
  sparsities (kept in the manifest) and the same masks."""
  plan, sparsities, want = owl_in_memory
  assert len(set(sparsities.values())) == 3  # one sparsity per block, all different
  manifest = run_owl(src, tmp_path / 'out', plan)
  assert manifest['complete'] and manifest['dense']['summary'] == sparsities
  assert_equal_leaves(tmp_path / 'out', want)
  assert not list((tmp_path / 'out').glob('*.npy'))
  with pytest.raises(ValueError, match=r'stage 2 needs a first pass over the whole model'):
    cal.compress_checkpoint(src, tmp_path / 'x', [cal.SequentialPlan(cal.hessian(), oc.cheap_block, False), plan],
                            oc.batches(), recipe={})


def test_owl_out_of_core_resumed_ends_identical(src, owl_in_memory, tmp_path):
  """Stopped inside the dense pass, the next run starts the pass over; stopped after block 0, the next run reads
  the sparsities from the manifest (no dense step) and ends with the in-memory masks."""
  plan, sparsities, want = owl_in_memory
  steps = []

  def stop_in_dense_pass(phase, i, j):
    if phase == 'dense' and i == 1:
      raise KeyboardInterrupt

  def stop_after_block(i, record):
    if i == 0:
      raise KeyboardInterrupt

  out = tmp_path / 'out'
  with pytest.raises(KeyboardInterrupt):
    run_owl(src, out, plan, on_step=stop_in_dense_pass)
  assert 'dense' not in json.loads((out / 'manifest.json').read_text()) and list(out.glob('d_*.npy'))
  with pytest.raises(KeyboardInterrupt):  # the pass starts over, then block 0 is written
    run_owl(src, out, plan, on_block=stop_after_block)
  manifest = json.loads((out / 'manifest.json').read_text())
  assert manifest['dense']['summary'] == sparsities and sorted(manifest['blocks']) == ['0']
  run_owl(src, out, plan, on_step=lambda phase, i, j: steps.append(phase))
  assert 'dense' not in steps and 'stats' in steps
  assert_equal_leaves(out, want)


def rtn_block(i, block, stats):
  """Each kernel round-to-nearest W4 g16, symmetric (what compressed-tensors' default transformers path reads)."""
  del i
  return core.paths.replace(block, {p: core.quantize(core.paths.get(block, p), bits=4, group_size=16, symmetric=True)
                                    for p in stats})


def test_streamed_export_writes_what_the_in_memory_export_writes(src, tmp_path):
  """compressed-tensors and GPTQ checkpoints written from the out-of-core output a part at a time (the rest, then
  each block) hold the same leaves and config as those written from the whole tree, in several shards."""
  from jaxcompress.models import compressed_tensors as ct
  from jaxcompress.models import gptq_format
  from tests.models.quantized_leaves import assert_same_leaves
  out = tmp_path / 'out'
  cal.compress_checkpoint(src, out, rtn_block, oc.batches(), observer=cal.hessian(), recipe={'rtn': 4},
                          per_group=True)
  model, params = oc.SPEC, cal.load_compressed(out)
  parts = cal.compressed_parts(out)
  assert len(parts) == 1 + oc.SPEC.config.num_layers
  for name, export, export_parts, kw in (('ct', ct.export, ct.export_parts, {}),
                                         ('gptq', gptq_format.export, gptq_format.export_parts,
                                          {'dense_fallback': True})):  # k_proj is 16 wide: GPTQ packs 32s
    export(model, params, tmp_path / f'{name}_memory', **kw)
    export_parts(model, parts, tmp_path / f'{name}_stream', max_shard_bytes=1 << 14, **kw)
    config = lambda d: json.loads((d / 'config.json').read_text())['quantization_config']
    a, b = config(tmp_path / f'{name}_memory'), config(tmp_path / f'{name}_stream')
    for q in (a, b):
      for g in (q.get('config_groups') or {}).values():
        g['targets'].sort()
    assert a == b, name
    assert len(list((tmp_path / f'{name}_stream').glob('model-*-of-*.safetensors'))) > 1
    _, back = models.from_pretrained(tmp_path / f'{name}_stream')
    _, want = models.from_pretrained(tmp_path / f'{name}_memory')
    assert_same_leaves(want, back)
  assert_same_leaves(params, models.from_pretrained(tmp_path / 'ct_stream')[1])


def test_part_loaders_check_each_file_every_time(reference, tmp_path):
  """A block file damaged after a loader read it (its size unchanged) stops the loader's next call, naming it."""
  import shutil
  out = tmp_path / 'out'
  shutil.copytree(reference, out)
  manifest = json.loads((out / 'manifest.json').read_text())
  block = out / manifest['blocks']['1']['file']
  parts = cal.compressed_parts(out)
  first = parts[2]()
  assert jax.tree.structure(first) == jax.tree.structure(cal.compressed_parts(reference)[2]())
  data = bytearray(block.read_bytes())
  data[-5] ^= 0xFF  # one byte of the last tensor
  block.write_bytes(bytes(data))
  with pytest.raises(ValueError, match=r"block_00001.*does not match the sha256 in the manifest"):
    parts[2]()


def test_streamed_export_refuses_before_writing(src, reference, tmp_path):
  """A leaf the format cannot hold, in any part, stops the export with every such leaf named; what the parts
  before it wrote is removed: no directory is made, and a checkpoint already in the directory stays as it was."""
  from jaxcompress.models import compressed_tensors as ct
  with pytest.raises(ValueError, match=r'layers/2/mlp/down_proj/kernel: Masked, a sparsity mask'):
    ct.export_parts(oc.SPEC, cal.compressed_parts(reference), tmp_path / 'ct')
  assert not (tmp_path / 'ct').exists()
  earlier = tmp_path / 'earlier'
  ct.export_parts(oc.SPEC, cal.compressed_parts(reference), earlier, dense_fallback=True, max_shard_bytes=1 << 14)
  before = {f.name: f.read_bytes() for f in earlier.iterdir()}
  assert len([n for n in before if n.startswith('model-')]) > 1
  with pytest.raises(ValueError, match=r'layers/2/mlp/down_proj/kernel: Masked') as refused:
    ct.export_parts(oc.SPEC, cal.compressed_parts(reference), earlier, max_shard_bytes=1 << 14)
  assert refused.value.args[0].count('Masked, a sparsity mask') == sum(
      isinstance(w, core.Masked) for w in core.flatten(cal.load_compressed(reference)).values())
  assert {f.name: f.read_bytes() for f in earlier.iterdir()} == before


def test_streamed_dense_export_of_missing_parts_leaves_no_checkpoint(src, reference, tmp_path):
  """save_pretrained from parts that lack a parameter is an error naming it, and removes the shards it wrote (and the
  directory it made)."""
  with pytest.raises(KeyError, match=r"params lack 'embed/tokens/embedding'"):
    models.hf.save_pretrained_parts(tmp_path / 'hf', oc.SPEC, cal.compressed_parts(reference)[1:])
  assert not (tmp_path / 'hf').exists()
  models.hf.save_pretrained_parts(tmp_path / 'hf', oc.SPEC, cal.compressed_parts(reference))
  want = core.flatten(cal.load_compressed(reference))
  got = core.flatten(models.from_pretrained(tmp_path / 'hf')[1])
  for p, w in want.items():
    np.testing.assert_array_equal(got[p], np.asarray(core.materialize(w)), err_msg=p)


def test_a_copy_whose_source_no_part_wrote_is_an_error(tmp_path):
  """A tensor transformers expects twice (BERT's untied MLM decoder bias) is written beside its source; a streamed
  writer never given the source says which tensor to add, and leaves no checkpoint."""
  bert = models.Bert(models.BertConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                                       max_position_embeddings=16, mlm_head=True, tie_embeddings=False))
  writer = models.hf.ShardWriter(tmp_path / 'hf', bert)
  writer.add({'bert.pooler.dense.bias': np.zeros(16, np.float32)})
  with pytest.raises(ValueError, match=r"'cls.predictions.bias'.*copy of 'cls.predictions.decoder.bias'"):
    writer.close()
  assert not (tmp_path / 'hf').exists()
