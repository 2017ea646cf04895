"""QuIP: the incoherence transforms against a float64 NumPy reference, the `Incoherent` leaf computes
x·Q_in·Ŵ·Q_outᵀ (and is exact when its base is), it serializes, and at 2 bits per channel it beats GPTQ on a layer
with outlier input channels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import core, quantization, recipes
from jaxcompress.core import hadamard
from jaxcompress.quantization._src import gptq as gptq_lib
from tests.quantization.test_quarot import _llama, _tokens


def _q(n, signs):
  """NumPy float64 Q = diag(signs)·H, H the normalized Hadamard of n."""
  return np.asarray(signs, np.float64)[:, None] * (hadamard.hadamard_matrix(n).astype(np.float64) / np.sqrt(n))


def _layer(seed=0, n_in=64, n_out=48, outliers=(3, 17)):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((512, n_in)).astype(np.float32)
  x[:, list(outliers)] *= 25.0  # outlier input channels
  w = (rng.standard_normal((n_in, n_out)) * 0.05).astype(np.float32)
  return x, w


def test_the_transforms_equal_a_float64_reference_and_the_leaf_is_exact_before_rounding():
  x, w = _layer()
  h = x.T.astype(np.float64) @ x
  key = jax.random.key(3)
  leaf = quantization.quip_layer(jnp.asarray(w), jnp.asarray(h, jnp.float32), key,
                                 quantization.QuIPConfig(bits=8, group_size=16))
  q_in, q_out = _q(64, leaf.in_signs), _q(48, leaf.out_signs)
  np.testing.assert_allclose(q_in.T @ q_in, np.eye(64), atol=1e-12)
  wt = q_in.T @ w.astype(np.float64) @ q_out  # what was quantized: Q_inᵀ W Q_out
  base = np.asarray(leaf.base.materialize(), np.float64)
  assert np.abs(base - wt).max() < 0.01 * np.abs(wt).max()  # 8 bits: close to the transformed weight
  want = q_in @ base @ q_out.T  # the leaf's weight: Q_in Ŵ Q_outᵀ
  np.testing.assert_allclose(np.asarray(leaf.materialize(), np.float64), want, rtol=1e-4, atol=1e-5)
  xs = x[:8]
  np.testing.assert_allclose(np.asarray(core.linear(jnp.asarray(xs), leaf)), xs.astype(np.float64) @ want,
                             rtol=1e-4, atol=1e-3)
  exact = quantization.Incoherent(jnp.asarray(wt, jnp.float32), leaf.in_signs, leaf.out_signs)
  np.testing.assert_allclose(np.asarray(core.linear(jnp.asarray(xs), exact)), xs @ w, rtol=1e-4, atol=1e-4)
  ht = q_in.T @ h @ q_in
  assert np.abs(np.diag(ht)).max() / np.abs(np.diag(ht)).mean() < 0.2 * np.diag(h).max() / np.diag(h).mean()


def test_activation_rounding_goes_inside_the_transform():
  """act_quant after quip rounds the input its quantized weight multiplies, x·Q_in (float64 reference), where the
  outlier channels are spread over all: at 4 bits far closer to the float output than rounding x itself."""
  x, w = _layer()
  leaf = quantization.quip_layer(jnp.asarray(w), jnp.asarray(x.T @ x), jax.random.key(3),
                                 quantization.QuIPConfig(bits=8, group_size=16))
  model = _llama(hidden_size=64, intermediate_size=48)  # up_proj [64, 48], the layer's shape
  params = core.paths.replace(model.init(jax.random.key(0)), {'layers/0/mlp/up_proj/kernel': leaf})
  _, out = quantization.act_quant(model, params, config=quantization.ActQuantConfig(
      bits=4, rules=core.Rules(include=('layers/0/mlp/up_proj/kernel$',))))
  rounded = core.paths.get(out, 'layers/0/mlp/up_proj/kernel')
  assert isinstance(rounded, quantization.Incoherent) and isinstance(rounded.base, quantization.ActQuantized)
  q_in, q_out = _q(64, leaf.in_signs), _q(48, leaf.out_signs)
  xt = x[:16].astype(np.float64) @ q_in
  s = np.abs(xt).max(-1, keepdims=True) / 7
  want = (np.clip(np.round(xt / s), -7, 7) * s) @ np.asarray(leaf.base.materialize(), np.float64) @ q_out.T
  got = np.asarray(core.linear(jnp.asarray(x[:16]), rounded), np.float64)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
  outside = np.asarray(core.linear(jnp.asarray(x[:16]), quantization.ActQuantized(leaf, bits=4)), np.float64)
  exact = x[:16].astype(np.float64) @ w
  err = lambda y: np.linalg.norm(y - exact) / np.linalg.norm(exact)
  print(f'4-bit inputs: relative error {err(got):.4f} rounded after the transform, {err(outside):.4f} before')
  assert err(got) < 0.5 * err(outside), (err(got), err(outside))


def test_a_leaf_of_the_earlier_transform_order_is_refused_on_load():
  from jaxcompress.quantization._src import quip as quip_lib
  with pytest.raises(ValueError, match='Hadamard before the signs.*Run quip again'):
    quip_lib._decode({'base': {}, 'in_block': None, 'out_block': None}, None)


def test_a_width_with_no_hadamard_uses_blocks_or_is_refused():
  x, w = _layer(n_in=96, n_out=56)  # 96 = 12 · 8 has a Hadamard matrix here; 56 = 8 · 7 has blocks of 8
  h = jnp.asarray(x.T @ x)
  leaf = quantization.quip_layer(jnp.asarray(w), h, jax.random.key(0), quantization.QuIPConfig(bits=8, group_size=16))
  assert leaf.in_block is None and leaf.out_block == hadamard.largest_block(56) == 8
  np.testing.assert_allclose(np.asarray(core.linear(jnp.asarray(x[:4]), leaf)), x[:4] @ w, rtol=0.05, atol=0.05)
  with pytest.raises(ValueError, match="quip: output width 56 has no Hadamard matrix here; fallback='block' uses blocks of 8"):
    quantization.quip_layer(jnp.asarray(w), h, jax.random.key(0), quantization.QuIPConfig(fallback='error'))


@pytest.mark.parametrize('bits', [2, 3])
def test_beats_gptq_per_channel_on_a_layer_with_outlier_inputs(bits):
  x, w = _layer(seed=bits)
  h = jnp.asarray(x.T @ x)
  err = lambda q: float(np.sum((x @ (np.asarray(q, np.float64) - w)) ** 2))
  plain = err(gptq_lib.gptq_from_hessian(jnp.asarray(w), h, bits=bits, group_size=None).materialize())
  quip = err(quantization.quip_layer(jnp.asarray(w), h, jax.random.key(0),
                                     quantization.QuIPConfig(bits=bits, group_size=None)).materialize())
  assert quip < 0.8 * plain, (plain, quip)


def test_model_stage_serializes_and_draws_its_signs_from_the_seed(tmp_path):
  model = _llama()
  params = model.init(jax.random.key(0))
  tokens = _tokens(shape=(4, 16))
  run = lambda seed: recipes.run(recipes.parse('quip(bits=3, group_size=16)'),
                                 recipes.Context(calib=({'tokens': tokens},), seed=seed), model, params)[1]
  out = run(0)
  leaves = {p: w for p, w in core.paths.flatten(out).items() if p.startswith('layers/') and p.endswith('kernel')}
  assert leaves and all(isinstance(w, quantization.Incoherent) and isinstance(w.base, core.Quantized)
                        for w in leaves.values())
  signs = [np.asarray(w.in_signs) for w in leaves.values() if w.shape[0] == 32]
  assert not all(np.array_equal(signs[0], s) for s in signs[1:])  # each linear its own signs
  again, other = run(0), run(1)
  for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert not np.array_equal(np.asarray(core.paths.flatten(other)['layers/0/attn/q_proj/kernel'].in_signs),
                            np.asarray(leaves['layers/0/attn/q_proj/kernel'].in_signs))
  core.serialize.save(tmp_path / 'q.safetensors', out)
  back = core.serialize.load(tmp_path / 'q.safetensors')
  np.testing.assert_array_equal(np.asarray(model.apply(back, tokens)), np.asarray(model.apply(out, tokens)))
  w = leaves['layers/0/mlp/up_proj/kernel']
  assert core.disk_bytes(w) == core.disk_bytes(w.base) + 32 + 64


def test_refusals_name_the_parameter():
  with pytest.raises(ValueError, match=r'quip: bits=1 is outside \[2, 8\]'):
    recipes.parse('quip(bits=1)')
  with pytest.raises(ValueError, match='embeddings=True'):
    recipes.parse('quip(embeddings=True)')
  with pytest.raises(ValueError, match="quip: fallback='none'"):
    quantization.QuIPConfig(fallback='none')
  model = _llama()
  with pytest.raises(ValueError, match='group_size=24'):
    quantization.quip(model, model.init(jax.random.key(0)), [_tokens()],
                      config=quantization.QuIPConfig(group_size=24))


def test_packed_formats_refuse_it_by_name_and_the_dense_export_is_the_same_model(tmp_path):
  from jaxcompress import models
  from jaxcompress.models import compressed_tensors, gptq_format
  model = _llama()
  params = model.init(jax.random.key(0))
  tokens = _tokens(shape=(2, 16))
  _, out = recipes.run(recipes.parse('quip(bits=3, group_size=16)'), recipes.Context(calib=({'tokens': tokens},)),
                       model, params)
  for refusals in (compressed_tensors.refusals(model, out), gptq_format.refusals(model, out)):
    assert 'layers/0/attn/q_proj/kernel' in refusals and 'core.serialize' in refusals['layers/0/attn/q_proj/kernel']
  models.hf.save_pretrained(tmp_path / 'dense', model, out)
  back_model, back = models.from_pretrained(tmp_path / 'dense')
  np.testing.assert_allclose(np.asarray(back_model.apply(back, tokens)), np.asarray(model.apply(out, tokens)),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.subprocess
def test_benchmark_runs_small(tmp_path):
  import json
  import pathlib
  import subprocess
  import sys

  from tests import xla_settings
  repo = pathlib.Path(__file__).resolve().parents[2]
  out = subprocess.run([sys.executable, 'experiments/benchmarks/incoherence.py', '--small', '--repeats=1',
                        f'--out={tmp_path}/bench.json'], cwd=repo, check=True, capture_output=True, text=True,
                       env=xla_settings.environ(PYTHONPATH=str(repo), JAX_PLATFORMS='cpu'), timeout=600).stdout
  row, = json.loads((tmp_path / 'bench.json').read_text())['rows']
  assert row['ratio'] > 0 and row['bits'] == 2 and '| ratio |' in out
