"""Parity against transformers' torch implementation: tiny random reference models and their logits.

Test support, not part of the installed package: the parity tests and experiments/tables/parity.py build a random
transformers model, save it as safetensors, load it with jaxcompress, and compare outputs. Needs torch
(`pip install -e '.[test]'`).

    ref = tiny_reference('mistral')                       # random MistralForCausalLM, sliding window 4
    ref.save_pretrained(path); model, params = from_pretrained(path)
    relative_error(model.apply(params, tokens), torch_outputs(ref, tokens))
"""

from __future__ import annotations

import numpy as np

VOCAB = 97
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=64)
CAUSAL_KINDS = ('llama', 'llama_tied', 'mistral', 'qwen2', 'gpt2')
ALL_KINDS = CAUSAL_KINDS + ('bert_mlm', 'bert')


def tiny_reference(kind: str):
  """A tiny random transformers model (torch, eval mode) of one supported family; seeded by its kind.

  kinds: llama (GQA, llama3 RoPE scaling), llama_tied, mistral (sliding window 4), qwen2 (qkv bias), gpt2,
  bert_mlm (BertForMaskedLM), bert (BertModel with pooler). Norms and biases are randomized too, so a
  swapped or dropped one shows in the outputs.
  """
  import torch
  import transformers
  llama3_rope = {'rope_type': 'llama3', 'rope_theta': 500000.0, 'factor': 8.0, 'low_freq_factor': 1.0,
                 'high_freq_factor': 4.0, 'original_max_position_embeddings': 16}
  builders = {
      'llama': lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
          **_COMMON, num_key_value_heads=2, rope_parameters=llama3_rope)),
      'llama_tied': lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
          **_COMMON, num_key_value_heads=4, tie_word_embeddings=True)),
      'mistral': lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
          **_COMMON, num_key_value_heads=2, sliding_window=4)),
      'qwen2': lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_COMMON, num_key_value_heads=2)),
      'gpt2': lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
          vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)),
      'bert_mlm': lambda: transformers.BertForMaskedLM(transformers.BertConfig(**_COMMON)),
      'bert': lambda: transformers.BertModel(transformers.BertConfig(**_COMMON)),
  }
  if kind not in builders:
    raise ValueError(f'tiny_reference: kind={kind!r}; choose one of {sorted(builders)}.')
  torch.manual_seed(sorted(builders).index(kind))
  model = builders[kind]().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name.lower() or '.ln_' in name or name.endswith('bias'):
        p.add_(0.1 * torch.randn_like(p))
  return model


def torch_outputs(model, tokens: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
  """Logits (LM heads) or last hidden states (BertModel) of a transformers model, float32 numpy."""
  import torch
  with torch.no_grad():
    kwargs = {} if attention_mask is None else {'attention_mask': torch.tensor(attention_mask)}
    out = model(torch.tensor(tokens), **kwargs)
  return (out.logits if hasattr(out, 'logits') else out.last_hidden_state).float().numpy()


def relative_error(ours, ref) -> float:
  """||ours - ref|| / ||ref|| over whole arrays, as a float: jaxcompress.eval.relative_error, ours first."""
  import jax.numpy as jnp

  from jaxcompress.eval import relative_error as rel
  return float(rel(jnp.asarray(ref), jnp.asarray(ours)))
