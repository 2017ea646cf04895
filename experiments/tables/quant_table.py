"""Weight-only post-training quantization of the causal-LM fixture: held-out perplexity and checkpoint size.

    python experiments/tables/quant_table.py --output_dir runs/quant_table            # the fixture (4 layers, 256 wide)
    python experiments/tables/quant_table.py --model /work/fixture/hf --output_dir /tmp/qt
    python experiments/tables/quant_table.py --small --output_dir /tmp/qt_small       # tiny random model, seconds

Rows: fp32; round-to-nearest (RTN), GPTQ and AWQ at W4 g128, W3 g128 and W4 per-channel (asymmetric min-max
grids; every block linear quantized, embedding and norms left in fp32); W8A8 (int8 weights per channel, int8
activations per token, int32 accumulation) naive, with SmoothQuant (α = 0.5) and with LLM.int8() outliers;
non-uniform 3-bit (per-column weighted k-means codebooks, with and without 0.5% float outliers); mixed precision
(per-layer 2/3/4/8 bits from measured sensitivity, 3.5 average code bits, GPTQ g128). Calibration: `--calib_rows` training
rows of the fixture's own data; evaluation: the held-out rows (mean NLL over every next-token prediction).
Size: a W4 g128 checkpoint (GPTQ block linears and an RTN W4 g128 embedding table, bf16 scales, zeros and
norms) against the bf16 checkpoint, both written by `core.serialize`, bytes on disk.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import tempfile
import time

from experiments.tables import common

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxcompress import core, models, provenance, quantization
from jaxcompress.eval import lm

common.define_flags('quant_table')
flags.DEFINE_integer('calib_rows', 64, 'Training rows used for calibration.')
flags.DEFINE_integer('eval_rows', 256, 'Held-out rows scored (0: all).')
FLAGS = flags.FLAGS

SETTINGS = (('W4 g128', 4, 128), ('W3 g128', 3, 128), ('W4 per-channel', 4, None))


def _small():
  model = models.Llama(models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                                          num_heads=4, num_kv_heads=2, max_position_embeddings=32))
  params = jax.jit(model.init)(jax.random.key(FLAGS.seed))
  rng = np.random.default_rng(FLAGS.seed)
  return model, params, rng.integers(0, 64, (16, 17)).astype(np.int32), rng.integers(0, 64, (8, 17)).astype(np.int32)


def _fixture():
  model, params, calib, held_out = common.fixture_rows(FLAGS.model, FLAGS.calib_rows, FLAGS.seed)
  return model, params, calib, held_out[:FLAGS.eval_rows or None]


def _nll(model, params, rows, batch=32):
  return lm.rows_perplexity(model, params, rows, batch_size=batch).mean_nll


def _bf16(x):
  if isinstance(x, core.Quantized):
    return dataclasses.replace(x, scale=x.scale.astype(jnp.bfloat16),
                               zero=None if x.zero is None else x.zero.astype(jnp.bfloat16))
  return x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x


def _mixed(model, params, batches, held_out, gs128):
  """GPTQ at per-layer widths (2/3/4/8) allocated from sensitivity for 3.5 average code bits: a table row."""
  t = time.time()
  config = quantization.MixedConfig(average_bits=3.5, candidates=(2, 3, 4, 8), group_size=gs128)
  bits = quantization.bit_allocation(model, params, batches, config=config)
  _, q = quantization.mixed(model, params, batches, config=config, widths=bits)
  sizes = {p: core.shape_of(core.paths.get(params, p)) for p in bits}
  avg = sum(bits[p] * math.prod(sizes[p]) for p in bits) / sum(math.prod(v) for v in sizes.values())
  return {'method': 'GPTQ mixed precision', 'setting': f'{avg:.2f} avg bits g{gs128}',
          'nll': _nll(model, q, held_out), 'seconds': time.time() - t, 'bits': bits}


def main(argv):
  del argv
  t0 = time.time()
  model, params, calib, held_out = _small() if FLAGS.small else _fixture()
  batches = [calib[i:i + 8, :-1] for i in range(0, calib.shape[0], 8)]
  gs128 = 16 if FLAGS.small else 128
  rows = [{'method': 'fp32', 'setting': '-', 'nll': _nll(model, params, held_out)}]
  quantized = {}
  for name, bits, gs in SETTINGS[:1] if FLAGS.small else SETTINGS:
    gs = gs and gs128
    cands = {
        'RTN': lambda: common.rtn(core.select(params), params, bits, gs),
        'GPTQ': lambda: quantization.gptq(model, params, batches,
                                          config=quantization.GPTQConfig(bits=bits, group_size=gs))[1],
        'AWQ': lambda: quantization.awq(model, params, batches,
                                        config=quantization.AWQConfig(bits=bits, group_size=gs))[1],
    }
    for method, make in cands.items():
      t = time.time()
      q = make()
      rows.append({'method': method, 'setting': name, 'nll': _nll(model, q, held_out), 'seconds': time.time() - t})
      quantized[(method, name)] = q
      print(rows[-1], flush=True)
  nonuniform = (('SqueezeLLM-style k-means', 0.0), ('SqueezeLLM-style k-means + 0.5% outliers', 0.005))
  for method, frac in nonuniform[:1] if FLAGS.small else nonuniform:
    t = time.time()
    _, q = quantization.nonuniform(model, params, batches,
                                  config=quantization.NonUniformConfig(bits=3, outlier_fraction=frac))
    rows.append({'method': method, 'setting': 'W3 per-column codebook', 'nll': _nll(model, q, held_out),
                 'seconds': time.time() - t})
    print(rows[-1], flush=True)
  if not FLAGS.small:  # --small leaves it to tests/quantization/test_mixed.py
    rows.append(_mixed(model, params, batches, held_out, gs128))
    print(rows[-1], flush=True)
  w8a8 = {'naive W8A8': quantization.W8A8Config(migration=None),
          'SmoothQuant W8A8 (alpha 0.5)': quantization.W8A8Config(migration=0.5),
          'LLM.int8() W8A8 (|x| > 6 in float)': quantization.W8A8Config(migration=None, outlier_threshold=6.0)}
  for method, cfg in list(w8a8.items())[1:2] if FLAGS.small else w8a8.items():
    t = time.time()
    _, q = quantization.w8a8(model, params, batches, config=cfg)
    rows.append({'method': method, 'setting': 'W8A8 per-token', 'nll': _nll(model, q, held_out),
                 'seconds': time.time() - t})
    print(rows[-1], flush=True)
  for r in rows:
    r['ppl'] = math.exp(r['nll'])

  # checkpoint bytes: W4 g128 (GPTQ blocks + RTN embedding, bf16 side arrays) vs bf16
  q = quantized[('GPTQ', 'W4 g128')]
  emb = 'embed/tokens/embedding'
  q = core.paths.replace(q, {emb: quantization.quantize_weight(core.paths.get(params, emb), bits=4,
                                                                group_size=common.group_for(core.paths.get(params, emb), gs128))})
  q = jax.tree.map(_bf16, q, is_leaf=lambda x: isinstance(x, core.Quantized))
  bf16 = jax.tree.map(_bf16, params)
  with tempfile.TemporaryDirectory() as d:
    core.serialize.save(os.path.join(d, 'bf16.safetensors'), bf16)
    core.serialize.save(os.path.join(d, 'w4.safetensors'), q)
    nb, nq = os.path.getsize(os.path.join(d, 'bf16.safetensors')), os.path.getsize(os.path.join(d, 'w4.safetensors'))
    loaded = core.serialize.load(os.path.join(d, 'w4.safetensors'))
  ck_nll = _nll(model, loaded, held_out)  # as written: bf16 norms and side arrays
  size = {'bf16_bytes': nb, 'w4g128_bytes': nq, 'ratio': nq / nb, 'w4g128_checkpoint_ppl': math.exp(ck_nll)}

  table = ['| method | setting | held-out ppl | NLL | seconds |', '|---|---|---|---|---|']
  table += [f"| {r['method']} | {r['setting']} | {r['ppl']:.3f} | {r['nll']:.4f} | {r.get('seconds', 0):.1f} |"
            for r in rows]
  table += ['', f"W4 g{gs128} checkpoint (GPTQ blocks, RTN embedding, bf16 scales): {nq} bytes vs bf16 {nb} bytes "
            f"= {nq / nb:.4f}x; its held-out ppl {math.exp(ck_nll):.3f}"]
  text = '\n'.join(table)
  out = pathlib.Path(FLAGS.output_dir)
  provenance.write_run_dir(out, config={k: FLAGS[k].value for k in ('model', 'seed', 'calib_rows', 'eval_rows',
                                                                     'small')},
                           results={'rows': rows, 'size': size, 'calib_rows': int(calib.shape[0]),
                                    'eval_rows': int(held_out.shape[0]), 'seconds': time.time() - t0})
  (out / 'table.md').write_text(text + '\n')
  print(text)


if __name__ == '__main__':
  app.run(main)
