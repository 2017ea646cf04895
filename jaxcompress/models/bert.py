"""The BERT family (BERT, MiniLM, sentence-transformers encoders): post-LayerNorm bidirectional encoder.

    params: embed/{tokens,positions,token_types}/embedding, embed/norm/{scale,bias}
            layers/{i}/attn/{q,k,v,o}_proj/{kernel,bias}, layers/{i}/attn_norm/{scale,bias}
            layers/{i}/mlp/{up,down}_proj/{kernel,bias},  layers/{i}/mlp_norm/{scale,bias}
            pooler/dense/{kernel,bias}                                  (when the checkpoint has a pooler)
            mlm_head/transform/{kernel,bias}, mlm_head/norm/{scale,bias}, mlm_head/bias   (masked-LM head)
            mlm_head/decoder/kernel [d, vocab]   (masked-LM head not tied to the token embedding)

`apply` returns MLM logits when the model has an MLM head, else the last hidden states.
`sentence_embedding` is the mean over real tokens (sentence-transformers' pooling), optionally L2-normalized.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcompress import core
from jaxcompress.core import hadamard
from jaxcompress.models import base, convert, layers


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig:
  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = 'gelu'
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  pad_token_id: int | None = 0
  pooler: bool = True  # BertModel's tanh pooler over [CLS]
  mlm_head: bool = False  # BertForMaskedLM's prediction head
  tie_embeddings: bool = True  # the MLM decoder is the token embedding (HF tie_word_embeddings)
  # > 0: the input of q/k/v, up_proj and down_proj is rotated online by a block Hadamard of this size, x·Q, and
  # those kernels are stored as Qᵀ·W (`quarot(online=True)`; compressed.jxc's metadata records it, no HF field).
  online_hadamard: int = 0

  def __post_init__(self):
    if self.online_hadamard and (self.hidden_size % self.online_hadamard or
                                 self.intermediate_size % self.online_hadamard):
      raise ValueError(f'BertConfig: online_hadamard={self.online_hadamard} must divide hidden_size='
                       f'{self.hidden_size} and intermediate_size={self.intermediate_size}.')

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


class Attention(nnx.Module):

  def __init__(self, cfg: BertConfig, dtype, rngs: nnx.Rngs):
    d, std = cfg.hidden_size, cfg.initializer_range
    for name in ('q_proj', 'k_proj', 'v_proj', 'o_proj'):
      setattr(self, name, layers.Linear(d, d, bias=True, std=std, dtype=dtype, rngs=rngs))
    self.head_dim = cfg.head_dim
    self.online_hadamard = cfg.online_hadamard

  def __call__(self, x, ctx: layers.Context, cache=None, *, return_probs: bool = False):
    """-> [B, T, D], or ([B, T, D], probabilities [B, N, T, T]) when return_probs."""
    if cache is not None:
      raise ValueError('BERT is an encoder; it has no KV cache.')
    b, t, _ = x.shape
    if self.online_hadamard:
      x = hadamard.hadamard_transform(x, block=self.online_hadamard)
    q, k, v = (p(x).reshape(b, t, -1, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
    out = layers.dot_product_attention(q, k, v, ctx.mask, self.head_dim ** -0.5, return_probs=return_probs)
    out, probs = out if return_probs else (out, None)
    out = self.o_proj(out.reshape(b, t, -1))
    return (out, probs) if return_probs else out


class Block(nnx.Module):

  def __init__(self, cfg: BertConfig, dtype, rngs: nnx.Rngs):
    d, std = cfg.hidden_size, cfg.initializer_range
    self.attn = Attention(cfg, dtype, rngs)
    self.attn_norm = layers.LayerNorm(d, eps=cfg.layer_norm_eps, dtype=dtype)
    self.mlp = layers.MLP(d, cfg.intermediate_size, cfg.hidden_act, std=std, dtype=dtype, rngs=rngs,
                          online_hadamard=cfg.online_hadamard)
    self.mlp_norm = layers.LayerNorm(d, eps=cfg.layer_norm_eps, dtype=dtype)

  def __call__(self, h, ctx: layers.Context, cache=None, *, return_probs: bool = False):
    """-> (h, None), or (h, None, attention probabilities [B, N, T, T]) when return_probs."""
    a = self.attn(h, ctx, cache, return_probs=return_probs)
    a, *probs = a if return_probs else (a,)
    h = self.attn_norm(h + a)
    return (self.mlp_norm(h + self.mlp(h)), None, *probs)


class Embedder(nnx.Module):

  def __init__(self, cfg: BertConfig, dtype, rngs: nnx.Rngs):
    std, d = cfg.initializer_range, cfg.hidden_size
    self.tokens = layers.Embed(cfg.vocab_size, d, std=std, dtype=dtype, rngs=rngs)
    self.positions = layers.Embed(cfg.max_position_embeddings, d, std=std, dtype=dtype, rngs=rngs)
    self.token_types = layers.Embed(cfg.type_vocab_size, d, std=std, dtype=dtype, rngs=rngs)
    self.norm = layers.LayerNorm(d, eps=cfg.layer_norm_eps, dtype=dtype)
    self.sizes = (cfg.vocab_size, cfg.max_position_embeddings, cfg.type_vocab_size)

  def __call__(self, tokens, positions, token_types=None):
    if token_types is None:
      token_types = jnp.zeros_like(tokens)
    vocab, num_pos, num_types = self.sizes
    h = self.tokens(base.fill_invalid(tokens, vocab))
    return self.norm(h + self.positions(base.fill_invalid(positions, num_pos), h.dtype)
                     + self.token_types(base.fill_invalid(token_types, num_types), h.dtype))


class Pooler(nnx.Module):

  def __init__(self, cfg: BertConfig, dtype, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.dense = layers.Linear(d, d, bias=True, std=cfg.initializer_range, dtype=dtype, rngs=rngs)

  def __call__(self, h):
    return jnp.tanh(self.dense(h[:, 0]))


class MLMHead(nnx.Module):

  def __init__(self, cfg: BertConfig, dtype, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.transform = layers.Linear(d, d, bias=True, std=cfg.initializer_range, dtype=dtype, rngs=rngs)
    self.norm = layers.LayerNorm(d, eps=cfg.layer_norm_eps, dtype=dtype)
    self.decoder = None if cfg.tie_embeddings else layers.Linear(
        d, cfg.vocab_size, bias=False, std=cfg.initializer_range, dtype=dtype, rngs=rngs)
    self.bias = nnx.Param(jnp.zeros((cfg.vocab_size,), dtype))
    self.act = cfg.hidden_act

  def __call__(self, h, embed: layers.Embed):
    h = self.norm(layers.activation(self.act)(self.transform(h)))
    logits = embed.attend(h) if self.decoder is None else self.decoder(h)
    return logits + core.materialize(layers.value(self.bias)).astype(h.dtype)


class BertEncoder(nnx.Module):

  def __init__(self, cfg: BertConfig, dtype, rngs: nnx.Rngs):
    self.embed = Embedder(cfg, dtype, rngs)
    self.layers = nnx.List([Block(cfg, dtype, rngs) for _ in range(cfg.num_layers)])
    self.pooler = Pooler(cfg, dtype, rngs) if cfg.pooler else None
    self.mlm_head = MLMHead(cfg, dtype, rngs) if cfg.mlm_head else None

  def head(self, h):
    return h if self.mlm_head is None else self.mlm_head(h, self.embed.tokens)


@dataclasses.dataclass(frozen=True)
class Bert(base.Model):
  """Spec of a BERT-family encoder."""

  config: BertConfig

  family: ClassVar[str] = 'bert'
  causal: ClassVar[bool] = False
  online_rotated: ClassVar[tuple[str, ...]] = ('attn/q_proj/kernel', 'attn/k_proj/kernel', 'attn/v_proj/kernel',
                                               'mlp/up_proj/kernel', 'mlp/down_proj/kernel')
  hf_model_types: ClassVar[tuple[str, ...]] = ('bert',)
  hf_prefixes: ClassVar[tuple[str, ...]] = ('bert.', '')
  hf_ignore: ClassVar[tuple[str, ...]] = (r'position_ids$', r'embeddings\.token_type_ids$')
  # Post-norm: q/k/v read the block input (normed by the previous block's mlp_norm or the embedding norm);
  # up_proj reads attn_norm's output, but that output is also the MLP's residual, so no per-channel scale can
  # be folded into attn_norm (norm=None).
  linear_groups: ClassVar[tuple[base.LinearGroup, ...]] = (
      base.LinearGroup('attn_in', ('attn/q_proj/kernel', 'attn/k_proj/kernel', 'attn/v_proj/kernel')),
      base.LinearGroup('attn_out', ('attn/o_proj/kernel',)),
      base.LinearGroup('mlp_in', ('mlp/up_proj/kernel',)),
      base.LinearGroup('mlp_out', ('mlp/down_proj/kernel',)))
  head_patterns: ClassVar[tuple[str, ...]] = (r'^pooler/', r'^mlm_head/')

  def sharding_rules(self):
    # q/k/v, up and the heads' dense layers split their outputs over 'tensor', o/down their inputs.
    return ((r'(q_proj|k_proj|v_proj|up_proj)/kernel$', ('fsdp', 'tensor')),
            (r'(o_proj|down_proj)/kernel$', ('tensor', 'fsdp')),
            (r'^(pooler/dense|mlm_head/(transform|decoder))/kernel$', ('fsdp', 'tensor')),
            (r'/embedding$', ('tensor', 'fsdp')))

  def _module(self, rngs, dtype):
    return BertEncoder(self.config, dtype, rngs)

  def max_positions(self) -> int:
    return self.config.max_position_embeddings

  def token_type_count(self) -> int:
    return self.config.type_vocab_size

  def _per_sequence_kernels(self):
    return ('pooler/dense/kernel',)  # the pooler reads [CLS] only

  def _tied_head_flops(self, params):
    c = self.config
    return 2 * c.hidden_size * c.vocab_size if c.mlm_head and c.tie_embeddings else 0

  def hf_export_prefix(self) -> str:
    return 'bert.' if self.config.mlm_head else ''  # BertForMaskedLM nests the encoder under "bert."

  def pooled(self, params, tokens, *, attention_mask=None, token_types=None) -> jax.Array:
    """BertModel's pooler output: tanh(dense(h[:, 0])) -> [B, D]."""
    if not self.config.pooler:
      raise ValueError('this BERT has no pooler (the checkpoint had no pooler.dense weights).')
    module = self.bind(params)
    h = self._trunk(module, tokens, attention_mask, None, token_types)
    return module.pooler(h)

  def sentence_embedding(self, params, tokens, attention_mask, *, token_types=None, normalize: bool = True
                         ) -> jax.Array:
    """Mean of the last hidden states over real tokens -> [B, D] (L2-normalized by default)."""
    h = self.hidden_states(params, tokens, attention_mask=attention_mask, token_types=token_types)
    return mean_pool(h, attention_mask, normalize=normalize)

  @classmethod
  def from_hf_config(cls, hf: Any, tensor_names: frozenset[str] = frozenset()) -> Bert:
    """Reads every BertConfig field that changes BertModel's / BertForMaskedLM's outputs; refuses the rest.

    Read: sizes, hidden_act, max_position_embeddings, type_vocab_size, layer_norm_eps, tie_word_embeddings
    (and the pooler / MLM head from the tensors present). chunk_size_feed_forward only splits the MLP's work
    over the sequence, which gives the same numbers. is_decoder (causal self-attention), add_cross_attention
    and position_embedding_type other than 'absolute' are refused.
    """
    if getattr(hf, 'is_decoder', False):
      raise ValueError('BERT is_decoder=True (causal self-attention, BertLMHeadModel) is not supported; this '
                       'family runs BERT as a bidirectional encoder.')
    if getattr(hf, 'add_cross_attention', False):
      raise ValueError('BERT add_cross_attention=True (an encoder-decoder layer) is not supported.')
    if getattr(hf, 'position_embedding_type', 'absolute') != 'absolute':
      raise ValueError(f'BERT position_embedding_type={hf.position_embedding_type!r} is not supported; only '
                       "'absolute' positions are implemented.")
    if hf.hidden_act not in layers.ACTIVATIONS:
      raise ValueError(f'BERT hidden_act={hf.hidden_act!r} is not supported; supported: '
                       f'{sorted(layers.ACTIVATIONS)}.')
    if hf.hidden_size % hf.num_attention_heads:
      raise ValueError(f'BERT hidden_size={hf.hidden_size} is not a multiple of num_attention_heads='
                       f'{hf.num_attention_heads}.')
    has = lambda prefix: any(n.startswith(prefix) or n.startswith('bert.' + prefix) for n in tensor_names)
    return cls(BertConfig(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads, intermediate_size=hf.intermediate_size, hidden_act=hf.hidden_act,
        max_position_embeddings=hf.max_position_embeddings, type_vocab_size=hf.type_vocab_size,
        layer_norm_eps=hf.layer_norm_eps, initializer_range=hf.initializer_range, pad_token_id=hf.pad_token_id,
        pooler=has('pooler.'), mlm_head=has('cls.predictions.'),
        tie_embeddings=bool(getattr(hf, 'tie_word_embeddings', True))))

  def hf_config(self):
    import transformers
    c = self.config
    arch = 'BertForMaskedLM' if c.mlm_head else 'BertModel'
    return transformers.BertConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, intermediate_size=c.intermediate_size, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, type_vocab_size=c.type_vocab_size,
        layer_norm_eps=c.layer_norm_eps, initializer_range=c.initializer_range, pad_token_id=c.pad_token_id,
        tie_word_embeddings=c.tie_embeddings, architectures=[arch])

  def hf_table(self) -> list[convert.TensorMap]:
    c = self.config
    rows = [convert.same('embeddings.word_embeddings.weight', 'embed/tokens/embedding'),
            convert.same('embeddings.position_embeddings.weight', 'embed/positions/embedding'),
            convert.same('embeddings.token_type_embeddings.weight', 'embed/token_types/embedding'),
            convert.same('embeddings.LayerNorm.weight', 'embed/norm/scale'),
            convert.same('embeddings.LayerNorm.bias', 'embed/norm/bias')]
    linears = {'attention.self.query': 'attn/q_proj', 'attention.self.key': 'attn/k_proj',
               'attention.self.value': 'attn/v_proj', 'attention.output.dense': 'attn/o_proj',
               'intermediate.dense': 'mlp/up_proj', 'output.dense': 'mlp/down_proj'}
    for hf, ours in linears.items():
      rows += [convert.linear_weight(f'encoder.layer.{{i}}.{hf}.weight', f'layers/{{i}}/{ours}/kernel'),
               convert.same(f'encoder.layer.{{i}}.{hf}.bias', f'layers/{{i}}/{ours}/bias')]
    for hf, ours in (('attention.output.LayerNorm', 'attn_norm'), ('output.LayerNorm', 'mlp_norm')):
      rows += [convert.same(f'encoder.layer.{{i}}.{hf}.weight', f'layers/{{i}}/{ours}/scale'),
               convert.same(f'encoder.layer.{{i}}.{hf}.bias', f'layers/{{i}}/{ours}/bias')]
    if c.pooler:
      rows += [convert.linear_weight('pooler.dense.weight', 'pooler/dense/kernel'),
               convert.same('pooler.dense.bias', 'pooler/dense/bias')]
    if c.mlm_head:
      rows += [convert.linear_weight('cls.predictions.transform.dense.weight', 'mlm_head/transform/kernel'),
               convert.same('cls.predictions.transform.dense.bias', 'mlm_head/transform/bias'),
               convert.same('cls.predictions.transform.LayerNorm.weight', 'mlm_head/norm/scale'),
               convert.same('cls.predictions.transform.LayerNorm.bias', 'mlm_head/norm/bias'),
               convert.same('cls.predictions.bias' if c.tie_embeddings else 'cls.predictions.decoder.bias',
                            'mlm_head/bias')]
      if not c.tie_embeddings:
        rows.append(convert.linear_weight('cls.predictions.decoder.weight', 'mlm_head/decoder/kernel'))
    return convert.expand(rows, c.num_layers)

  def hf_copies(self) -> dict[str, str]:
    """{HF tensor a checkpoint may hold as a copy: the tensor it must equal} (tied weights)."""
    c = self.config
    if not (c.mlm_head and c.tie_embeddings):
      return {}
    return {'cls.predictions.decoder.weight': 'embeddings.word_embeddings.weight',
            'cls.predictions.decoder.bias': 'cls.predictions.bias'}

  def hf_unused_heads(self) -> tuple[str, ...]:
    """Regexes of HF tensors that no output of this model depends on: BertForPreTraining's next-sentence head,
    and, with an untied decoder, `cls.predictions.bias`, which transformers then holds but never adds (the
    decoder's own bias is used)."""
    untied = self.config.mlm_head and not self.config.tie_embeddings
    return (r'^cls\.seq_relationship\.',) + ((r'^cls\.predictions\.bias$',) if untied else ())

  def hf_export_copies(self) -> dict[str, str]:
    """An untied decoder's bias is also written as `cls.predictions.bias`, which transformers expects."""
    c = self.config
    return {'cls.predictions.bias': 'cls.predictions.decoder.bias'} if c.mlm_head and not c.tie_embeddings else {}


def mean_pool(h: jax.Array, attention_mask: jax.Array, *, normalize: bool = True) -> jax.Array:
  """h: [B, T, D], attention_mask: [B, T] -> [B, D] mean over real tokens."""
  m = attention_mask.astype(h.dtype)[..., None]
  pooled = (h * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)
  if normalize:
    pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
  return pooled
