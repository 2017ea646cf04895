"""Pretrains the causal-LM fixture: a few-million-parameter Llama on the fortunes corpus.

    python experiments/pretrain.py                                  # default fixture, runs/pretrain
    python experiments/pretrain.py --steps=50 --run_dir=/tmp/x      # quick look
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/pretrain.py --fsdp=4 --data=2

Everything random derives from --seed: the document split, the BPE tokenizer's data, the initialisation
('init' stream), the batch order and the training key. Re-running with the same flags gives the same bits.
Resumes from run_dir/checkpoints when interrupted (SIGTERM saves first). Writes into run_dir: config.json,
environment.json, metrics.jsonl, tb/, checkpoints/, loss.png, results.json (held-out perplexity against the
unigram baseline) and hf/ (a transformers-loadable checkpoint with its tokenizer, the fixture families compress).

Multi-host: give --coordinator, --num_processes and --process_id (with --cpu_collectives=gloo for CPU
processes), or set nothing on TPU pods and SLURM, where the platform provides them.
"""

from __future__ import annotations

from absl import app, flags, logging

flags.DEFINE_string('run_dir', 'runs/pretrain', 'Output directory (resumed if it holds checkpoints).')
flags.DEFINE_integer('seed', 0, 'The one seed every random choice derives from.')
flags.DEFINE_integer('steps', 1200, 'Optimizer steps.')
flags.DEFINE_integer('batch_size', 16, 'Global sequences per step.')
flags.DEFINE_integer('seq_len', 128, 'Tokens per sequence.')
flags.DEFINE_integer('vocab_size', 4096, 'BPE vocabulary trained on the corpus.')
flags.DEFINE_integer('hidden_size', 256, 'Model width.')
flags.DEFINE_integer('num_layers', 4, 'Transformer blocks.')
flags.DEFINE_integer('num_heads', 4, 'Query heads.')
flags.DEFINE_integer('num_kv_heads', 2, 'Key/value heads (grouped-query attention).')
flags.DEFINE_integer('intermediate_size', 768, 'SwiGLU MLP width.')
flags.DEFINE_boolean('tie_embeddings', True, 'Share the embedding with the output head.')
flags.DEFINE_enum('optimizer', 'adamw', ['adamw', 'adam', 'sgd', 'lion', 'adafactor'], 'Optimizer.')
flags.DEFINE_float('learning_rate', 3e-3, 'Peak learning rate.')
flags.DEFINE_integer('warmup_steps', 50, 'Linear warm-up steps.')
flags.DEFINE_float('weight_decay', 0.1, 'AdamW weight decay.')
flags.DEFINE_float('grad_clip', 1.0, 'Global gradient-norm clip (0 disables).')
flags.DEFINE_integer('accum_steps', 1, 'Micro-batches per step.')
flags.DEFINE_enum('compute_dtype', 'float32', ['float32', 'bfloat16'], 'Forward/backward dtype.')
flags.DEFINE_boolean('remat', False, 'Recompute block activations in the backward pass.')
flags.DEFINE_boolean('scan_layers', False, 'Run the blocks as one lax.scan (faster compiles, less memory when sharded).')
flags.DEFINE_integer('data', -1, 'Mesh: data-parallel devices (-1 fills).')
flags.DEFINE_integer('fsdp', 1, 'Mesh: devices parameters are sharded over.')
flags.DEFINE_integer('tensor', 1, 'Mesh: tensor-parallel devices.')
flags.DEFINE_integer('log_every', 10, 'Steps between metric records.')
flags.DEFINE_integer('eval_every', 200, 'Steps between held-out evaluations (0: end only).')
flags.DEFINE_integer('checkpoint_every', 100, 'Steps between checkpoints (0: end and SIGTERM only).')
flags.DEFINE_integer('keep_checkpoints', 3, 'Newest checkpoints kept (plus the best by valid loss).')
flags.DEFINE_boolean('async_checkpoint', True, 'Write checkpoints in the background.')
flags.DEFINE_boolean('force_resume', False, 'Resume even if run_dir was written with another seed or data.')
flags.DEFINE_integer('stop_at_step', None, 'End this invocation after this step (with a checkpoint); rerun to go on.')
flags.DEFINE_boolean('export', True, 'Write run_dir/hf, a Hugging Face checkpoint with the tokenizer.')
flags.DEFINE_boolean('progress', True, 'Progress line on process 0.')
flags.DEFINE_string('cache_dir', None, 'Corpus/tokenizer cache (default $JAXCOMPRESS_CACHE or ~/.cache/jaxcompress).')
flags.DEFINE_string('coordinator', None, 'Multi-host: coordinator address host:port.')
flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-host: this process.')
flags.DEFINE_string('cpu_collectives', None, "Multi-host on CPU: 'gloo'.")
FLAGS = flags.FLAGS


def model_config():
  from jaxcompress import models
  return models.LlamaConfig(
      vocab_size=FLAGS.vocab_size, hidden_size=FLAGS.hidden_size, intermediate_size=FLAGS.intermediate_size,
      num_layers=FLAGS.num_layers, num_heads=FLAGS.num_heads, num_kv_heads=FLAGS.num_kv_heads,
      max_position_embeddings=max(2048, FLAGS.seq_len), tie_embeddings=FLAGS.tie_embeddings, rope_theta=10000.0,
      bos_token_id=None, eos_token_id=0, pad_token_id=None)


def main(argv):
  del argv
  from jaxcompress.train import sharding
  explicit = FLAGS.coordinator or FLAGS.num_processes or FLAGS.process_id is not None
  if explicit or sharding.platform_provides_processes():
    sharding.initialize_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id,
                                    FLAGS.cpu_collectives)

  import jax

  from jaxcompress import models
  from jaxcompress.data import pipeline, tokenizer
  from jaxcompress.eval.lm import unigram_perplexity
  from jaxcompress.train import evaluate, loop, metrics, objectives, optim
  from jaxcompress import provenance

  tok, train, valid = pipeline.fortunes_lm_data(seq_len=FLAGS.seq_len, batch_size=FLAGS.batch_size,
                                                vocab_size=FLAGS.vocab_size, seed=FLAGS.seed,
                                                cache_dir=FLAGS.cache_dir)
  eos = tokenizer.token_id(tok, '<|endoftext|>')
  cfg = model_config()
  cfg = type(cfg)(**{**cfg.__dict__, 'vocab_size': max(FLAGS.vocab_size, tok.get_vocab_size()), 'eos_token_id': eos})
  model = models.Llama(cfg)
  params = jax.jit(model.init)(loop.rng_stream(FLAGS.seed, 'init'))
  logging.info('model: %s parameters; data: %d train rows, %d valid rows, %s tokens/step',
               f'{model.summary(params).total.params:,}', train.num_sequences, len(valid), train.tokens_per_batch)

  opt_cfg = optim.OptimizerConfig(name=FLAGS.optimizer, learning_rate=FLAGS.learning_rate,
                                  warmup_steps=FLAGS.warmup_steps, total_steps=FLAGS.steps,
                                  weight_decay=FLAGS.weight_decay, grad_clip=FLAGS.grad_clip or None)
  loop_cfg = loop.LoopConfig(
      steps=FLAGS.steps, batch_size=FLAGS.batch_size, run_dir=FLAGS.run_dir, seed=FLAGS.seed,
      accum_steps=FLAGS.accum_steps, compute_dtype=FLAGS.compute_dtype,
      mesh=(FLAGS.data, FLAGS.fsdp, FLAGS.tensor), log_every=FLAGS.log_every, eval_every=FLAGS.eval_every,
      checkpoint_every=FLAGS.checkpoint_every, keep_checkpoints=FLAGS.keep_checkpoints,
      best_metric='valid/loss' if len(valid) else None, async_checkpoint=FLAGS.async_checkpoint,
      progress=FLAGS.progress, stop_at_step=FLAGS.stop_at_step, force_resume=FLAGS.force_resume)
  mesh = sharding.make_mesh(FLAGS.data, FLAGS.fsdp, FLAGS.tensor)
  eval_fn = None
  if len(valid):
    eval_fn = evaluate.make_lm_eval(model, valid, batch_size=FLAGS.batch_size, mesh=mesh,
                                    compute_dtype=FLAGS.compute_dtype)
  result = loop.fit(loop_cfg, model=model, params=params, objective=objectives.causal_lm(model, remat=FLAGS.remat, scan=FLAGS.scan_layers),
                    optimizer=optim.make_optimizer(opt_cfg), data=train, eval_fn=eval_fn, mesh=mesh,
                    config_record={'flags': FLAGS.flag_values_dict(), 'model': cfg, 'optimizer': opt_cfg})
  if result.status != 'completed':
    return
  # Every process takes part in the collectives below; process 0 writes the files.
  run_dir = result.run_dir
  results = {'steps': int(result.state.step), 'status': result.status,
             'parameters': model.summary(params).total.params, 'param_hash': _hash(result.state.params)}
  if len(valid):  # fit evaluated the final parameters already: its last record holds the numbers
    valid_eval = next(h for h in reversed(result.history) if 'valid/loss' in h)
    unigram = unigram_perplexity(train.sequences[:, 1:].ravel(), valid[:, 1:].ravel(), cfg.vocab_size)
    results.update({'valid_perplexity': valid_eval['valid/perplexity'], 'valid_tokens': valid_eval['valid/tokens'],
                    'unigram_perplexity': unigram.perplexity})
  final = _gather(result.state.params) if FLAGS.export else None
  if jax.process_index() != 0:
    return
  if len(valid):
    print(f'held-out perplexity {results["valid_perplexity"]:.2f} vs unigram baseline '
          f'{results["unigram_perplexity"]:.2f} ({int(results["valid_tokens"]):,} tokens)')
  provenance.write_json(run_dir / 'results.json', results)
  metrics.plot_metrics(run_dir / 'metrics.jsonl', run_dir / 'loss.png',
                       keys=['train/loss'] + (['valid/loss'] if len(valid) else []), log_y=True)
  if final is not None:
    models.save_pretrained(run_dir / 'hf', model, final)
    tokenizer.save_tokenizer(tok, run_dir / 'hf', eos_token='<|endoftext|>', model_max_length=FLAGS.seq_len)
  print(f'results: {run_dir / "results.json"}')


def _gather(params):
  """Host copies of (possibly multi-host sharded) params."""
  import jax
  from jax.experimental import multihost_utils
  if jax.process_count() == 1:
    return jax.device_get(params)
  return multihost_utils.process_allgather(params, tiled=True)


def _hash(params) -> str:
  from jaxcompress.train import state
  return state.param_hash(params)


def console():
  """The `jaxcompress-pretrain` command."""
  app.run(main)


if __name__ == '__main__':
  console()
