"""One selection vocabulary: every method that chooses its weights holds `rules: core.Rules`, which a recipe writes
as the same four arguments (`include=`, `exclude=`, `embeddings=`, `head=`); spellings that are gone are refused
with what replaced them."""

import dataclasses
import json
import typing

import pytest

from jaxcompress import core, pruning, quantization, recipes, registry, sharing
from jaxcompress.lowrank._src.svd import SVDConfig
from jaxcompress.pruning._src import gradual, movement

# the registered methods whose selection is an argument: every method that compresses chosen weights (the others
# change the whole model: distillation, architecture, rotations, the KV cache, sharing's own in-block regex)
SELECTING = ('magnitude', 'wanda', 'owl', 'ria', 'sparsegpt', 'gradual', 'movement', 'soft_movement', 'set', 'rigl',
             'rtn', 'gptq', 'awq', 'nonuniform', 'mixed', 'pq', 'w8a8', 'smoothquant', 'llm_int8', 'qat', 'llm_qat',
             'lsq', 'bitnet', 'svd', 'fwsvd', 'asvd', 'svd_llm', 'lora', 'qlora')
# calibrated block by block: the blocks' linears only (embeddings= and head= are refused); linears only (no tables)
BLOCKS_ONLY = ('wanda', 'owl', 'ria', 'sparsegpt', 'gptq', 'awq', 'nonuniform', 'mixed', 'w8a8', 'smoothquant', 'llm_int8')
NO_TABLES = ('pq', 'lsq', 'bitnet', 'lora', 'qlora')
OLD = ('include', 'exclude', 'target')  # fields that chose weights before `rules`
# configs used from Python (transforms, optimizers, layer-level APIs) that select too
PYTHON_ONLY = (gradual.GradualConfig, gradual.SparseTrainingConfig, movement.SoftMovementConfig,
               movement.HardMovementConfig, SVDConfig)


def test_every_selecting_config_holds_rules_and_no_other_selection_field():
  for name, m in recipes.REGISTRY.items():
    fields = {f.name for f in dataclasses.fields(m.config)}
    assert not fields & set(OLD), f'{name}: {m.config.__name__} still has {sorted(fields & set(OLD))}'
    assert registry.selects(m.config) == (name in SELECTING), name
  for config in [recipes.get(n).config for n in SELECTING] + list(PYTHON_ONLY):
    assert typing.get_type_hints(config)['rules'] is core.Rules, config.__name__
    assert isinstance(config().rules, core.Rules) and config().rules.heads is None  # the model's heads decide


@pytest.mark.parametrize('name', SELECTING)
def test_the_four_flat_arguments_build_the_rules(name, tmp_path):
  embeddings, head = name not in BLOCKS_ONLY + NO_TABLES, name not in BLOCKS_ONLY
  stage, = recipes.parse(f'{name}(include=("mlp/",), exclude="layers/0/", embeddings={embeddings}, head={head})')
  assert stage.config.rules == core.Rules(include=('mlp/',), exclude='layers/0/', embeddings=embeddings, head=head)
  default, = recipes.parse(name)
  assert default.config.rules == core.Rules()
  assert dataclasses.replace(default.config, rules=core.Rules(include=('mlp/',))) == \
      recipes.parse(f'{name}(include=["mlp/"])')[0].config  # a list is a tuple, as every recipe argument
  file = tmp_path / 'r.json'
  file.write_text(json.dumps([{'method': name, 'include': ['mlp/'], 'exclude': 'q'}]))
  assert recipes.parse(str(file))[0].config.rules == core.Rules(include=('mlp/',), exclude='q')
  assert f'include={core.selection.KERNELS!r}, exclude=(), embeddings=False, head=False' in \
      recipes.describe().split(f'  {name}(')[1].split('\n')[0]
  with pytest.raises(ValueError, match=f"{name}: embeddings='yes' is not a bool"):
    recipes.parse(f'{name}(embeddings="yes")')
  with pytest.raises(ValueError, match=f'{name}: rules= is written as its flat arguments include=, exclude='):
    recipes.parse(f'{name}(rules="mlp/")')


def test_python_configs_take_rules():
  config = pruning.WandaConfig(rules=core.Rules(include=('mlp/',)))
  assert config == recipes.parse('wanda(include=("mlp/",))')[0].config
  assert quantization.RTNConfig(rules=core.Rules(include=(), embeddings=True)) == \
      recipes.parse('rtn(include=(), embeddings=True)')[0].config


@pytest.mark.parametrize('text, needle', [
    ('rtn(bits=8, target="embeddings")', "rtn: target= is gone: weights are chosen by include=, exclude=, "
     "embeddings=, head= (Python: rules=core.Rules(...)); target='blocks' is the default, target='all' is "
     "embeddings=True, target='embeddings' is include=(), embeddings=True."),
    ('share(include="mlp/")', "share: include= is gone: the regex over paths inside a block is within_block= "
     "(e.g. within_block='mlp/')."),
])
def test_a_recipe_with_a_spelling_that_is_gone_is_refused_naming_the_replacement(text, needle):
  with pytest.raises(ValueError) as e:
    recipes.parse(text)
  assert needle in str(e.value)


@pytest.mark.parametrize('make, needle', [
    (lambda: quantization.RTNConfig(target='all'), "RTNConfig: target= is gone: weights are chosen by include="),
    (lambda: pruning.WandaConfig(include='mlp/'), 'WandaConfig: include= is gone: it is a field of rules: '
     'WandaConfig(rules=core.Rules(include=...))'),
    (lambda: pruning.SparseGPTConfig(exclude='layers/0/'), 'SparseGPTConfig(rules=core.Rules(exclude=...))'),
    (lambda: gradual.GradualConfig(include='mlp/'), 'GradualConfig(rules=core.Rules(include=...))'),
    (lambda: movement.HardMovementConfig(exclude='x'), 'HardMovementConfig(rules=core.Rules(exclude=...))'),
    (lambda: sharing.ShareConfig(include='mlp/'), 'ShareConfig: include= is gone: the regex over paths inside a '
     'block is within_block='),
])
def test_a_python_config_with_a_spelling_that_is_gone_is_refused_naming_the_replacement(make, needle):
  with pytest.raises(TypeError) as e:
    make()
  assert needle in str(e.value)


def test_share_keeps_its_in_block_regex_apart():
  stage, = recipes.parse('share(group=2, within_block="mlp/")')
  assert stage.config.within_block == 'mlp/' and not registry.selects(type(stage.config))
  with pytest.raises(ValueError, match=r"share: within_block='mlp/\(': 'mlp/\(' is not a valid regular expression"):
    recipes.parse('share(within_block="mlp/(")')
