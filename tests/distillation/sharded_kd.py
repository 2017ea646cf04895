"""One distillation step with the teacher in TrainState.frozen, on the default device and FSDP-sharded over
8 virtual devices, for each teacher storage. Run by test_sharded_teacher.py in a fresh subprocess (8 devices):

    python tests/distillation/sharded_kd.py

Prints one line 'RESULT {json}': per storage, the loss on 1 device and on 8, the largest parameter difference
after the step, and whether the teacher's arrays were really split over the devices.
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project root


def main() -> None:
  jax.config.update('jax_default_matmul_precision', 'highest')
  from jaxcompress import distillation, models
  from jaxcompress.distillation import students
  from jaxcompress.train import sharding, step as step_lib, state as state_lib
  assert jax.device_count() == 8, jax.devices()
  teacher = models.Llama(models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                                            num_heads=4, num_kv_heads=2, max_position_embeddings=32))
  tp = teacher.init(jax.random.key(0))
  student, sp, layer_map = students.select_layers(teacher, tp)
  cfg = distillation.DistillConfig(output='soft_kl', temperature=2.0, layer_map=layer_map, hidden_weight=1.0)
  step = step_lib.make_train_step(distillation.distillation(student, teacher, cfg), optax.sgd(0.1))
  rows = np.random.RandomState(0).randint(0, 64, (8, 17)).astype(np.int32)
  batch = {'inputs': rows[:, :-1], 'targets': rows[:, 1:]}
  mesh = sharding.make_mesh(1, 8, 1)
  out = {}
  for storage in ('float32', 'bfloat16', 'int8'):
    # Own buffers: the student's layers are the teacher's arrays, and the step donates the state's buffers.
    frozen = jax.tree.map(lambda x: x.copy(), distillation.prepare_teacher(teacher, tp, storage))
    copy = lambda tree: jax.tree.map(lambda x: x.copy(), tree)
    state = state_lib.init_state(sp, optax.sgd(0.1), jax.random.key(1), frozen=frozen)
    one, m1 = jax.jit(step)(state, batch)
    shardings = sharding.state_shardings(jax.eval_shape(lambda s=state: s), mesh, teacher.sharding_rules())
    sharded = jax.device_put(copy(state), shardings)
    sharded = jax.jit(copy, out_shardings=shardings)(sharded)  # no buffer shared with `state` (the step donates)
    split = [not x.sharding.is_fully_replicated for x in jax.tree.leaves(sharded.frozen) if x.ndim == 2]
    compiled = step_lib.compile_step(step, state_sharding=shardings, batch_sharding=sharding.batch_sharding(mesh))
    eight, m8 = compiled(sharded, sharding.global_batch(batch, mesh))
    diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
               for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params)))
    out[storage] = {'loss_1': float(m1['loss']), 'loss_8': float(m8['loss']), 'param_diff': diff,
                    'teacher_matrices_split': sum(split), 'teacher_matrices': len(split),
                    'teacher_bytes': sum(x.nbytes for x in jax.tree.leaves(frozen))}
  print('RESULT ' + json.dumps(out), flush=True)


if __name__ == '__main__':
  main()
