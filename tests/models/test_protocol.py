"""What each model family declares about itself: its sharding rules and its head paths."""

from __future__ import annotations

import dataclasses
import re

import jax
import pytest

from jaxcompress import core, models
from jaxcompress.core.selection import HEADS as DEFAULT_HEADS
from jaxcompress.models import base
from jaxcompress.train import sharding

SPECS = {
    'llama': models.Llama(models.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2,
                                             num_heads=2, num_kv_heads=1)),
    'gpt2': models.GPT2(models.GPT2Config(vocab_size=32, n_positions=16, hidden_size=16, num_layers=2,
                                          num_heads=2)),
    'bert_mlm': models.Bert(models.BertConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2,
                                              intermediate_size=24, max_position_embeddings=16, pooler=True,
                                              mlm_head=True)),
}
HEADS = {'llama': ['lm_head/kernel'], 'gpt2': [], 'bert_mlm': ['mlm_head/transform/kernel', 'pooler/dense/kernel']}
COLUMN = ('q_proj', 'k_proj', 'v_proj', 'gate_proj', 'up_proj', 'lm_head', 'transform', 'pooler/dense')


@pytest.mark.parametrize('name', sorted(SPECS))
def test_sharding_rules_place_every_kernel_and_embedding(name):
  model = SPECS[name]
  rules = model.sharding_rules()
  for path, w in core.flatten(model.abstract_params()).items():
    axes = sharding.weight_axes(path, len(w.shape), rules)
    if path.endswith('/kernel'):
      column = any(c in path for c in COLUMN)
      assert axes == (('fsdp', 'tensor') if column else ('tensor', 'fsdp')), path
    elif path.endswith('/embedding'):
      assert axes == ('tensor', 'fsdp'), path
    else:
      assert axes == (None,) * len(w.shape), path  # norms and biases are replicated


def test_mixture_of_experts_weights_split_like_the_dense_mlp():
  model = models.Llama(dataclasses.replace(SPECS['llama'].config, moe_experts=4, moe_top_k=2))
  rules = model.sharding_rules()
  flat = core.flatten(model.abstract_params())
  got = {p.rsplit('/', 1)[1]: sharding.weight_axes(p, len(w.shape), rules) for p, w in flat.items() if '/mlp/' in p}
  assert got == {'up': (None, 'fsdp', 'tensor'), 'gate': (None, 'fsdp', 'tensor'),
                 'down': (None, 'tensor', 'fsdp'), 'router': ('fsdp', None)}


def test_trees_without_a_model_fall_back_to_fsdp_only_rules():
  params = {'blocks': {0: {'proj': {'kernel': jax.ShapeDtypeStruct((8, 4), 'float32')}}},
            'table': {'embedding': jax.ShapeDtypeStruct((10, 8), 'float32')}}
  assert sharding.DEFAULT_RULES == base.FSDP_RULES
  assert sharding.weight_axes('blocks/0/proj/kernel', 2) == ('fsdp', None)
  assert sharding.weight_axes('table/embedding', 2) == (None, 'fsdp')
  assert base.Model.sharding_rules(SPECS['llama']) == base.FSDP_RULES  # what a family without its own gets
  mesh = sharding.make_mesh(1, 1, 1)
  assert set(sharding.param_specs(params, mesh)) == {'blocks/0/proj/kernel', 'table/embedding'}


@pytest.mark.parametrize('name', sorted(SPECS))
def test_head_patterns_decide_what_select_leaves_out(name):
  model = SPECS[name]
  params = model.abstract_params()
  kernels = [p for p in core.flatten(params) if p.endswith('/kernel')]
  heads = [p for p in kernels if any(re.search(h, p) for h in model.head_patterns)]
  assert sorted(heads) == HEADS[name]
  assert list(model.select(params)) == [p for p in kernels if p not in heads]
  assert list(model.select(params, head=True)) == kernels
  assert model.select(params) == core.select(params, heads=model.head_patterns)


def test_selection_rules_carry_the_head_patterns():
  model = SPECS['bert_mlm']
  rules = model.selection_rules(include=r'kernel$')
  assert rules.heads == model.head_patterns and not rules.matches('pooler/dense/kernel')
  assert rules.matches('layers/0/attn/q_proj/kernel')
  assert base.Model.head_patterns == (DEFAULT_HEADS,)  # a family that declares none: the usual names
