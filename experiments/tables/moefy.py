"""MoEfication of the causal-LM fixture run as a real mixture of experts: perplexity against the fraction of FFN
neurons active per token, and the measured FFN and whole-forward speed-ups of running only the selected experts.

    python experiments/tables/moefy.py                 # fixture, 8 experts per FFN, top 8, 6, 4, 2 (100/75/50/25%)
    python experiments/tables/moefy.py --small         # a tiny random model, seconds

Every block's SwiGLU MLP is split into --experts balanced clusters of neurons and the model runs as
`LlamaConfig(moe_experts=E, moe_top_k=k, moe_capacity=c)` (`architecture.moefy_model`, `models.moe`): each
token is routed (by the clusters' mean gate column) to its top k experts and each expert computes only the
C = ceil(c N k / E) tokens it takes, so the FFN FLOPs are c k / E of the dense ones. No training. Perplexity
columns: the model as it runs (tokens an expert has no room for lose it, the dropped share is reported) and
the exact top-k mixture (no capacity limit, dense FLOPs: what routing alone costs).

Speed: the MLP of block 0 on the fixture's batch of tokens (--speed_batch rows of the held-out length), dense
module against the mixture module, and the whole forward pass of the dense model against the mixture model;
jitted, called interleaved (the host is shared with other work, so only ratios from one run are meaningful),
medians.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

from experiments.tables import common

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxcompress import architecture, provenance
from jaxcompress.recipes import lm_runs

common.define_flags('moefy')
flags.DEFINE_integer('experts', 8, 'Experts per FFN.')
flags.DEFINE_list('top_k', ['8', '6', '4', '2'], 'Experts run per token.')
flags.DEFINE_integer('eval_rows', 32, 'Held-out rows scored.')
flags.DEFINE_integer('speed_batch', 8, 'Rows of the timed forward passes.')
flags.DEFINE_integer('repeats', 15, 'Timed calls of each candidate.')
flags.DEFINE_float('capacity', 1.0, 'Capacity factor of the mixture (1.0: exactly top_k / E of the FFN FLOPs).')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  out = pathlib.Path(FLAGS.output_dir)
  if FLAGS.small:
    model, params, _, valid = lm_runs.small_setup(FLAGS.seed)
  else:
    model, params, _, valid = lm_runs.fixture_setup(FLAGS.model, 16)
  valid = valid[:FLAGS.eval_rows]
  experts = 4 if FLAGS.small else FLAGS.experts
  tops = [int(k) for k in FLAGS.top_k if int(k) <= experts] if not FLAGS.small else [4, 2]
  t0 = time.perf_counter()
  spec, moe = architecture.moefy_model(model, params, num_experts=experts, top_k=experts,
                                       key=jax.random.key(FLAGS.seed), capacity=FLAGS.capacity)
  cluster_s = time.perf_counter() - t0
  at = lambda k, c=FLAGS.capacity: type(spec)(dataclasses.replace(spec.config, moe_top_k=k, moe_capacity=c))
  dense = lm_runs.heldout_nll(model, params, valid)
  rows = [{'top_k': None, 'active': 1.0, 'perplexity': float(np.exp(dense))}]
  print(f'dense                    ppl {np.exp(dense):9.2f}', flush=True)
  x_in = jnp.asarray(valid[:, :-1])
  for k in tops:
    # Exact top-k: a capacity of E / k lets every expert take every token that picked it.
    exact = float(np.exp(lm_runs.heldout_nll(at(k, experts / k), moe, valid)))
    nll = float(np.exp(lm_runs.heldout_nll(at(k), moe, valid)))
    rows.append({'top_k': k, 'active': k / experts, 'perplexity': nll, 'perplexity_exact_topk': exact,
                 'flops_fraction': min(1.0, FLAGS.capacity * k / experts)})
    print(f'top {k} of {experts} experts  ppl {nll:9.2f} (exact top-k {exact:9.2f})', flush=True)

  # Dropped selections of each top-k on the timed batch, from the block-0 MLP input.
  tokens = x_in[:FLAGS.speed_batch]
  _, inter = model.apply(params, tokens, intermediates=('hidden_states',))
  blk0 = model.bind_block(model.block_params(params, 0))
  h = inter['hidden_states'][0]
  h = h + blk0.attn(blk0.attn_norm(h), model.context(tokens))[0]
  mlp_in = blk0.mlp_norm(h)
  fns = {'dense_ffn': jax.jit(lambda x: blk0.mlp(x)).lower(mlp_in).compile(),
         'dense_model': jax.jit(lambda t: model.apply(params, t)).lower(tokens).compile()}
  for r in rows[1:]:
    m = at(r['top_k'])
    mblk = m.bind_block(moe['layers'][0])
    fns[f"ffn_{r['top_k']}"] = jax.jit(lambda x, b=mblk: b.mlp(x)).lower(mlp_in).compile()
    fns[f"model_{r['top_k']}"] = jax.jit(lambda t, m=m: m.apply(moe, t)).lower(tokens).compile()
    w = mblk.mlp.weights()
    _, dropped = architecture.moe_mlp_dispatch(mlp_in.reshape(-1, mlp_in.shape[-1]), w, r['top_k'],
                                               model.config.hidden_act, FLAGS.capacity)
    r['dropped'] = float(dropped)
  args = {k: (mlp_in if k.endswith('ffn') or k.startswith('ffn') else tokens) for k in fns}
  med = common.interleaved({k: (lambda f=f, a=args[k]: f(a)) for k, f in fns.items()},
                           3 if FLAGS.small else FLAGS.repeats)
  for r in rows[1:]:
    r.update(ffn_speedup=med['dense_ffn'] / med[f"ffn_{r['top_k']}"],
             model_speedup=med['dense_model'] / med[f"model_{r['top_k']}"])
  table = ('| experts run | FFN neurons active | perplexity (as run) | exact top-k perplexity | FFN FLOPs | '
           'FFN speed-up | forward speed-up | selections dropped |\n|---|---|---|---|---|---|---|---|\n'
           f"| dense | 100% | {rows[0]['perplexity']:.2f} | | 1.00 | 1.00x | 1.00x | |\n" +
           ''.join(f"| top {r['top_k']} of {experts} | {100 * r['active']:.1f}% | {r['perplexity']:.2f} | "
                   f"{r['perplexity_exact_topk']:.2f} | {r['flops_fraction']:.2f} | {r['ffn_speedup']:.2f}x | "
                   f"{r['model_speedup']:.2f}x | {100 * r['dropped']:.1f}% |\n" for r in rows[1:]))
  provenance.write_run_dir(out, config={'flags': {n: FLAGS[n].value for n in (
      'model', 'seed', 'experts', 'top_k', 'eval_rows', 'speed_batch', 'repeats', 'capacity', 'small')},
      'cluster_s': cluster_s}, results={'rows': rows, 'median_s': med, 'device': str(jax.devices()[0])})
  (out / 'table.md').write_text(table)
  print(f'\n{experts} experts per FFN (balanced k-means, {cluster_s:.0f} s for all layers), capacity factor '
        f'{FLAGS.capacity:g}, no training; {len(valid)} held-out rows; timing on {tokens.shape[0]} x '
        f'{tokens.shape[1]} tokens, interleaved medians of {FLAGS.repeats} calls on a shared host '
        f'({jax.devices()[0].platform})\n')
  print(table)


if __name__ == '__main__':
  app.run(main)
