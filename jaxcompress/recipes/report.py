"""What a compression run measures and how it reports it: quality, size, interleaved speed, fine-tuning cost,
energy, leaf formats and hardware fit, the parameter hash; the typed result with its Markdown, JSON and plot.

    result = recipes.compress('tiny', 'wanda(sparsity=0.5)')        # a CompressionResult
    print(result.to_markdown())                                    # report.md
    json.dumps(result.to_json())                                   # results.json
    result.plot('stages.png')                                      # quality against size after each stage
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import resource
import time
from typing import Any

import numpy as np

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
# The measurements `measure` adds (NaN in the report of a run that did not measure).
MEASURED = ('forward_s_dense', 'forward_s', 'speedup', 'train_step_s_dense', 'train_step_s', 'train_step_ratio',
            'trainable_bytes_dense', 'trainable_bytes', 'memory_bytes_dense', 'memory_bytes', 'peak_rss_bytes',
            'joule_per_token_dense', 'joule_per_token')


# Measurements --------------------------------------------------------------------------------------------------------

def quality(setup, model, params, reference: np.ndarray | None, batch_size: int) -> dict[str, float]:
  """Causal LM: held-out perplexity. Encoder: embeddings [N, D] and, given the reference ones, cosine fidelity."""
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


def quality_metric(causal: bool) -> tuple[str, bool]:
  """(name of the quality figure, higher is better)."""
  return ('cosine_mean', True) if not causal else ('perplexity', False)


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


def _forward(setup, model):
  import jax
  import jax.numpy as jnp
  if setup.causal:
    x = jnp.asarray(setup.eval_tokens[:8, :-1])
    f = jax.jit(lambda p: model.apply(p, x))
  else:
    x, m = jnp.asarray(setup.eval_tokens[:8]), jnp.asarray(setup.eval_mask[:8])
    f = jax.jit(lambda p: model.sentence_embedding(p, x, m))
  return f


def _loss(setup, model, reference_out):
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
  """{compressed leaf type name: count}, a Masked leaf's inner format counted too."""
  from jaxcompress import core
  kinds: dict[str, int] = {}
  for w in core.paths.flatten(params).values():
    name = type(w).__name__ if core.is_compressed(w) else None
    while name:
      kinds[name] = kinds.get(name, 0) + 1
      inner = getattr(w, 'value', None) if isinstance(w, core.Masked) else None
      w, name = inner, (type(inner).__name__ if inner is not None and core.is_compressed(inner) else None)
  return kinds


def measure(setup, dense, model, params, *, reps: int, seq_len: int) -> dict[str, Any]:
  """Speed (forward and train step, dense vs compressed, interleaved), memory, fine-tuning cost, energy."""
  import jax
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
  """Disk bytes (compressed and dense), logical and stored parameters, bits per weight, compression, sparsity."""
  summ = model.summary(params, seq_len=seq_len, baseline=dense_params)
  return {'disk_bytes': summ.total.disk, 'disk_bytes_dense': summ.baseline.disk, 'params': summ.total.params,
          'stored': summ.total.stored, 'bits_per_weight': summ.total.bits_per_weight,
          'compression': summ.baseline.disk / summ.total.disk, 'sparsity': summ.total.sparsity}


def params_hash(params) -> str:
  """sha256 over every array of the tree, in path order (types, shapes, dtypes and bytes)."""
  import jax
  h = hashlib.sha256()
  leaves, treedef = jax.tree.flatten_with_path(params)
  h.update(str(treedef).encode())
  for path, x in leaves:
    a = np.asarray(jax.device_get(x))
    h.update(f'{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape}'.encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


# The result ----------------------------------------------------------------------------------------------------------

QUALITY_KEYS = ('cosine_mean', 'cosine_min', 'perplexity', 'mean_nll')  # the quality figures a stage record holds


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompressionResult:
  """One compression run: what results.json holds (`to_json`), report.md (`to_markdown`), stages.png (`plot`),
  and, from `recipes.compress`, the compressed model itself."""
  model: str  # the model's name ('tiny', 'fixture', 'minilm' or its directory)
  recipe: str  # the recipe run, canonical (`recipes.to_string`)
  quality_dense: dict  # the original's quality: {'perplexity', 'mean_nll'} or {'cosine_mean': 1, 'cosine_min': 1}
  quality: dict  # the compressed model's quality, the same keys
  size: dict  # `size`: disk bytes, parameters, bits per weight, compression rate, sparsity
  compress_s: float  # seconds spent in the stages
  stages: tuple  # one record per stage: {'stage', 'index', 'seconds', size's keys, quality's keys}
  params_hash: str  # `params_hash` of the compressed params
  leaf_kinds: dict  # {compressed leaf type: count}
  measure: dict | None  # `measure`'s speed, memory, fine-tuning and energy figures; None: not measured
  compressed_model: Any = dataclasses.field(default=None, compare=False, repr=False)  # the model spec after the recipe
  compressed_params: Any = dataclasses.field(default=None, compare=False, repr=False)  # its params (None when read)
  output_dir: str | None = dataclasses.field(default=None, compare=False)  # where the run wrote its files
  exports: dict = dataclasses.field(default_factory=dict)  # {format: {'path', 'bytes'}} written (`recipes.exports`)

  @property
  def metric(self) -> tuple[str, bool]:
    """(name of the quality figure, higher is better): embedding cosine for encoders, perplexity for causal LMs."""
    return quality_metric('cosine_mean' not in self.quality_dense)

  def to_json(self) -> dict:
    """The results.json dict (plain Python values)."""
    from jaxcompress import provenance
    return provenance.to_jsonable({
        'model': self.model, 'recipe': self.recipe, 'quality_dense': self.quality_dense, 'quality': self.quality,
        'size': self.size, 'compress_s': self.compress_s, 'stages': list(self.stages),
        'params_hash': self.params_hash, 'leaf_kinds': self.leaf_kinds, 'measure': self.measure,
        'exports': self.exports})

  @classmethod
  def from_json(cls, data: dict, **kwargs) -> CompressionResult:
    """A result from results.json's dict (kwargs: the fields it does not hold, e.g. output_dir)."""
    names = ('model', 'recipe', 'quality_dense', 'quality', 'size', 'compress_s', 'stages', 'params_hash',
             'leaf_kinds', 'measure')
    missing = [k for k in names if k not in data]
    if missing:
      raise ValueError(f'CompressionResult.from_json: keys {missing} are missing; give the dict of a results.json.')
    return cls(**{k: data[k] for k in names if k != 'stages'}, stages=tuple(data['stages']),
               exports=data.get('exports', {}), **kwargs)  # results.json before exports were recorded: {}

  @classmethod
  def read(cls, run_dir: str | os.PathLike) -> CompressionResult:
    """The result of a run directory (its results.json; the compressed model is not loaded)."""
    import json
    path = pathlib.Path(run_dir) / 'results.json'
    if not path.is_file():
      raise FileNotFoundError(f"'{run_dir}' holds no results.json; give the output_dir of a finished run.")
    return cls.from_json(json.loads(path.read_text()), output_dir=str(run_dir))

  def to_markdown(self) -> str:
    """report.md: the survey's criteria, original against compressed, the stages and the hardware fit."""
    return markdown(self.to_json())

  def plot(self, path: str | os.PathLike) -> None:
    """stages.png: quality against size on disk after each stage."""
    plot(self.to_json(), pathlib.Path(path))


# Report --------------------------------------------------------------------------------------------------------------

def _mb(b: float) -> str:
  return f'{b / 2**20:.2f} MiB'


def _metric_of(res: dict) -> tuple[str, bool]:
  return quality_metric('cosine_mean' not in res['quality_dense'])


def markdown(res: dict) -> str:
  """report.md of a results.json dict."""
  q, higher = _metric_of(res)
  s, m = res['size'], res['measure']
  if m is None:  # not measured (--measure=false): those cells say so
    m = {k: float('nan') for k in MEASURED}
    m['leaf_kinds'] = res.get('leaf_kinds', {})
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
  lines = [f"# Compression report: {res['model']}", '', f"Recipe: `{res['recipe']}`", '',
           '| criterion | original (fp32) | compressed |', '|---|---|---|']
  lines += [f'| {a} | {b} | {c} |' for a, b, c in rows]
  lines += ['', f'**Combined figure: quality drop per bit saved = {per_bit:.5f}** '
            f'({drop:+.4f} {q} over {bits_saved:.2f} bits/weight saved).', '',
            '## Stages', '', '| stage | seconds | disk | bits/w | ' + q + ' |', '|---|---|---|---|---|']
  for st in res['stages']:
    lines.append(f"| {st['stage']} | {st['seconds']:.1f} | {_mb(st['disk_bytes'])} | {st['bits_per_weight']:.2f} | "
                 + (f"{st[q]:.4f}" if q in st else '') + ' |')
  if res.get('exports'):
    lines += ['', '## Files written', '', '| format | path | bytes | vs original fp32 |', '|---|---|---|---|']
    lines += [f"| {fmt} | {e['path']} | {e['bytes']:,} ({_mb(e['bytes'])}) | "
              f"{e['bytes'] / s['disk_bytes_dense']:.3f}× |" for fmt, e in res['exports'].items()]
  lines += ['', '## Hardware fit', '', fit, '',
            f"Energy model: {DEVICE_MODEL['name']}: {DEVICE_MODEL['joule_per_flop'] * 1e12:.2f} pJ/FLOP and "
            f"{DEVICE_MODEL['joule_per_byte'] * 1e12:.0f} pJ/byte (rated power over peak rate); a token costs its "
            'matmul FLOPs plus one read of the weights as stored (batch-1 decoding). Emulated formats also pay '
            'their dequantization, which this model leaves out.', '',
            'Speed figures are medians of interleaved runs on this machine (CPU, shared with other jobs: ratios '
            'are meaningful, absolute times are not). Compressed leaves run emulated on CPU (dequantized in XLA).']
  return '\n'.join(lines) + '\n'


def plot(res: dict, path: pathlib.Path) -> None:
  """stages.png of a results.json dict: quality against size on disk, the original and each evaluated stage."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  q, _ = _metric_of(res)
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
