"""`select`, `Rules`, `Selection`: which weights a method touches."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import core

D, H, V = 4, 6, 9


def _params() -> dict:
  """A tree shaped like the models': int layer keys, norms with scale/bias, heads and shared storage."""
  z = lambda *s: jnp.zeros(s)
  layer = lambda: {
      'attn': {'q_proj': {'kernel': z(D, D), 'bias': z(D)}, 'o_proj': {'kernel': z(D, D)}},
      'attn_norm': {'scale': z(D), 'bias': z(D)},
      'mlp': {'up_proj': {'kernel': z(D, H)}, 'down_proj': {'kernel': z(H, D)}},
  }
  params = {
      'embed': {'tokens': {'embedding': z(V, D)}, 'positions': {'embedding': z(8, D)}},
      'layers': {0: layer(), 1: layer()},
      'final_norm': {'scale': z(D)},
      'lm_head': {'kernel': z(D, V)},
      'mlm_head': {'transform': {'kernel': z(D, D)}, 'bias': z(V)},
      'pooler': {'dense': {'kernel': z(D, D), 'bias': z(D)}},
  }
  params['layers'][0]['attn']['o_proj']['kernel'] = core.Masked(z(D, D), jnp.ones((D, D), bool))
  # Storage named 'kernel', so its path "_shared/kernel" would match the kernel rule if it were not excluded.
  return core.tie(params, ['layers/0/mlp/up_proj/kernel', 'layers/1/mlp/up_proj/kernel'], name='kernel')


BLOCK_KERNELS = [f'layers/{i}/{m}/kernel' for i in (0, 1)
                 for m in ('attn/o_proj', 'attn/q_proj', 'mlp/down_proj', 'mlp/up_proj')]
EMBEDDINGS = ['embed/positions/embedding', 'embed/tokens/embedding']
HEADS = ['lm_head/kernel', 'mlm_head/transform/kernel', 'pooler/dense/kernel']


def _in_tree_order(params: dict, paths: list[str]) -> list[str]:
  return [p for p in core.flatten(params) if p in set(paths)]


def test_default_selects_block_kernels_only():
  params = _params()
  sel = core.select(params)
  assert list(sel) == _in_tree_order(params, BLOCK_KERNELS)
  assert len(sel) == 8
  assert '_shared/kernel' in core.flatten(params) and '_shared/kernel' not in sel
  kinds = dict(zip(sel.paths, sel.kinds))
  assert kinds['layers/0/attn/o_proj/kernel'] == 'Masked'
  assert kinds['layers/1/mlp/up_proj/kernel'] == 'Shared'
  assert kinds['layers/0/attn/q_proj/kernel'] == 'dense'
  assert dict(zip(sel.paths, sel.shapes))['layers/1/mlp/down_proj/kernel'] == (H, D)


@pytest.mark.parametrize('embeddings, head, extra', [
    (True, False, EMBEDDINGS),
    (False, True, HEADS),
    (True, True, EMBEDDINGS + HEADS),
])
def test_embeddings_and_head_flags_add_them(embeddings, head, extra):
  params = _params()
  sel = core.select(params, embeddings=embeddings, head=head)
  assert list(sel) == _in_tree_order(params, BLOCK_KERNELS + extra)


def test_match_everything_still_leaves_out_norms_heads_embeddings_and_storage():
  params = _params()
  sel = core.select(params, include='.*')
  assert not any(p.startswith(('embed/', 'lm_head/', 'mlm_head/', 'pooler/', '_shared/')) for p in sel)
  assert 'layers/0/attn_norm/scale' in sel and 'final_norm/scale' in sel  # include='.*' asks for them
  default = core.select(params)
  assert all(not p.endswith(('/scale', '/bias')) for p in default)


def test_include_and_exclude_regexes():
  params = _params()
  mlp = core.select(params, include=r'mlp/.*/kernel$')
  assert list(mlp) == _in_tree_order(params, [p for p in BLOCK_KERNELS if '/mlp/' in p])
  later = core.select(params, exclude=r'layers/0/')
  assert list(later) == _in_tree_order(params, [p for p in BLOCK_KERNELS if p.startswith('layers/1/')])
  several = core.select(params, include=[r'q_proj/kernel$', r'down_proj/kernel$'], exclude=[r'^layers/1/', 'xyz'])
  assert list(several) == ['layers/0/attn/q_proj/kernel', 'layers/0/mlp/down_proj/kernel']
  assert list(core.select(params, include=r'no_such_weight')) == []


def test_rules_are_frozen_and_select_by_agrees():
  params = _params()
  rules = core.Rules(include=r'attn/.*kernel$', head=True)
  with pytest.raises(dataclasses.FrozenInstanceError):
    rules.head = False  # type: ignore[misc]
  sel = core.select_by(params, rules)
  assert sel == core.select(params, include=r'attn/.*kernel$', head=True)
  assert list(sel) == _in_tree_order(params, [p for p in BLOCK_KERNELS if '/attn/' in p])
  assert rules.matches('layers/3/attn/q_proj/kernel')
  assert not rules.matches('_shared/attn/kernel')
  assert not core.Rules().matches('lm_head/kernel') and core.Rules(head=True).matches('lm_head/kernel')
  assert not core.Rules().matches('embed/tokens/embedding')
  assert core.Rules(embeddings=True).matches('embed/tokens/embedding')


@pytest.mark.parametrize('kwargs', [dict(include='mlp/(kernel'), dict(exclude=['ok', '[unclosed'])])
def test_invalid_regex_is_a_value_error_naming_the_pattern(kwargs):
  with pytest.raises(ValueError, match='not a valid regular expression') as info:
    core.select(_params(), **kwargs)
  bad = kwargs.get('include') or kwargs['exclude'][1]
  assert repr(bad) in str(info.value)


def test_invalid_exclude_is_reported_even_when_nothing_is_included():
  with pytest.raises(ValueError, match='regular expression'):
    core.select(_params(), include='no_such_weight', exclude='[unclosed')


def test_assert_count():
  sel = core.select(_params())
  assert sel.assert_count(8) is sel
  with pytest.raises(AssertionError) as info:
    sel.assert_count(3)
  message = str(info.value)
  assert 'expected 3' in message and 'has 8' in message
  assert all(p in message for p in BLOCK_KERNELS)


def test_map_touches_only_selected_weights():
  params = _params()
  sel = core.select(params, include=r'mlp/down_proj/kernel$')
  seen = []

  def mark(path, w):
    seen.append(path)
    return jnp.ones(core.shape_of(w))

  out = sel.map(mark, params)
  assert seen == list(sel) == ['layers/0/mlp/down_proj/kernel', 'layers/1/mlp/down_proj/kernel']
  before, after = core.flatten(params), core.flatten(out)
  assert list(before) == list(after)
  for path, w in after.items():
    if path in sel:
      np.testing.assert_array_equal(np.asarray(w), np.ones((H, D)))
    else:
      assert w is before[path]


def test_map_hands_compressed_weights_whole():
  params = _params()
  sel = core.select(params, include=r'o_proj/kernel$')
  got = {}
  sel.map(lambda p, w: got.setdefault(p, w), params)
  assert isinstance(got['layers/0/attn/o_proj/kernel'], core.Masked)
  assert set(sel.get(params)) == set(sel)
  assert sel.get(params)['layers/0/attn/o_proj/kernel'] is got['layers/0/attn/o_proj/kernel']


def test_repr_lists_paths_kinds_and_shapes():
  sel = core.select(_params())
  text = repr(sel)
  lines = text.splitlines()
  assert lines[0] == 'Selection(8 weights)'
  assert len(lines) == 9
  for line, path, kind, shape in zip(lines[1:], sel.paths, sel.kinds, sel.shapes):
    assert path in line and kind in line and str(list(shape)) in line
  assert repr(core.select(_params(), include='nothing_here')) == 'Selection(0 weights)'


def test_selection_container_protocol():
  sel = core.select(_params())
  assert 'layers/1/attn/q_proj/kernel' in sel and 'lm_head/kernel' not in sel
  assert len(sel) == len(list(iter(sel))) == 8


def test_heads_come_from_the_caller():
  params = _params()
  # A model whose only head is the pooler: lm_head and mlm_head kernels are ordinary kernels to it.
  sel = core.select(params, include='.*kernel$', heads=r'^pooler/')
  assert 'lm_head/kernel' in sel and 'mlm_head/transform/kernel' in sel and 'pooler/dense/kernel' not in sel
  assert 'pooler/dense/kernel' in core.select(params, heads=[r'^pooler/'], head=True)
  assert core.Rules(heads=()).matches('lm_head/kernel')
  with pytest.raises(ValueError, match='not a valid regular expression'):
    core.select(params, heads='(')


def test_map_over_shared_places_transforms_the_storage_once():
  params = _params()
  sel = core.select(params, include=r'up_proj/kernel$')
  assert list(sel) == ['layers/0/mlp/up_proj/kernel', 'layers/1/mlp/up_proj/kernel']
  seen = []

  def double(path, w):
    seen.append(path)
    return core.Masked(2 * w, jnp.ones(core.shape_of(w), bool))

  out = sel.map(double, params)
  assert seen == ['layers/0/mlp/up_proj/kernel']  # once, with the first place's path
  storage = out[core.SHARED]['kernel']
  assert isinstance(storage, core.Masked)
  for i in (0, 1):
    ref = out['layers'][i]['mlp']['up_proj']['kernel']
    assert isinstance(ref, core.Shared) and ref.name == 'kernel'
  np.testing.assert_array_equal(np.asarray(core.materialize(storage)), 2 * np.asarray(params[core.SHARED]['kernel']))
  resolved = core.resolve(out)
  np.testing.assert_array_equal(np.asarray(core.materialize(resolved['layers'][1]['mlp']['up_proj']['kernel'])),
                                2 * np.asarray(params[core.SHARED]['kernel']))


def test_map_over_some_places_of_a_shared_storage_is_an_error():
  params = _params()
  sel = core.select(params, include=r'up_proj/kernel$', exclude=r'^layers/0/')
  with pytest.raises(ValueError, match="leaves out \\['layers/0/mlp/up_proj/kernel'\\]"):
    sel.map(lambda p, w: w, params)
