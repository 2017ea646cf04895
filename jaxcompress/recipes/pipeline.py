"""One call from a model and a recipe to a compressed, evaluated, measured and reported model.

    from jaxcompress.recipes import pipeline
    result = pipeline.compress('fixture', 'sparsegpt(sparsity=0.5) > gptq(bits=4)', output_dir='runs/mine')
    result.quality, result.size['compression'], result.compressed_params
    print(result.to_markdown())

With output_dir, the run writes there what `experiments/compress.py` writes: config.json, environment.json,
metrics.jsonl (one record per stage), compressed.jxc (core.serialize), orbax/ (the same tree with orbax), hf/ (the
dense equivalent as a Hugging Face checkpoint), report.md, results.json and stages.png. The run owns the directory
(`run_dir`): it writes into output_dir.partial/ and swaps it in once every file is written, so a directory never
mixes two runs and a failed run leaves the one before it as it was; another run's directory is replaced only with
overwrite=True, a rerun of the same configuration replaces its own result.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

from jaxcompress.recipes import exports as export_lib
from jaxcompress.recipes import preflight
from jaxcompress.recipes import report as report_lib
from jaxcompress.recipes import run_dir
from jaxcompress.recipes import setup as setup_lib
from jaxcompress.recipes.report import CompressionResult


def compress(model: str | setup_lib.Setup, recipe: str | Sequence, *, calib_data: str = 'default',
             eval_data: str = 'default', calib_samples: int = 512, eval_samples: int = 256, seq_len: int = 64,
             batch_size: int = 32, seed: int = 0, output_dir: str | pathlib.Path | None = None, save: bool = True,
             measure: bool = True, per_stage_eval: bool = True, timing_reps: int = 5, out_of_core: bool = False,
             mesh=None, verbose: bool = False, settings: Mapping[str, Any] | None = None,
             overwrite: bool = False, export: str | Sequence[str] | None = None) -> CompressionResult:
  """Parse, load, calibrate, apply the recipe, evaluate, measure, save and report.

  model: 'minilm', 'fixture', 'tiny', a checkpoint directory, or a `setup.Setup` already loaded (its data
    settings then come from it). recipe: stages joined by '>' (`recipes.parse`), a JSON file of them, or parsed
    stages. calib_data / eval_data / calib_samples / eval_samples / seq_len: see `setup.load`. batch_size:
    sequences per calibration, evaluation and training batch. seed: every random choice derives from it.
  output_dir: where the run writes its files (None: none; training stages and out-of-core blocks then use a
    temporary directory): new, empty, or holding a run of the same configuration (config.json equal), which is
    replaced once this run has finished; another run's directory is refused before any work unless overwrite.
    Written as output_dir.partial/ and swapped in at the end; after a failure of an out-of-core run the partial
    directory stays and the same call resumes its blocks. save: also write compressed.jxc, orbax/ and hf/.
    measure: speed, fine-tuning cost and energy (else size and quality only). per_stage_eval: quality after every
    stage (else after the last). timing_reps: interleaved repetitions of the speed measurements. out_of_core: run
    every stage block by block from the checkpoint on disk into output_dir/blocks/ (`layerwise_plan` says which
    stages can). mesh: a jax Mesh splitting calibration rows over 'data'. verbose: print the stage lines and the
    report. settings: further settings recorded in config.json (e.g. a command line's mesh flags). overwrite:
    replace a directory holding another run (or an unfinished out-of-core run of another configuration) as a
    whole. export: the formats `save` writes ('jxc,compressed-tensors,gptq,dense' or a list; `recipes.exports`);
    None: jxc, dense and each packed format that holds every compressed leaf.
  Returns the typed result; every figure of results.json and report.md comes from it.
  """
  from jaxcompress import recipes
  parsed = not isinstance(recipe, str) and all(isinstance(s, recipes.Stage) for s in recipe)
  stages = list(recipe) if parsed else recipes.parse(recipe if isinstance(recipe, str) else list(recipe))  # checked
  preflight.check(model, stages, calib_data=calib_data, eval_data=eval_data, out_of_core=out_of_core, seed=seed)
  name = model.name if isinstance(model, setup_lib.Setup) else str(model)
  cfg = {'model': name, 'recipe': recipe if isinstance(recipe, str) else recipes.to_string(stages),
         'calib_data': calib_data, 'eval_data': eval_data, 'calib_samples': calib_samples,
         'eval_samples': eval_samples, 'seq_len': seq_len, 'batch_size': batch_size, 'seed': seed,
         'output_dir': None if output_dir is None else str(output_dir), 'per_stage_eval': per_stage_eval,
         'timing_reps': timing_reps, 'measure': measure, 'out_of_core': out_of_core, 'save': save,
         **(settings or {})}
  formats = export_lib.parse(export)  # unknown names refused before any work
  if formats is not None:
    cfg['export'] = list(formats)
  if output_dir is None:
    with tempfile.TemporaryDirectory(prefix='jaxcompress-') as tmp:
      return _run(cfg, stages, model, pathlib.Path(tmp), write=False, save=False, mesh=mesh, verbose=verbose)
  staging = run_dir.claim(output_dir, cfg, overwrite=overwrite)  # refused before any work
  try:
    result = _run(cfg, stages, model, staging, write=True, save=save, mesh=mesh, verbose=verbose,
                  final=pathlib.Path(output_dir))
  except BaseException as e:
    if run_dir.abandon(staging):
      e.add_note(f"The unfinished run stays in '{staging}' (its out-of-core blocks); the same call resumes it.")
    raise
  run_dir.publish(staging, output_dir)
  return result


def run(config: Mapping[str, Any], *, setup: setup_lib.Setup | None = None, mesh=None, save: bool = True,
        verbose: bool = True, overwrite: bool = False) -> dict:
  """`compress` driven by a settings dict with config.json's keys ('model', 'recipe', 'output_dir', the data and
  measurement settings; missing ones take `compress`'s defaults, others are recorded): results.json's dict.
  Replays a run: `run(json.loads(pathlib.Path('runs/x/config.json').read_text()))`."""
  import inspect
  own = {'model', 'recipe', 'settings', 'save', 'mesh', 'verbose', 'overwrite'}
  names = set(inspect.signature(compress).parameters) - own
  kwargs = {k: v for k, v in config.items() if k in names}
  settings = {k: v for k, v in config.items() if k not in names and k not in own}
  result = compress(config['model'] if setup is None else setup, config['recipe'], **kwargs, save=save, mesh=mesh,
                    verbose=verbose, settings=settings, overwrite=overwrite)
  return result.to_json()


def _run(cfg: dict, stages: list, model, out: pathlib.Path, *, write: bool, save: bool, mesh, verbose: bool,
         final: pathlib.Path | None = None) -> CompressionResult:
  """The run, writing into `out` (the staging directory of `final`, the output directory it becomes)."""
  import jax

  from jaxcompress import provenance, recipes, registry
  t_load = time.perf_counter()
  setup = model if isinstance(model, setup_lib.Setup) else setup_lib.load(
      cfg['model'], calib_data=cfg['calib_data'], eval_data=cfg['eval_data'], calib_samples=cfg['calib_samples'],
      eval_samples=cfg['eval_samples'], seq_len=cfg['seq_len'], batch_size=cfg['batch_size'], seed=cfg['seed'])
  if cfg['out_of_core']:  # refused before any evaluation when a stage cannot run block by block
    layerwise_plan(stages, registry.Context(reference_model=setup.model, reference=setup.params,
                                            calib=tuple(setup.calib), train=setup.train, seed=cfg['seed']),
                   setup.model)
  preflight.check_weights(setup.params, name=cfg['model'])  # NaN / inf: refused before the dense evaluation
  say = print if verbose else (lambda *a, **k: None)
  say(f"{cfg['model']}: {type(setup.model).__name__}, recipe {recipes.to_string(stages)} "
      f'(loaded in {time.perf_counter() - t_load:.1f}s)')
  if write:  # the inputs are checked: config.json goes in with the run's first files
    run_dir.open_staging(out, cfg)
  bs, seq_len = cfg['batch_size'], cfg['seq_len']
  q_dense = report_lib.quality(setup, setup.model, setup.params, None, bs)
  reference = q_dense.pop('embeddings', None)
  if reference is not None:
    q_dense.update(cosine_mean=1.0, cosine_min=1.0)
  ctx = registry.Context(reference_model=setup.model, reference=setup.params, calib=tuple(setup.calib),
                         train=setup.train, seed=cfg['seed'], run_dir=str(out), mesh=mesh)
  records = []
  compress_s = 0.0

  def on_stage(i, stage, model, params, seconds):
    nonlocal compress_s
    compress_s += seconds
    rec = {'stage': str(stage), 'index': i, 'seconds': seconds,
           **report_lib.size(model, params, setup.params, seq_len)}
    if cfg['per_stage_eval'] or i == len(stages) - 1:
      qs = report_lib.quality(setup, model, params, reference, bs)
      qs.pop('embeddings', None)
      rec.update(qs)
    records.append(rec)
    say(f"  stage {i + 1} {stage}: {seconds:.1f}s, {rec['compression']:.2f}× smaller"
        + ''.join(f', {k} {rec[k]:.4f}' for k in ('cosine_mean', 'perplexity') if k in rec))

  if cfg['out_of_core']:
    t0 = time.perf_counter()
    model, params = out_of_core(stages, ctx, setup, out, source=cfg['model'], seed=cfg['seed'], verbose=verbose)
    on_stage(len(stages) - 1, recipes.to_string(stages) + ' [out of core]', model, params, time.perf_counter() - t0)
  else:
    model, params = recipes.run(stages, ctx, setup.model, setup.params, on_stage=on_stage)
  measured = (report_lib.measure(setup, (setup.model, setup.params), model, params, reps=cfg['timing_reps'],
                                 seq_len=seq_len) if cfg['measure'] else None)
  result = CompressionResult(
      model=cfg['model'], recipe=recipes.to_string(stages), quality_dense=q_dense,
      quality={k: v for k, v in records[-1].items() if k in report_lib.QUALITY_KEYS},
      size=report_lib.size(model, params, setup.params, seq_len), compress_s=compress_s, stages=tuple(records),
      params_hash=report_lib.params_hash(params), leaf_kinds=report_lib.leaf_kinds(params), measure=measured,
      compressed_model=model, compressed_params=params, output_dir=str(final or out) if write else None)
  text = result.to_markdown()
  if write:
    provenance.atomic_write(out / 'metrics.jsonl', ''.join(json.dumps(provenance.to_jsonable(r)) + '\n'
                                                          for r in records))
    if save and jax.process_index() == 0:  # every process holds the same compressed model; one writes it
      parts = None
      if cfg['out_of_core']:  # every format streams from the block files, one block in memory
        from jaxcompress import calibration
        parts = calibration.compressed_parts(out / 'blocks')
      written = export_lib.write(out, model, params, cfg.get('export'),
                                 metadata={'recipe': result.recipe, 'model': cfg['model']}, parts=parts)
      if 'jxc' in written and jax.process_count() == 1:  # orbax would coordinate a save across processes
        _save_orbax(out / 'orbax', params)
      result = dataclasses.replace(result, exports=written)
      text = result.to_markdown()
    provenance.atomic_write(out / 'report.md', text)
    result.plot(out / 'stages.png')
    provenance.write_json(out / 'results.json', result.to_json())
  say('\n' + text)
  if write:
    say(f'files: {final or out}/ (report.md, stages.png, metrics.jsonl, results.json'
        + ''.join(f", {e['path']}" + ('/' if fmt != 'jxc' else '') for fmt, e in result.exports.items()) + ')')
  return result


def layerwise_plan(stages, ctx, model):
  """[(stage, calibration.SequentialPlan)] of a recipe whose every stage compresses block by block, or a
  ValueError naming the first stage that cannot (trains, changes the architecture, needs statistics of the
  whole compressed model, is not calibrated, or needs a first pass over the whole model (distribution=owl) after
  another stage). Which methods may run comes from their registration (`preflight.out_of_core_refusal`) and
  from recording the stage (`calibration.record_sequential`)."""
  from jaxcompress import calibration
  plans = []
  for i, s in enumerate(stages):
    why = preflight.out_of_core_refusal(s.method)
    if why is None:
      try:
        rec = preflight.record(s.method, s.config, model, ctx)
      except calibration.NotSequential:
        why = 'needs statistics of the whole uncompressed model (calibrate, not run_sequential)'
      else:
        why = None if len(rec) == 1 else 'does not compress block by block with run_sequential'
        if why is None and i > 0 and rec[0].dense is not None:
          why = ('needs a first pass over the whole model as the stages before it leave it (e.g. '
                 'distribution=owl); out of core such a stage must come first')
    if why:
      raise ValueError(f'--out_of_core: stage {i + 1} {s} {why}; {preflight.out_of_core_methods(model)}. Run '
                       'this recipe without --out_of_core, or split it: the layer-wise stages out of core, the '
                       'rest on the result.')
    plans.append((s, rec[0]))
  return plans


def out_of_core(stages, ctx, setup: setup_lib.Setup, out: pathlib.Path, *, source: str, seed: int,
                verbose: bool = False):
  """The recipe through `calibration.compress_checkpoint` into out/blocks/ and back: (model, params).

  source: the model's checkpoint directory (a named model is first written to out/input_hf). Per block, the
  stages run in recipe order, each calibrated on the hidden states it would see in memory (the blocks before it
  with this stage and the earlier ones applied, or only the earlier ones for a stage that calibrates on the model
  as given): the result equals the in-memory recipe's.
  """
  from jaxcompress import calibration, models, recipes
  src = pathlib.Path(source)
  if not (src / 'config.json').is_file():  # a named model: written once as the checkpoint to stream from
    src = out / 'input_hf'
    models.save_pretrained(src, setup.model, setup.params)

  plans = [p for _, p in layerwise_plan(stages, ctx, setup.model)]

  def on_block(i, record):
    if verbose:
      print(f"  block {i}: {record['seconds']:.1f}s, {record['bytes'] / 2**20:.2f} MiB", flush=True)

  calibration.compress_checkpoint(src, out / 'blocks', plans, list(ctx.calib),
                                  recipe={'recipe': recipes.to_string(stages)}, seed=seed, on_block=on_block)
  return setup.model, calibration.load_compressed(out / 'blocks')


def _save_orbax(path: pathlib.Path, params) -> None:
  import orbax.checkpoint as ocp
  shutil.rmtree(path, ignore_errors=True)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path.absolute(), params)
