"""A tiny Llama checkpoint on disk and a SparseGPT-then-GPTQ block compressor, shared by the out-of-core tests
and their subprocess runs."""

import numpy as np

import jax
from jaxcompress import calibration as cal
from jaxcompress import core, models, pruning, quantization

SPEC = models.Llama(models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3,
                                       num_heads=4, num_kv_heads=2, max_position_embeddings=32))
RECIPE = {'sparsegpt': {'sparsity': 0.5}, 'gptq': {'bits': 4, 'group_size': 16}}


def write_checkpoint(path, seed: int = 0):
  params = SPEC.init(jax.random.key(seed))
  models.save_pretrained(path, SPEC, params)
  return path


def batches(n: int = 3, b: int = 2, t: int = 12, seed: int = 0):
  rs = np.random.RandomState(seed)
  return [{'tokens': rs.randint(0, 64, (b, t)).astype(np.int32)} for _ in range(n)]


def compress_kernel(w, stats):
  """SparseGPT 50%, then GPTQ W4 g16 of the pruned weights under the same mask: Masked(Quantized)."""
  m = pruning.sparsegpt_from_hessian(w, stats['xtx'], sparsity=0.5)
  q = quantization.gptq_from_hessian(m.value, stats['xtx'], bits=4, group_size=16)
  return core.Masked(value=q, mask=m.mask)


def compress_block(i, block, stats):
  del i
  return core.paths.replace(block, {p: compress_kernel(core.paths.get(block, p), st) for p, st in stats.items()})


def run(src, out, **kwargs):
  return cal.compress_checkpoint(src, out, compress_block, batches(), observer=cal.hessian(), recipe=RECIPE,
                                 per_group=True, **kwargs)


def cheap_block(i, block, stats):
  """A fast stand-in compressor for the resume tests: each kernel masked where |w|·‖x‖ is below its median."""
  del i

  def one(w, st):
    score = np.abs(np.asarray(w, np.float32)) * np.sqrt(np.diag(np.asarray(st['xtx'])))[:, None]
    return core.Masked(value=w, mask=jax.numpy.asarray(score >= np.median(score)))

  return core.paths.replace(block, {p: one(core.paths.get(block, p), st) for p, st in stats.items()})


def run_cheap(src, out, **kwargs):
  return cal.compress_checkpoint(src, out, cheap_block, batches(), observer=cal.hessian(), recipe={'cheap': 1},
                                 per_group=True, **kwargs)


def output_hashes(out):
  """{file name: sha256} of every block and the rest file of a finished output."""
  import json
  import pathlib
  manifest = json.loads((pathlib.Path(out) / 'manifest.json').read_text())
  return {r['file']: r['sha256'] for r in [*manifest['rest'], *manifest['blocks'].values()]}
