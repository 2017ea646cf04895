"""MoEfication of the causal-LM fixture: perplexity against the fraction of FFN neurons active per token, and
the measured FFN speed-up of running only the selected experts.

    python experiments/moefy.py                        # fixture, 8 experts per FFN, top-k in 8, 4, 2, 1
    python experiments/moefy.py --small                # a tiny random model, seconds

Every block's SwiGLU MLP is split into --experts balanced clusters of neurons (`architecture.moefy`), routed
by the clusters' mean gate column; no training. Perplexity uses the exact top-k MLP (`moe_mlp`). Speed: one
FFN on --speed_tokens tokens, dense (three matmuls) against `moe_mlp_dispatch` (only the selected experts'
FLOPs, capacity factor --capacity), jitted and timed interleaved on a shared host.

The blocks are composed here from the model's own pieces (norms and attention of `model.bind_block`), with the
MoE MLP in place of the dense one; the models package itself has no MoE block.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault('HF_HUB_OFFLINE', '1')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pathlib
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxcompress import architecture, provenance
from jaxcompress.eval import token_nll

from experiments import distill_common as common

flags.DEFINE_string('model', 'fixture', "'fixture' or a Hugging Face Llama checkpoint directory.")
flags.DEFINE_string('output_dir', 'runs/moefy', 'Where results.json and table.md go.')
flags.DEFINE_integer('seed', 0, 'Seed of the k-means initializations.')
flags.DEFINE_integer('experts', 8, 'Experts per FFN.')
flags.DEFINE_list('top_k', ['8', '4', '2', '1'], 'Experts run per token.')
flags.DEFINE_integer('eval_rows', 32, 'Held-out rows scored.')
flags.DEFINE_integer('speed_tokens', 1024, 'Tokens of the FFN timing.')
flags.DEFINE_float('capacity', 1.25, 'Capacity factor of the dispatched MoE.')
flags.DEFINE_boolean('small', False, 'Tiny random model, a smoke test.')
FLAGS = flags.FLAGS


def moe_logits(model, params, moes, tokens, top_k):
  """Logits [B, T, V] with every block's MLP replaced by its top_k MoE."""
  ctx = model.context(tokens)
  h = model.embed(params, tokens)
  act = model.config.hidden_act
  for i, moe in enumerate(moes):
    blk = model.bind_block(model.block_params(params, i))
    h = h + blk.attn(blk.attn_norm(h), ctx)[0]
    h = h + architecture.moe_mlp(blk.mlp_norm(h), moe, top_k, act).astype(h.dtype)
  return model.head(params, h)


def main(argv):
  del argv
  out = pathlib.Path(FLAGS.output_dir)
  if FLAGS.small:
    model, params, _, valid = common.small_setup(FLAGS.seed)
  else:
    model, params, _, valid = common.fixture_setup(FLAGS.model, 16)
  valid = valid[:FLAGS.eval_rows]
  keys = jax.random.split(jax.random.key(FLAGS.seed), model.num_layers(params))
  experts = 4 if FLAGS.small else FLAGS.experts
  t0 = time.perf_counter()
  moes = [architecture.moefy(model.block_params(params, i)['mlp'], experts, keys[i])
          for i in range(model.num_layers(params))]
  cluster_s = time.perf_counter() - t0
  x_in, y = valid[:, :-1], valid[:, 1:]
  dense = common.heldout_nll(model, params, valid)
  rows = [{'top_k': None, 'active': 1.0, 'perplexity': float(np.exp(dense))}]
  print(f'dense                    ppl {np.exp(dense):9.2f}', flush=True)
  fn = jax.jit(lambda p, m, x, k: token_nll(moe_logits(model, p, m, x, k).astype(jnp.float32), y[:x.shape[0]]),
               static_argnums=3)
  for k in [int(k) for k in FLAGS.top_k if int(k) <= experts]:
    nll = float(np.mean(np.asarray(fn(params, moes, x_in, k))))
    rows.append({'top_k': k, 'active': k / experts, 'perplexity': float(np.exp(nll))})
    print(f'top {k} of {experts} experts  ppl {np.exp(nll):9.2f}', flush=True)

  # FFN speed: dense three-matmul SwiGLU against the dispatched MoE, on one block's weights.
  mlp = model.block_params(params, 0)['mlp']
  g, u, dn = (mlp[n]['kernel'] for n in ('gate_proj', 'up_proj', 'down_proj'))
  x = jax.random.normal(jax.random.key(1), (64 if FLAGS.small else FLAGS.speed_tokens, g.shape[0]), jnp.float32)
  dense_fn = jax.jit(lambda x: (jax.nn.silu(x @ g) * (x @ u)) @ dn)
  for r in rows[1:]:
    moe_fn = jax.jit(lambda x, k=r['top_k']: architecture.moe_mlp_dispatch(x, moes[0], k, 'silu', FLAGS.capacity))
    jax.block_until_ready(dense_fn(x))
    _, dropped = jax.block_until_ready(moe_fn(x))
    td, tm = [], []
    for _ in range(3 if FLAGS.small else 20):
      t0 = time.perf_counter(); jax.block_until_ready(dense_fn(x)); td.append(time.perf_counter() - t0)
      t0 = time.perf_counter(); jax.block_until_ready(moe_fn(x)); tm.append(time.perf_counter() - t0)
    r.update(ffn_speedup=statistics.median(td) / statistics.median(tm), dropped=float(dropped),
             flops_fraction=min(1.0, FLAGS.capacity * r['top_k'] / experts))
  table = ('| experts run | FFN neurons active | held-out perplexity | FFN FLOPs (dispatched) | FFN speed-up '
           '(measured) | selections dropped |\n|---|---|---|---|---|---|\n'
           f"| dense | 100% | {rows[0]['perplexity']:.2f} | 1.00 | 1.00x | |\n" +
           ''.join(f"| top {r['top_k']} of {experts} | {100 * r['active']:.1f}% | {r['perplexity']:.2f} | "
                   f"{r['flops_fraction']:.2f} | {r['ffn_speedup']:.2f}x | {100 * r['dropped']:.1f}% |\n"
                   for r in rows[1:]))
  provenance.write_run_dir(out, config={'flags': {n: FLAGS[n].value for n in (
      'model', 'seed', 'experts', 'top_k', 'eval_rows', 'speed_tokens', 'capacity', 'small')},
      'cluster_s': cluster_s}, results={'rows': rows})
  (out / 'table.md').write_text(table)
  print(f'\n{experts} experts per FFN (balanced k-means, {cluster_s:.0f} s for all layers), no training; '
        f'{len(valid)} held-out rows; FFN timing on {x.shape[0]} tokens, interleaved medians, shared host\n')
  print(table)


if __name__ == '__main__':
  app.run(main)
