"""The training step: accumulation, mixed precision, remat, compressed leaves, objectives, guards."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcompress import core, models
from jaxcompress.train import objectives, optim
from jaxcompress.train import state as state_lib
from jaxcompress.train import step as step_lib

MODEL = models.Llama(models.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2,
                                        num_heads=4, num_kv_heads=2, max_position_embeddings=32))
TOKENS = np.random.RandomState(0).randint(0, 48, (8, 13)).astype(np.int32)
BATCH = {'inputs': jnp.asarray(TOKENS[:, :-1]), 'targets': jnp.asarray(TOKENS[:, 1:])}



@pytest.fixture(scope='module')
def params():
  return jax.jit(MODEL.init)(jax.random.key(0))


def _run(params, steps=3, *, tx=None, trainable=state_lib.floating, batch=BATCH, **kwargs):
  tx = tx or optax.adamw(1e-2, weight_decay=0.1)
  objective = kwargs.pop('objective', objectives.causal_lm(MODEL, remat=kwargs.pop('remat', False)))
  frozen = kwargs.pop('frozen', None)
  state = state_lib.init_state(params, tx, jax.random.key(1), trainable=trainable, frozen=frozen,
                               transforms=kwargs.get('transforms', ()))
  step = jax.jit(step_lib.make_train_step(objective, tx, trainable=trainable, **kwargs))
  history = []
  for _ in range(steps):
    state, m = step(state, batch)
    history.append(jax.device_get(m))
  return state, history


# Plain SGD in the equivalence tests: Adam divides by sqrt(v), so where a gradient is nearly zero it would
# amplify summation-order rounding, which differs from one CPU to another, into visible parameter differences.
SGD = optax.sgd(0.5)


@pytest.mark.slow
def test_accumulation_equals_one_big_batch(params):
  one, h1 = _run(params, tx=SGD, accum_steps=1)
  four, h4 = _run(params, tx=SGD, accum_steps=4)
  np.testing.assert_allclose([m['loss'] for m in h1], [m['loss'] for m in h4], rtol=1e-5)
  chex_close(one.params, four.params, 1e-5)


def test_remat_changes_nothing_but_memory(params):
  a, ha = _run(params, tx=SGD, remat=False)
  b, hb = _run(params, tx=SGD, remat=True)
  np.testing.assert_allclose([m['loss'] for m in ha], [m['loss'] for m in hb], rtol=1e-6)
  chex_close(a.params, b.params, 1e-6)


@pytest.mark.slow
def test_bf16_compute_keeps_fp32_master_weights(params):
  f32, h32 = _run(params, steps=4)
  bf16, h16 = _run(params, steps=4, compute_dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16.params))
  np.testing.assert_allclose([m['loss'] for m in h16], [m['loss'] for m in h32], rtol=3e-2)
  assert h16[-1]['loss'] < h16[0]['loss']


def test_training_lowers_the_loss(params):
  _, h = _run(params, steps=10)
  assert h[-1]['loss'] < 0.8 * h[0]['loss']
  assert all(m['finite'] == 1.0 for m in h)


def test_masked_leaves_keep_their_zeros_under_adamw(params):
  w = params['layers'][0]['mlp']['up_proj']['kernel']
  mask = jax.random.bernoulli(jax.random.key(5), 0.5, w.shape)
  sparse = core.paths.replace(params, {'layers/0/mlp/up_proj/kernel': core.Masked(w, mask)})
  lr, wd, steps = 1e-2, 0.1, 5
  state, _ = _run(sparse, steps=steps, tx=optax.adamw(lr, weight_decay=wd))
  leaf = state.params['layers'][0]['mlp']['up_proj']['kernel']
  assert isinstance(leaf, core.Masked)
  assert leaf.mask.dtype == jnp.bool_
  np.testing.assert_array_equal(leaf.mask, mask)  # the pattern is data, never trained
  off, w64 = ~np.asarray(mask), np.asarray(w, np.float64)
  # Pruned entries get no gradient, so Adam's moments stay zero there and AdamW only decays them:
  # value <- value * (1 - lr * wd) each step. Any gradient leaking through the mask breaks this.
  np.testing.assert_allclose(np.asarray(leaf.value)[off], w64[off] * (1 - lr * wd) ** steps, rtol=1e-6)
  mu = state.opt_state[0].mu['layers'][0]['mlp']['up_proj']['kernel'].value
  assert np.all(np.asarray(mu)[off] == 0)
  assert not np.allclose(np.asarray(leaf.value)[~off], w64[~off] * (1 - lr * wd) ** steps, rtol=1e-3)


@pytest.mark.slow
def test_shared_storage_receives_summed_gradients(params):
  paths = [f'layers/{i}/mlp/gate_proj/kernel' for i in range(2)]
  tied = core.tie(params, paths, 'gate')
  tx = optax.sgd(0.1)
  state, _ = _run(tied, steps=1, tx=tx)
  untied = core.paths.replace(params, {p: tied[core.SHARED]['gate'] for p in paths})
  g = jax.jit(jax.grad(lambda p: objectives.causal_lm(MODEL)(p, None, BATCH, None)[0] / TOKENS[:, 1:].size))(untied)
  expected = tied[core.SHARED]['gate'] - 0.1 * sum(core.paths.get(g, p) for p in paths)
  np.testing.assert_allclose(state.params[core.SHARED]['gate'], expected, rtol=1e-4, atol=1e-6)
  assert isinstance(core.paths.get(state.params, paths[1]), core.Shared)


def test_non_finite_step_leaves_state_unchanged(params):
  tx = optax.sgd(1e30)  # the first update overflows, the second step's loss is inf/nan
  state = state_lib.init_state(params, tx, jax.random.key(1))
  step = jax.jit(step_lib.make_train_step(objectives.causal_lm(MODEL), tx))
  state, m1 = step(state, BATCH)
  before = jax.device_get(state.params)
  state2, m2 = step(state, BATCH)
  assert m1['finite'] == 1.0 and m2['finite'] == 0.0
  assert int(state2.step) == int(state.step)
  chex_close(jax.device_get(state2.params), before, 0.0)


def test_classification_objective_trains_a_head():
  bert = models.Bert(models.BertConfig(vocab_size=48, hidden_size=32, num_layers=1, num_heads=4,
                                       intermediate_size=48, max_position_embeddings=16))
  p = objectives.add_classifier(bert.init(jax.random.key(0)), 3, jax.random.key(1), hidden_size=32)
  labels = jnp.asarray(TOKENS[:, 0] % 3)
  batch = {'inputs': jnp.asarray(TOKENS), 'labels': labels}
  tx = optax.adam(1e-2)
  state = state_lib.init_state(p, tx, jax.random.key(1))
  step = jax.jit(step_lib.make_train_step(objectives.classification(bert, pool='mean'), tx))
  losses = []
  for _ in range(15):
    state, m = step(state, batch)
    losses.append(float(m['loss']))
  assert losses[-1] < 0.5 * losses[0]


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="optimizer name 'adamz' is unknown"):
    optim.OptimizerConfig(name='adamz')
  with pytest.raises(ValueError, match='learning_rate'):
    optim.OptimizerConfig(learning_rate=0)
  with pytest.raises(ValueError, match='accum_steps=3'):
    step_lib.split_microbatches({'inputs': jnp.zeros((8, 4), jnp.int32)}, 3)
  with pytest.raises(ValueError, match=r"batch\['inputs'\] has shape \(4, 12\); expected 8 rows"):
    step_lib.validate_batch({'inputs': np.zeros((4, 12), np.int32), 'targets': np.zeros((4, 12), np.int32)}, rows=8)
  with pytest.raises(ValueError, match=r"batch\['inputs'\] has dtype float32"):
    step_lib.validate_batch({'inputs': np.zeros((8, 12), np.float32), 'targets': np.zeros((8, 12), np.int32)}, rows=8)
  with pytest.raises(ValueError, match=r"batch\['inputs'\]: 95 ids are outside \[0, 48\) \(vocab_size=48\), e\.g\. 70 at"):
    ids = np.full((8, 12), 70, np.int32)
    ids[0, 0] = 0
    step_lib.validate_batch({'inputs': ids, 'targets': ids}, rows=8, vocab_size=48)
  with pytest.raises(ValueError, match='no parameter is trainable'):
    state_lib.init_state({'w': jnp.zeros(3, jnp.int32)}, optax.sgd(0.1), jax.random.key(0))


def chex_close(a, b, tol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=tol, atol=tol)
