"""Shared fixtures: tiny random Hugging Face models built offline with transformers + torch."""

from __future__ import annotations

import os

import tempfile

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')
# One XLA compilation cache for the whole test session, shared with the subprocesses tests start: the same
# programs are compiled over and over (every fit, every pretrain run), and each compile costs seconds on CPU.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  import atexit
  import shutil
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='jaxcompress-xla-cache-')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'

import jax
import numpy as np
import pytest

VOCAB = 97
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=64)


def hf_model(kind: str):
  """A tiny random transformers model of one of the supported families (torch, eval mode)."""
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
  torch.manual_seed(sorted(builders).index(kind))
  model = builders[kind]().eval()
  with torch.no_grad():  # random norms and biases, so a swapped or dropped one shows in the logits
    for name, p in model.named_parameters():
      if 'norm' in name.lower() or '.ln_' in name or name.endswith('bias'):
        p.add_(0.1 * torch.randn_like(p))
  return model


CAUSAL_KINDS = ('llama', 'llama_tied', 'mistral', 'qwen2', 'gpt2')
ALL_KINDS = CAUSAL_KINDS + ('bert_mlm', 'bert')


@pytest.fixture(scope='session')
def hf_checkpoint(tmp_path_factory):
  """hf_checkpoint(kind) -> (directory, torch model); each kind built once per session."""
  cache = {}

  def make(kind: str):
    if kind not in cache:
      model = hf_model(kind)
      path = tmp_path_factory.mktemp(kind)
      model.save_pretrained(str(path))
      cache[kind] = (path, model)
    return cache[kind]

  return make


def torch_logits(model, tokens: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
  import torch
  with torch.no_grad():
    kwargs = {} if attention_mask is None else {'attention_mask': torch.tensor(attention_mask)}
    out = model(torch.tensor(tokens), **kwargs)
  return (out.logits if hasattr(out, 'logits') else out.last_hidden_state).float().numpy()


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(autouse=True, scope='session')
def _full_precision_matmuls():
  jax.config.update('jax_default_matmul_precision', 'highest')
  yield
