"""Export formats side by side: bytes, export and import seconds, and agreement with transformers' own load.

    python experiments/benchmarks/export.py                    # the causal-LM fixture and all-MiniLM-L6-v2
    python experiments/benchmarks/export.py --bits=8 --group_size=0     # W8 per channel
    python experiments/benchmarks/export.py --bits=8 --group_size=0 --symmetric --act_bits=8    # W8A8 int
    python experiments/benchmarks/export.py --bits=8 --group_size=0 --symmetric --act_bits=8 --noact_symmetric
                                                                           # W8A8, asymmetric per-token inputs
    python experiments/benchmarks/export.py --bits=4 --group_size=128 --symmetric --act_bits=8 --act_group_size=32
                                                                           # W4A8, a scale per 32 input channels
    python experiments/benchmarks/export.py --fmt=fp8 --group_size=0 --act_bits=8              # FP8 W8A8
    python experiments/benchmarks/export.py --fmt=fp8 --group_size=0 --act_bits=8 --act_static  # FP8 static
    python experiments/benchmarks/export.py --bits=8 --group_size=0 --symmetric --act_bits=8 --act_static \
        --noact_symmetric                                                                     # W8A8 static asym
    python experiments/benchmarks/export.py --json=export.json

Each model's Linear kernels (heads included, embeddings not) are quantized round-to-nearest (asymmetric, W4 g128
by default), then written in every format of `recipes.exports` (jxc, compressed-tensors, gptq, dense fp32) and
read back: jxc with `core.serialize.load`, the others with `models.from_pretrained`. Agreement is the relative
error (‖a − b‖ / ‖b‖ over the logits, or the last hidden states of MiniLM) of the read-back model against the
compressed params, and of transformers' load of the directory (compressed-tensors with `dequantize=True` for an
asymmetric 'pack-quantized' scheme) against them. With `--act_bits`, each kernel's input is also rounded per token
(`ActQuantized` on compressed-tensors' grid: 'full' for int weights, 'fp8' for FP8 ones), written 'int-quantized'
or 'float-quantized'; with `--act_static` the block Linears' inputs are rounded with one static scale each
(`act_quant(static=True)`, calibrated on 8 random token rows of another seed than the check's; heads stay
weight-only). There an activation within float error of a rounding boundary lands on the neighbouring code
in one implementation and not in the other, and in a deep model such flips feed the next layers' roundings, so the
whole-model agreement says little; the column "per-Linear" gives the largest relative error of one transformers
Linear against ours on the same random input [2, tokens, in], which is where the two must agree. GPTQ directories load in transformers only with optimum + gptqmodel, which this
CPU environment does not install (GPTQModel's wheel pulls the CUDA runtime): that column says so.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
import time

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxcompress import core, models, quantization
from jaxcompress.recipes import exports, fixture

flags.DEFINE_integer('bits', 4, 'Code width of the round-to-nearest quantization.', lower_bound=2, upper_bound=8)
flags.DEFINE_integer('group_size', 128, 'Inputs per scale group (0: per channel).', lower_bound=0)
flags.DEFINE_bool('symmetric', False, 'Symmetric codes (no zero points).')
flags.DEFINE_enum('fmt', 'int', ['int', 'fp8'], "Code format: uniform 'int' or 'fp8' (e4m3, absmax; --bits ignored).")
flags.DEFINE_integer('act_bits', 0, 'Also round every kernel input per token to this many bits (0: weights only).',
                     lower_bound=0, upper_bound=8)
flags.DEFINE_bool('act_static', False, 'With --act_bits: one calibrated scale per block Linear input (static '
                  'per tensor, act_quant(static=True)) instead of one per token.')
flags.DEFINE_integer('act_group_size', 0, 'With --act_bits (per token): one activation scale per this many input '
                     'channels of a token (0: one per token).')
flags.DEFINE_bool('act_symmetric', True, 'With --act_bits: symmetric activation grid (False, int: a zero point too, '
                  'per token or calibrated with --act_static).')
flags.DEFINE_list('models', ['fixture', 'minilm'], "'fixture' and / or 'minilm' (skipped if not installed).")
flags.DEFINE_integer('tokens', 32, 'Tokens per sequence of the agreement check (2 sequences).', lower_bound=2)
flags.DEFINE_string('json', None, 'Also write the rows as JSON to this file.')
FLAGS = flags.FLAGS


def load(name: str):
  if name == 'fixture':
    return fixture.load('fixture'), 'causal'
  return models.from_pretrained(models.minilm_dir()), 'encoder'


def quantize(model, params):
  group = FLAGS.group_size or None
  fp8 = FLAGS.fmt == 'fp8'
  grid = 'fp8' if fp8 else 'full'
  per_token = FLAGS.act_bits and not FLAGS.act_static

  def one(_, w):
    q = core.quantize(w, bits=8 if fp8 else FLAGS.bits, group_size=group, symmetric=FLAGS.symmetric or fp8,
                      fmt=FLAGS.fmt)
    return (core.ActQuantized(q, bits=FLAGS.act_bits, grid=grid, symmetric=FLAGS.act_symmetric,
                              group_size=FLAGS.act_group_size or None) if per_token else q)
  qparams = model.select(params, head=True).map(one, params)
  if FLAGS.act_bits and FLAGS.act_static:
    calib = [{'tokens': np.random.RandomState(7).randint(1, model.config.vocab_size, (8, FLAGS.tokens)
                                                         ).astype(np.int32)}]
    config = quantization.ActQuantConfig(bits=FLAGS.act_bits, grid=grid, static=True,
                                         symmetric=FLAGS.act_symmetric)
    qparams = quantization.act_quant(model, qparams, calib, config=config)[1]
  return qparams


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def per_linear_error(ref, model, qparams, tokens: int) -> float:
  """The largest relative error of a transformers Linear (with its bias) against `core.linear` on the same input."""
  import torch
  rng, worst = np.random.RandomState(1), 0.0
  flat = core.flatten(qparams)
  for row in model.hf_table():
    w = flat[row.ours[0]]
    if not isinstance(w, core.ActQuantized):
      continue
    x = rng.randn(2, tokens, w.shape[0]).astype(np.float32)
    bias = flat.get(row.ours[0].removesuffix('kernel') + 'bias')
    module = ref.get_submodule(models.hf.export_name(model, row.hf).removesuffix('.weight'))
    with torch.no_grad():
      want = module(torch.from_numpy(x)).numpy()
    worst = max(worst, rel_err(core.linear(jnp.asarray(x), w, bias), want))
  return worst


def transformers_outputs(path: pathlib.Path, kind: str, tokens: np.ndarray, asymmetric: bool, check=None):
  import torch
  import transformers
  auto = transformers.AutoModelForCausalLM if kind == 'causal' else transformers.AutoModel
  kwargs = {}
  if asymmetric and f'"{exports.compressed_tensors.FORMAT}"' in (path / 'config.json').read_text():
    kwargs['quantization_config'] = transformers.CompressedTensorsConfig(dequantize=True)
  ref = auto.from_pretrained(str(path), dtype=torch.float32, **kwargs).eval()
  with torch.no_grad():
    out = ref(torch.tensor(tokens))  # the first forward also decompresses the weights
  outputs = (out.logits if kind == 'causal' else out.last_hidden_state).float().numpy()
  return outputs, None if check is None else check(ref)


def bench(name: str) -> list[dict]:
  (model, params), kind = load(name)
  qparams = quantize(model, params)
  vocab = model.config.vocab_size
  tokens = np.random.RandomState(0).randint(1, vocab, (2, FLAGS.tokens)).astype(np.int32)
  apply = jax.jit(model.apply)
  ours = np.asarray(apply(qparams, jnp.asarray(tokens)))
  formats = exports.allowed(model, qparams) + ('dense',)  # dense: the byte reference, written in any case
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for fmt in exports.FORMATS:
      row = {'model': name, 'format': fmt}
      rows.append(row)
      if fmt not in formats:
        row['note'] = 'refused: ' + '; '.join(
            (exports.compressed_tensors.refusals(model, qparams) if fmt == 'compressed-tensors' else
             exports.gptq_format.refusals(model, qparams, 'gptq_v2')).values())[:120]
        continue
      out = pathlib.Path(tmp, fmt)
      out.mkdir()
      t0 = time.perf_counter()
      written = exports.write(out, model, qparams, [fmt])[fmt]
      row['export_s'] = time.perf_counter() - t0
      row['bytes'] = written['bytes']
      path = out / written['path']
      if fmt == 'gptq':  # v1 where every zero point is at least 1, else v2
        row['format'] = f"gptq ({json.loads((path / 'config.json').read_text())['quantization_config']['format']})"
      if fmt == 'dense' and FLAGS.act_bits:  # not a default here: its weights alone compute another function
        row['format'] = 'dense (weights only)'

      t0 = time.perf_counter()
      back = core.serialize.load(path) if fmt == 'jxc' else models.from_pretrained(path)[1]
      jax.block_until_ready(back)
      row['import_s'] = time.perf_counter() - t0
      row['reimport_err'] = rel_err(apply(back, jnp.asarray(tokens)), ours)
      if fmt == 'gptq':
        row['transformers_err'] = 'n/a: needs optimum + gptqmodel'
      elif fmt != 'jxc':
        check = (lambda ref: per_linear_error(ref, model, qparams, FLAGS.tokens)) if fmt == 'compressed-tensors' \
            and FLAGS.act_bits else None
        theirs, row['per_linear_err'] = transformers_outputs(path, kind, tokens, not FLAGS.symmetric, check)
        row['transformers_err'] = rel_err(theirs, ours)
  dense = next(r['bytes'] for r in rows if r['format'].startswith('dense'))
  for r in rows:
    if 'bytes' in r:
      r['vs_dense'] = r['bytes'] / dense
  return rows


def table(rows: list[dict]) -> str:
  cell = lambda v, f: '' if v is None else v if isinstance(v, str) else format(v, f)
  acts = bool(FLAGS.act_bits)
  lines = ['| model | format | bytes | vs dense fp32 | export s | import s | re-import rel err | transformers rel err |'
           + (' per-Linear |' if acts else ''), '|---|---|---|---|---|---|---|---|' + ('---|' if acts else '')]
  for r in rows:
    if 'note' in r:
      lines.append(f"| {r['model']} | {r['format']} | {r['note']} | | | | | |" + (' |' if acts else ''))
      continue
    lines.append(f"| {r['model']} | {r['format']} | {r['bytes']:,} | {r['vs_dense']:.3f} | {r['export_s']:.2f} | "
                 f"{r['import_s']:.2f} | {cell(r['reimport_err'], '.1e')} | "
                 f"{cell(r.get('transformers_err'), '.1e') or 'n/a (no reader)'} |" +
                 (f" {cell(r.get('per_linear_err'), '.1e')} |" if acts else ''))
  return '\n'.join(lines)


def main(argv):
  del argv
  if FLAGS.act_group_size and (FLAGS.act_static or not FLAGS.act_bits):
    raise app.UsageError(f'--act_group_size={FLAGS.act_group_size} rounds activations per group of a token at run '
                         'time: give --act_bits and leave out --act_static.')
  jax.config.update('jax_default_matmul_precision', 'highest')
  import transformers
  transformers.utils.logging.disable_progress_bar()
  rows = []
  for name in FLAGS.models:
    if name == 'minilm':
      try:
        models.minilm_dir()
      except ImportError as e:
        print(f'minilm skipped: {e}')
        continue
    rows += bench(name)
  weights = 'FP8 (e4m3)' if FLAGS.fmt == 'fp8' else f'W{FLAGS.bits}'
  how = ('static per tensor' if FLAGS.act_static else 'per token') + ('' if FLAGS.act_symmetric else ', asymmetric')
  how += f', per {FLAGS.act_group_size} channels' if FLAGS.act_group_size and not FLAGS.act_static else ''
  acts = f"A{FLAGS.act_bits} ({'fp8' if FLAGS.fmt == 'fp8' else 'int'}, {how}) " if FLAGS.act_bits else ''
  scheme = f"{weights} {acts}{'g' + str(FLAGS.group_size) if FLAGS.group_size else 'per channel'} " + \
      ('symmetric' if FLAGS.symmetric or FLAGS.fmt == 'fp8' else 'asymmetric')
  print(f'{scheme}, round-to-nearest, every Linear kernel (heads included), fp32 elsewhere; CPU ({jax.devices()[0]})')
  print(table(rows))
  if FLAGS.json:
    pathlib.Path(FLAGS.json).write_text(json.dumps(rows, indent=1))


if __name__ == '__main__':
  app.run(main)
