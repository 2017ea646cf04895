"""`core.stats`: per-weight counts, totals and the summary table against hand computation."""

from __future__ import annotations

import math
import re

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import core
from jaxcompress.core import stats

IN, OUT, RANK = 64, 8, 3
SIZE = IN * OUT


def _normal(seed: int, shape: tuple[int, ...]) -> jnp.ndarray:
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _away_from_zero(seed: int, shape: tuple[int, ...], zero_every: int = 0) -> np.ndarray:
  """Values in ±[1, 2] (never rounded to zero by a 3+ bit min-max grid), with every k-th entry exactly zero."""
  rng = np.random.default_rng(seed)
  w = rng.choice([-1.0, 1.0], size=shape) * rng.uniform(1, 2, size=shape)
  if zero_every:
    w.reshape(-1)[::zero_every] = 0.0
  return w.astype(np.float32)


def test_dense_counts():
  params = {'layers': {0: {'attn': {'kernel': _normal(0, (IN, OUT)), 'bias': _normal(1, (OUT,))}}},
            'embed': {'embedding': jnp.asarray(np.zeros((7, IN), np.float32)).at[0, 0].set(1.0)}}
  counts = stats.leaf_counts(params)
  assert list(counts) == ['embed/embedding', 'layers/0/attn/bias', 'layers/0/attn/kernel']
  assert counts['layers/0/attn/kernel'] == stats.Counts(params=SIZE, nonzero=SIZE, stored=SIZE, memory=4 * SIZE,
                                                        disk=4 * SIZE, flops=2 * SIZE)
  assert counts['layers/0/attn/bias'] == stats.Counts(OUT, OUT, OUT, 4 * OUT, 4 * OUT, 0)
  # Embeddings do no matmul; only the one non-zero entry counts as non-zero.
  assert counts['embed/embedding'] == stats.Counts(7 * IN, 1, 7 * IN, 4 * 7 * IN, 4 * 7 * IN, 0)
  assert counts['layers/0/attn/kernel'].bits_per_weight == 32.0
  total = stats.totals(params)
  assert total.params == SIZE + OUT + 7 * IN
  assert total.disk == 4 * (SIZE + OUT + 7 * IN)
  assert total.flops == 2 * SIZE


def test_masked_counts_and_sparsity():
  mask = (np.arange(SIZE).reshape(IN, OUT) % 4) == 0
  kept = SIZE // 4
  w = core.Masked(_normal(2, (IN, OUT)), jnp.asarray(mask))
  c = stats.leaf_counts({'mlp': {'kernel': w}})['mlp/kernel']
  assert c == stats.Counts(params=SIZE, nonzero=kept, stored=kept, memory=4 * SIZE + SIZE,
                           disk=4 * kept + SIZE // 8, flops=2 * kept)
  assert c.sparsity == pytest.approx(0.75)
  assert c.bits_per_weight == pytest.approx(8 * (4 * kept + SIZE / 8) / SIZE)


@pytest.mark.parametrize('bits, group_size, symmetric, scale_dtype, side_bits', [
    (4, 16, False, jnp.float32, 64),  # float32 scale and zero per group
    (3, 16, False, jnp.float32, 64),
    (4, 16, True, jnp.float32, 32),  # scale only
    (8, 32, True, jnp.bfloat16, 16),
    (2, None, False, jnp.float16, 32),
])
def test_quantized_bits_per_weight_is_bits_plus_scale_overhead(bits, group_size, symmetric, scale_dtype,
                                                               side_bits):
  w = _away_from_zero(3, (IN, OUT), zero_every=5)
  qw = core.quantize(jnp.asarray(w), bits=bits, group_size=group_size, symmetric=symmetric,
                     scale_dtype=scale_dtype)
  c = stats.leaf_counts({'q': {'kernel': qw}})['q/kernel']
  gs = IN if group_size is None else group_size
  side_bytes = SIZE // gs * side_bits // 8
  assert c.params == SIZE and c.stored == SIZE and c.flops == 2 * SIZE
  assert c.disk == math.ceil(SIZE * bits / 8) + side_bytes
  assert c.bits_per_weight == pytest.approx(bits + side_bits / gs)
  if bits >= 3:  # a grid this fine keeps every |w| >= 1 away from zero, and exact zeros stay zero
    assert c.nonzero == int(np.count_nonzero(w))


def test_lowrank_counts():
  lr = core.LowRank(_normal(4, (IN, RANK)), _normal(5, (RANK, OUT)))
  c = stats.leaf_counts({'proj': {'kernel': lr}})['proj/kernel']
  stored = RANK * (IN + OUT)
  assert c == stats.Counts(params=SIZE, nonzero=SIZE, stored=stored, memory=4 * stored, disk=4 * stored,
                           flops=2 * RANK * (IN + OUT))


def test_shared_storage_counts_once_and_each_use_counts_params():
  params = {'layers': {i: {'up': {'kernel': _normal(6 + i, (IN, OUT))}} for i in range(3)}}
  tied = core.tie(params, ['layers/0/up/kernel', 'layers/1/up/kernel', 'layers/2/up/kernel'], name='up')
  counts = stats.leaf_counts(tied)
  assert counts['_shared/up'] == stats.Counts(params=0, nonzero=0, stored=SIZE, memory=4 * SIZE, disk=4 * SIZE,
                                              flops=0)
  for i in range(3):
    assert counts[f'layers/{i}/up/kernel'] == stats.Counts(params=SIZE, nonzero=SIZE, stored=0, memory=0, disk=0,
                                                           flops=2 * SIZE)
  total, untied = stats.totals(tied), stats.totals(params)
  assert (total.params, total.nonzero, total.flops) == (untied.params, untied.nonzero, untied.flops)
  assert (total.stored, total.disk, total.memory) == (SIZE, 4 * SIZE, 4 * SIZE)
  assert (untied.stored, untied.disk) == (3 * SIZE, 12 * SIZE)
  s = stats.summary(tied, baseline=params)
  assert s.compression == pytest.approx(3.0)


def _model(layer_keys) -> dict:
  mask = jnp.asarray((np.arange(SIZE).reshape(IN, OUT) % 2) == 0)
  return {
      'embed': {'embedding': _normal(10, (5, IN))},
      'layers': {k: {'attn': {'kernel': core.Masked(_normal(11, (IN, OUT)), mask)},
                     'mlp': {'kernel': core.quantize(_normal(12, (IN, OUT)), bits=4, group_size=16)}}
                 for k in layer_keys},
      'final_norm': {'scale': jnp.ones((OUT,))},
  }


def _dense(params: dict) -> dict:
  return core.materialize_tree(params)


def test_summary_by_block_weight_and_total():
  params = _model((0, 1))
  counts = stats.leaf_counts(params)
  by_block = stats.summary(params)
  assert list(by_block.rows) == ['embed', 'final_norm', 'layers/0', 'layers/1']
  for i in (0, 1):
    assert by_block.rows[f'layers/{i}'] == counts[f'layers/{i}/attn/kernel'] + counts[f'layers/{i}/mlp/kernel']
  assert by_block.total == stats.totals(params)
  by_weight = stats.summary(params, by='weight')
  assert by_weight.rows == counts and by_weight.total == by_block.total
  by_total = stats.summary(params, by='total')
  assert list(by_total.rows.values()) == [by_block.total]
  assert by_block.baseline is None and by_block.compression is None


def test_summary_compression_against_baseline():
  params = _model((0, 1))
  baseline = _dense(params)
  s = stats.summary(params, baseline=baseline)
  # Baseline: float32 everywhere. Compressed: half the attention values plus a bitmap, 4-bit mlp codes + scales.
  dense_bytes = 4 * (5 * IN + 2 * 2 * SIZE + OUT)
  compressed = 4 * (5 * IN + OUT) + 2 * ((4 * SIZE // 2 + SIZE // 8) + (SIZE // 2 + 2 * (IN // 16) * OUT * 4))
  assert s.baseline.disk == dense_bytes and s.total.disk == compressed
  assert s.compression == pytest.approx(dense_bytes / compressed)
  text = str(s)
  assert f'{dense_bytes / compressed:.2f}x' in text
  assert s.as_dict()['compression'] == pytest.approx(dense_bytes / compressed)


def test_summary_extra_flops():
  params = _model((0,))
  s = stats.summary(params, baseline=_dense(params), extra_flops={'attention': 1000})
  assert s.rows['attention'] == stats.Counts(flops=1000)
  assert s.total.flops == stats.totals(params).flops + 1000
  assert s.baseline.flops == stats.totals(_dense(params)).flops + 1000


def test_summary_rejects_unknown_grouping():
  with pytest.raises(ValueError, match='by='):
    stats.summary(_model((0,)), by='layer')


def _row_names(text: str) -> list[str]:
  return [line.split()[0] for line in text.splitlines() if re.match(r'^layers/\d+\s', line)]


@pytest.mark.parametrize('keys', [(0, 1, 2, 10, 11), ('0', '1', '2', '10', '11')])
def test_summary_table_has_a_row_per_layer_in_natural_order(keys):
  text = str(stats.summary(_model(keys)))
  assert _row_names(text) == ['layers/0', 'layers/1', 'layers/2', 'layers/10', 'layers/11']
  lines = text.splitlines()
  assert lines[0].split()[:2] == ['group', 'params']
  assert any(line.startswith('total ') for line in lines)


def test_summary_by_weight_keeps_layer_major_order():
  rows = list(stats.summary(_model((0, 1, 2, 10)), by='weight').rows)
  layers = [f'layers/{i}/{m}/kernel' for i in (0, 1, 2, 10) for m in ('attn', 'mlp')]
  assert rows == ['embed/embedding', 'final_norm/scale'] + layers  # tree order, with 10 after 2


def test_group_of():
  assert stats.group_of('layers/3/attn/q_proj/kernel') == 'layers/3'
  assert stats.group_of('embed/tokens/embedding') == 'embed'
  assert stats.group_of('encoder/layers/12/mlp/kernel') == 'encoder/layers/12'
  assert stats.group_of('_shared/up') == '_shared'


def test_counts_properties():
  c = stats.Counts(params=100, nonzero=25, stored=25, memory=400, disk=150, flops=50)
  assert c.bits_per_weight == 12.0 and c.sparsity == 0.75
  assert (c + c) == stats.Counts(200, 50, 50, 800, 300, 100)
  assert stats.Counts().bits_per_weight == 0.0 and stats.Counts().sparsity == 0.0
  assert c.as_dict()['bits_per_weight'] == 12.0
