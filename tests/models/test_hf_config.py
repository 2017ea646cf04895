"""Every config field that changes the computation is read (and matches transformers) or refused by name.

Each row builds a tiny random transformers model with one field changed, saves it, and either loads it and
compares logits with transformers, or expects `from_pretrained` to refuse it with an error naming the field.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from jaxcompress import models
from tests.reference_models import relative_error, torch_outputs

VOCAB = 53
TOKENS = np.random.RandomState(0).randint(0, VOCAB, (2, 10))
TOL = 1e-6  # fp32 against fp32: observed errors are ~1e-7
_SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=32)
_GPT2 = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0)
_LLAMA3 = {'rope_type': 'llama3', 'rope_theta': 500000.0, 'factor': 8.0, 'low_freq_factor': 1.0,
           'high_freq_factor': 4.0, 'original_max_position_embeddings': 8}


def _llama(**kw):
  return transformers.LlamaForCausalLM, transformers.LlamaConfig(**{**_SIZES, 'num_key_value_heads': 2, **kw})


def _mistral(**kw):
  return transformers.MistralForCausalLM, transformers.MistralConfig(**{**_SIZES, 'num_key_value_heads': 2, **kw})


def _qwen2(**kw):
  return transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**{**_SIZES, 'num_key_value_heads': 2, **kw})


def _gpt2(**kw):
  return transformers.GPT2LMHeadModel, transformers.GPT2Config(**{**_GPT2, **kw})


def _bert(cls=transformers.BertForMaskedLM, **kw):
  return cls, transformers.BertConfig(**{**_SIZES, **kw})


# (name, builder, None for "loads and matches transformers" or a regex the refusal must match)
CASES = [
    ('llama attention_bias', lambda: _llama(attention_bias=True), None),
    ('llama mlp_bias', lambda: _llama(mlp_bias=True), None),
    ('llama head_dim', lambda: _llama(head_dim=16), None),
    ('llama pretraining_tp', lambda: _llama(pretraining_tp=2), None),
    ('llama tied', lambda: _llama(tie_word_embeddings=True), None),
    ('llama rope linear', lambda: _llama(rope_parameters={'rope_type': 'linear', 'rope_theta': 1e4, 'factor': 2.0}),
     None),
    ('llama rope llama3', lambda: _llama(rope_parameters=_LLAMA3), None),
    ('llama rms_norm_eps', lambda: _llama(rms_norm_eps=0.5), None),
    ('llama hidden_act gelu', lambda: _llama(hidden_act='gelu'), None),
    ('llama hidden_act unknown', lambda: _llama(hidden_act='quick_gelu'), r"hidden_act.*'quick_gelu'"),
    ('llama rope dynamic', lambda: _llama(rope_parameters={'rope_type': 'dynamic', 'rope_theta': 1e4, 'factor': 2.0}),
     r"rope_type.*'dynamic'"),
    ('llama rope partial', lambda: _llama(rope_parameters={**_LLAMA3, 'partial_rotary_factor': 0.5}),
     r'partial_rotary_factor.*0\.5'),
    ('mistral window', lambda: _mistral(sliding_window=3), None),
    ('mistral no window', lambda: _mistral(sliding_window=None), None),
    ('mistral head_dim', lambda: _mistral(head_dim=16, sliding_window=None), None),
    ('qwen2 full', lambda: _qwen2(), None),
    ('qwen2 all layers sliding', lambda: _qwen2(use_sliding_window=True, sliding_window=3, max_window_layers=0),
     None),
    ('qwen2 window unused', lambda: _qwen2(use_sliding_window=False, sliding_window=3, max_window_layers=0), None),
    ('qwen2 mixed layers', lambda: _qwen2(use_sliding_window=True, sliding_window=3, max_window_layers=1),
     r"layer_types.*'full_attention', 'sliding_attention'"),
    ('qwen2 tied', lambda: _qwen2(tie_word_embeddings=True), None),
    ('gpt2 n_inner', lambda: _gpt2(n_inner=40), None),
    ('gpt2 unscaled attention', lambda: _gpt2(scale_attn_weights=False), None),
    ('gpt2 reorder_and_upcast_attn', lambda: _gpt2(reorder_and_upcast_attn=True), None),
    ('gpt2 relu', lambda: _gpt2(activation_function='relu'), None),
    ('gpt2 gelu', lambda: _gpt2(activation_function='gelu'), None),
    ('gpt2 layer_norm_epsilon', lambda: _gpt2(layer_norm_epsilon=0.3), None),
    ('gpt2 untied head', lambda: _gpt2(tie_word_embeddings=False), None),
    ('gpt2 activation unknown', lambda: _gpt2(activation_function='quick_gelu'),
     r"activation_function.*'quick_gelu'"),
    ('gpt2 inverse layer scaling', lambda: _gpt2(scale_attn_by_inverse_layer_idx=True),
     r'scale_attn_by_inverse_layer_idx'),
    ('gpt2 cross attention', lambda: _gpt2(add_cross_attention=True), r'add_cross_attention'),
    ('bert mlm', lambda: _bert(), None),
    ('bert mlm untied decoder', lambda: _bert(tie_word_embeddings=False), None),
    ('bert chunked feed-forward', lambda: _bert(chunk_size_feed_forward=5), None),
    ('bert relu', lambda: _bert(hidden_act='relu'), None),
    ('bert type vocab', lambda: _bert(type_vocab_size=1), None),
    ('bert base model', lambda: _bert(transformers.BertModel, layer_norm_eps=0.2), None),
    ('bert is_decoder', lambda: _bert(is_decoder=True), r'is_decoder'),
    ('bert is_decoder base model', lambda: _bert(transformers.BertModel, is_decoder=True), r'is_decoder'),
    ('bert cross attention', lambda: _bert(transformers.BertModel, is_decoder=True, add_cross_attention=True),
     r'is_decoder|add_cross_attention'),
    ('bert relative positions', lambda: _bert(position_embedding_type='relative_key'),
     r"position_embedding_type.*'relative_key'"),
    ('bert activation unknown', lambda: _bert(hidden_act='quick_gelu'), r"hidden_act.*'quick_gelu'"),
]


def _reference(builder, seed: int):
  cls, cfg = builder()
  torch.manual_seed(seed)
  model = cls(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name.lower() or '.ln_' in name or name.endswith('bias'):
        p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.mark.parametrize('name,builder,refusal', CASES, ids=[c[0] for c in CASES])
def test_config_field_is_read_or_refused(name, builder, refusal, tmp_path):
  ref = _reference(builder, sum(map(ord, name)))
  ref.save_pretrained(str(tmp_path))
  if refusal is not None:
    with pytest.raises(ValueError, match=refusal):
      models.from_pretrained(tmp_path)
    return
  model, params = models.from_pretrained(tmp_path)
  err = relative_error(model.apply(params, jnp.asarray(TOKENS)), torch_outputs(ref, TOKENS))
  assert err <= TOL, f'{name}: relative error {err:.2e}'


@pytest.mark.parametrize('builder', [lambda: _gpt2(tie_word_embeddings=False),
                                     lambda: _bert(tie_word_embeddings=False),
                                     lambda: _llama(mlp_bias=True, attention_bias=True, head_dim=16),
                                     lambda: _qwen2(use_sliding_window=True, sliding_window=3, max_window_layers=0)],
                         ids=['gpt2 untied', 'bert untied', 'llama biases', 'qwen2 sliding'])
def test_export_round_trips(builder, tmp_path):
  ref = _reference(builder, 0)
  ref.save_pretrained(str(tmp_path / 'in'))
  model, params = models.from_pretrained(tmp_path / 'in')
  models.save_pretrained(tmp_path / 'out', model, params)
  back = type(ref).from_pretrained(str(tmp_path / 'out')).eval()
  np.testing.assert_array_equal(torch_outputs(back, TOKENS), torch_outputs(ref, TOKENS))
  assert models.load_model(tmp_path / 'out') == model


def _with_tensor(path, name, value):
  tensors = load_file(str(path / 'model.safetensors'))
  tensors[name] = value(tensors)
  save_file(tensors, str(path / 'model.safetensors'), metadata={'format': 'pt'})


# A tensor no table row reads is loaded only when it provably duplicates one that is read.
TIED_COPIES = [
    ('gpt2 tied head', lambda: _gpt2(), 'lm_head.weight', 'transformer.wte.weight'),
    ('llama tied head', lambda: _llama(tie_word_embeddings=True), 'lm_head.weight', 'model.embed_tokens.weight'),
    ('bert decoder', lambda: _bert(), 'cls.predictions.decoder.weight', 'bert.embeddings.word_embeddings.weight'),
    ('bert decoder bias', lambda: _bert(), 'cls.predictions.decoder.bias', 'cls.predictions.bias'),
]


@pytest.mark.parametrize('name,builder,copy,source', TIED_COPIES, ids=[c[0] for c in TIED_COPIES])
def test_tied_copies_are_checked_equal(name, builder, copy, source, tmp_path):
  ref = _reference(builder, 1)
  ref.save_pretrained(str(tmp_path))
  _with_tensor(tmp_path, copy, lambda t: t[source].copy())
  model, params = models.from_pretrained(tmp_path)  # an equal copy is redundant
  assert relative_error(model.apply(params, jnp.asarray(TOKENS)), torch_outputs(ref, TOKENS)) <= TOL
  _with_tensor(tmp_path, copy, lambda t: t[source] + 1e-3)
  with pytest.raises(ValueError, match=f"{copy}.*differs from.*{source}"):
    models.from_pretrained(tmp_path)


def test_unread_tensors_are_refused_by_name(tmp_path):
  ref = _reference(lambda: _llama(), 2)
  ref.save_pretrained(str(tmp_path))
  _with_tensor(tmp_path, 'model.layers.0.self_attn.q_norm.weight', lambda t: np.ones(8, np.float32))
  with pytest.raises(ValueError, match=r'model\.layers\.0\.self_attn\.q_norm\.weight'):
    models.from_pretrained(tmp_path)


def test_untied_config_without_head_tensor_is_refused(tmp_path):
  ref = _reference(lambda: _gpt2(tie_word_embeddings=False), 3)
  ref.save_pretrained(str(tmp_path))
  tensors = load_file(str(tmp_path / 'model.safetensors'))
  del tensors['lm_head.weight']
  save_file(tensors, str(tmp_path / 'model.safetensors'), metadata={'format': 'pt'})
  with pytest.raises(KeyError, match=r'lm_head\.weight'):
    models.from_pretrained(tmp_path)


def test_config_written_by_hand_with_unknown_values_is_refused(tmp_path):
  ref = _reference(lambda: _gpt2(), 4)
  ref.save_pretrained(str(tmp_path))
  cfg = json.loads((tmp_path / 'config.json').read_text())
  cfg['activation_function'] = 'swiglu'
  (tmp_path / 'config.json').write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"config\.json.*activation_function.*'swiglu'"):
    models.from_pretrained(tmp_path)


def test_pretraining_checkpoint_loads_without_its_next_sentence_head(tmp_path):
  ref = _reference(lambda: _bert(transformers.BertForPreTraining), 5)
  ref.save_pretrained(str(tmp_path))
  model, params = models.from_pretrained(tmp_path)
  assert model.config.mlm_head and model.config.pooler
  with torch.no_grad():
    want = ref(torch.tensor(TOKENS)).prediction_logits.numpy()
  assert relative_error(model.apply(params, jnp.asarray(TOKENS)), want) <= TOL
