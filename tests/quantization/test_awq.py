"""AWQ: equal to a NumPy float64 implementation of the paper's searches; beats round-to-nearest; model level."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import core, models, quantization
from tests.quantization import reference as ref

LLAMA = models.Llama(models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                                        num_heads=4, num_kv_heads=2, max_position_embeddings=32))


def _layer(seed, n=64, out=24, tokens=256):
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal((tokens, 8)) @ rng.standard_normal((8, n)) + 0.3 * rng.standard_normal((tokens, n)))
  x = x * rng.lognormal(0, 1, n)  # a few salient input channels
  return rng.standard_normal((n, out)), x


@pytest.mark.parametrize('bits,group_size', [(3, 16), (4, None)])
def test_awq_matches_float64_reference(bits, group_size):
  w, x = _layer(bits)
  with jax.enable_x64(True):
    leaf = quantization.awq_layer(jnp.asarray(w), jnp.asarray(x),
                                  quantization.AWQConfig(bits=bits, group_size=group_size))
    got = np.asarray(leaf.materialize())
  want, s = ref.awq(w.T, x, bits=bits, groupsize=group_size)
  np.testing.assert_allclose(1 / np.asarray(leaf.inv_scale), s, rtol=1e-9)
  close = np.isclose(got, want.T, rtol=1e-5, atol=1e-5)
  assert close.mean() > 0.998, close.mean()  # an exact rounding tie may land on either side, rarely


@pytest.mark.parametrize('bits', [3, 4])
def test_awq_beats_round_to_nearest_on_layer_output(bits):
  w, x = _layer(20 + bits, n=128, out=64, tokens=512)
  w, x = w.astype(np.float32), x.astype(np.float32)
  a = quantization.awq_layer(w, x, quantization.AWQConfig(bits=bits, group_size=32))
  r = quantization.quantize_weight(w, bits=bits, group_size=32)
  assert quantization.layer_error(x, w, a) < 0.9 * quantization.layer_error(x, w, r)


def test_prescaled_multiplies_like_its_dense_weight_and_round_trips(tmp_path):
  w, x = _layer(1)
  leaf = quantization.awq_layer(w.astype(np.float32), x.astype(np.float32), quantization.AWQConfig(group_size=16))
  x32 = jnp.asarray(x, jnp.float32)
  np.testing.assert_allclose(core.linear(x32, leaf), x32 @ leaf.materialize(), rtol=1e-4, atol=1e-3)
  core.serialize.save(tmp_path / 'a.safetensors', {'k': leaf})
  back = core.serialize.load(tmp_path / 'a.safetensors')['k']
  np.testing.assert_array_equal(back.materialize(), leaf.materialize())
  assert isinstance(back, quantization.Prescaled) and isinstance(back.base, core.Quantized)


def _batches():
  rng = np.random.default_rng(0)
  return [rng.integers(0, 64, (4, 16)).astype(np.int32) for _ in range(2)]


def _logit_error(params, ref_params, tokens):
  a, b = LLAMA.apply(params, tokens), LLAMA.apply(ref_params, tokens)
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _salient(params):
  """Norm scales with a few large channels, so activation-aware scaling has salient inputs to protect."""
  rng = np.random.default_rng(0)
  ups = {f'layers/{i}/{n}/scale': jnp.asarray(rng.lognormal(0, 1, 32), jnp.float32)
         for i in range(2) for n in ('attn_norm', 'mlp_norm')}
  return core.paths.replace(params, ups)


@pytest.mark.slow
def test_model_awq_folds_scales_into_norms_and_beats_rtn():
  params = _salient(jax.jit(LLAMA.init)(jax.random.key(0)))
  tokens = jnp.asarray(_batches()[0])
  _, q3 = quantization.awq(LLAMA, params, _batches(), config=quantization.AWQConfig(bits=3, group_size=16))
  block = q3['layers'][0]
  assert isinstance(core.paths.get(block, 'attn/q_proj/kernel'), core.Quantized)
  assert isinstance(core.paths.get(block, 'mlp/down_proj/kernel'), quantization.Prescaled)
  norm = np.asarray(core.paths.get(block, 'attn_norm/scale'))
  assert not np.allclose(norm, core.paths.get(params, 'layers/0/attn_norm/scale'))  # 1/s went into the norm
  r3 = core.select(params).map(lambda _, w: quantization.quantize_weight(w, bits=3, group_size=16), params)
  assert _logit_error(q3, params, tokens) < _logit_error(r3, params, tokens)
  # no_clip=('q_proj', 'k_proj') (the paper's code): q/k are scaled but not clipped; v, of the same group, is
  _, q3 = quantization.awq(LLAMA, params, _batches(), config=quantization.AWQConfig(
      bits=3, group_size=16, no_clip=('q_proj', 'k_proj')))
  block = q3['layers'][0]
  norm = np.asarray(core.paths.get(block, 'attn_norm/scale'))
  s = np.asarray(core.paths.get(params, 'layers/0/attn_norm/scale'), np.float64) / norm
  for name, clipped in (('q_proj', False), ('k_proj', False), ('v_proj', True)):
    w = np.asarray(core.paths.get(params, f'layers/0/attn/{name}/kernel'), np.float64)
    plain = np.asarray(quantization.quantize_weight(jnp.asarray(w * s[:, None], jnp.float32), bits=3,
                                                    group_size=16).materialize())
    got = np.asarray(core.paths.get(block, f'attn/{name}/kernel').materialize())
    same = np.isclose(got, plain, rtol=1e-5, atol=1e-6).mean()
    assert (same < 0.99) if clipped else (same > 0.99), (name, same)


def test_model_gptq_quantizes_every_block_linear_and_beats_rtn():
  params = jax.jit(LLAMA.init)(jax.random.key(1))
  tokens = jnp.asarray(_batches()[0])
  _, g3 = quantization.gptq(LLAMA, params, _batches(), config=quantization.GPTQConfig(bits=3, group_size=16))
  kinds = {type(w) for p, w in core.flatten(g3).items() if p.startswith('layers/') and p.endswith('kernel')}
  assert kinds == {core.Quantized}
  r3 = core.select(params).map(lambda _, w: quantization.quantize_weight(w, bits=3, group_size=16), params)
  assert _logit_error(g3, params, tokens) < _logit_error(r3, params, tokens)


def test_shared_input_group_scale_minimises_the_float64_group_output_error():
  """A group of linears sharing an input (q/k/v after one norm; gate/up) gets one s, chosen (Lin et al. Sec. 3.2)
  by the output error of the whole group: Σ_k ‖X W_k − (X / s) Q(diag(s) W_k)‖², which `awq` measures by searching
  the concatenated kernels. This case is one where the group's α differs from each linear's own."""
  from jaxcompress.quantization._src import awq as awq_lib
  w1, x = _layer(3, out=24)
  rng = np.random.default_rng(103)
  w2 = rng.standard_normal((64, 40)) * rng.lognormal(0, 1, (64, 1))
  xm = np.abs(x).mean(0)

  def scales(a):
    s = np.maximum(xm ** a, 1e-4)
    return s / np.sqrt(s.max() * s.min())

  def best(ws):  # float64 argmin over the α grid of the summed output error
    err = [sum(np.sum((x @ w - x @ (ref.rtn((w * scales(a / 20)[:, None]).T, bits=3, groupsize=16).T
                                    / scales(a / 20)[:, None])) ** 2) for w in ws) for a in range(20)]
    return scales(int(np.argmin(err)) / 20)

  cfg = quantization.AWQConfig(bits=3, group_size=16, clip=False)
  with jax.enable_x64(True):
    search = lambda w: np.asarray(awq_lib.search(jnp.asarray(w), jnp.asarray(x.T @ x), jnp.asarray(xm), cfg)[0])
    s_group = search(np.concatenate([w1, w2], axis=1))
    np.testing.assert_allclose(s_group, best([w1, w2]), rtol=1e-9)
    for w in (w1, w2):  # each linear alone would pick another scale
      np.testing.assert_allclose(search(w), best([w]), rtol=1e-9)
      assert not np.allclose(search(w), s_group)
