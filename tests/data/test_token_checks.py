"""Bad token ids, token types, masks and batch fields are refused where data enters, with one message per kind,
never turned into a NaN perplexity, NaN statistics or a loss of 0.0: evaluation, calibration, compression set-up
and training each with a tiny model."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcompress import calibration, eval, models
from jaxcompress.data.pipeline import LMBatches
from jaxcompress.recipes import setup
from jaxcompress.train import evaluate, kd, loop, objectives, optim, sharding
from jaxcompress.train import state as state_lib
from jaxcompress.train import step as step_lib

VOCAB = 64
LLAMA = models.Llama(models.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=1,
                                        num_heads=4, num_kv_heads=2, max_position_embeddings=32))
BERT = models.Bert(models.BertConfig(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=4,
                                     intermediate_size=48, max_position_embeddings=16, type_vocab_size=2))
ROWS = np.random.RandomState(0).randint(0, VOCAB, (8, 9)).astype(np.int32)


def vocab_message(name: str, bad: int, at: str = r'\[row, position\] \[1, 3\]', prefix: str = '') -> str:
  """The one message every token path gives for an id outside the vocabulary."""
  return (rf'{prefix}{name}: 1 id is outside \[0, 64\) \(vocab_size=64\), e\.g\. {bad} at {at}; tokenize with '
          'the tokenizer this model was built with')


def with_id(x: np.ndarray, bad: int, at=(1, 3)) -> np.ndarray:
  x = np.array(x, copy=True)
  x[at] = bad
  return x


@pytest.fixture(scope='module')
def llama_params():
  return jax.jit(LLAMA.init)(jax.random.key(0))


@pytest.fixture(scope='module')
def bert_params():
  return jax.jit(BERT.init)(jax.random.key(0))


# Evaluation ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('bad', [VOCAB, -1])
def test_eval_rows_outside_the_vocabulary_raise_not_nan(llama_params, bad):
  with pytest.raises(ValueError, match=vocab_message('rows', bad, prefix='rows_perplexity: ')):
    eval.rows_perplexity(LLAMA, llama_params, with_id(ROWS, bad))


def test_eval_stream_and_fidelity_use_the_same_message(llama_params):
  stream = with_id(ROWS.reshape(-1), -1, at=5)
  with pytest.raises(ValueError, match=vocab_message('tokens', -1, at=r'\[position\] \[5\]')):
    eval.perplexity(LLAMA, llama_params, stream, max_length=8)
  with pytest.raises(ValueError, match=vocab_message('tokens', VOCAB, prefix='compare_lm: ')):
    eval.compare_lm(LLAMA, llama_params, LLAMA, llama_params, jnp.asarray(with_id(ROWS, VOCAB)))


def test_training_held_out_eval_refuses_float_rows_and_bad_ids(llama_params):
  mesh = sharding.make_mesh(1, 1, 1)
  with pytest.raises(ValueError, match=r'make_lm_eval: sequences has dtype float32; ids must be integers .* not cast'):
    evaluate.make_lm_eval(LLAMA, ROWS.astype(np.float32) + 0.7, batch_size=4, mesh=mesh)
  with pytest.raises(ValueError, match=vocab_message('sequences', VOCAB, prefix='make_lm_eval: ')):
    evaluate.make_lm_eval(LLAMA, with_id(ROWS, VOCAB), batch_size=4, mesh=mesh)


# Calibration ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('bad', [-1, VOCAB])
def test_calibration_ids_outside_the_vocabulary_raise_not_nan_statistics(llama_params, bad):
  batches = [{'tokens': ROWS[:, :-1]}, {'tokens': with_id(ROWS[:, :-1], bad)}]
  with pytest.raises(ValueError, match=vocab_message('tokens', bad, prefix='calibration batch 1: ')):
    calibration.calibrate(LLAMA, llama_params, batches, calibration.hessian())



def test_out_of_core_calibration_checks_ids_before_writing(llama_params, tmp_path):
  models.save_pretrained(tmp_path / 'src', LLAMA, llama_params)
  batches = [{'tokens': ROWS[:, :-1]}, {'tokens': with_id(ROWS[:, :-1], VOCAB)}]
  with pytest.raises(ValueError, match=vocab_message('tokens', VOCAB, prefix='calibration batch 1: ')):
    calibration.compress_checkpoint(tmp_path / 'src', tmp_path / 'out', lambda i, block, stats: block, batches,
                                    observer=calibration.hessian(), recipe={})
  assert not (tmp_path / 'out').exists()

def test_calibration_token_types_outside_the_table_raise(bert_params):
  tokens = ROWS[:2, :8]
  with pytest.raises(ValueError, match=r'calibration batch 0: token_types: 1 id is outside \[0, 2\) '
                                       r'\(type_vocab_size=2\), e\.g\. 2 at \[row, position\] \[1, 3\]'):
    calibration.calibrate(BERT, bert_params, [{'tokens': tokens, 'token_types': with_id(tokens * 0, 2)}],
                          calibration.hessian())


# Compression set-up: data files ----------------------------------------------------------------------------------


def test_setup_refuses_float_token_files_instead_of_casting(tmp_path):
  path = tmp_path / 'rows.npy'
  np.save(path, ROWS.astype(np.float32) + 0.5)
  with pytest.raises(ValueError, match=r"calib_data='.*rows\.npy': token rows has dtype float32; ids must be "
                                       'integers'):
    setup.load('tiny', calib_data=str(path), calib_samples=8)


@pytest.mark.parametrize('param,bad', [('calib_data', -1), ('eval_data', VOCAB), ('eval_data', 2**32 + 1)])
def test_setup_refuses_rows_outside_the_vocabulary(tmp_path, param, bad):
  path = tmp_path / 'rows.npy'
  np.save(path, with_id(ROWS.astype(np.int64), bad))
  with pytest.raises(ValueError, match=vocab_message('token rows', bad, prefix=rf"{param}='.*rows\.npy': ")):
    setup.load('tiny', **{param: str(path)}, calib_samples=8, eval_samples=8)


def test_a_hand_built_setup_refuses_bad_eval_tokens(bert_params):
  tokens = ROWS[:4, :8]
  make = lambda eval_tokens, eval_mask: setup.Setup(
      name='mine', model=BERT, params=bert_params, causal=False, calib=[], train=None, eval_tokens=eval_tokens,
      eval_mask=eval_mask)
  with pytest.raises(ValueError, match=vocab_message('eval_tokens', VOCAB, prefix="setup 'mine': ")):
    make(with_id(tokens, VOCAB), np.ones_like(tokens))
  with pytest.raises(ValueError, match=r"eval_mask has shape \(4, 7\) but eval_tokens \(4, 8\)"):
    make(tokens, np.ones((4, 7), np.int32))


# Models: BERT token types ------------------------------------------------------------------------------------------


@pytest.mark.parametrize('bad', [2, -1])
def test_bert_token_types_outside_type_vocab_size_raise(bert_params, bad):
  tokens = jnp.asarray(ROWS[:2, :8])
  types = jnp.asarray(with_id(np.zeros((2, 8), np.int32), bad))
  message = (rf'token_types: 1 id is outside \[0, 2\) \(type_vocab_size=2\), e\.g\. {bad} at \[row, position\] '
             r'\[1, 3\]; token types are segment ids: 0 for a single text, 1 for the second text of a pair')
  for run in (lambda: BERT.apply(bert_params, tokens, token_types=types),
              lambda: BERT.embed(bert_params, tokens, token_types=types),
              lambda: BERT.sentence_embedding(bert_params, tokens, jnp.ones_like(tokens), token_types=types)):
    with pytest.raises(ValueError, match=message):
      run()
  with pytest.raises(ValueError, match=r'token_types has shape \(2, 7\), tokens \(2, 8\); they must match'):
    BERT.apply(bert_params, tokens, token_types=types[:, :7])


# Training batches --------------------------------------------------------------------------------------------------


def lm_batch(**fields):
  batch = {'inputs': ROWS[:, :-1], 'targets': ROWS[:, 1:], 'mask': np.ones((8, 8), np.float32)}
  batch.update(fields)
  return {k: v for k, v in batch.items() if v is not None}


def test_training_batches_use_the_shared_id_check():
  with pytest.raises(ValueError, match=vocab_message(r"batch\['targets'\]", -1)):
    step_lib.validate_batch(lm_batch(targets=with_id(ROWS[:, 1:], -1)), rows=8, vocab_size=VOCAB)
  with pytest.raises(ValueError, match=r"batch\['inputs'\] has dtype float32; ids must be integers"):
    step_lib.validate_batch(lm_batch(inputs=ROWS[:, :-1].astype(np.float32)), rows=8, vocab_size=VOCAB)


def test_an_all_zero_mask_is_refused_and_all_zero_rows_warn():
  with pytest.raises(ValueError, match=r"batch\['mask'\] is zero everywhere: no target of this batch counts.*"
                                       r'loss 0\.0'):
    step_lib.validate_batch(lm_batch(mask=np.zeros((8, 8), np.float32)), rows=8, vocab_size=VOCAB)
  enc = {'inputs': ROWS[:, :-1], 'attention_mask': np.zeros((8, 8), np.int32)}
  with pytest.raises(ValueError, match=r"batch\['attention_mask'\] is zero everywhere: no token"):
    step_lib.validate_batch(enc, rows=8, vocab_size=VOCAB)
  mask = np.ones((8, 8), np.float32)
  mask[2:4] = 0
  with pytest.warns(RuntimeWarning, match=r"batch\['mask'\] has 2 of 8 rows that are all zero"):
    step_lib.validate_batch(lm_batch(mask=mask), rows=8, vocab_size=VOCAB)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    step_lib.validate_batch(lm_batch(), rows=8, vocab_size=VOCAB)  # a full mask: silent


def test_masks_of_the_wrong_shape_are_named():
  with pytest.raises(ValueError, match=r"batch\['mask'\] has shape \(8, 7\) but batch\['targets'\] has \(8, 8\)"):
    step_lib.validate_batch(lm_batch(mask=np.ones((8, 7), np.float32)), rows=8)
  with pytest.raises(ValueError, match=r"batch\['attention_mask'\] has shape \(8, 9\) but batch\['inputs'\] has "
                                       r'\(8, 8\)'):
    step_lib.validate_batch({'inputs': ROWS[:, :-1], 'attention_mask': np.ones((8, 9))}, rows=8)
  with pytest.raises(ValueError, match=r"batch\['mask'\] has shape \(8, 7\) but batch\['targets'\] has \(8, 8\)"):
    objectives.token_mask({'targets': jnp.zeros((8, 8), jnp.int32), 'mask': jnp.ones((8, 7))})


def test_a_batch_without_targets_names_what_the_objective_reads(llama_params):
  tx = optax.sgd(0.1)
  state = state_lib.init_state(llama_params, tx, jax.random.key(0))
  step = jax.jit(step_lib.make_train_step(objectives.causal_lm(LLAMA), tx))
  with pytest.raises(ValueError, match=r"causal_lm: the batch lacks \['targets'\]; it has \{'inputs': \(8, 8\)\}\. "
                                       r'This objective reads inputs \[B, T\] int32 token ids, targets \[B, T\]'):
    step(state, {'inputs': jnp.asarray(ROWS[:, :-1])})
  teacher = kd.logit_distillation(LLAMA, LLAMA)
  with pytest.raises(ValueError, match=r"logit_distillation: the batch lacks \['targets'\]"):
    teacher(llama_params, llama_params, {'inputs': jnp.asarray(ROWS[:, :-1])}, None)


class ZeroMask:
  """Causal-LM batches whose masks are all zero."""

  def batch(self, step, *, process_index=0, process_count=1):
    b = LMBatches(sequences=ROWS, batch_size=8, seed=0).batch(step)
    return {**b, 'mask': b['mask'] * 0}


def test_the_loop_refuses_an_all_zero_mask_at_its_step(tmp_path, llama_params):
  cfg = loop.LoopConfig(steps=3, batch_size=8, run_dir=str(tmp_path), checkpoint_every=0, progress=False,
                        async_checkpoint=False, mesh=(1, 1, 1))
  with pytest.raises(ValueError, match=r"step 1 \(data.batch\(0\)\): batch\['mask'\] is zero everywhere"):
    loop.fit(cfg, model=LLAMA, params=llama_params, objective=objectives.causal_lm(LLAMA), data=ZeroMask(),
             optimizer=optim.make_optimizer(optim.OptimizerConfig(learning_rate=1e-3, total_steps=3)))


def test_lm_batches_refuse_ids_that_would_wrap_to_int32():
  with pytest.raises(ValueError, match=r'LMBatches: sequences \(int64\) hold ids in \[0, 4294967296\], past int32'):
    LMBatches(sequences=with_id(ROWS.astype(np.int64), 2**32), batch_size=4, seed=0)


class EncoderRows:
  """Encoder batches: inputs and attention_mask, no targets."""

  def batch(self, step, *, process_index=0, process_count=1):
    return {'inputs': ROWS[:, :8], 'attention_mask': np.ones((8, 8), np.int32)}


def test_the_loop_trains_on_batches_without_targets(tmp_path, bert_params, monkeypatch):
  """The loop counts an encoder batch's tokens by its inputs (it read batch['targets'], a KeyError). The compiled
  step is replaced by one that returns fixed metrics: what is tested is the loop around it."""
  metrics = {k: jnp.float32(1) for k in ('loss', 'grad_norm', 'finite')}
  monkeypatch.setattr(step_lib, 'compile_step', lambda step, **kw: lambda state, batch: (state, metrics))
  cfg = loop.LoopConfig(steps=2, batch_size=8, run_dir=str(tmp_path), checkpoint_every=0, progress=False, log_every=1,
                        async_checkpoint=False, mesh=(1, 1, 1))
  result = loop.fit(cfg, model=BERT, params=bert_params, objective=None, data=EncoderRows(),
                    optimizer=optax.sgd(0.1))
  assert result.status == 'completed' and [h['train/loss'] for h in result.history] == [1.0, 1.0]
