"""GPTQ export and import: a NumPy float64 reading of the layout (bit streams unpacked with Python integers, the
v1 zero-point offset, g_idx) gives our `materialize()` exactly and, loaded dense into transformers, our logits;
`from_pretrained` gives back the same codes, scales and zero points; what the layout cannot hold is refused.

GPTQModel itself is not a test extra: its CPU wheel (7.7) pulls torch 2.14 and the CUDA 13 runtime wheels."""

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxcompress import core, models
from jaxcompress.models import gptq_format
from tests.models.quantized_leaves import assert_same_leaves, quantize_kernels, random_leaf
from tests.reference_models import relative_error as rel_err

VOCAB = 64
# Every Linear a multiple of 32 wide (the layout packs along both axes): q/o 64, k/v 32, MLP 96.
MODEL = models.Llama(models.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2,
                                        num_heads=4, num_kv_heads=2, max_position_embeddings=32))
TOKENS = np.random.RandomState(0).randint(0, VOCAB, (2, 10))


@pytest.fixture(scope='module')
def params():
  rng = np.random.RandomState(0)
  return jax.tree.map(lambda s: jnp.asarray((0.05 * rng.randn(*s.shape)).astype(s.dtype)), MODEL.abstract_params())


# name: (kernel scheme by path, checkpoint_format). v1 cannot store a zero point of 0, so its asymmetric leaves
# draw zero points from [1, 2**bits).
SCHEMES = {
    'w4_g32_sym_v1': (lambda p: None if 'lm_head' in p else dict(bits=4, group_size=32), 'gptq'),
    'w3_g32_asym_v2': (lambda p: dict(bits=3, group_size=32, symmetric=False), 'gptq_v2'),
    # mixed: the attention's w8 per channel asymmetric are `dynamic` overrides of the MLP's w2 g16, lm_head dense
    'mixed_w8_channel_asym_w2_g16_v1': (lambda p: (None if 'lm_head' in p else
                                                   dict(bits=8, symmetric=False, zero_low=1) if 'attn' in p else
                                                   dict(bits=2, group_size=16)), 'gptq'),
    # act-order groups (GPTQ's static_groups=False): each Linear's own g_idx, desc_act in the config
    'w4_g16_act_order_asym_v2': (lambda p: dict(bits=4, group_size=16, symmetric=False, act_order=True), 'gptq_v2'),
}


def reference_unpack(words: np.ndarray, bits: int, count: int) -> np.ndarray:
  """int32 [n, w] -> int64 [n, count]: row r's words joined little-endian into one integer, code i its bits
  i*bits ... i*bits+bits-1 (the GPTQ layout, 3-bit codes straddling words included)."""
  out = np.zeros((words.shape[0], count), np.int64)
  for r, row in enumerate(words):
    stream = sum((int(w) & 0xFFFFFFFF) << (32 * k) for k, w in enumerate(row))
    out[r] = [(stream >> (i * bits)) & ((1 << bits) - 1) for i in range(count)]
  return out


def reference_weights(path) -> dict[str, np.ndarray]:
  """{module.weight: dense float64 [out, in]} of every GPTQ Linear in checkpoint `path`, from the tensors and
  config alone: w[i, o] = scales[g_idx[i], o] * (q[i, o] - z[g_idx[i], o]), z stored minus 1 in v1."""
  q = json.loads((path / 'config.json').read_text())['quantization_config']
  tensors = load_file(str(path / 'model.safetensors'))
  dense = {}
  for name in [n for n in tensors if n.endswith('.qweight')]:
    m = name.removesuffix('.qweight')
    # GPTQModel's `dynamic`: the first pattern that re.match-es the module name overrides the config's fields
    overrides = next((o for pat, o in (q['dynamic'] or {}).items()
                      if re.match(pat[2:] if pat[:2] in ('+:', '-:') else pat, m)), {})
    bits = overrides.get('bits', q['bits'])
    qweight, qzeros, scales, g_idx = (tensors[f'{m}.{t}'] for t in ('qweight', 'qzeros', 'scales', 'g_idx'))
    n_in, n_out = g_idx.shape[0], scales.shape[1]
    codes = reference_unpack(qweight.T, bits, n_in).T  # [in, out]
    zeros = reference_unpack(qzeros, bits, n_out) + (1 if q['checkpoint_format'] == 'gptq' else 0)
    w = scales.astype(np.float64)[g_idx] * (codes - zeros[g_idx])
    dense[f'{m}.weight'] = w.T
  return dense


@pytest.mark.parametrize('bits', range(1, 9))
def test_int32_packing_is_each_rows_little_endian_stream(bits):
  """`packed.pack_int32` against the Python-integer reading, on widths whose streams end inside a word."""
  from jaxcompress.models import packed
  rng = np.random.default_rng(bits)
  for rows, cols in ((1, 1), (3, 5), (2, 31), (4, 32), (5, 33), (3, 100)):
    codes = rng.integers(0, 2 ** bits, size=(rows, cols), dtype=np.uint8)
    words = packed.pack_int32(codes, bits)
    assert words.dtype == np.int32 and words.shape == (rows, -(-cols * bits // 32))
    np.testing.assert_array_equal(reference_unpack(words, bits, cols), codes, err_msg=f'{rows}x{cols}')
    tail = [(int(row[-1]) & 0xFFFFFFFF) >> (cols * bits - 32 * (words.shape[1] - 1)) for row in words]
    assert tail == [0] * rows  # the last word's unused bits are zero
    np.testing.assert_array_equal(packed.unpack_int32(words, bits, cols), codes, err_msg=f'{rows}x{cols}')


@pytest.mark.parametrize('name', sorted(SCHEMES))
def test_reference_reading_equals_materialize_and_round_trip(name, params, tmp_path):
  scheme, fmt = SCHEMES[name]
  qparams = quantize_kernels(params, scheme)
  gptq_format.export(MODEL, qparams, tmp_path, checkpoint_format=fmt)
  cfg = json.loads((tmp_path / 'config.json').read_text())['quantization_config']
  assert (cfg['quant_method'], cfg['checkpoint_format'], cfg['desc_act']) == ('gptq', fmt, 'act_order' in name)
  flat = core.flatten(qparams)
  dense = core.flatten(jax.jit(core.materialize_tree)(qparams))  # each leaf's materialize(), one compile
  ref = reference_weights(tmp_path)
  assert len(ref) == sum(isinstance(w, core.Quantized) for w in flat.values())
  for row in MODEL.hf_table():
    if isinstance(flat[row.ours[0]], core.Quantized):
      ours = np.asarray(dense[row.ours[0]]).T
      np.testing.assert_array_equal(ref[row.hf].astype(np.float32), ours, err_msg=row.hf)
  _, loaded = models.from_pretrained(tmp_path)
  assert_same_leaves(qparams, loaded)


def test_reference_weights_in_transformers_give_our_logits(params, tmp_path):
  """The dense weights a GPTQ reader computes from the export, in transformers' Llama, give our logits of the
  compressed leaves (names, transposes and the rest of the checkpoint agree)."""
  torch = pytest.importorskip('torch')
  import transformers
  qparams = quantize_kernels(params, SCHEMES['mixed_w8_channel_asym_w2_g16_v1'][0])
  gptq_format.export(MODEL, qparams, tmp_path)
  state = {n: t for n, t in load_file(str(tmp_path / 'model.safetensors')).items()
           if not n.endswith(gptq_format.TENSORS)}
  state.update(reference_weights(tmp_path))
  ref = transformers.LlamaForCausalLM(MODEL.hf_config()).eval()
  ref.load_state_dict({n: torch.tensor(np.asarray(t, np.float32)) for n, t in state.items()}, strict=True)
  with torch.no_grad():
    theirs = ref(torch.tensor(TOKENS)).logits.numpy()
  ours = MODEL.apply(jax.jit(core.materialize_tree)(qparams), jnp.asarray(TOKENS))  # the leaves' dense values
  assert rel_err(ours, theirs) <= 1e-5


def test_unsupported_leaves_are_refused_before_writing(params, tmp_path):
  qparams = quantize_kernels(params, lambda p: dict(bits=4, group_size=32, symmetric=False))
  up = params['layers'][1]['mlp']['up_proj']['kernel']
  odd = {'layers/0/attn/q_proj/kernel': random_leaf((64, 64), group_size=32, fmt='nf4'),
         'layers/1/mlp/up_proj/kernel': core.Masked(up, jnp.abs(up) > 0.01),
         'layers/0/mlp/down_proj/kernel': random_leaf((96, 64), bits=5),
         'embed/tokens/embedding': random_leaf((VOCAB, 64), bits=8)}
  mixed = core.paths.replace(qparams, odd)
  out = tmp_path / 'refused'
  with pytest.raises(ValueError) as e:
    gptq_format.export(MODEL, mixed, out, checkpoint_format='gptq_v2')
  for p in odd:
    assert p in str(e.value)
  assert 'nf4' in str(e.value) and 'Masked' in str(e.value) and 'dense_fallback=True' in str(e.value)
  assert not out.exists()
  # v1 stores zero - 1: random zero points include 0, which only gptq_v2 holds
  with pytest.raises(ValueError, match="gptq_v2"):
    gptq_format.export(MODEL, qparams, out)
  assert not out.exists()

  gptq_format.export(MODEL, mixed, out, checkpoint_format='gptq_v2', dense_fallback=True)
  cfg = json.loads((out / 'config.json').read_text())['quantization_config']
  assert r'-:^model\.layers\.1\.mlp\.up_proj$' in cfg['dynamic'] and cfg['lm_head']
  _, loaded = models.from_pretrained(out)
  assert isinstance(core.paths.get(loaded, 'layers/1/mlp/down_proj/kernel'), core.Quantized)
  assert not core.is_compressed(core.paths.get(loaded, 'layers/0/attn/q_proj/kernel'))
  np.testing.assert_array_equal(np.asarray(core.paths.get(loaded, 'layers/1/mlp/up_proj/kernel')),
                                np.asarray(core.materialize(odd['layers/1/mlp/up_proj/kernel'])))


def test_unreadable_checkpoints_name_the_field_or_tensor(params, tmp_path):
  src = tmp_path / 'src'
  gptq_format.export(MODEL, quantize_kernels(params, lambda p: dict(bits=4, group_size=32)), src)

  def edited(name, config=None, tensors=None):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    if config:
      cfg = json.loads((dst / 'config.json').read_text())
      config(cfg['quantization_config'])
      (dst / 'config.json').write_text(json.dumps(cfg))
    if tensors:
      from safetensors.numpy import save_file
      arrays = load_file(str(dst / 'model.safetensors'))
      tensors(arrays)
      save_file(arrays, str(dst / 'model.safetensors'), metadata={'format': 'pt'})
    return dst

  cases = {
      'checkpoint_format': dict(config=lambda q: q.update(checkpoint_format='marlin', format='marlin')),
      'bits': dict(config=lambda q: q.update(bits=5)),
      'dynamic': dict(config=lambda q: q.update(dynamic={'-:.*q_proj': {}})),
      'g_idx': dict(tensors=lambda t: t.update({'model.layers.0.mlp.up_proj.g_idx': np.full(64, 7, np.int32)})),
      r'qzeros.*model\.safetensors': dict(config=lambda q: q.update(group_size=16)),
  }
  for match, edit in cases.items():
    with pytest.raises(ValueError, match=match):
      models.from_pretrained(edited(match.split('.')[0].replace('\\', ''), **edit))
