"""GPT-2: learned positions, pre-LayerNorm blocks, GELU (tanh) MLP, head tied to the token embedding (or not).

HF fuses q, k, v into one `c_attn` tensor; here they are three kernels so per-head methods see them apart.

    params: embed/tokens/embedding [vocab, d], embed/positions/embedding [n_positions, d]
            layers/{i}/attn_norm/{scale,bias}, layers/{i}/attn/{q,k,v,o}_proj/{kernel,bias}
            layers/{i}/mlp_norm/{scale,bias}, layers/{i}/mlp/{up,down}_proj/{kernel,bias}
            final_norm/{scale,bias}
            lm_head/kernel [d, vocab]   (only when the head is not tied to the token embedding)
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from flax import nnx

from jaxcompress.models import base, convert, decode, layers


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPT2Config:
  vocab_size: int = 50257
  n_positions: int = 1024
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int | None = None  # None: 4 * hidden_size
  activation: str = 'gelu_new'
  layer_norm_eps: float = 1e-5
  scale_attn_weights: bool = True  # False: attention logits are not divided by sqrt(head_dim)
  tie_embeddings: bool = True  # the output head is the token embedding (HF tie_word_embeddings)
  initializer_range: float = 0.02
  bos_token_id: int | None = 50256
  eos_token_id: int | None = 50256
  pad_token_id: int | None = None
  kv_cache: decode.KVCacheFormat | None = None  # the KV cache `generate` uses by default (None: full precision)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def inner(self) -> int:
    return self.intermediate_size or 4 * self.hidden_size


class Attention(nnx.Module):

  def __init__(self, cfg: GPT2Config, dtype, rngs: nnx.Rngs):
    d, std = cfg.hidden_size, cfg.initializer_range
    self.q_proj = layers.Linear(d, d, bias=True, std=std, dtype=dtype, rngs=rngs)
    self.k_proj = layers.Linear(d, d, bias=True, std=std, dtype=dtype, rngs=rngs)
    self.v_proj = layers.Linear(d, d, bias=True, std=std, dtype=dtype, rngs=rngs)
    self.o_proj = layers.Linear(d, d, bias=True, std=std, dtype=dtype, rngs=rngs)
    self.cfg = cfg

  def __call__(self, x, ctx: layers.Context, cache=None, *, return_probs: bool = False):
    hd = self.cfg.head_dim
    b, t, _ = x.shape
    q, k, v = (p(x).reshape(b, t, -1, hd) for p in (self.q_proj, self.k_proj, self.v_proj))
    scale = hd ** -0.5 if self.cfg.scale_attn_weights else 1.0
    out, *rest = layers.cached_attention(q, k, v, ctx, cache, scale, return_probs=return_probs)
    return (self.o_proj(out), *rest)


def block(cfg: GPT2Config, dtype, rngs: nnx.Rngs) -> layers.PreNormBlock:
  norm = lambda: layers.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
  return layers.PreNormBlock(norm(), Attention(cfg, dtype, rngs), norm(),
                             layers.MLP(cfg.hidden_size, cfg.inner, cfg.activation, std=cfg.initializer_range,
                                        dtype=dtype, rngs=rngs), cfg.head_dim)


class Embedder(nnx.Module):

  def __init__(self, cfg: GPT2Config, dtype, rngs: nnx.Rngs):
    std = cfg.initializer_range
    self.tokens = layers.Embed(cfg.vocab_size, cfg.hidden_size, std=std, dtype=dtype, rngs=rngs)
    self.positions = layers.Embed(cfg.n_positions, cfg.hidden_size, std=std, dtype=dtype, rngs=rngs)
    self.sizes = (cfg.vocab_size, cfg.n_positions)

  def __call__(self, tokens, positions, token_types=None):
    del token_types
    h = self.tokens(base.fill_invalid(tokens, self.sizes[0]))
    return h + self.positions(base.fill_invalid(positions, self.sizes[1]), h.dtype)


class GPT2LM(nnx.Module):

  def __init__(self, cfg: GPT2Config, dtype, rngs: nnx.Rngs):
    self.embed = Embedder(cfg, dtype, rngs)
    self.layers = nnx.List([block(cfg, dtype, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = layers.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
    self.lm_head = None if cfg.tie_embeddings else layers.Linear(
        cfg.hidden_size, cfg.vocab_size, bias=False, std=cfg.initializer_range, dtype=dtype, rngs=rngs)

  def head(self, h):
    h = self.final_norm(h)
    return self.embed.tokens.attend(h) if self.lm_head is None else self.lm_head(h)


@dataclasses.dataclass(frozen=True)
class GPT2(base.Model):
  """Spec of a GPT-2 causal LM."""

  config: GPT2Config

  family: ClassVar[str] = 'gpt2'
  causal: ClassVar[bool] = True
  hf_model_types: ClassVar[tuple[str, ...]] = ('gpt2',)
  hf_prefixes: ClassVar[tuple[str, ...]] = ('transformer.', '')
  hf_ignore: ClassVar[tuple[str, ...]] = (r'\.attn\.bias$', r'\.attn\.masked_bias$')  # causal-mask buffers
  linear_groups: ClassVar[tuple[base.LinearGroup, ...]] = (
      base.LinearGroup('attn_in', ('attn/q_proj/kernel', 'attn/k_proj/kernel', 'attn/v_proj/kernel'), 'attn_norm'),
      base.LinearGroup('attn_out', ('attn/o_proj/kernel',)),
      base.LinearGroup('mlp_in', ('mlp/up_proj/kernel',), 'mlp_norm'),
      base.LinearGroup('mlp_out', ('mlp/down_proj/kernel',)))
  head_patterns: ClassVar[tuple[str, ...]] = (r'^lm_head/',)  # absent when tied to the embedding

  def sharding_rules(self):
    # q/k/v and up split their outputs over 'tensor', o/down their inputs; 'fsdp' takes the other dimension.
    return ((r'(q_proj|k_proj|v_proj|up_proj)/kernel$', ('fsdp', 'tensor')),
            (r'(o_proj|down_proj)/kernel$', ('tensor', 'fsdp')),
            (r'^lm_head/kernel$', ('fsdp', 'tensor')),
            (r'/embedding$', ('tensor', 'fsdp')))

  def _module(self, rngs, dtype):
    return GPT2LM(self.config, dtype, rngs)

  def max_positions(self) -> int:
    return self.config.n_positions

  def _tied_head_flops(self, params):
    return 2 * self.config.hidden_size * self.config.vocab_size if self.config.tie_embeddings else 0

  @classmethod
  def from_hf_config(cls, hf: Any, tensor_names: frozenset[str] = frozenset()) -> GPT2:
    """Reads every GPT2Config field that changes GPT2LMHeadModel's logits; refuses the ones it cannot run.

    Read: vocab_size, n_positions, n_embd, n_layer, n_head, n_inner, activation_function, layer_norm_epsilon,
    scale_attn_weights, tie_word_embeddings. reorder_and_upcast_attn only changes the float16 rounding of the
    attention logits (the softmax here is float32 always). Dropouts and summary_* (heads of other classes) do
    not change the LM logits in eval mode.
    """
    for field in ('scale_attn_by_inverse_layer_idx', 'add_cross_attention'):
      if getattr(hf, field, False):
        raise ValueError(f'GPT-2 {field}=True is not supported (per-layer attention scaling and cross-attention '
                         'are not implemented); set it to false only if the checkpoint was trained without it.')
    if hf.activation_function not in layers.ACTIVATIONS:
      raise ValueError(f'GPT-2 activation_function={hf.activation_function!r} is not supported; supported: '
                       f'{sorted(layers.ACTIVATIONS)}.')
    if hf.n_embd % hf.n_head:
      raise ValueError(f'GPT-2 n_embd={hf.n_embd} is not a multiple of n_head={hf.n_head}.')
    return cls(GPT2Config(
        vocab_size=hf.vocab_size, n_positions=hf.n_positions, hidden_size=hf.n_embd, num_layers=hf.n_layer,
        num_heads=hf.n_head, intermediate_size=hf.n_inner, activation=hf.activation_function,
        layer_norm_eps=hf.layer_norm_epsilon, scale_attn_weights=bool(hf.scale_attn_weights),
        tie_embeddings=bool(getattr(hf, 'tie_word_embeddings', True)), initializer_range=hf.initializer_range,
        bos_token_id=hf.bos_token_id, eos_token_id=hf.eos_token_id, pad_token_id=hf.pad_token_id,
        kv_cache=decode.hf_kv_cache(hf)))

  def hf_config(self):
    import transformers
    c = self.config
    return transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.n_positions, n_embd=c.hidden_size, n_layer=c.num_layers,
        n_head=c.num_heads, n_inner=c.intermediate_size, activation_function=c.activation,
        layer_norm_epsilon=c.layer_norm_eps, scale_attn_weights=c.scale_attn_weights,
        tie_word_embeddings=c.tie_embeddings, initializer_range=c.initializer_range, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id, architectures=['GPT2LMHeadModel'], **decode.hf_kv_fields(c.kv_cache))

  def hf_table(self) -> list[convert.TensorMap]:
    # GPT-2's Conv1D weights are already [in, out].
    rows = [convert.same('wte.weight', 'embed/tokens/embedding'),
            convert.same('wpe.weight', 'embed/positions/embedding'),
            convert.same('ln_f.weight', 'final_norm/scale'), convert.same('ln_f.bias', 'final_norm/bias'),
            convert.split('h.{i}.attn.c_attn.weight', [f'layers/{{i}}/attn/{p}_proj/kernel' for p in 'qkv'], 1),
            convert.split('h.{i}.attn.c_attn.bias', [f'layers/{{i}}/attn/{p}_proj/bias' for p in 'qkv'], 0)]
    for hf, ours in (('ln_1', 'attn_norm'), ('ln_2', 'mlp_norm')):
      rows += [convert.same(f'h.{{i}}.{hf}.weight', f'layers/{{i}}/{ours}/scale'),
               convert.same(f'h.{{i}}.{hf}.bias', f'layers/{{i}}/{ours}/bias')]
    for hf, ours in (('attn.c_proj', 'attn/o_proj'), ('mlp.c_fc', 'mlp/up_proj'), ('mlp.c_proj', 'mlp/down_proj')):
      rows += [convert.same(f'h.{{i}}.{hf}.weight', f'layers/{{i}}/{ours}/kernel'),
               convert.same(f'h.{{i}}.{hf}.bias', f'layers/{{i}}/{ours}/bias')]
    if not self.config.tie_embeddings:
      rows.append(convert.linear_weight('lm_head.weight', 'lm_head/kernel'))
    return convert.expand(rows, self.config.num_layers)

  def hf_copies(self) -> dict[str, str]:
    """{HF tensor a checkpoint may hold as a copy: the tensor it must equal} (tied weights)."""
    return {'lm_head.weight': 'wte.weight'} if self.config.tie_embeddings else {}

  def hf_unused_heads(self) -> tuple[str, ...]:
    """Regexes of HF tensors of other task heads, which no output of this model computes."""
    return ()

  def hf_export_copies(self) -> dict[str, str]:
    """{HF tensor written as a copy of another on export}."""
    return {}
