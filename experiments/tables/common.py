"""What the table scripts share: their common flags, the models and data they load, held-out perplexity, a
recovery run, and the markdown table with its results.json.

    from experiments.tables import common
    common.define_flags('lowrank_table')                 # --output_dir=runs/lowrank_table, --seed, --small, --model
    model, params, train, valid = common.model_and_data(FLAGS.model, small=FLAGS.small, seed=FLAGS.seed)
    ppl = common.perplexity(model, params, valid)
    params = common.recover(model, params, train, steps=100, run_dir=..., trainable=...)
    common.write(FLAGS.output_dir, {'flags': FLAGS.flag_values_dict()}, rows, common.markdown(rows, columns))
"""

from __future__ import annotations

import os
import pathlib
import shutil
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

os.environ.setdefault('HF_HUB_OFFLINE', '1')  # the models are local (the fixture, MiniLM's package)

import numpy as np
from absl import flags


def define_flags(name: str, *, model: bool = True, small: bool = True) -> None:
  """--output_dir (default runs/<name>), --seed and, unless turned off, --small and --model."""
  flags.DEFINE_string('output_dir', f'runs/{name}', 'Where results.json, table.md and any runs go.')
  flags.DEFINE_integer('seed', 0, 'The one seed every random choice derives from.')
  if small:
    flags.DEFINE_boolean('small', False, 'A tiny random model on random data, a few steps: a smoke test in seconds.')
  if model:
    flags.DEFINE_string('model', 'fixture', "'fixture' or a causal-LM checkpoint directory holding training.json.")


def fixture_rows(name: str, calib_rows: int, seed: int, *, sort: bool = False):
  """(model, params, calibration rows [calib_rows, T + 1] drawn (seeded, without replacement) from the training
  rows, held-out rows [N, T + 1]) of the fixture or a checkpoint trained like it."""
  from jaxcompress.recipes import fixture
  model, params = fixture.load(name)
  _, train, held_out = fixture.data(fixture.resolve(name))
  pick = np.random.default_rng(seed).choice(train.num_sequences, calib_rows, replace=False)
  return model, params, train.sequences[np.sort(pick) if sort else pick], held_out


def tiny_llama_rows(seed: int):
  """`fixture_rows` of a tiny random tied Llama (2 layers, 32 wide) on random tokens: 16 calibration and 8
  held-out rows of 17 tokens (smoke tests of the tables)."""
  import jax

  from jaxcompress import models
  model = models.Llama(models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                                          num_heads=4, num_kv_heads=2, max_position_embeddings=32,
                                          tie_embeddings=True))
  params = jax.jit(model.init)(jax.random.key(seed))
  rng = np.random.default_rng(seed)
  return model, params, rng.integers(0, 64, (16, 17)).astype(np.int32), rng.integers(0, 64, (8, 17)).astype(np.int32)


def llama_rows(*, small: bool, name: str, calib_rows: int, eval_rows: int, seed: int):
  """`tiny_llama_rows(seed)` with --small, else `fixture_rows` with the first `eval_rows` held-out rows (0: all)."""
  if small:
    return tiny_llama_rows(seed)
  model, params, calib, held_out = fixture_rows(name, calib_rows, seed)
  return model, params, calib, held_out[:eval_rows or None]


class RecipeRows(NamedTuple):
  """A recipe table's set-up: the model, its calibration rows as a recipes.Context, the group size and a
  held-out mean NLL."""
  model: Any
  params: Any
  calib: np.ndarray  # [calib_rows, T + 1]
  held_out: np.ndarray  # [N, T + 1]
  ctx: Any  # recipes.Context: the calibration rows without their last token, in batches of 8
  group_size: int  # 16 with --small (the tiny model's widths), else 128
  nll: Callable[[Any, Any], float]  # (model, params) -> mean NLL over every held-out prediction


def llama_recipe_rows(values) -> RecipeRows:
  """`llama_rows` from the flags `values` (small, model, calib_rows, eval_rows, seed) set up for recipes."""
  from jaxcompress import recipes
  from jaxcompress.eval import lm
  model, params, calib, held_out = llama_rows(small=values.small, name=values.model, calib_rows=values.calib_rows,
                                              eval_rows=values.eval_rows, seed=values.seed)
  ctx = recipes.Context(calib=tuple({'tokens': calib[i:i + 8, :-1]} for i in range(0, calib.shape[0], 8)),
                        seed=values.seed)
  return RecipeRows(model, params, calib, held_out, ctx, 16 if values.small else 128,
                    lambda m, p: lm.rows_perplexity(m, p, held_out, batch_size=32).mean_nll)


def minilm():
  """(model, params, tokenizer) of all-MiniLM-L6-v2 from its package."""
  import transformers

  from jaxcompress.recipes import fixture
  model, params = fixture.load('minilm')
  return model, params, transformers.AutoTokenizer.from_pretrained(str(fixture.resolve('minilm')))


def minilm_sentences(seed: int, *, heldout: int, max_len: int, batch_size: int, small: bool):
  """(model, params, tokenizer, held-out (ids, mask) [N, max_len], training `Sentences`) of all-MiniLM-L6-v2 on
  the fortunes in a seeded order: the first `heldout` are held out, the rest train (16 and 64 with `small`)."""
  import jax

  from jaxcompress.data import corpus
  from jaxcompress.recipes.encoder_runs import Sentences, tokenize
  from jaxcompress.train import loop
  model, params, tok = minilm()
  docs = corpus.fortunes_documents()
  order = np.asarray(jax.random.permutation(loop.rng_stream(seed, 'data'), len(docs)))
  n_held = 16 if small else heldout
  n_train = 64 if small else len(docs) - n_held
  held = tokenize(tok, [docs[i] for i in order[:n_held]], max_len)
  ids, mask = tokenize(tok, [docs[i] for i in order[n_held:n_held + n_train]], max_len)
  return model, params, tok, held, Sentences(ids, mask, batch_size, seed)


def group_for(w, group_size: int | None) -> int | None:
  """The group size if it divides the kernel's input dimension, else None (per-channel: the --small models)."""
  from jaxcompress import core
  return group_size if group_size is None or core.shape_of(w)[0] % group_size == 0 else None


def rtn(selection, params, bits: int, group_size: int | None):
  """params with every kernel of the selection round-to-nearest quantized (asymmetric min-max), in groups of
  group_size input rows where that divides, per-channel elsewhere."""
  from jaxcompress import quantization
  return selection.map(lambda _, w: quantization.quantize_weight(w, bits=bits, group_size=group_for(w, group_size)),
                       params)


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
  """{name: median seconds}: each callable called once first (compilation), then `repeats` rounds calling every
  one in turn, so load from other work on a shared host falls on all of them alike."""
  import jax
  for f in fns.values():
    jax.block_until_ready(f())
  times: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(repeats):
    for k, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      times[k].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}


def model_and_data(name: str, *, small: bool, seed: int, data_dir: str | None = None):
  """(model, params, train LMBatches, held-out rows [N, T + 1]); `small`: a random 2-layer Llama on random
  tokens (a smoke run in seconds)."""
  import jax

  from jaxcompress import models
  from jaxcompress.data import pipeline
  from jaxcompress.train import loop

  if small:
    model = models.Llama(models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                                            num_heads=4, num_kv_heads=2, max_position_embeddings=64))
    params = jax.jit(model.init)(loop.rng_stream(seed, 'init'))
    rows = np.random.RandomState(seed).randint(0, 64, (48, 17)).astype(np.int32)
    return model, params, pipeline.LMBatches(sequences=rows[:40], batch_size=4, seed=seed), rows[40:]
  from jaxcompress.recipes import fixture
  model, params = fixture.load(name)
  directory = data_dir or fixture.resolve(name)
  _, train, valid = fixture.data(directory)
  return model, params, train, valid


def perplexity(model, params, valid: np.ndarray, batch_size: int = 16) -> float:
  """Held-out perplexity over every token of the rows (the fixture's own evaluation)."""
  from jaxcompress.eval import lm
  return lm.rows_perplexity(model, params, valid, batch_size=batch_size).perplexity


def calibration_batches(train, n: int) -> list[dict[str, np.ndarray]]:
  """n training batches as calibration input ({'tokens'} for the calibration driver; inputs/targets too)."""
  out = []
  for step in range(n):
    b = train.batch(step)
    out.append({'tokens': b['inputs'], 'inputs': b['inputs'], 'targets': b['targets']})
  return out


def recover(model, params, train, *, steps: int, run_dir: pathlib.Path, seed: int, trainable=None,
            learning_rate: float = 1e-3, batch_size: int | None = None) -> Any:
  """params after `steps` of causal-LM fine-tuning with loop.fit (a fresh run in run_dir each time);
  batch_size: rows per step (default the training batches' own)."""
  import dataclasses

  from jaxcompress.train import loop, objectives, optim, state
  if steps <= 0:
    return params
  if batch_size:
    train = dataclasses.replace(train, batch_size=batch_size)
  shutil.rmtree(run_dir, ignore_errors=True)
  cfg = loop.LoopConfig(steps=steps, batch_size=train.batch_size, run_dir=str(run_dir), seed=seed,
                        checkpoint_every=0, async_checkpoint=False, progress=False, log_every=max(1, steps // 4),
                        mesh=(1, 1, 1))
  opt = optim.make_optimizer(optim.OptimizerConfig(learning_rate=learning_rate, warmup_steps=min(10, steps // 5),
                                                   total_steps=steps))
  result = loop.fit(cfg, model=model, params=params, objective=objectives.causal_lm(model), optimizer=opt,
                    data=train, trainable=trainable or state.floating)
  return result.state.params


def markdown(rows: list[dict], columns: list[str]) -> str:
  """A markdown table of the rows' `columns` (floats to 2 decimals, missing cells empty)."""
  def cell(v):
    return f'{v:.2f}' if isinstance(v, float) else str(v)
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(cell(r.get(c, '')) for c in columns) + ' |' for r in rows]
  return '\n'.join(lines)


def write(output_dir: str, config: dict, rows: list[dict], table: str, extra: dict | None = None) -> None:
  """results.json ({'rows': rows, **extra}) with provenance, and table.md; prints the table."""
  from jaxcompress import provenance
  out = pathlib.Path(output_dir)
  provenance.write_run_dir(out, config=config, results={'rows': rows, **(extra or {})})
  (out / 'table.md').write_text(table + '\n')
  print(table)
  print(f'results: {out / "results.json"}')


def chart(path: pathlib.Path, rows: list[dict], *, series: Callable[[dict], str], category: str,
          value: Callable[[dict], float], categories: list[str] | None = None, y_label: str, title: str = ''
          ) -> pathlib.Path:
  """Grouped bars of `value(row)` (one group per row[category], one bar per `series(row)`) as a PNG at `path`; a
  log scale when every value is positive. Prints and returns the path."""
  from jaxcompress.eval import plots
  bars: dict[str, dict[str, float]] = {}
  for r in rows:
    bars.setdefault(series(r), {})[r[category]] = value(r)
  groups = categories or list(dict.fromkeys(r[category] for r in rows))
  path = plots.bar_chart(bars, path, categories=groups, y_label=y_label, title=title,
                         log_y=all(v > 0 for cells in bars.values() for v in cells.values()),
                         width=max(7.2, 1.6 * len(groups)))
  print(f'plot: {path}')
  return path
