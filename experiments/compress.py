"""Compress a model with a recipe of stages across families, evaluate it against the original, save and report.

    python experiments/compress.py                       # all-MiniLM-L6-v2, the default recipe, fortunes sentences
    python experiments/compress.py --list_methods        # every method, its config fields and paper
    python experiments/compress.py --model=fixture --recipe='sparsegpt(sparsity=0.5) > gptq(bits=4) > distill(steps=100)'
    python experiments/compress.py --recipe=recipe.json --output_dir=runs/mine

Each run writes into --output_dir: config.json, environment.json (package versions, git revision), metrics.jsonl
(one record per stage), compressed.jxc (core.serialize) and orbax/ (the same tree with orbax), hf/ (the dense
equivalent as a Hugging Face checkpoint), report.md (the survey's criteria: size, compression rate, quality and
its drop, speed-up, peak memory, time to compress, fine-tuning cost, hardware fit, energy) and stages.png.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import resource
import sys
import time
from typing import Any

os.environ.setdefault('HF_HUB_OFFLINE', '1')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from absl import app, flags

DEFAULT_RECIPE = ('rtn(bits=8, group_size=64, target="embeddings") > wanda(sparsity=0.1, include=("mlp/",)) > '
                  'gptq(bits=4, group_size=128, act_order=True)')
MODELS = ('minilm', 'fixture', 'tiny')

flags.DEFINE_string('model', 'minilm', "'minilm' (all-MiniLM-L6-v2), 'fixture' (the causal-LM fixture), 'tiny' (a "
                    'random 2-layer Llama, seconds) or a checkpoint directory holding config.json.')
flags.DEFINE_string('recipe', DEFAULT_RECIPE, "Stages joined by '>' (name(arg=value, ...)), or a JSON file of "
                    '[{"method": name, args...}]. See --list_methods.')
flags.DEFINE_bool('list_methods', False, 'Print every registered method with its config fields and paper, then exit.')
flags.DEFINE_string('calib_data', 'default', "Calibration text: 'default' (fortunes sentences for encoders, the "
                    "fixture's training rows for causal LMs), a .txt file (one text per line) or a .npy of token rows.")
flags.DEFINE_string('eval_data', 'default', "Evaluation text: 'default' (held-out fortunes sentences / the fixture's "
                    'held-out rows), a .txt file or a .npy of token rows [N, T + 1].')
flags.DEFINE_integer('calib_samples', 512, 'Calibration sequences.', lower_bound=1)
flags.DEFINE_integer('eval_samples', 256, 'Evaluation sequences.', lower_bound=1)
flags.DEFINE_integer('seq_len', 64, 'Tokens per encoder sentence (longer ones are cut).', lower_bound=8)
flags.DEFINE_integer('batch_size', 32, 'Sequences per calibration, evaluation and training batch.', lower_bound=1)
flags.DEFINE_integer('seed', 0, 'The one seed every random choice derives from.')
flags.DEFINE_string('output_dir', 'runs/compress', 'Where the run writes its files (replaced files only).')
flags.DEFINE_bool('save', True, 'Write compressed.jxc, orbax/ and hf/ (False: report and metrics only).')
flags.DEFINE_bool('per_stage_eval', True, 'Evaluate after every stage (the points of stages.png).')
flags.DEFINE_bool('measure', True, 'Measure speed, fine-tuning cost and energy (False: size and quality only).')
flags.DEFINE_integer('timing_reps', 5, 'Interleaved repetitions of the dense/compressed speed measurements.',
                     lower_bound=1)
flags.DEFINE_integer('data', -1, 'Mesh: data-parallel devices splitting calibration rows (-1 fills).')
flags.DEFINE_integer('fsdp', 1, 'Mesh: devices parameters are sharded over (calibration keeps 1).', lower_bound=1)
flags.DEFINE_integer('tensor', 1, 'Mesh: tensor-parallel devices (calibration keeps 1).', lower_bound=1)
flags.DEFINE_string('coordinator', None, 'Multi-host: coordinator address host:port.')
flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.', lower_bound=1)
flags.DEFINE_integer('process_id', None, 'Multi-host: this process.', lower_bound=0)
flags.DEFINE_string('cpu_collectives', None, "Multi-host on CPU: 'gloo'.")
flags.DEFINE_bool('out_of_core', False, 'Run the layer-wise stages block by block from the checkpoint on disk '
                  '(calibration.compress_checkpoint: one block in memory, resumable) into --output_dir/blocks/, '
                  'then reload it for the report. Every stage must be a calibrated layer-wise method (wanda, '
                  'sparsegpt, gptq, awq, w8a8/smoothquant/llm_int8, nonuniform, asvd/svd_llm without budget=); '
                  'the stages run one after another on each block, each on the hidden states it sees in memory.')
FLAGS = flags.FLAGS

# Energy per operation, stated per device: rated power over peak rate (an upper bound at full load).
DEVICE_MODEL = {'name': 'H100 SXM (700 W; 989 TFLOP/s dense bf16; 3.35 TB/s HBM3)',
                'joule_per_flop': 700 / 989e12, 'joule_per_byte': 700 / 3.35e12}
# Which backends run a leaf format natively (a dedicated kernel / hardware path) rather than emulate it
# (dequantize or materialize to dense in XLA, then a dense matmul).
HARDWARE = {
    'Quantized': {'gpu': 'native (int4/int8 weight-only kernels: Marlin, exllama, bitsandbytes)',
                  'tpu': 'emulated (dequantize in XLA; int8 native on v5e+)', 'cpu': 'emulated (dequantize)'},
    'Prescaled': {'gpu': 'native after folding 1/s into the input', 'tpu': 'emulated', 'cpu': 'emulated'},
    'Masked': {'gpu': 'native for 2:4 (Ampere+ sparse tensor cores), else emulated', 'tpu': 'emulated (dense)',
               'cpu': 'emulated (dense)'},
    'LowRank': {'gpu': 'native (two dense matmuls)', 'tpu': 'native (two dense matmuls)', 'cpu': 'native'},
    'LoRA': {'gpu': 'native (base + two thin matmuls)', 'tpu': 'native', 'cpu': 'native'},
    'Int8Linear': {'gpu': 'native (int8 tensor cores)', 'tpu': 'native (int8 MXU)', 'cpu': 'native (VNNI)'},
    'ActQuantized': {'gpu': 'native at 8/8 bits (int8 tensor cores), else emulated', 'tpu': 'emulated',
                     'cpu': 'emulated (activations rounded in XLA)'},
    'Outliers': {'gpu': 'emulated (codebook lookup + sparse)', 'tpu': 'emulated', 'cpu': 'emulated'},
    'ProductQuantized': {'gpu': 'emulated (codebook lookup)', 'tpu': 'emulated', 'cpu': 'emulated'},
    'Shared': {'gpu': 'native (one buffer, several users)', 'tpu': 'native', 'cpu': 'native'},
}


# Data ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EncoderBatches:
  """Random-access encoder training batches {'inputs', 'attention_mask'} [B, T] from fixed tokenized sentences."""
  tokens: np.ndarray  # [N, T] int32
  mask: np.ndarray  # [N, T] int32
  batch_size: int
  seed: int

  def batch(self, step: int, *, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
    rows = np.random.default_rng([self.seed, step]).choice(len(self.tokens), self.batch_size, replace=False)
    rows = np.array_split(rows, process_count)[process_index]
    return {'inputs': self.tokens[rows], 'attention_mask': self.mask[rows]}


def sentences(n: int, skip: int = 0) -> list[str]:
  """n sentences (one per fortune, its first line of 20+ characters) from the fortunes corpus, after `skip`."""
  from jaxcompress.data import corpus
  out = []
  for doc in corpus.fortunes_documents():
    line = next((s.strip() for s in doc.splitlines() if len(s.strip()) >= 20), None)
    if line:
      out.append(line)
    if len(out) >= skip + n:
      break
  if len(out) < skip + n:
    raise ValueError(f'the fortunes corpus has {len(out)} sentences; asked for {skip + n}.')
  return out[skip:skip + n]


def _texts(spec: str, n: int, skip: int) -> list[str]:
  if spec == 'default':
    return sentences(n, skip)
  path = pathlib.Path(spec)
  if path.suffix != '.txt' or not path.is_file():
    raise ValueError(f"data={spec!r}: an encoder takes 'default' or an existing .txt file (one text per line).")
  lines = [s for s in path.read_text().splitlines() if s.strip()]
  if len(lines) < n:
    raise ValueError(f'data={spec!r} has {len(lines)} lines; {n} asked (lower --calib_samples / --eval_samples).')
  return lines[:n]


def _rows(spec: str, default: np.ndarray, n: int) -> np.ndarray:
  if spec == 'default':
    rows = default
  else:
    path = pathlib.Path(spec)
    if path.suffix != '.npy' or not path.is_file():
      raise ValueError(f"data={spec!r}: a causal LM takes 'default' or an existing .npy of token rows [N, T + 1].")
    rows = np.load(path).astype(np.int32)
    if rows.ndim != 2:
      raise ValueError(f'data={spec!r}: rows of shape {rows.shape}; expected [N, T + 1].')
  return rows[:n]


def tiny_model(seed: int):
  import jax

  from jaxcompress import models
  model = models.Llama(models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                                          num_heads=4, num_kv_heads=2, max_position_embeddings=64))
  return model, jax.jit(model.init)(jax.random.key(seed))


@dataclasses.dataclass
class Setup:
  model: Any
  params: Any
  causal: bool
  calib: list  # calibration batches
  train: Any  # training batches
  eval_tokens: np.ndarray  # encoder [N, T] or causal rows [N, T + 1]
  eval_mask: np.ndarray | None


def load(model_name: str, *, calib_data: str, eval_data: str, calib_samples: int, eval_samples: int, seq_len: int,
         batch_size: int, seed: int) -> Setup:
  """The model, its calibration/training batches and evaluation data."""
  from experiments import fixture
  from jaxcompress.data import pipeline
  if model_name == 'tiny':
    model, params = tiny_model(seed)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 64, (64, 17)).astype(np.int32)
    train_rows = _rows(calib_data, rows[:48], calib_samples)
    eval_rows = _rows(eval_data, rows[48:], eval_samples)
    train = pipeline.LMBatches(sequences=train_rows, batch_size=min(batch_size, len(train_rows)), seed=seed)
  else:
    model, params = fixture.load(model_name)
    if model.causal:
      _, train, held_out = fixture.data(fixture.resolve(model_name))
      train_rows = _rows(calib_data, train.sequences, calib_samples)
      eval_rows = _rows(eval_data, held_out, eval_samples)
      train = pipeline.LMBatches(sequences=train.sequences, batch_size=min(batch_size, 16), seed=seed)
  if model.causal:
    calib = [{'tokens': train_rows[i:i + batch_size, :-1]} for i in range(0, len(train_rows), batch_size)]
    return Setup(model, params, True, calib, train, eval_rows, None)
  import transformers
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(fixture.resolve(model_name)))

  def encode(texts):
    b = tokenizer(texts, padding='max_length', truncation=True, max_length=seq_len, return_tensors='np')
    return b['input_ids'].astype(np.int32), b['attention_mask'].astype(np.int32)

  calib_tok, calib_mask = encode(_texts(calib_data, calib_samples, 0))
  eval_tok, eval_mask = encode(_texts(eval_data, eval_samples, calib_samples if calib_data == 'default' else 0))
  calib = [{'tokens': calib_tok[i:i + batch_size], 'attention_mask': calib_mask[i:i + batch_size]}
           for i in range(0, len(calib_tok), batch_size)]
  train = EncoderBatches(calib_tok, calib_mask, min(batch_size, len(calib_tok)), seed)
  return Setup(model, params, False, calib, train, eval_tok, eval_mask)


# Measurements --------------------------------------------------------------------------------------------------------

def quality(setup: Setup, model, params, reference: np.ndarray | None, batch_size: int) -> dict[str, float]:
  """Causal LM: held-out perplexity. Encoder: embeddings and, given the reference ones, cosine fidelity."""
  import jax
  import jax.numpy as jnp

  from jaxcompress.eval import fidelity, lm
  if setup.causal:
    r = lm.rows_perplexity(model, params, setup.eval_tokens, batch_size=batch_size)
    return {'perplexity': float(r.perplexity), 'mean_nll': float(r.mean_nll)}
  embed = jax.jit(model.sentence_embedding)
  emb = np.concatenate([np.asarray(embed(params, jnp.asarray(setup.eval_tokens[i:i + batch_size]),
                                         jnp.asarray(setup.eval_mask[i:i + batch_size])))
                        for i in range(0, len(setup.eval_tokens), batch_size)])
  out = {'embeddings': emb}
  if reference is not None:
    cos = fidelity.embedding_cosine(jnp.asarray(reference), jnp.asarray(emb))
    out.update(cosine_mean=float(cos.mean), cosine_min=float(cos.min))
  return out


def quality_metric(setup: Setup) -> tuple[str, bool]:
  """(name of the quality figure, higher is better)."""
  return ('cosine_mean', True) if not setup.causal else ('perplexity', False)


def timed_pair(fns, reps: int) -> list[float]:
  """Median seconds of each zero-argument fn, measured interleaved (the machine's load hits both alike)."""
  import jax
  for f in fns:
    jax.block_until_ready(f())
  times = [[] for _ in fns]
  for _ in range(reps):
    for i, f in enumerate(fns):
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      times[i].append(time.perf_counter() - t0)
  return [float(np.median(t)) for t in times]


def _forward(setup: Setup, model):
  import jax
  import jax.numpy as jnp
  if setup.causal:
    x = jnp.asarray(setup.eval_tokens[:8, :-1])
    f = jax.jit(lambda p: model.apply(p, x))
  else:
    x, m = jnp.asarray(setup.eval_tokens[:8]), jnp.asarray(setup.eval_mask[:8])
    f = jax.jit(lambda p: model.sentence_embedding(p, x, m))
  return f


def _loss(setup: Setup, model, reference_out):
  """A training loss of the model's own kind: causal next-token NLL, or 1 - cosine to the reference embeddings."""
  import jax.numpy as jnp

  from jaxcompress.eval import lm
  if setup.causal:
    x = jnp.asarray(setup.eval_tokens[:8])
    return lambda p: lm.token_nll(model.apply(p, x[:, :-1]).astype(jnp.float32), x[:, 1:]).mean()
  x, m = jnp.asarray(setup.eval_tokens[:8]), jnp.asarray(setup.eval_mask[:8])
  return lambda p: 1 - jnp.mean(jnp.sum(model.sentence_embedding(p, x, m) * reference_out, -1))


def trainable_bytes(params) -> int:
  """Bytes of the floating arrays a fine-tune would train, times 3 (weights + Adam's two moments)."""
  import jax
  import jax.numpy as jnp
  leaves = [x for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)]
  return 3 * int(sum(x.size * x.dtype.itemsize for x in leaves))


def leaf_kinds(params) -> dict[str, int]:
  from jaxcompress import core
  kinds: dict[str, int] = {}
  for w in core.paths.flatten(params).values():
    name = type(w).__name__ if core.is_compressed(w) else None
    while name:
      kinds[name] = kinds.get(name, 0) + 1
      inner = getattr(w, 'value', None) if isinstance(w, core.Masked) else None
      w, name = inner, (type(inner).__name__ if inner is not None and core.is_compressed(inner) else None)
  return kinds


def measure(setup: Setup, dense, model, params, *, reps: int, seq_len: int) -> dict[str, Any]:
  """Speed (forward and train step, dense vs compressed, interleaved), memory, fine-tuning cost, energy."""
  import jax
  import jax.numpy as jnp
  dense_model, dense_params = dense
  fd, fc = _forward(setup, dense_model), _forward(setup, model)
  t_dense, t_comp = timed_pair([lambda: fd(dense_params), lambda: fc(params)], reps)
  ref_out = None if setup.causal else fd(dense_params)
  gd = jax.jit(jax.grad(_loss(setup, dense_model, ref_out)))
  gc = jax.jit(jax.grad(_loss(setup, model, ref_out), allow_int=True))
  s_dense, s_comp = timed_pair([lambda: gd(dense_params), lambda: gc(params)], max(1, reps // 2))
  summ = model.summary(params, seq_len=seq_len, baseline=dense_params)
  total, base = summ.total, summ.baseline
  energy = {}
  for name, c in (('dense', base), ('compressed', total)):
    energy[name] = c.flops * DEVICE_MODEL['joule_per_flop'] + c.memory * DEVICE_MODEL['joule_per_byte']
  del jnp
  return {
      'forward_s_dense': t_dense, 'forward_s': t_comp, 'speedup': t_dense / t_comp,
      'train_step_s_dense': s_dense, 'train_step_s': s_comp, 'train_step_ratio': s_comp / s_dense,
      'trainable_bytes_dense': trainable_bytes(dense_params), 'trainable_bytes': trainable_bytes(params),
      'memory_bytes_dense': base.memory, 'memory_bytes': total.memory,
      'peak_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      'flops_per_token_dense': base.flops, 'flops_per_token': total.flops,
      'joule_per_token_dense': energy['dense'], 'joule_per_token': energy['compressed'],
      'leaf_kinds': leaf_kinds(params),
  }


def size(model, params, dense_params, seq_len: int) -> dict[str, Any]:
  summ = model.summary(params, seq_len=seq_len, baseline=dense_params)
  return {'disk_bytes': summ.total.disk, 'disk_bytes_dense': summ.baseline.disk, 'params': summ.total.params,
          'stored': summ.total.stored, 'bits_per_weight': summ.total.bits_per_weight,
          'compression': summ.baseline.disk / summ.total.disk, 'sparsity': summ.total.sparsity}


# Hashes (reproducibility) --------------------------------------------------------------------------------------------

def params_hash(params) -> str:
  """sha256 over every array of the tree, in path order (types, shapes, dtypes and bytes)."""
  import hashlib

  import jax
  h = hashlib.sha256()
  leaves, treedef = jax.tree.flatten_with_path(params)
  h.update(str(treedef).encode())
  for path, x in leaves:
    a = np.asarray(jax.device_get(x))
    h.update(f'{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape}'.encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


# Report --------------------------------------------------------------------------------------------------------------

def _mb(b: float) -> str:
  return f'{b / 2**20:.2f} MiB'


MEASURED = ('forward_s_dense', 'forward_s', 'speedup', 'train_step_s_dense', 'train_step_s', 'train_step_ratio',
            'trainable_bytes_dense', 'trainable_bytes', 'memory_bytes_dense', 'memory_bytes', 'peak_rss_bytes',
            'joule_per_token_dense', 'joule_per_token')


def leaf_kinds_of(res: dict) -> dict:
  return res.get('leaf_kinds', {})


def report(cfg: dict, setup: Setup, res: dict) -> str:
  q, higher = quality_metric(setup)
  s, m = res['size'], res['measure']
  if m is None:  # not measured (--measure=false): those cells say so
    m = {k: float('nan') for k in MEASURED}
    m['leaf_kinds'] = leaf_kinds_of(res)
  dq, cq = res['quality_dense'][q], res['quality'][q]
  drop = (dq - cq) if higher else (cq - dq)
  bits_saved = 32.0 - s['bits_per_weight']
  per_bit = drop / bits_saved if bits_saved > 0 else float('nan')
  hw = sorted(m['leaf_kinds'])
  fit = '; '.join(f'{k}: gpu {HARDWARE.get(k, {}).get("gpu", "?")}, tpu {HARDWARE.get(k, {}).get("tpu", "?")}, '
                  f'cpu {HARDWARE.get(k, {}).get("cpu", "?")}' for k in hw) or 'dense: native everywhere'
  qname = 'embedding cosine to the original (mean over sentences)' if q == 'cosine_mean' else 'held-out perplexity'
  rows = [
      ('size on disk', _mb(s['disk_bytes_dense']), _mb(s['disk_bytes'])),
      ('parameters (logical / stored)', f"{s['params']:,}", f"{s['params']:,} / {s['stored']:,}"),
      ('bits per weight', '32.00', f"{s['bits_per_weight']:.2f}"),
      ('compression rate (disk)', '1.00×', f"{s['compression']:.2f}×"),
      (f'quality: {qname}', f'{dq:.4f}', f'{cq:.4f}'),
      ('quality drop', '0', f'{drop:+.4f}' + (f" (min cosine {res['quality']['cosine_min']:.4f})"
                                               if q == 'cosine_mean' else f' ({100 * drop / dq:+.2f}%)')),
      ('inference speed-up (forward, same run, interleaved)', f"{m['forward_s_dense'] * 1e3:.1f} ms",
       f"{m['forward_s'] * 1e3:.1f} ms ({m['speedup']:.2f}×)"),
      ('weights in memory', _mb(m['memory_bytes_dense']), _mb(m['memory_bytes'])),
      ('peak process RSS (whole run)', '', _mb(m['peak_rss_bytes'])),
      ('time to compress', '', f"{res['compress_s']:.1f} s"),
      ('fine-tuning step time (grad of one batch)', f"{m['train_step_s_dense'] * 1e3:.1f} ms",
       f"{m['train_step_s'] * 1e3:.1f} ms ({m['train_step_ratio']:.2f}× dense)"),
      ('fine-tuning state (trainable floats × 3, Adam)', _mb(m['trainable_bytes_dense']), _mb(m['trainable_bytes'])),
      ('energy per token (FLOPs + weight bytes, model below)', f"{m['joule_per_token_dense'] * 1e6:.2f} µJ",
       f"{m['joule_per_token'] * 1e6:.2f} µJ"),
  ]
  lines = [f"# Compression report: {cfg['model']}", '', f"Recipe: `{res['recipe']}`", '',
           '| criterion | original (fp32) | compressed |', '|---|---|---|']
  lines += [f'| {a} | {b} | {c} |' for a, b, c in rows]
  lines += ['', f'**Combined figure: quality drop per bit saved = {per_bit:.5f}** '
            f'({drop:+.4f} {q} over {bits_saved:.2f} bits/weight saved).', '',
            '## Stages', '', '| stage | seconds | disk | bits/w | ' + q + ' |', '|---|---|---|---|---|']
  for st in res['stages']:
    lines.append(f"| {st['stage']} | {st['seconds']:.1f} | {_mb(st['disk_bytes'])} | {st['bits_per_weight']:.2f} | "
                 + (f"{st[q]:.4f}" if q in st else '') + ' |')
  lines += ['', '## Hardware fit', '', fit, '',
            f"Energy model: {DEVICE_MODEL['name']}: {DEVICE_MODEL['joule_per_flop'] * 1e12:.2f} pJ/FLOP and "
            f"{DEVICE_MODEL['joule_per_byte'] * 1e12:.0f} pJ/byte (rated power over peak rate); a token costs its "
            'matmul FLOPs plus one read of the weights as stored (batch-1 decoding). Emulated formats also pay '
            'their dequantization, which this model leaves out.', '',
            'Speed figures are medians of interleaved runs on this machine (CPU, shared with other jobs: ratios '
            'are meaningful, absolute times are not). Compressed leaves run emulated on CPU (dequantized in XLA).']
  return '\n'.join(lines) + '\n'


def plot(setup: Setup, res: dict, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  q, _ = quality_metric(setup)
  pts = [('original', res['size']['disk_bytes_dense'], res['quality_dense'][q])]
  pts += [(st['stage'].split('(')[0], st['disk_bytes'], st[q]) for st in res['stages'] if q in st]
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot([p[1] / 2**20 for p in pts], [p[2] for p in pts], 'o-')
  for name, x, y in pts:
    ax.annotate(name, (x / 2**20, y), textcoords='offset points', xytext=(4, 4), fontsize=8)
  ax.set_xlabel('size on disk (MiB)')
  ax.set_ylabel(q)
  ax.set_title(f"{res['model']}: quality vs size after each stage")
  ax.invert_xaxis()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# The run -------------------------------------------------------------------------------------------------------------

def run(cfg: dict, *, setup: Setup | None = None, mesh=None, save: bool = True, verbose: bool = True) -> dict:
  """Parse, load, calibrate, apply the recipe, evaluate, save, report. cfg: the flag values. Returns results."""
  from jaxcompress import core, models, provenance, pruning, recipes
  stages = recipes.parse(cfg['recipe'])  # every name and argument is checked before any work
  out = pathlib.Path(cfg['output_dir'])
  t_load = time.perf_counter()
  if setup is None:
    setup = load(cfg['model'], calib_data=cfg['calib_data'], eval_data=cfg['eval_data'],
                 calib_samples=cfg['calib_samples'], eval_samples=cfg['eval_samples'], seq_len=cfg['seq_len'],
                 batch_size=cfg['batch_size'], seed=cfg['seed'])
  if cfg.get('out_of_core'):  # refused before any evaluation when a stage cannot run block by block
    layerwise_plan(stages, recipes.Context(reference_model=setup.model, reference=setup.params,
                                           calib=tuple(setup.calib), train=setup.train, seed=cfg['seed']),
                   setup.model)
  say = print if verbose else (lambda *a, **k: None)
  say(f"{cfg['model']}: {type(setup.model).__name__}, recipe {recipes.to_string(stages)} "
      f'(loaded in {time.perf_counter() - t_load:.1f}s)')
  out.mkdir(parents=True, exist_ok=True)
  provenance.write_run_dir(out, config=cfg)
  bs = cfg['batch_size']
  q_dense = quality(setup, setup.model, setup.params, None, bs)
  reference = q_dense.pop('embeddings', None)
  if reference is not None:
    q_dense.update(cosine_mean=1.0, cosine_min=1.0)
  ctx = recipes.Context(reference_model=setup.model, reference=setup.params, calib=tuple(setup.calib),
                        train=setup.train, seed=cfg['seed'], run_dir=str(out), mesh=mesh)
  records = []
  compress_s = 0.0

  def on_stage(i, stage, model, params, seconds):
    nonlocal compress_s
    compress_s += seconds
    rec = {'stage': str(stage), 'index': i, 'seconds': seconds, **size(model, params, setup.params, cfg['seq_len'])}
    if cfg.get('per_stage_eval', True) or i == len(stages) - 1:
      qs = quality(setup, model, params, reference, bs)
      qs.pop('embeddings', None)
      rec.update(qs)
    records.append(rec)
    say(f"  stage {i + 1} {stage}: {seconds:.1f}s, {rec['compression']:.2f}× smaller"
        + ''.join(f', {k} {rec[k]:.4f}' for k in ('cosine_mean', 'perplexity') if k in rec))

  if cfg.get('out_of_core'):
    t0 = time.perf_counter()
    model, params = out_of_core(stages, ctx, cfg, setup, out, verbose=verbose)
    on_stage(len(stages) - 1, recipes.to_string(stages) + ' [out of core]', model, params, time.perf_counter() - t0)
  else:
    model, params = recipes.run(stages, ctx, setup.model, setup.params, on_stage=on_stage)
  res = {'model': cfg['model'], 'recipe': recipes.to_string(stages), 'quality_dense': q_dense,
         'quality': {k: v for k, v in records[-1].items() if k in ('cosine_mean', 'cosine_min', 'perplexity',
                                                                   'mean_nll')},
         'size': size(model, params, setup.params, cfg['seq_len']), 'compress_s': compress_s, 'stages': records,
         'params_hash': params_hash(params), 'leaf_kinds': leaf_kinds(params)}
  res['measure'] = (measure(setup, (setup.model, setup.params), model, params, reps=cfg.get('timing_reps', 5),
                            seq_len=cfg['seq_len']) if cfg.get('measure', True) else None)
  provenance.atomic_write(out / 'metrics.jsonl', ''.join(json.dumps(provenance.to_jsonable(r)) + '\n'
                                                        for r in records))
  import jax
  if save and jax.process_index() == 0:  # every process holds the same compressed model; one writes it
    core.serialize.save(out / 'compressed.jxc', params, metadata={'recipe': res['recipe'], 'model': cfg['model']})
    if jax.process_count() == 1:  # orbax would coordinate a save across processes; this tree is process-local
      _save_orbax(out / 'orbax', params)
    if pruning.structured.is_narrowed(model, params):  # per-layer widths: our config field, not HF's
      pruning.structured.save(out / 'hf', model, params)
    else:
      models.save_pretrained(out / 'hf', model, params)
  text = report(cfg, setup, res)
  provenance.atomic_write(out / 'report.md', text)
  plot(setup, res, out / 'stages.png')
  provenance.write_json(out / 'results.json', res)
  say('\n' + text)
  say(f'files: {out}/ (report.md, stages.png, metrics.jsonl, results.json'
      + (', compressed.jxc, orbax/, hf/)' if save else ')'))
  return res


def layerwise_plan(stages, ctx, model):
  """[(stage, calibration.SequentialPlan)] of a recipe whose every stage compresses block by block, or a
  ValueError naming the first stage that cannot (trains, changes the architecture, needs statistics of the
  whole uncompressed model, or is not calibrated)."""
  from jaxcompress import calibration
  supported = ('calibrated layer-wise methods run out of core: wanda, sparsegpt, gptq, awq, w8a8, smoothquant, '
               'llm_int8, nonuniform, and asvd / svd_llm with keep=, rank= or energy= (budget= allocates ranks '
               'over every kernel of the whole model: give keep= instead; mixed allocates bits over the whole '
               'model)')
  abstract = model.abstract_params()
  plans = []
  for i, s in enumerate(stages):
    why = ('trains' if s.method.trains else 'changes the architecture' if s.method.adds == 'architecture'
           else 'is not calibrated' if not s.method.calibrated else None)
    if why is None:
      try:
        with calibration.record_sequential() as rec:
          s.method.apply(ctx, model, abstract, s.config)
      except calibration.NotSequential:
        why = 'needs statistics of the whole uncompressed model (calibrate, not run_sequential)'
      else:
        why = None if len(rec) == 1 else 'does not compress block by block with run_sequential'
    if why:
      raise ValueError(f'--out_of_core: stage {i + 1} {s} {why}; {supported}. Run this recipe without '
                       '--out_of_core, or split it: the layer-wise stages out of core, the rest on the result.')
    plans.append((s, rec[0]))
  return plans


def out_of_core(stages, ctx, cfg: dict, setup: Setup, out: pathlib.Path, *, verbose: bool = True):
  """The recipe through `calibration.compress_checkpoint` into out/blocks/ and back: (model, params).

  Per block, the stages run in recipe order, each calibrated on the hidden states it would see in memory (the
  blocks before it with this stage and the earlier ones applied, or only the earlier ones for a stage that
  calibrates on the model as given): the result equals the in-memory recipe's.
  """
  from jaxcompress import calibration, models
  src = pathlib.Path(cfg['model'])
  if not (src / 'config.json').is_file():  # a named model: written once as the checkpoint to stream from
    src = out / 'input_hf'
    models.save_pretrained(src, setup.model, setup.params)

  plans = [p for _, p in layerwise_plan(stages, ctx, setup.model)]

  def on_block(i, record):
    if verbose:
      print(f"  block {i}: {record['seconds']:.1f}s, {record['bytes'] / 2**20:.2f} MiB", flush=True)

  from jaxcompress import recipes
  calibration.compress_checkpoint(src, out / 'blocks', plans, list(ctx.calib),
                                  recipe={'recipe': recipes.to_string(stages)}, seed=cfg['seed'], on_block=on_block)
  return setup.model, calibration.load_compressed(out / 'blocks')


def _save_orbax(path: pathlib.Path, params) -> None:
  import shutil

  import orbax.checkpoint as ocp
  shutil.rmtree(path, ignore_errors=True)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path.absolute(), params)


def _mesh():
  from jaxcompress.train import sharding
  if FLAGS.coordinator or FLAGS.num_processes:
    sharding.initialize_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id, FLAGS.cpu_collectives)
  import jax
  if FLAGS.fsdp != 1 or FLAGS.tensor != 1:
    raise ValueError(f'--fsdp={FLAGS.fsdp} --tensor={FLAGS.tensor}: calibration splits batch rows only; keep both 1.')
  if jax.device_count() == 1 and FLAGS.data in (-1, 1):
    return None
  mesh = sharding.make_mesh(FLAGS.data, FLAGS.fsdp, FLAGS.tensor)
  return mesh


def validate() -> None:
  """Every flag checked before loading anything."""
  from jaxcompress import recipes
  recipes.parse(FLAGS.recipe)
  if FLAGS.model not in MODELS and not (pathlib.Path(FLAGS.model) / 'config.json').is_file():
    raise ValueError(f'--model={FLAGS.model!r}: choose {", ".join(MODELS)} or a directory holding config.json.')
  for name in ('calib_data', 'eval_data'):
    v = getattr(FLAGS, name)
    if v != 'default' and not (re.search(r'\.(txt|npy)$', v) and pathlib.Path(v).is_file()):
      raise ValueError(f"--{name}={v!r}: give 'default' or an existing .txt (encoders) / .npy (causal LMs) file.")
  if FLAGS.cpu_collectives not in (None, 'gloo'):
    raise ValueError(f"--cpu_collectives={FLAGS.cpu_collectives!r}: only 'gloo' (or unset).")
  if (FLAGS.num_processes or 1) > 1 and (FLAGS.coordinator is None or FLAGS.process_id is None):
    raise ValueError('--num_processes > 1 needs --coordinator=host:port and --process_id.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}; every setting is a --flag (see --help).')
  if FLAGS.list_methods:
    from jaxcompress import recipes
    print(recipes.describe())
    return
  try:
    validate()
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  mesh = _mesh()
  cfg = {k: FLAGS[k].value for k in ('model', 'recipe', 'calib_data', 'eval_data', 'calib_samples', 'eval_samples',
                                     'seq_len', 'batch_size', 'seed', 'output_dir', 'per_stage_eval', 'timing_reps',
                                     'measure', 'out_of_core',
                                     'data', 'fsdp', 'tensor')}
  import jax
  if jax.process_count() > 1:
    cfg['output_dir'] = str(pathlib.Path(FLAGS.output_dir) / f'process{jax.process_index()}')
  t0 = time.perf_counter()
  run(cfg, mesh=mesh, save=FLAGS.save)
  print(f'total {time.perf_counter() - t0:.1f}s')


if __name__ == '__main__':
  app.run(main)
