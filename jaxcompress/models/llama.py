"""The Llama family: Llama 2/3 (with Llama 3 RoPE scaling), Mistral (sliding window), Qwen2 (qkv bias).

Pre-norm decoder: RMSNorm -> grouped-query attention with rotary positions -> RMSNorm -> SwiGLU MLP.

    params: embed/tokens/embedding                [vocab, d]
            layers/{i}/attn_norm/scale            [d]
            layers/{i}/attn/{q,k,v,o}_proj/kernel [d, heads * head_dim] ... ; bias for Qwen2's q, k, v
            layers/{i}/mlp_norm/scale             [d]
            layers/{i}/mlp/{gate,up,down}_proj/kernel
            final_norm/scale                      [d]
            lm_head/kernel                        [d, vocab]   (absent when tied to the embedding)
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from flax import nnx

from jaxcompress.core import hadamard
from jaxcompress.models import base, convert, decode, layers, moe


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32  # fewer than num_heads: grouped-query attention
  head_dim: int | None = None  # None: hidden_size // num_heads
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope: tuple = ()  # sorted (key, value) pairs of HF rope_parameters beyond theta, e.g. llama3 scaling
  max_position_embeddings: int = 4096
  tie_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2: True
  o_bias: bool = False
  mlp_bias: bool = False
  sliding_window: int | None = None  # Mistral: attend to the last `sliding_window` positions only
  hidden_act: str = 'silu'
  model_type: str = 'llama'  # 'llama' | 'mistral' | 'qwen2': the HF class written on export
  initializer_range: float = 0.02
  bos_token_id: int | None = 1
  eos_token_id: int | None = 2
  pad_token_id: int | None = None
  moe_experts: int = 0  # > 0: every MLP is a mixture of this many experts (models.moe, from MoEfication)
  moe_top_k: int = 0  # experts each token runs (with moe_experts)
  moe_capacity: float = 1.25  # tokens per expert over its even share N top_k / E (the rest are dropped)
  kv_cache: decode.KVCacheFormat | None = None  # the KV cache `generate` uses by default (None: full precision)
  # > 0: the MLP rotates down_proj's input online by a (block) Hadamard Q of this size, x·Q (`quarot(online=True)`
  # sets it and stores down_proj's kernel as Qᵀ·W, the same function). Not a Hugging Face field: the exports write
  # Q·kernel, the plain weight; compressed.jxc's metadata records it (`ONLINE_HADAMARD`).
  online_hadamard: int = 0

  def __post_init__(self):
    if self.online_hadamard and (self.moe_experts or self.intermediate_size % self.online_hadamard):
      raise ValueError(f'LlamaConfig: online_hadamard={self.online_hadamard} rotates a dense MLP input of a width it '
                       f'divides; got intermediate_size={self.intermediate_size}, moe_experts={self.moe_experts}. '
                       'Change the MLP before quarot(online=True).')

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads


class Attention(nnx.Module):

  def __init__(self, cfg: LlamaConfig, dtype, rngs: nnx.Rngs):
    d, hd, std = cfg.hidden_size, cfg.dim_per_head, cfg.initializer_range
    self.q_proj = layers.Linear(d, cfg.num_heads * hd, bias=cfg.qkv_bias, std=std, dtype=dtype, rngs=rngs)
    self.k_proj = layers.Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias, std=std, dtype=dtype, rngs=rngs)
    self.v_proj = layers.Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias, std=std, dtype=dtype, rngs=rngs)
    self.o_proj = layers.Linear(cfg.num_heads * hd, d, bias=cfg.o_bias, std=std, dtype=dtype, rngs=rngs)
    self.cfg = cfg

  def __call__(self, x, ctx: layers.Context, cache=None, *, return_probs: bool = False):
    cfg, hd = self.cfg, self.cfg.dim_per_head
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, -1, hd)
    k = self.k_proj(x).reshape(b, t, -1, hd)
    v = self.v_proj(x).reshape(b, t, -1, hd)
    inv_freq, scaling = layers.rope_frequencies(hd, cfg.rope_theta, cfg.rope)
    q = layers.apply_rope(q, ctx.positions, inv_freq, scaling)
    k = layers.apply_rope(k, ctx.positions, inv_freq, scaling)
    out, *rest = layers.cached_attention(q, k, v, ctx, cache, hd ** -0.5, return_probs=return_probs)
    return (self.o_proj(out), *rest)


class MLP(nnx.Module):

  def __init__(self, cfg: LlamaConfig, dtype, rngs: nnx.Rngs):
    d, f, std = cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range
    self.gate_proj = layers.Linear(d, f, bias=cfg.mlp_bias, std=std, dtype=dtype, rngs=rngs)
    self.up_proj = layers.Linear(d, f, bias=cfg.mlp_bias, std=std, dtype=dtype, rngs=rngs)
    self.down_proj = layers.Linear(f, d, bias=cfg.mlp_bias, std=std, dtype=dtype, rngs=rngs)
    self.act = cfg.hidden_act
    self.online_hadamard = cfg.online_hadamard

  def __call__(self, x):
    h = layers.activation(self.act)(self.gate_proj(x)) * self.up_proj(x)
    if self.online_hadamard:
      h = hadamard.hadamard_transform(h, block=self.online_hadamard)
    return self.down_proj(h)


def block(cfg: LlamaConfig, dtype, rngs: nnx.Rngs) -> layers.PreNormBlock:
  norm = lambda: layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
  attn = Attention(cfg, dtype, rngs)  # before the MLP: the order modules draw from `rngs` fixes the init
  if cfg.moe_experts:
    mlp = moe.MoEMLP(cfg.hidden_size, cfg.intermediate_size, experts=cfg.moe_experts, top_k=cfg.moe_top_k,
                     capacity=cfg.moe_capacity, gated=True, bias=cfg.mlp_bias, act=cfg.hidden_act,
                     std=cfg.initializer_range, dtype=dtype, rngs=rngs)
  else:
    mlp = MLP(cfg, dtype, rngs)
  return layers.PreNormBlock(norm(), attn, norm(), mlp, cfg.dim_per_head)


class LlamaLM(nnx.Module):

  def __init__(self, cfg: LlamaConfig, dtype, rngs: nnx.Rngs):
    self.embed = _Embedder(cfg, dtype, rngs)
    self.layers = nnx.List([block(cfg, dtype, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
    self.lm_head = None if cfg.tie_embeddings else layers.Linear(
        cfg.hidden_size, cfg.vocab_size, bias=False, std=cfg.initializer_range, dtype=dtype, rngs=rngs)

  def head(self, h):
    h = self.final_norm(h)
    return self.embed.tokens.attend(h) if self.lm_head is None else self.lm_head(h)


class _Embedder(nnx.Module):

  def __init__(self, cfg: LlamaConfig, dtype, rngs: nnx.Rngs):
    self.tokens = layers.Embed(cfg.vocab_size, cfg.hidden_size, std=cfg.initializer_range, dtype=dtype,
                               rngs=rngs)
    self.vocab = cfg.vocab_size

  def __call__(self, tokens, positions, token_types=None):
    del positions, token_types  # rotary positions are applied inside attention
    return self.tokens(base.fill_invalid(tokens, self.vocab))


@dataclasses.dataclass(frozen=True)
class Llama(base.Model):
  """Spec of a Llama / Mistral / Qwen2 causal LM."""

  config: LlamaConfig

  family: ClassVar[str] = 'llama'
  causal: ClassVar[bool] = True
  online_rotated: ClassVar[tuple[str, ...]] = ('mlp/down_proj/kernel',)
  hf_model_types: ClassVar[tuple[str, ...]] = ('llama', 'mistral', 'qwen2')
  hf_prefixes: ClassVar[tuple[str, ...]] = ('',)
  hf_ignore: ClassVar[tuple[str, ...]] = (r'rotary_emb\.inv_freq$',)
  linear_groups: ClassVar[tuple[base.LinearGroup, ...]] = (
      base.LinearGroup('attn_in', ('attn/q_proj/kernel', 'attn/k_proj/kernel', 'attn/v_proj/kernel'), 'attn_norm'),
      base.LinearGroup('attn_out', ('attn/o_proj/kernel',)),
      base.LinearGroup('mlp_in', ('mlp/gate_proj/kernel', 'mlp/up_proj/kernel'), 'mlp_norm'),
      base.LinearGroup('mlp_out', ('mlp/down_proj/kernel',)))
  # MoE blocks (moe_experts > 0): the stacked experts take the routed tokens of mlp_norm's output (gate, up) and
  # their own hidden activations (down). mlp_norm feeds every expert, so it cannot absorb per-expert scales.
  routed_groups: ClassVar[tuple[base.LinearGroup, ...]] = (
      base.LinearGroup('mlp_in', ('mlp/up', 'mlp/gate'), 'mlp_norm'),
      base.LinearGroup('mlp_out', ('mlp/down',)))
  head_patterns: ClassVar[tuple[str, ...]] = (r'^lm_head/',)  # absent when tied to the embedding

  def sharding_rules(self):
    # Megatron layout: q/k/v and gate/up split their outputs over 'tensor', o/down their inputs, so each
    # attention and MLP pair needs one reduction; 'fsdp' takes the other dimension.
    return ((r'(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel$', ('fsdp', 'tensor')),
            (r'(o_proj|down_proj)/kernel$', ('tensor', 'fsdp')),
            (r'^lm_head/kernel$', ('fsdp', 'tensor')),
            (r'/embedding$', ('tensor', 'fsdp')),
            # Mixture-of-experts MLPs (models.moe): [experts, in, out] stacks split like the dense pair, each
            # expert whole on its devices' slice; the small router splits its input like the up projections.
            (r'/mlp/(up|gate)$', (None, 'fsdp', 'tensor')),
            (r'/mlp/down$', (None, 'tensor', 'fsdp')),
            (r'/mlp/router$', ('fsdp', None)))

  def _module(self, rngs, dtype):
    return LlamaLM(self.config, dtype, rngs)

  def _window(self):
    return self.config.sliding_window

  def _tied_head_flops(self, params):
    return 2 * self.config.hidden_size * self.config.vocab_size if self.config.tie_embeddings else 0

  # Hugging Face -----------------------------------------------------------------------------------------------

  @classmethod
  def from_hf_config(cls, hf: Any, tensor_names: frozenset[str] = frozenset()) -> Llama:
    """Reads every field of LlamaConfig / MistralConfig / Qwen2Config that changes the logits; refuses the
    values it cannot run, naming the field.

    Read: sizes, head_dim, rms_norm_eps, rope_parameters (default, linear, llama3), hidden_act,
    tie_word_embeddings, attention_bias and mlp_bias (Llama), sliding_window (Mistral), layer_types /
    use_sliding_window / max_window_layers (Qwen2: every layer full or every layer sliding). pretraining_tp only
    splits the matmuls of old checkpoints' training; transformers' forward ignores it, and so does this one.
    """
    mt = hf.model_type
    rope_params = dict(getattr(hf, 'rope_parameters', None) or {})
    theta = rope_params.pop('rope_theta', getattr(hf, 'rope_theta', 10000.0))
    kind = rope_params.get('rope_type', 'default')
    if kind == 'default':
      rope_params = {}  # transformers' default rope reads only rope_theta
    elif rope_params.get('partial_rotary_factor', 1.0) != 1.0:
      raise ValueError(f"{mt}: rope_parameters partial_rotary_factor={rope_params['partial_rotary_factor']} is not "
                       'supported (rotary positions on part of each head).')
    try:
      layers.rope_frequencies(8, theta, tuple(sorted(rope_params.items())))  # fails early if unsupported
    except ValueError as e:
      raise ValueError(f'{mt}: rope_parameters: {e}') from None
    if hf.hidden_act not in layers.ACTIVATIONS:
      raise ValueError(f'{mt}: hidden_act={hf.hidden_act!r} is not supported; supported: '
                       f'{sorted(layers.ACTIVATIONS)}.')
    window = None
    if mt == 'mistral':
      window = getattr(hf, 'sliding_window', None)
    elif mt == 'qwen2':
      window = _qwen2_window(hf)
    # Only LlamaConfig has bias flags; Mistral has no biases, Qwen2 biases q, k, v only.
    attn_bias = mt == 'llama' and bool(getattr(hf, 'attention_bias', False))
    mlp_bias = mt == 'llama' and bool(getattr(hf, 'mlp_bias', False))
    head_dim = getattr(hf, 'head_dim', None) or hf.hidden_size // hf.num_attention_heads
    cfg = LlamaConfig(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
        num_kv_heads=getattr(hf, 'num_key_value_heads', None) or hf.num_attention_heads,
        head_dim=head_dim, rms_norm_eps=hf.rms_norm_eps, rope_theta=float(theta),
        rope=tuple(sorted(rope_params.items())), max_position_embeddings=hf.max_position_embeddings,
        tie_embeddings=bool(hf.tie_word_embeddings), qkv_bias=(mt == 'qwen2') or attn_bias,
        o_bias=attn_bias, mlp_bias=mlp_bias, sliding_window=window, hidden_act=hf.hidden_act, model_type=mt,
        initializer_range=hf.initializer_range, bos_token_id=hf.bos_token_id, eos_token_id=_first(hf.eos_token_id),
        pad_token_id=hf.pad_token_id, kv_cache=decode.hf_kv_cache(hf))
    return cls(cfg)

  def hf_config(self):
    import transformers
    c = self.config
    if c.moe_experts:
      raise ValueError(f'Llama export: moe_experts={c.moe_experts}; a MoEfied MLP has no Hugging Face Llama '
                       'layout. Export the dense model the experts were split from.')
    kwargs = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.dim_per_head, rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_embeddings, hidden_act=c.hidden_act, initializer_range=c.initializer_range,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        rope_parameters={'rope_theta': c.rope_theta, 'rope_type': 'default', **dict(c.rope)},
        **decode.hf_kv_fields(c.kv_cache))
    if c.model_type == 'llama':
      if c.qkv_bias != c.o_bias:
        raise ValueError('Llama export: HF Llama has one attention_bias flag; q/k/v and o biases differ.')
      return transformers.LlamaConfig(attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias,
                                      architectures=['LlamaForCausalLM'], **kwargs)
    if c.model_type == 'mistral':
      return transformers.MistralConfig(sliding_window=c.sliding_window, architectures=['MistralForCausalLM'],
                                        **kwargs)
    if c.model_type == 'qwen2':
      sliding = c.sliding_window is not None
      return transformers.Qwen2Config(use_sliding_window=sliding, sliding_window=c.sliding_window,
                                      max_window_layers=0 if sliding else c.num_layers,
                                      layer_types=[('sliding_attention' if sliding else 'full_attention')] *
                                      c.num_layers, architectures=['Qwen2ForCausalLM'], **kwargs)
    raise ValueError(f'Llama export: unknown model_type {c.model_type!r}.')

  def hf_table(self) -> list[convert.TensorMap]:
    c = self.config
    rows = [convert.same('model.embed_tokens.weight', 'embed/tokens/embedding'),
            convert.same('model.layers.{i}.input_layernorm.weight', 'layers/{i}/attn_norm/scale'),
            convert.same('model.layers.{i}.post_attention_layernorm.weight', 'layers/{i}/mlp_norm/scale'),
            convert.same('model.norm.weight', 'final_norm/scale')]
    for p in ('q', 'k', 'v', 'o'):
      rows.append(convert.linear_weight(f'model.layers.{{i}}.self_attn.{p}_proj.weight',
                                        f'layers/{{i}}/attn/{p}_proj/kernel'))
      if (c.qkv_bias and p != 'o') or (c.o_bias and p == 'o'):
        rows.append(convert.same(f'model.layers.{{i}}.self_attn.{p}_proj.bias', f'layers/{{i}}/attn/{p}_proj/bias'))
    for p in ('gate', 'up', 'down'):
      rows.append(convert.linear_weight(f'model.layers.{{i}}.mlp.{p}_proj.weight', f'layers/{{i}}/mlp/{p}_proj/kernel'))
      if c.mlp_bias:
        rows.append(convert.same(f'model.layers.{{i}}.mlp.{p}_proj.bias', f'layers/{{i}}/mlp/{p}_proj/bias'))
    if not c.tie_embeddings:
      rows.append(convert.linear_weight('lm_head.weight', 'lm_head/kernel'))
    return convert.expand(rows, c.num_layers)

  def hf_copies(self) -> dict[str, str]:
    """{HF tensor a checkpoint may hold as a copy: the tensor it must equal} (tied weights)."""
    return {'lm_head.weight': 'model.embed_tokens.weight'} if self.config.tie_embeddings else {}

  def hf_unused_heads(self) -> tuple[str, ...]:
    return ()

  def hf_export_copies(self) -> dict[str, str]:
    return {}


def _qwen2_window(hf: Any) -> int | None:
  """Qwen2's window: layer_types says per layer; one window for all layers or none is supported."""
  kinds = list(getattr(hf, 'layer_types', None) or [])
  if not kinds:  # configs from before layer_types
    use = getattr(hf, 'use_sliding_window', False) and getattr(hf, 'sliding_window', None) is not None
    kinds = ['sliding_attention' if use and i >= hf.max_window_layers else 'full_attention'
             for i in range(hf.num_hidden_layers)]
  unknown = sorted(set(kinds) - {'full_attention', 'sliding_attention'})
  if unknown:
    raise ValueError(f'qwen2: layer_types holds {unknown}; only full_attention and sliding_attention exist.')
  if len(set(kinds)) > 1:
    raise ValueError(f'qwen2: layer_types={kinds} mixes full and sliding-window layers (use_sliding_window with '
                     f'max_window_layers={getattr(hf, "max_window_layers", None)}); one kind for all layers is '
                     'supported.')
  if kinds and kinds[0] == 'sliding_attention':
    if not getattr(hf, 'sliding_window', None):
      raise ValueError('qwen2: layer_types are sliding_attention but sliding_window is not set.')
    return int(hf.sliding_window)
  return None


def _first(x):
  return x[0] if isinstance(x, (list, tuple)) else x
