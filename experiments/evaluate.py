"""Evaluates a model against a reference: quality, size and forward speed, measured in one run.

    python experiments/evaluate.py --model=runs/w4 --reference=fixture        # a compressed fixture
    python experiments/evaluate.py --model=runs/student/hf --reference=fixture --rows=heldout.npy
    python experiments/evaluate.py --model=runs/minilm_small --reference=minilm --sentences=256
    python experiments/evaluate.py --model=runs/compress --reference=minilm      # a compress.py run directory
    launch/local_multihost.sh 2 1 experiments/evaluate.py --model=... --reference=... --output_dir=runs/ev2

--model and --reference are each 'fixture' (the committed causal-LM fixture), 'minilm' (all-MiniLM-L6-v2), a
Hugging Face checkpoint directory (config.json + safetensors), a compressed-checkpoint directory: config.json
(the architecture, `model.hf_config()`) next to one safetensors file written by `core.serialize.save` (masks,
codes and low-rank factors kept as such; `jaxcompress.recipes.model_dirs` writes and reads one), or the
--output_dir of an experiments/compress.py run (its compressed.jxc, the architecture of its hf/).

Quality. Causal LMs: held-out perplexity over packed rows [N, T + 1] (inputs [:, :-1], targets [:, 1:]): the
fixture's held-out rows by default (`fixture.data()`), or --rows=<file.npy>. Scored by `eval.lm.sequence_nll`
in fixed batches sharded over the mesh, the same path as `eval.lm.rows_perplexity`. Encoders: sentence
embeddings (mean-pooled, normalized) of fortunes sentences, tokenized by --tokenizer: mean cosine to the
reference's embedding of the same sentence, and nearest-neighbour agreement (the fraction of sentences whose
nearest other sentence is the same under both models).
Size: `model.summary` (params, non-zeros, bits per weight, disk and memory bytes, FLOPs per token).
Speed: the reference's forward time over the model's on one batch, jitted, timed interleaved in this run (a
ratio > 1: the model is faster). Writes results.json, report.md, config.json and environment.json.

Multi-host: give --coordinator, --num_processes and --process_id (with --cpu_collectives=gloo for CPU
processes), or nothing on TPU pods, SLURM and GKE TPU JobSets, where the platform provides them (the launchers in
launch/ pass these flags through unchanged, and launch/gke_jobset.py adds them for GPU JobSets).
"""

from __future__ import annotations

import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import json
import pathlib
from typing import Any

from absl import app, flags

from experiments import cli

flags.DEFINE_string('model', None, "Model to evaluate: 'fixture', 'minilm', a Hugging Face checkpoint directory, "
                    'a compressed-checkpoint directory or a compress.py run directory.')
flags.DEFINE_string('reference', None, "Reference model, the same kinds as --model (usually the uncompressed "
                    "one, e.g. 'fixture').")
flags.DEFINE_string('output_dir', 'runs/evaluate', 'Where results.json, report.md, config.json and '
                    'environment.json go.')
flags.DEFINE_string('rows', None, 'Causal LMs: a .npy file of held-out token rows [N, T + 1] (default: the '
                    "fixture's held-out rows).")
flags.DEFINE_integer('max_rows', 0, 'Causal LMs: score only the first this many rows (0: all).')
flags.DEFINE_string('tokenizer', None, 'Encoders: directory of the tokenizer (default: that of the reference, '
                    'else of the model; a compress.py run directory uses the model it compressed).')
flags.DEFINE_integer('sentences', 256, 'Encoders: fortunes sentences embedded.')
flags.DEFINE_integer('max_len', 64, 'Encoders: tokens per sentence (longer ones are cut).')
flags.DEFINE_integer('batch_size', 16, 'Rows (or sentences) per forward pass; a multiple of data x fsdp devices.')
flags.DEFINE_integer('speed_repeats', 5, 'Interleaved timed forward passes per model (0: no speed figure).')
flags.DEFINE_integer('seed', 0, 'Seed of the sentence selection (encoders).')
flags.DEFINE_integer('data', -1, 'Mesh: data-parallel devices (-1 fills).')
flags.DEFINE_integer('fsdp', 1, 'Mesh: devices parameters are sharded over.')
flags.DEFINE_integer('tensor', 1, 'Mesh: tensor-parallel devices.')
flags.DEFINE_string('coordinator', None, 'Multi-host: coordinator address host:port.')
flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-host: this process.')
flags.DEFINE_string('cpu_collectives', None, "Multi-host on CPU: 'gloo'.")
FLAGS = flags.FLAGS

# Measurements -------------------------------------------------------------------------------------------------

def place(model, params, mesh):
  """Host params -> global arrays laid out by the model's sharding rules (every process passes the same)."""
  import jax

  from jaxcompress.train import sharding
  params = jax.device_get(params)
  shardings = sharding.tree_shardings(params, sharding.param_specs(params, mesh, model.sharding_rules()), mesh)
  return jax.jit(lambda p: p, out_shardings=shardings)(params)


def lm_quality(model, params, rows, batch_size: int, mesh) -> dict[str, float]:
  """Held-out perplexity of packed rows [N, T + 1], sharded over the mesh."""
  from jaxcompress.train import evaluate
  r = evaluate.make_lm_eval(model, rows, batch_size=batch_size, mesh=mesh, prefix='')(params)
  return {'perplexity': r['perplexity'], 'mean_nll': r['loss'], 'tokens': int(r['tokens'])}


def embeddings(model, params, ids, mask, batch_size: int, mesh):
  """Normalized sentence embeddings [N, D] float64 on every process (rows sharded over the mesh, gathered)."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  from jaxcompress.train import sharding
  n = len(ids)
  pad = (-n) % batch_size
  ids = np.concatenate([ids, np.repeat(ids[-1:], pad, 0)])  # filler rows, dropped below
  mask = np.concatenate([mask, np.repeat(mask[-1:], pad, 0)])
  fn = jax.jit(model.sentence_embedding)
  p, count = jax.process_index(), jax.process_count()
  local = batch_size // count
  out = []
  for start in range(0, len(ids), batch_size):
    mine = slice(start + p * local, start + (p + 1) * local)
    batch = sharding.global_batch({'ids': ids[mine], 'mask': mask[mine]}, mesh)
    e = fn(params, batch['ids'], batch['mask'])
    e = multihost_utils.process_allgather(e, tiled=True) if count > 1 else jax.device_get(e)
    out.append(np.asarray(e, np.float64))
  return np.concatenate(out)[:n]


def embedding_agreement(ref: Any, emb: Any) -> dict[str, float]:
  """Mean cosine of matching rows [N, D] (both normalized) and nearest-neighbour agreement (self excluded)."""
  import numpy as np

  def nearest(e):
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(-1)
  cos = np.sum(ref * emb, -1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(emb, axis=-1))
  return {'cosine_mean': float(cos.mean()), 'cosine_min': float(cos.min()),
          'nn_agreement': float(np.mean(nearest(ref) == nearest(emb)))}


def sentences(tokenizer_dir: pathlib.Path, n: int, max_len: int, seed: int):
  """(ids [n, max_len] int32, mask [n, max_len] int32) of n fortunes sentences picked by seed."""
  import jax
  import numpy as np
  import transformers

  from jaxcompress.data import corpus
  tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
  docs = corpus.fortunes_documents()
  order = np.asarray(jax.random.permutation(jax.random.key(seed), len(docs)))[:n]
  enc = tok([' '.join(docs[i].split()) for i in order], padding='max_length', truncation=True,
            max_length=max_len, return_tensors='np')
  return enc['input_ids'].astype(np.int32), enc['attention_mask'].astype(np.int32)


def speed_ratio(forward_ref, forward_model, repeats: int) -> dict[str, float]:
  """Median seconds of each forward, timed interleaved after one warm-up each, and reference / model."""
  from jaxcompress.recipes import encoder_runs
  a, b, _ = encoder_runs.time_ratio(forward_ref, forward_model, repeats)
  return {'reference_s': a, 'model_s': b, 'speedup': a / b, 'repeats': repeats}


# Flags and main -----------------------------------------------------------------------------------------------

def check_model_arg(flag: str, name: str | None) -> pathlib.Path:
  """The directory of a --model / --reference value, or a ValueError naming the flag, the value and the fix."""
  from jaxcompress.recipes import fixture, model_dirs
  if not name:
    raise ValueError(f"--{flag} is required: 'fixture', 'minilm', a Hugging Face checkpoint directory, a "
                     'compressed-checkpoint directory or a compress.py run directory.')
  if name not in fixture.NAMES and not pathlib.Path(name).expanduser().is_dir():
    raise ValueError(f"--{flag}={name!r}: the directory '{name}' does not exist; give 'fixture', 'minilm' or an "
                     'existing checkpoint or run directory.')
  if model_dirs.is_run_dir(name):
    return pathlib.Path(name).expanduser()
  try:
    path = fixture.resolve(name)
  except FileNotFoundError as e:
    raise ValueError(f'--{flag}: {e}') from None
  if not list(path.glob('*.safetensors')) and not (path / 'model.safetensors.index.json').exists():
    hint = (' It is a compress.py run directory written with --save=false: rerun with --save.'
            if (path / 'results.json').is_file() else '')
    raise ValueError(f"--{flag}={name!r}: '{path}' has config.json but no safetensors weights.{hint}")
  return path


def check_flags() -> dict[str, Any]:
  """Validates every flag before any work; returns the resolved paths. Raises ValueError naming the flag."""
  import numpy as np

  from jaxcompress.recipes import model_dirs
  resolved = {'model': check_model_arg('model', FLAGS.model),
              'reference': check_model_arg('reference', FLAGS.reference)}
  for name in ('batch_size', 'sentences', 'max_len'):
    if FLAGS[name].value < 1:
      raise ValueError(f'--{name}={FLAGS[name].value} must be >= 1.')
  for name in ('max_rows', 'speed_repeats'):
    if FLAGS[name].value < 0:
      raise ValueError(f'--{name}={FLAGS[name].value} must be >= 0.')
  if FLAGS.data == 0 or FLAGS.data < -1 or FLAGS.fsdp < 1 or FLAGS.tensor < 1:
    raise ValueError(f'mesh --data={FLAGS.data} --fsdp={FLAGS.fsdp} --tensor={FLAGS.tensor}: data is -1 (fill) '
                     'or >= 1, fsdp and tensor >= 1.')
  if FLAGS.rows is not None:
    path = pathlib.Path(FLAGS.rows).expanduser()
    if not path.is_file():
      raise ValueError(f"--rows={FLAGS.rows!r}: no such file; give a .npy file of token rows [N, T + 1].")
    rows = np.load(path, allow_pickle=False)
    if rows.ndim != 2 or rows.shape[1] < 2 or not len(rows) or not np.issubdtype(rows.dtype, np.integer):
      raise ValueError(f'--rows={FLAGS.rows!r}: holds {rows.dtype} {list(rows.shape)}; expected integer token '
                       'rows [N >= 1, T + 1 >= 2].')
    resolved['rows'] = rows.astype(np.int32)
  if FLAGS.tokenizer is not None and not pathlib.Path(FLAGS.tokenizer).expanduser().is_dir():
    raise ValueError(f"--tokenizer={FLAGS.tokenizer!r}: the directory '{FLAGS.tokenizer}' does not exist.")
  resolved['tokenizer'] = (pathlib.Path(FLAGS.tokenizer).expanduser() if FLAGS.tokenizer is not None else
                           model_dirs.tokenizer_dir(FLAGS.reference) or model_dirs.tokenizer_dir(FLAGS.model))
  explicit = (FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  if any(v is not None for v in explicit) and None in explicit:
    raise ValueError('--coordinator, --num_processes and --process_id go together (or none of them, where the '
                     f'platform provides them); got {explicit}.')
  if FLAGS.cpu_collectives not in (None, 'gloo', 'mpi'):
    raise ValueError(f"--cpu_collectives={FLAGS.cpu_collectives!r}: use 'gloo' (or 'mpi').")
  return resolved


def load(flag: str):
  """(model, params, kind) of --model or --reference (`model_dirs.load`); a file it cannot read is a usage error
  naming the flag, its value and the loader's fix."""
  from jaxcompress.recipes import model_dirs
  name = FLAGS[flag].value
  try:
    return model_dirs.load(name)
  except (OSError, ValueError, KeyError) as e:
    why = e.args[0] if isinstance(e, KeyError) and e.args else e  # a KeyError's str() is its repr
    raise app.UsageError(f'--{flag}={name!r}: {why}') from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}; every setting is a --flag (see --help).')
  try:
    resolved = check_flags()
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  from jaxcompress.train import sharding
  if FLAGS.coordinator is not None or sharding.platform_provides_processes():
    sharding.initialize_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id,
                                    FLAGS.cpu_collectives)
  import jax
  import numpy as np

  from jaxcompress import provenance
  from jaxcompress.recipes import model_dirs
  mesh = sharding.make_mesh(FLAGS.data, FLAGS.fsdp, FLAGS.tensor)
  divisor = sharding.batch_divisor(mesh)
  if FLAGS.batch_size % divisor:
    raise app.UsageError(f'--batch_size={FLAGS.batch_size} must be a multiple of {divisor} (data x fsdp devices '
                         f'of the mesh {dict(mesh.shape)}).')

  model, params, kind = load('model')
  ref_model, ref_params, ref_kind = load('reference')
  if model.causal != ref_model.causal:
    raise app.UsageError(f'--model is {"a causal LM" if model.causal else "an encoder"} but --reference is '
                         f'{"a causal LM" if ref_model.causal else "an encoder"}; compare like with like.')
  if getattr(model.config, 'vocab_size', None) != getattr(ref_model.config, 'vocab_size', None):
    raise app.UsageError(f'--model vocab_size={model.config.vocab_size} differs from --reference '
                         f'vocab_size={ref_model.config.vocab_size}; they must share one tokenizer.')

  if model.causal:
    if 'rows' in resolved:
      rows = resolved['rows']
    else:
      from jaxcompress.recipes import fixture
      rows = fixture.data()[2]
    rows = rows[:FLAGS.max_rows or None]
    if int(rows.max()) >= model.config.vocab_size:
      raise app.UsageError(f'--rows holds token id {int(rows.max())} >= vocab_size {model.config.vocab_size}.')
    seq_len = rows.shape[1] - 1
    speed_batch = {'tokens': rows[:FLAGS.batch_size, :-1]}
  else:
    if resolved['tokenizer'] is None:
      raise app.UsageError(f'--reference={FLAGS.reference!r} and --model={FLAGS.model!r} hold no tokenizer '
                           f'({", ".join(model_dirs.TOKENIZER_FILES)}); give --tokenizer=<dir>, e.g. the directory of '
                           'the model they were compressed from.')
    ids, mask = sentences(resolved['tokenizer'], FLAGS.sentences, FLAGS.max_len, FLAGS.seed)
    seq_len = FLAGS.max_len
    speed_batch = {'tokens': ids[:FLAGS.batch_size], 'attention_mask': mask[:FLAGS.batch_size]}

  summary = model.summary(params, seq_len=seq_len, baseline=ref_params)
  ref_summary = ref_model.summary(ref_params, seq_len=seq_len)
  params, ref_params = place(model, params, mesh), place(ref_model, ref_params, mesh)

  if model.causal:
    quality = {'model': lm_quality(model, params, rows, FLAGS.batch_size, mesh),
               'reference': lm_quality(ref_model, ref_params, rows, FLAGS.batch_size, mesh), 'rows': len(rows),
               'seq_len': seq_len}
    quality['perplexity_ratio'] = quality['model']['perplexity'] / quality['reference']['perplexity']
  else:
    emb = embeddings(model, params, ids, mask, FLAGS.batch_size, mesh)
    ref_emb = embeddings(ref_model, ref_params, ids, mask, FLAGS.batch_size, mesh)
    quality = {**embedding_agreement(ref_emb, emb), 'sentences': len(ids), 'max_len': FLAGS.max_len}

  speed = None
  if FLAGS.speed_repeats:
    batch = {k: v[:(len(v) // divisor) * divisor] for k, v in speed_batch.items()}
    local = {k: np.array_split(v, jax.process_count())[jax.process_index()] for k, v in batch.items()}
    g = sharding.global_batch(local, mesh)
    f_ref = jax.jit(lambda p, b: ref_model.apply(p, b['tokens'], attention_mask=b.get('attention_mask')))
    f_model = jax.jit(lambda p, b: model.apply(p, b['tokens'], attention_mask=b.get('attention_mask')))
    speed = speed_ratio(lambda: f_ref(ref_params, g), lambda: f_model(params, g), FLAGS.speed_repeats)
    speed['batch'] = list(batch['tokens'].shape)

  results = {'model': FLAGS.model, 'model_kind': kind, 'reference': FLAGS.reference, 'reference_kind': ref_kind,
             'task': 'causal_lm' if model.causal else 'encoder', 'quality': quality,
             'size': {'model': summary.total.as_dict(), 'reference': ref_summary.total.as_dict(),
                      'compression': summary.compression, 'by_block': summary.as_dict()['rows']},
             'speed': speed, 'processes': jax.process_count(), 'devices': jax.device_count(),
             'mesh': dict(mesh.shape)}
  if jax.process_index() != 0:
    return
  report = markdown(results)
  out = provenance.write_run_dir(FLAGS.output_dir, config={'flags': FLAGS.flag_values_dict()}, results=results)
  provenance.atomic_write(out / 'report.md', report)
  print(report)
  print(f'results: {out / "results.json"}')
  print('RESULTS ' + json.dumps({'quality': quality, 'bits_per_weight': summary.total.bits_per_weight}))


def markdown(r: dict) -> str:
  """The report table of a results dict."""
  m, ref = r['size']['model'], r['size']['reference']
  lines = [f"# {r['model']} against {r['reference']}", '', '| | model | reference |', '|---|---:|---:|']
  q = r['quality']
  if r['task'] == 'causal_lm':
    lines.append(f"| held-out perplexity ({q['rows']} rows x {q['seq_len']} tokens) | "
                 f"{q['model']['perplexity']:.2f} | {q['reference']['perplexity']:.2f} |")
  lines += [f"| parameters | {m['params']:,} | {ref['params']:,} |",
            f"| non-zero | {m['nonzero']:,} | {ref['nonzero']:,} |",
            f"| bits per weight | {m['bits_per_weight']:.2f} | {ref['bits_per_weight']:.2f} |",
            f"| disk bytes | {m['disk']:,} | {ref['disk']:,} |",
            f"| FLOPs per token | {m['flops']:,} | {ref['flops']:,} |"]
  if r['speed']:
    s = r['speed']
    lines.append(f"| forward {s['batch']} (median of {s['repeats']}, interleaved) | {s['model_s'] * 1e3:.1f} ms | "
                 f"{s['reference_s'] * 1e3:.1f} ms |")
  lines.append('')
  if r['task'] == 'causal_lm':
    lines.append(f"perplexity ratio (model / reference): {q['perplexity_ratio']:.4f}")
  else:
    lines.append(f"embedding cosine to the reference on {q['sentences']} sentences: mean {q['cosine_mean']:.4f}, "
                 f"min {q['cosine_min']:.4f}; nearest-neighbour agreement {q['nn_agreement']:.3f}")
  if r['size']['compression']:
    lines.append(f"compression (reference disk / model disk): {r['size']['compression']:.2f}x")
  if r['speed']:
    lines.append(f"forward speed-up (reference time / model time, this run, host possibly shared): "
                 f"{r['speed']['speedup']:.2f}x")
  lines.append(f"{r['processes']} process(es), {r['devices']} device(s), mesh {r['mesh']}")
  return '\n'.join(lines) + '\n'


def console():
  """The `jaxcompress-evaluate` command (an error it can name before any work: one line, exit status 2)."""
  cli.run(main)


if __name__ == '__main__':
  console()
