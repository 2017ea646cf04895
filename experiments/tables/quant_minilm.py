"""Post-training quantization of all-MiniLM-L6-v2 on real sentences: embedding cosine to the fp32 model.

    python experiments/tables/quant_minilm.py --output_dir runs/quant_minilm
    python experiments/tables/quant_minilm.py --small --output_dir /tmp/qm_small     # tiny random BERT, seconds

Sentences are fortunes (`data.corpus.fortunes_documents()`, 20..400 characters, shuffled by --seed): the first
--calib sentences calibrate, the next --eval ones (never seen in calibration) are embedded by the fp32 and the
quantized model (mean-pooled, L2-normalised last hidden states, as sentence-transformers does) and compared by
cosine (table.md, results.json, and quant_minilm.png: 1 − mean cosine as bars per setting). Every block linear
(q/k/v/o, up/down) is quantized; embeddings, LayerNorms and the pooler stay fp32.

Rows: W8A8 (int8 weights per output channel, dynamic int8 activations per token, int32 accumulation) naive and
with SmoothQuant (α = 0.5); weight-only W4 g128 and W3 g128 (asymmetric min-max grids; 384 = 3 × 128 and
1536 = 12 × 128) by round-to-nearest, GPTQ and AWQ. MiniLM is post-norm: the LayerNorm before up_proj also feeds
the residual, so no smoothing / AWQ scale is folded into a norm; every such scale stays in the leaf. GPTQ with
act-order (also with `mse=True`, the authors' clipping search), and RTN / GPTQ after `quarot(online=True)`:
BERT's residual stream cannot be rotated (post-norm), so the inputs of q/k/v, up_proj and down_proj are rotated
online by a Hadamard of 384 (kernels stored as Qᵀ·W) and each head's values by one of 32 fused into v_proj /
o_proj. OmniQuant's learned clipping (10 epochs over the calibration batches per block) with and without that
rotation; W4A8 and W4A4 (GPTQ W4 g128, then `act_quant`: activations
rounded per token at every block linear's input), with and without it. QuIP: every linear's weight and Hessian
multiplied on both sides by random-signed Hadamards before GPTQ, undone around the matmul at run time.
"""

from __future__ import annotations

import pathlib
import time

from experiments.tables import common

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxcompress import models, provenance, quantization
from jaxcompress.eval import fidelity
from jaxcompress.recipes.encoder_runs import tokenize

common.define_flags('quant_minilm', model=False)
flags.DEFINE_integer('calib', 128, 'Calibration sentences.')
flags.DEFINE_integer('eval', 512, 'Held-out sentences embedded and compared.')
flags.DEFINE_integer('max_len', 64, 'Tokens per sentence (truncated / padded).')
flags.DEFINE_list('methods', [], 'Only rows whose method starts with one of these (e.g. AWQ,RTN); empty: all.')
FLAGS = flags.FLAGS

SETTINGS = (('W4 g128', 4, 128), ('W3 g128', 3, 128))


def sentences(seed: int, n: int) -> list[str]:
  from jaxcompress.data import corpus
  docs = [' '.join(d.split()) for d in corpus.fortunes_documents()]
  docs = [d for d in docs if 20 <= len(d) <= 400]
  order = np.random.default_rng(seed).permutation(len(docs))[:n]
  return [docs[i] for i in order]


def _minilm():
  model, params, tok = common.minilm()
  ids, mask = tokenize(tok, sentences(FLAGS.seed, FLAGS.calib + FLAGS.eval), FLAGS.max_len)
  return model, params, (ids[:FLAGS.calib], mask[:FLAGS.calib]), (ids[FLAGS.calib:], mask[FLAGS.calib:])


def _small():
  model = models.Bert(models.BertConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                                        intermediate_size=64, max_position_embeddings=32))
  params = jax.jit(model.init)(jax.random.key(FLAGS.seed))
  rng = np.random.default_rng(FLAGS.seed)
  ids = rng.integers(1, 64, (24, 16)).astype(np.int32)
  mask = (np.arange(16)[None] < rng.integers(4, 17, (24, 1))).astype(np.int32)
  return model, params, (ids[:16], mask[:16]), (ids[16:], mask[16:])


def embed_all(model, params, ids, mask, batch=64):
  """[N, T] tokens and mask -> [N, D] normalised sentence embeddings (fixed batch shape: one compilation)."""
  fn = jax.jit(model.sentence_embedding)
  out = []
  for i in range(0, ids.shape[0], batch):
    b_ids, b_mask = ids[i:i + batch], mask[i:i + batch]
    pad = batch - b_ids.shape[0]
    if pad:
      b_ids, b_mask = np.pad(b_ids, ((0, pad), (0, 0))), np.pad(b_mask, ((0, pad), (0, 0)), constant_values=1)
    out.append(np.asarray(fn(params, jnp.asarray(b_ids), jnp.asarray(b_mask)))[:batch - pad])
  return np.concatenate(out)


def main(argv):
  del argv
  t0 = time.time()
  model, params, (c_ids, c_mask), (e_ids, e_mask) = _small() if FLAGS.small else _minilm()
  batches = [{'tokens': c_ids[i:i + 8], 'attention_mask': c_mask[i:i + 8]} for i in range(0, c_ids.shape[0], 8)]
  gs128 = 16 if FLAGS.small else 128
  ref = embed_all(model, params, e_ids, e_mask)
  # online Hadamard rotations of every linear input but o_proj's (post-norm: none can be fused), values per head
  rotated = quantization.quarot(model, params, config=quantization.QuaRotConfig(online=True),
                                key=jax.random.key(FLAGS.seed))
  rows = []

  def add(method, setting, make):
    if FLAGS.methods and not any(method.startswith(m) for m in FLAGS.methods):
      return
    t = time.time()
    q = make()
    qmodel, q = q if isinstance(q, tuple) else (model, q)  # a rotated model is another spec
    seconds = time.time() - t
    cos = fidelity.embedding_cosine(jnp.asarray(ref), jnp.asarray(embed_all(qmodel, q, e_ids, e_mask)))
    rows.append({'method': method, 'setting': setting, 'cos_mean': float(cos.mean), 'cos_min': float(cos.min),
                 'one_minus_cos': 1.0 - float(cos.mean), 'seconds': seconds})
    print(rows[-1], flush=True)

  add('naive W8A8', 'W8A8 per-token', lambda: quantization.w8a8(model, params, batches,
                                                                  config=quantization.W8A8Config(migration=None))[1])
  add('SmoothQuant W8A8 (alpha 0.5)', 'W8A8 per-token',
      lambda: quantization.w8a8(model, params, batches, config=quantization.W8A8Config(migration=0.5))[1])
  for name, bits, gs in SETTINGS:
    gs = gs and gs128
    add('RTN', name, lambda: common.rtn(model.select(params), params, bits, gs))
    add('GPTQ', name, lambda: quantization.gptq(model, params, batches,
                                                config=quantization.GPTQConfig(bits=bits, group_size=gs))[1])
    add('AWQ', name, lambda: quantization.awq(model, params, batches,
                                              config=quantization.AWQConfig(bits=bits, group_size=gs))[1])
    add('GPTQ act-order', name, lambda: quantization.gptq(
        model, params, batches, config=quantization.GPTQConfig(bits=bits, group_size=gs, act_order=True))[1])
    for order in (False, True):
      add('QuaRot online + GPTQ' + (' act-order' if order else ''), name, lambda order=order: quantization.gptq(
          *rotated, batches, config=quantization.GPTQConfig(bits=bits, group_size=gs, act_order=order)))
    for rot, (m, p) in (('', (model, params)), ('QuaRot online + ', rotated)):  # the authors' clipping search
      add(rot + 'GPTQ act-order mse', name, lambda m=m, p=p: quantization.gptq(
          m, p, batches, config=quantization.GPTQConfig(bits=bits, group_size=gs, act_order=True, mse=True)))
    add('QuaRot online + RTN', name, lambda: (rotated[0], common.rtn(rotated[0].select(rotated[1]), rotated[1],
                                                                   bits, gs)))
    add('QuIP', name, lambda: quantization.quip(model, params, batches,
                                                config=quantization.QuIPConfig(bits=bits, group_size=gs))[1])
    add('QuaRot online + QuIP', name, lambda: quantization.quip(
        *rotated, batches, config=quantization.QuIPConfig(bits=bits, group_size=gs)))
    omni = lambda m, p: quantization.omniquant(m, p, batches, config=quantization.OmniQuantConfig(bits=bits,
                                                                                                 group_size=gs))
    add('OmniQuant', name, lambda: omni(model, params)[1])
    add('QuaRot online + OmniQuant', name, lambda: omni(*rotated))
  # per-token activation rounding at every block linear's input, after GPTQ W4 g128 (rotated or not)
  for act in (8, 4):
    act_cfg = quantization.ActQuantConfig(bits=act)
    add('GPTQ', f'W4A{act} g128', lambda: quantization.act_quant(model, quantization.gptq(
        model, params, batches, config=quantization.GPTQConfig(bits=4, group_size=gs128))[1], config=act_cfg)[1])
    add('QuaRot online + GPTQ', f'W4A{act} g128', lambda: quantization.act_quant(*quantization.gptq(
        *rotated, batches, config=quantization.GPTQConfig(bits=4, group_size=gs128)), config=act_cfg))

  table = ['| method | setting | cosine mean | cosine min | 1 - mean | seconds |', '|---|---|---|---|---|---|']
  table += [f"| {r['method']} | {r['setting']} | {r['cos_mean']:.5f} | {r['cos_min']:.5f} | "
            f"{r['one_minus_cos']:.2e} | {r['seconds']:.1f} |" for r in rows]
  table += ['', f'{len(batches) * 8 if not FLAGS.small else c_ids.shape[0]} calibration sentences, '
            f'{e_ids.shape[0]} held-out sentences, {e_ids.shape[1]} tokens max.']
  text = '\n'.join(table)
  out = pathlib.Path(FLAGS.output_dir)
  keys = ('seed', 'calib', 'eval', 'max_len', 'methods', 'small')
  provenance.write_run_dir(out, config={k: FLAGS[k].value for k in keys},
                           results={'rows': rows, 'calib_sentences': int(c_ids.shape[0]),
                                    'eval_sentences': int(e_ids.shape[0]), 'seconds': time.time() - t0})
  (out / 'table.md').write_text(text + '\n')
  print(text)
  common.chart(out / 'quant_minilm.png', rows, series=lambda r: r['method'], category='setting',
               value=lambda r: r['one_minus_cos'], y_label='1 − mean embedding cosine to fp32',
               title='all-MiniLM-L6-v2' if not FLAGS.small else 'tiny random BERT')


if __name__ == '__main__':
  app.run(main)
