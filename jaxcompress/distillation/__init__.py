"""Knowledge distillation: a small student trained to reproduce a large teacher.

Logit distillation with a softened teacher follows Hinton, Vinyals and Dean, "Distilling the Knowledge in a
Neural Network" (2015); reverse KL MiniLLM (Gu et al. 2024); generalized JSD GKD (Agarwal et al. 2024),
on the data or on student-sampled continuations (`on_policy`); hidden-state and attention transfer TinyBERT
(Jiao et al. 2020); self-attention relations MiniLM (Wang et al. 2020). Students come from the teacher's own
layers (`students`); `cache` keeps a teacher's top-k next-token distribution on disk so it runs once.
"""

from jaxcompress.distillation import cache, losses, on_policy, students
from jaxcompress.distillation.kd import (PROJ, DistillConfig, distillation, init_projections, last_layer_qkv,
                                         logit_distillation, prepare_teacher, split_params)
from jaxcompress.distillation.on_policy import OnPolicyConfig, on_policy_distillation

__all__ = ['PROJ', 'DistillConfig', 'OnPolicyConfig', 'cache', 'distillation', 'init_projections', 'last_layer_qkv',
           'logit_distillation', 'losses', 'on_policy', 'on_policy_distillation', 'prepare_teacher', 'split_params', 'students']
