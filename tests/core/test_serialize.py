"""`core.serialize`: compact safetensors round trips, byte accounting and damaged files."""

from __future__ import annotations

import hashlib
import json
import dataclasses
import os
import weakref

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save as save_bytes, save_file

from jaxcompress import core
from jaxcompress.core import serialize, stats

IN, OUT, RANK = 64, 8, 3


def _normal(seed: int, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _mask(seed: int, shape: tuple[int, ...]) -> jax.Array:
  return jnp.asarray(np.random.default_rng(100 + seed).uniform(size=shape) < 0.3)


def _every_kind() -> dict:
  """A tree with int layer keys holding every leaf kind and the awkward formats."""
  params = {
      'embed': {'embedding': _normal(0, (7, IN), jnp.bfloat16)},
      'layers': {
          0: {'attn': {'kernel': core.Masked(_normal(1, (IN, OUT)), _mask(1, (IN, OUT))),
                       'bias': _normal(2, (OUT,), jnp.bfloat16)},
              'mlp': {'kernel': core.Masked(core.quantize(_normal(3, (IN, OUT)), bits=4, group_size=16),
                                            _mask(3, (IN, OUT)))},
              'up': {'kernel': _normal(4, (IN, OUT))}},
          1: {'attn': {'kernel': core.LowRank(core.quantize(_normal(5, (IN, RANK)), bits=3, group_size=16),
                                              core.quantize(_normal(6, (RANK, OUT)), fmt='fp8', group_size=None))},
              'mlp': {'kernel': core.quantize(_normal(7, (IN, OUT), jnp.bfloat16), bits=2, group_size=8)},
              'up': {'kernel': _normal(8, (IN, OUT))}},
          2: {'attn': {'kernel': core.Masked(_normal(9, (IN, OUT), jnp.bfloat16), _mask(9, (1, OUT)))},
              'mlp': {'kernel': core.quantize(_normal(10, (IN, OUT)), fmt='nf4', group_size=None, pack=False)},
              'up': {'kernel': core.quantize(_normal(11, (IN, OUT)), bits=3, group_size=None, symmetric=True)}},
      },
      'head': {'kernel': core.quantize(_normal(12, (IN, 5)), fmt='fp8', group_size=16)},
      'codebook': {'kernel': core.Quantized(
          codes=jnp.asarray(np.random.default_rng(13).integers(0, 8, size=(IN, OUT)), jnp.uint8), scale=None,
          codebook=_normal(14, (OUT, 8)), bits=3, fmt='codebook', logical_shape=(IN, OUT))},
      'norm': {'scale': jnp.ones((IN,), jnp.bfloat16)},
      # act-order groups: each input's group given by g_idx (GPTQ with static_groups=False)
      'act_order': {'kernel': dataclasses.replace(
          core.quantize(_normal(15, (IN, OUT)), bits=4, group_size=16, symmetric=False),
          g_idx=jnp.asarray(np.random.default_rng(15).permutation(IN).astype(np.int32) // 16))},
  }
  return core.tie(params, ['layers/0/up/kernel', 'layers/1/up/kernel'], name='up')


def _canonical(tree: dict) -> dict:
  """Masked plain values with their dropped entries zeroed, as the file stores them."""

  def canon(w):
    if isinstance(w, core.Masked) and not core.is_compressed(w.value):
      return core.Masked(jnp.where(w.mask, w.value, 0).astype(w.value.dtype), w.mask)
    return w

  return jax.tree.map(canon, tree, is_leaf=core.is_weight_leaf)


@pytest.fixture(scope='module')
def params() -> dict:
  return _every_kind()


def test_round_trip_preserves_structure_and_values(params, tmp_path):
  path = tmp_path / 'model.jc.safetensors'
  serialize.save(path, params, metadata={'step': 3})
  back = serialize.load(path)
  # Same tree structure (int layer keys included), same static formats, same dtypes.
  assert jax.tree.structure(back) == jax.tree.structure(params)
  assert list(back['layers']) == [0, 1, 2]
  chex.assert_trees_all_equal_dtypes(back, params)
  chex.assert_trees_all_equal_shapes(back, params)
  chex.assert_trees_all_equal(core.materialize_tree(core.resolve(back)),
                              core.materialize_tree(core.resolve(params)))
  # The stored arrays come back bit for bit (packed codes re-packed, fp8 codes as fp8), except that a masked
  # plain value keeps only its kept entries.
  chex.assert_trees_all_equal(_canonical(back), _canonical(params))
  assert isinstance(back['layers'][1]['up']['kernel'], core.Shared)
  assert serialize.user_metadata(path) == {'step': 3}
  assert sorted(os.listdir(tmp_path)) == ['model.jc.safetensors']


def test_returned_bytes_equal_stats_disk_and_tensors_in_file(params, tmp_path):
  path = tmp_path / 'model.jc.safetensors'
  written = serialize.save(path, params)
  assert written == stats.totals(params).disk
  with safe_open(str(path), 'numpy') as f:
    in_file = sum(f.get_tensor(k).nbytes for k in f.keys())
  assert written == in_file
  # Compressed on disk: well under the bytes of the dense float32 arrays it stands for.
  assert written < stats.totals(core.materialize_tree(core.resolve(params))).disk / 2


def test_per_leaf_disk_bytes_match_file(params, tmp_path):
  counts = stats.leaf_counts(params)
  path = tmp_path / 'model.jc.safetensors'
  serialize.save(path, params)
  with safe_open(str(path), 'numpy') as f:
    per_leaf: dict[str, int] = {}
    for k in f.keys():
      leaf = k.split('.')[0]
      per_leaf[leaf] = per_leaf.get(leaf, 0) + f.get_tensor(k).nbytes
  for leaf_path, c in counts.items():
    assert per_leaf.get(leaf_path, 0) == c.disk, leaf_path


@pytest.mark.parametrize('bits', range(1, 9))
def test_pack_bits_is_the_little_endian_bit_stream_and_round_trips(bits):
  for n in (0, 1, 7, 8, 9, 37, 1000):
    codes = np.random.default_rng(bits).integers(0, 2 ** bits, size=n, dtype=np.uint8)
    data = serialize.pack_bits(codes, bits)
    assert data.dtype == np.uint8 and data.size == -(-n * bits // 8)
    # the stream by its definition: bit b of code i is stream bit i·bits + b, stream bit k is bit k % 8 of byte k // 8
    planes = (codes[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    np.testing.assert_array_equal(data, np.packbits(planes.reshape(-1), bitorder='little'), err_msg=f'n={n}')
    np.testing.assert_array_equal(serialize.unpack_bits(data, bits, n), codes, err_msg=f'n={n}')


def test_round_trip_keeps_list_containers(tmp_path):
  params = {'blocks': [{'kernel': jnp.ones((2, 2))}, {'kernel': jnp.zeros((2, 2))}]}
  path = tmp_path / 'list.jc.safetensors'
  serialize.save(path, params)
  assert jax.tree.structure(serialize.load(path)) == jax.tree.structure(params)


def test_truncated_file_raises_value_error(params, tmp_path):
  path = tmp_path / 'model.jc.safetensors'
  serialize.save(path, params)
  data = path.read_bytes()
  for cut in (len(data) - 3, len(data) // 2, 16, 4):
    bad = tmp_path / f'cut{cut}.safetensors'
    bad.write_bytes(data[:cut])
    with pytest.raises(ValueError, match='truncated'):
      serialize.load(bad)


def test_foreign_safetensors_file_raises_value_error(tmp_path):
  plain = tmp_path / 'hf.safetensors'
  save_file({'weight': np.ones((2, 2), np.float32)}, str(plain))
  with pytest.raises(ValueError, match='format'):
    serialize.load(plain)
  other = tmp_path / 'other.safetensors'
  save_file({'weight': np.ones((2, 2), np.float32)}, str(other), metadata={'format': 'pt'})
  with pytest.raises(ValueError, match="'pt'"):
    serialize.load(other)


def test_missing_file_raises_value_error(tmp_path):
  with pytest.raises(ValueError, match='not a readable safetensors file'):
    serialize.load(tmp_path / 'absent.safetensors')


def test_overwrite_leaves_no_temporary_file(tmp_path):
  path = tmp_path / 'w.jc.safetensors'
  first = {'a': {'kernel': jnp.ones((4, 4))}}
  second = {'a': {'kernel': core.Masked(jnp.full((4, 4), 2.0), jnp.eye(4, dtype=bool))}}
  serialize.save(path, first)
  serialize.save(path, second)
  assert sorted(os.listdir(tmp_path)) == ['w.jc.safetensors']
  back = serialize.load(path)
  np.testing.assert_array_equal(np.asarray(core.materialize(back['a']['kernel'])), 2.0 * np.eye(4))


def test_equal_params_give_equal_bytes(params, tmp_path):
  # The safetensors writer orders header metadata differently from call to call; `save` fixes the order.
  digests = set()
  for i in range(6):
    path = tmp_path / f'p{i}.safetensors'
    serialize.save(path, params, metadata={'b': 1, 'a': 2, 'c': [3]})
    digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
  assert len(digests) == 1
  assert serialize.user_metadata(tmp_path / 'p0.safetensors') == {'b': 1, 'a': 2, 'c': [3]}


def test_bytes_round_trip_equals_the_file_round_trip(params, tmp_path):
  path = tmp_path / 'p.safetensors'
  serialize.save(path, params)
  chex.assert_trees_all_equal(_canonical(serialize.loads(serialize.dumps(params))), _canonical(serialize.load(path)))
  with pytest.raises(ValueError, match='format'):
    serialize.loads(save_bytes({'x': np.zeros(2, np.float32)}))


def _edit_header(path, edit) -> None:
  """Rewrites the safetensors header of `path` in place: edit(header dict), padded to its old length."""
  data = path.read_bytes()
  n = int.from_bytes(data[:8], 'little')
  header = json.loads(data[8:8 + n])
  edit(header)
  text = json.dumps(header, separators=(',', ':'), ensure_ascii=False).encode()
  assert len(text) <= n
  path.write_bytes(data[:8] + text.ljust(n) + data[8 + n:])


def test_a_flipped_byte_inside_a_tensor_is_an_error_naming_the_file_and_tensor(params, tmp_path):
  path = tmp_path / 'model.jc.safetensors'
  serialize.save(path, params)
  data = bytearray(path.read_bytes())
  n = int.from_bytes(data[:8], 'little')
  name = 'layers/1/mlp/kernel.codes'  # the packed 2-bit codes of one kernel
  data[8 + n + json.loads(data[8:8 + n])[name]['data_offsets'][1] - 1] ^= 0x01
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match=rf"'{path}': tensor '{name}' does not match its recorded sha256"):
    serialize.load(path)


def test_a_header_edit_to_a_shape_or_the_tree_is_an_error(params, tmp_path):
  path = tmp_path / 'model.jc.safetensors'
  serialize.save(path, params)
  original = path.read_bytes()
  # the same bytes read with another shape
  _edit_header(path, lambda h: h['layers/0/attn/bias'].update(shape=[1, OUT]))
  with pytest.raises(ValueError, match=r"tensor 'layers/0/attn/bias' does not match its recorded sha256"):
    serialize.load(path)
  # a leaf format edited in the tree description (2 bits read as 3)
  path.write_bytes(original)

  def bits(h):
    h['__metadata__']['tree'] = h['__metadata__']['tree'].replace('"bits": 2', '"bits": 3')

  _edit_header(path, bits)
  with pytest.raises(ValueError, match='tree description in its header does not match its recorded sha256'):
    serialize.load(path)


def test_a_damaged_header_is_a_value_error_also_for_user_metadata(params, tmp_path):
  path = tmp_path / 'model.jc.safetensors'
  serialize.save(path, params, metadata={'step': 1})
  data = path.read_bytes()
  path.write_bytes(data[:8] + b'{' * 4 + data[12:])  # the header's JSON broken
  for read in (serialize.load, serialize.user_metadata):
    with pytest.raises(ValueError, match=rf"'{path}' is not a readable safetensors file .*header damaged"):
      read(path)


def test_files_written_before_checksums_still_load_unchecked(params, tmp_path):
  path = tmp_path / 'old.jc.safetensors'
  tensors = {}
  header = serialize._header(serialize._encode_part(params, tensors), None, {})
  del header[serialize.CHECKSUMS], header[serialize.TREE_CHECKSUM]
  save_file(tensors, str(path), metadata=header)
  chex.assert_trees_all_equal(_canonical(serialize.load(path)), _canonical(params))
  new = tmp_path / 'new.jc.safetensors'
  serialize.save(new, params)
  assert serialize.CHECKSUMS in (safe_open(str(new), 'numpy').metadata() or {})


def _parts(params: dict) -> list:
  """params as loaders of its parts, as an out-of-core compression gives them: everything but the layers, then
  one layer at a time ({'layers': {i: layer}})."""
  rest = {k: v for k, v in params.items() if k != 'layers'}
  return [lambda: rest] + [lambda i=i: {'layers': {i: params['layers'][i]}} for i in params['layers']]


def test_a_tree_written_in_parts_has_the_bytes_of_the_whole(params, tmp_path):
  whole = tmp_path / 'whole.jxc'
  written = serialize.save(whole, params, metadata={'recipe': 'gptq'})
  for name, parts in (('parts.jxc', _parts(params)), ('reversed.jxc', _parts(params)[::-1])):
    assert serialize.save_parts(tmp_path / name, parts, metadata={'recipe': 'gptq'}) == written
    assert (tmp_path / name).read_bytes() == whole.read_bytes(), name
  chex.assert_trees_all_equal(_canonical(serialize.load(tmp_path / 'parts.jxc')), _canonical(params))
  assert sorted(os.listdir(tmp_path)) == ['parts.jxc', 'reversed.jxc', 'whole.jxc']  # no scratch file left
  # a plain safetensors file: every tensor starts aligned to its element size, right after an 8-aligned header
  n = int.from_bytes(whole.read_bytes()[:8], 'little')
  header = json.loads(whole.read_bytes()[8:8 + n])
  assert n % 8 == 0 and header.pop('__metadata__')['format'] == serialize.FORMAT
  for name, entry in header.items():
    assert entry['data_offsets'][0] % np.dtype(serialize.DTYPES[entry['dtype']]).itemsize == 0, name


def test_parts_are_loaded_one_at_a_time(tmp_path):
  alive = []

  def part(i):
    def load():
      assert all(ref() is None for ref in alive), f'part {i} loaded while an earlier part is still in memory'
      a = np.full((8, 4), i, np.float32)
      alive.append(weakref.ref(a))
      return {'layers': {i: {'kernel': a}}}
    return load

  serialize.save_parts(tmp_path / 'p.jxc', [part(i) for i in range(3)])
  back = serialize.load(tmp_path / 'p.jxc')
  assert [float(back['layers'][i]['kernel'][0, 0]) for i in range(3)] == [0.0, 1.0, 2.0]


def test_overlapping_parts_a_failing_part_or_a_bad_dtype_leave_the_file_as_it_was(tmp_path):
  path = tmp_path / 'p.jxc'
  serialize.save(path, {'a': jnp.ones(3)})
  before = path.read_bytes()
  twice = lambda: {'layers': {0: {'kernel': np.ones((2, 2), np.float32)}}}
  with pytest.raises(ValueError, match="tensor 'layers/0/kernel' is in two parts .*exactly one part"):
    serialize.save_parts(path, [twice, twice])

  def fails():
    raise OSError('the block file is unreadable')

  with pytest.raises(OSError, match='unreadable'):
    serialize.save_parts(path, [lambda: {'a': np.ones(2, np.float32)}, fails])
  with pytest.raises(TypeError, match="tensor 'c' has dtype complex64.*supported"):
    serialize.save(path, {'c': np.ones(2, np.complex64)})
  assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ['p.jxc']
