"""KV-cache decoding against the full forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import models
from jaxcompress.models import decode
from tests.reference_models import relative_error

SPECS = {
    'llama_gqa': models.Llama(models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                                                 num_heads=4, num_kv_heads=2, max_position_embeddings=64)),
    'mistral_window': models.Llama(models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                                      num_layers=2, num_heads=4, num_kv_heads=1, sliding_window=5,
                                                      model_type='mistral')),
    'gpt2': models.GPT2(models.GPT2Config(vocab_size=64, n_positions=64, hidden_size=32, num_layers=2, num_heads=4)),
}
PROMPT = jnp.asarray(np.random.RandomState(0).randint(0, 64, (3, 7)), jnp.int32)


def _scaled(params):
  # Larger weights make the greedy choices well separated, so float rounding cannot flip them.
  return jax.tree.map(lambda x: x * 8 if x.ndim == 2 else x, params)


@pytest.mark.parametrize('name', sorted(SPECS))
def test_cached_logits_equal_full_forward(name):
  spec = SPECS[name]
  params = spec.init(jax.random.key(1))
  tokens = jnp.asarray(np.random.RandomState(2).randint(0, 64, (2, 12)), jnp.int32)
  full = jax.jit(spec.apply)(params, tokens)
  step = jax.jit(lambda p, t, c, i: decode.forward_cached(spec, p, t, c, i))
  cache = decode.init_cache(spec, params, 2, 16)
  logits, cache = step(params, tokens[:, :5], cache, jnp.int32(0))
  steps = [logits]
  for t in range(5, 12):
    logits, cache = step(params, tokens[:, t:t + 1], cache, jnp.int32(t))
    steps.append(logits)
  assert relative_error(jnp.concatenate(steps, axis=1), full) <= 1e-6  # fp32; observed 1.4e-7


@pytest.mark.parametrize('name', sorted(SPECS))
def test_greedy_matches_argmax_loop(name):
  spec = SPECS[name]
  params = _scaled(spec.init(jax.random.key(1)))
  out = models.generate(spec, params, PROMPT, max_new_tokens=6)
  # Causal: positions after t do not change the logits at t, so one fixed-length jitted forward suffices.
  seq = np.zeros((3, 13), np.int32)
  seq[:, :7] = PROMPT
  apply = jax.jit(spec.apply)
  for t in range(7, 13):
    seq[:, t] = np.argmax(apply(params, jnp.asarray(seq))[:, t - 1], axis=-1)
  np.testing.assert_array_equal(out, seq)


def test_sampling_is_reproducible_per_key():
  spec = SPECS['llama_gqa']
  params = spec.init(jax.random.key(1))
  run = lambda seed: models.generate(spec, params, PROMPT, max_new_tokens=12, temperature=1.0, top_k=20,
                                     key=jax.random.key(seed))
  np.testing.assert_array_equal(run(0), run(0))
  assert not np.array_equal(run(0), run(1))


def test_top_k_one_is_greedy():
  spec = SPECS['gpt2']
  params = spec.init(jax.random.key(1))
  # 6 new tokens: the greedy program is test_greedy_matches_argmax_loop[gpt2]'s
  sampled = models.generate(spec, params, PROMPT, max_new_tokens=6, temperature=0.7, top_k=1,
                            key=jax.random.key(3))
  np.testing.assert_array_equal(sampled, models.generate(spec, params, PROMPT, max_new_tokens=6))


def test_generate_bad_input():
  spec = SPECS['gpt2']
  params = spec.init(jax.random.key(1))
  with pytest.raises(ValueError, match='needs key'):
    models.generate(spec, params, PROMPT, max_new_tokens=2, temperature=1.0)
  with pytest.raises(ValueError, match='max_new_tokens'):
    models.generate(spec, params, PROMPT, max_new_tokens=0)
  with pytest.raises(ValueError, match='learned positions'):
    models.generate(spec, params, PROMPT, max_new_tokens=60)
  bert = models.Bert(models.BertConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                                       intermediate_size=48))
  with pytest.raises(ValueError, match='encoder'):
    models.generate(bert, bert.init(jax.random.key(0)), PROMPT, max_new_tokens=2)


def _padded_prompts(lengths, width, vocab, seed=0):
  """Left-padded prompts of the given lengths: (ids [B, width] with pad id 0, mask [B, width])."""
  rs = np.random.RandomState(seed)
  ids, mask = np.zeros((len(lengths), width), np.int64), np.zeros((len(lengths), width), np.int64)
  for i, n in enumerate(lengths):
    ids[i, width - n:] = rs.randint(1, vocab, n)
    mask[i, width - n:] = 1
  return ids, mask


def _gpt2_reference():
  import torch
  import transformers
  torch.manual_seed(0)
  # A wide initialisation keeps the greedy choices varied (a narrow one repeats one token whatever the prompt).
  return transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.5, bos_token_id=0,
      eos_token_id=0)).eval()


@pytest.mark.parametrize('kind', ['llama', 'mistral', 'gpt2'])
def test_left_padded_greedy_matches_transformers(kind, hf_checkpoint, tmp_path):
  import torch
  import transformers
  if kind == 'gpt2':
    hf, path = _gpt2_reference(), tmp_path
    hf.save_pretrained(str(path))
  else:
    path, hf = hf_checkpoint(kind)
  model, params = models.from_pretrained(path)
  ids, mask = _padded_prompts([7, 4, 2, 1], 7, 97)
  new = 8
  config = transformers.GenerationConfig(do_sample=False, max_new_tokens=new, eos_token_id=None, pad_token_id=0,
                                         bos_token_id=None)
  with torch.no_grad():
    ref = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), generation_config=config).numpy()
  ours = models.generate(model, params, jnp.asarray(ids), attention_mask=jnp.asarray(mask), max_new_tokens=new)
  np.testing.assert_array_equal(ours, ref)
  # The test can fail: attending to the pads changes the text.
  assert not np.array_equal(models.generate(model, params, jnp.asarray(ids), max_new_tokens=new), ref)


def test_padded_row_generates_as_it_would_alone():
  spec = SPECS['mistral_window']
  params = _scaled(spec.init(jax.random.key(1)))
  # three rows of 7 and six new tokens: the program of test_greedy_matches_argmax_loop[mistral_window] (the mask
  # is an input); 3 + 6 tokens still run past the window of 5
  ids, mask = _padded_prompts([7, 3, 5], 7, 64, seed=4)
  both = models.generate(spec, params, jnp.asarray(ids), attention_mask=jnp.asarray(mask), max_new_tokens=6)
  alone = models.generate(spec, params, jnp.asarray(ids[1:2, 4:]), max_new_tokens=6)
  np.testing.assert_array_equal(both[1, 7:], alone[0, 3:])


def test_generate_refuses_bad_prompts():
  spec = SPECS['gpt2']
  params = spec.init(jax.random.key(1))
  ones = np.ones((3, 7), np.int32)
  right = ones.copy()
  right[1, 5:] = 0
  empty = ones.copy()
  empty[2] = 0
  cases = [
      (PROMPT.at[1, 2].set(-1), None, r'generate: tokens: 1 id is outside \[0, 64\).*-1 at \[row, position\] \[1, 2\]'),
      (PROMPT.at[0, 6].set(64), None, r'generate: tokens: .*outside \[0, 64\).*64 at'),
      (PROMPT, right, r'attention_mask row 1 is \[1, 1, 1, 1, 1, 0, 0\]: prompts must be padded on the left'),
      (PROMPT, empty, r'attention_mask row 2 .*at least one token'),
      (PROMPT, ones * 2, r'attention_mask must hold 0 .* and 1'),
      (PROMPT, ones[:, :5], r'attention_mask shape \(3, 5\) must equal tokens shape \(3, 7\)'),
  ]
  for prompt, mask, message in cases:
    with pytest.raises(ValueError, match=message):
      models.generate(spec, params, prompt, attention_mask=mask, max_new_tokens=2)
