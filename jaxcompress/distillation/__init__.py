"""Knowledge distillation: a small student trained to reproduce a large teacher.

Logit distillation with a softened teacher follows Hinton, Vinyals and Dean, "Distilling the Knowledge in a
Neural Network" (2015); reverse KL MiniLLM (Gu et al. 2024); generalized JSD GKD (Agarwal et al. 2024),
on the data or on student-sampled continuations (`on_policy`); hidden-state and attention transfer TinyBERT
(Jiao et al. 2020); self-attention relations MiniLM (Wang et al. 2020). Students come from the teacher's own
layers (`students`); `cache` keeps a teacher's top-k next-token distribution on disk so it runs once.

Recipe methods, one file each under `distillation/_src/`: `distill` / `recover` (`finetune`: recovery fine-tuning
with KD or the task loss), `gkd` (`on_policy`), `seq_kd` (`sequence`: training on text the teacher writes) and
`fresh_student` (`students`). This package re-exports their public names and the modules themselves
(`distillation.students.select_layers`).
"""

from jaxcompress.train import kd, losses  # the KD objective every family's recovery trains with
from jaxcompress.distillation._src import cache, finetune, on_policy, sequence, students
from jaxcompress.train.kd import (PROJ, DistillConfig, distillation, init_projections, last_layer_qkv,
                                  logit_distillation, prepare_teacher, split_params)
from jaxcompress.distillation._src.finetune import RecoverConfig, distill, recover
from jaxcompress.distillation._src.on_policy import GKDConfig, OnPolicyConfig, gkd, on_policy_distillation
from jaxcompress.distillation._src.sequence import SeqKDConfig, seq_kd, teacher_text
from jaxcompress.distillation._src.students import StudentConfig, fresh_student

__all__ = ['PROJ', 'DistillConfig', 'GKDConfig', 'OnPolicyConfig', 'RecoverConfig', 'SeqKDConfig', 'StudentConfig',
           'cache', 'distill', 'distillation', 'finetune', 'fresh_student', 'gkd', 'init_projections', 'kd',
           'last_layer_qkv', 'logit_distillation', 'losses', 'on_policy', 'on_policy_distillation', 'prepare_teacher',
           'recover', 'seq_kd', 'sequence', 'split_params', 'students', 'teacher_text']
