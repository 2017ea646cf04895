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

# The registered methods that change the whole model and so choose no weights: distillation, architecture,
# rotations, the KV cache, structured pruning, and sharing with its own in-block regex. Every other method,
# including one added later, must take the selection arguments (`registry.selects`).
WHOLE_MODEL = ('distill', 'recover', 'gkd', 'seq_kd', 'fresh_student', 'drop_layers', 'gqa', 'moefy', 'quarot',
               'kivi', 'structured', 'share', 'tie_embeddings')
SELECTING = tuple(sorted(n for n in recipes.REGISTRY if n not in WHOLE_MODEL))
OLD = ('include', 'exclude', 'target')  # fields that chose weights before `rules`
# configs used from Python (transforms, optimizers, layer-level APIs) that select too
PYTHON_ONLY = (gradual.GradualConfig, gradual.SparseTrainingConfig, movement.SoftMovementConfig,
               movement.HardMovementConfig, SVDConfig)


def test_every_selecting_config_holds_rules_and_no_other_selection_field():
  for name, m in recipes.REGISTRY.items():
    fields = {f.name for f in dataclasses.fields(m.config)}
    assert not fields & set(OLD), f'{name}: {m.config.__name__} still has {sorted(fields & set(OLD))}'
    assert registry.selects(m.config) == (name in SELECTING), (
        f'{name}: a method that compresses chosen weights holds rules: core.Rules = core.Rules() (see '
        'docs/new_method.md); one that changes the whole model belongs in WHOLE_MODEL above')
  for config in [recipes.get(n).config for n in SELECTING] + list(PYTHON_ONLY):
    assert typing.get_type_hints(config)['rules'] is core.Rules, config.__name__
    assert isinstance(config().rules, core.Rules) and config().rules.heads is None  # the model's heads decide


def _refuses(name: str, arg: str) -> bool:
  """Whether the method refuses arg=True when the recipe is read, saying so (layer-wise methods: the blocks'
  linears only; linear-only leaves: no embedding tables)."""
  try:
    recipes.parse(f'{name}({arg}=True)')
  except ValueError as e:
    assert f'{name}: {arg}=True' in str(e) or f'{name}: embeddings and head=True' in str(e), str(e)
    return True
  return False


def test_the_methods_known_to_refuse_tables_or_heads_do():
  for name in ('wanda', 'owl', 'ria', 'sparsegpt', 'gptq', 'awq', 'omniquant', 'nonuniform', 'mixed', 'w8a8'):
    assert _refuses(name, 'embeddings') and _refuses(name, 'head'), name
  for name in ('pq', 'lsq', 'bitnet', 'lora', 'qlora'):
    assert _refuses(name, 'embeddings') and not _refuses(name, 'head'), name
  for name in ('magnitude', 'rtn', 'svd', 'qat', 'gradual'):
    assert not _refuses(name, 'embeddings') and not _refuses(name, 'head'), name


@pytest.mark.parametrize('name', SELECTING)
def test_the_four_flat_arguments_build_the_rules(name, tmp_path):
  embeddings, head = not _refuses(name, 'embeddings'), not _refuses(name, 'head')
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
