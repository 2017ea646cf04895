"""The same seed gives the same initial parameters from one version to the next.

`experiments/pretrain.py --seed=0` must keep reproducing the committed fixture, so a change that reorders how
modules draw from their rng stream (creating the MLP before attention, say) must be caught. The digests were
recorded when the fixture was trained; a deliberate change of the initialisation updates them and says so.
"""

import hashlib

import jax
import numpy as np
import pytest

from jaxcompress import core, models
from tests import xla_settings

SPECS = {
    'llama': (lambda: models.Llama(models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                      num_layers=2, num_heads=4, num_kv_heads=2,
                                                      max_position_embeddings=32)), 'cd9e6e4ac9118fb9'),
    'gpt2': (lambda: models.GPT2(models.GPT2Config(vocab_size=64, n_positions=32, hidden_size=32, num_layers=2,
                                                   num_heads=4)), '323b521caae6b0e4'),
    'bert': (lambda: models.Bert(models.BertConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                                                   intermediate_size=64, max_position_embeddings=32)),
             '4583df7a38253675'),
}


@pytest.fixture(autouse=True, scope='module')
def _full_optimizations():  # the digests are of the programs users run
  yield from xla_settings.full_optimizations()


def digest(params) -> str:
  h = hashlib.sha256()
  for path, value in sorted(core.flatten(params).items()):
    h.update(path.encode())
    h.update(np.asarray(value).tobytes())
  return h.hexdigest()[:16]


@pytest.mark.parametrize('family', sorted(SPECS))
def test_seed_zero_gives_the_recorded_initial_parameters(family):
  build, want = SPECS[family]
  model = build()
  init = jax.jit(lambda: model.init(jax.random.key(0)))  # one fresh program, the key drawn inside it
  assert digest(init()) == want
