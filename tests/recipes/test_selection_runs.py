"""The selection arguments act: a method given include= / exclude= compresses exactly the kernels they choose and
leaves every other weight as it was, bit for bit; a group of linears chosen in part keeps its scales in its
leaves rather than folding them into the norm the other linears read."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import core, quantization, recipes
from jaxcompress.recipes import setup


@pytest.fixture(scope='module')
def tiny():
  model, params = setup.tiny_model(0)
  rows = np.asarray(jax.random.randint(jax.random.key(1), (4, 16), 0, 64), np.int32)
  ctx = recipes.Context(reference_model=model, reference=params, calib=({'tokens': rows},))
  return model, params, ctx


def _run(tiny, text, *, tree=False):
  model, params, ctx = tiny
  _, out = recipes.run(recipes.parse(text), ctx, model, params)
  return params, (out if tree else core.paths.flatten(out))


def _unchanged(before, after, paths):
  flat = core.paths.flatten(before)
  for p in paths:
    assert not core.is_compressed(after[p]), p
    np.testing.assert_array_equal(np.asarray(after[p]), np.asarray(flat[p]), err_msg=p)


KERNELS = [f'layers/{i}/{k}/kernel' for i in (0, 1) for k in ('attn/q_proj', 'attn/k_proj', 'attn/v_proj',
                                                             'attn/o_proj', 'mlp/gate_proj', 'mlp/up_proj',
                                                             'mlp/down_proj')]


@pytest.mark.parametrize('text, kind', [
    ('gptq(bits=4, group_size=None, include="mlp/")', core.Quantized),
    ('nonuniform(bits=3, iters=2, include="mlp/")', core.Compressed),
    ('mixed(average_bits=4.0, group_size=None, include="mlp/")', core.Quantized),
    ('w8a8(include="mlp/")', quantization.Int8Linear),
    ('pq(d=4, bits=2, iters=2, include="mlp/")', quantization.ProductQuantized),
    ('svd(rank=4, include="mlp/")', core.LowRank),
    ('asvd(rank=4, include="mlp/")', core.LowRank),
    ('svd_llm(rank=4, include="mlp/")', core.LowRank),
])
def test_a_calibrated_method_compresses_only_the_chosen_kernels(tiny, text, kind):
  before, after = _run(tiny, text)
  chosen = [p for p in KERNELS if 'mlp/' in p]
  for p in chosen:
    assert isinstance(after[p], kind), (p, type(after[p]))
  _unchanged(before, after, [p for p in KERNELS if p not in chosen] + ['embed/tokens/embedding'])
  _unchanged(before, after, [p for p in core.paths.flatten(before) if p.endswith('norm/scale')])


def test_exclude_takes_layers_out(tiny):
  before, after = _run(tiny, 'gptq(bits=4, group_size=None, exclude="layers/0/")')
  assert all(isinstance(after[p], core.Quantized) for p in KERNELS if p.startswith('layers/1/'))
  _unchanged(before, after, [p for p in KERNELS if p.startswith('layers/0/')])


@pytest.mark.parametrize('text', ['awq(bits=4, group_size=None, n_grid=2, clip=False, exclude="q_proj")',
                                  'smoothquant(exclude="q_proj")'])
def test_a_group_chosen_in_part_keeps_its_scales_in_the_leaves_and_the_norm_as_it_was(tiny, text):
  """q/k/v share the attention norm: with q left float, the smoothing of k and v cannot be folded into it."""
  model, params, _ = tiny
  before, tree = _run(tiny, text, tree=True)
  after = core.paths.flatten(tree)
  for i in (0, 1):
    q, k = f'layers/{i}/attn/q_proj/kernel', f'layers/{i}/attn/k_proj/kernel'
    _unchanged(before, after, [q, f'layers/{i}/attn_norm/scale'])
    assert core.is_compressed(after[k])
    # the whole MLP's input group (gate/up) was chosen: its scales fold into its norm as before
    assert core.is_compressed(after[f'layers/{i}/mlp/up_proj/kernel'])
  # the function stays close to the original: the unfolded scales are applied in the leaves
  tokens = jnp.asarray(np.arange(24, dtype=np.int32).reshape(2, 12) % 64)
  ref = model.apply(params, tokens)
  got = model.apply(tree, tokens)
  assert float(jnp.max(jnp.abs(got - ref))) < 0.25 * float(jnp.max(jnp.abs(ref)))


@pytest.mark.parametrize('text, needle', [
    ('gptq(head=True)', 'gptq: head=True: gptq compresses the linears of the transformer blocks only'),
    ('wanda(embeddings=True)', 'wanda: embeddings=True: wanda compresses the linears of the transformer blocks'),
    ('awq(embeddings=True, head=True)', 'awq: embeddings and head=True'),
    ('lora(embeddings=True)', 'lora: embeddings=True: a LoRA adapter'),
    ('pq(embeddings=True)', 'pq: embeddings=True: a product-quantized leaf'),
    ('lsq(embeddings=True)', 'lsq: embeddings=True: an LSQ weight'),
])
def test_what_a_method_cannot_compress_is_refused_when_the_recipe_is_read(text, needle):
  with pytest.raises(ValueError) as e:
    recipes.parse(text)
  assert needle in str(e.value)


@pytest.mark.parametrize('text', ['gptq(group_size=16, include="nothing/")', 'w8a8(include="nothing/")',
                                  'nonuniform(exclude="kernel")', 'awq(group_size=16, include="nothing/")'])
def test_rules_choosing_no_block_linear_are_refused_before_any_weight_is_loaded(tiny, text):
  from jaxcompress.recipes import preflight
  name = text.split('(')[0]
  with pytest.raises(ValueError, match=rf"recipe: stage 1 {name}: include=.* choose none of the 14 linears of the "
                     r"blocks \(e.g. layers/0/attn/q_proj/kernel\)"):
    preflight.check('tiny', recipes.parse(text))
  model, params, ctx = tiny  # and from Python, where the method runs
  with pytest.raises(ValueError, match=rf"{name}: include=.* choose none of the 14 linears"):
    recipes.run(recipes.parse(text), ctx, model, params)
