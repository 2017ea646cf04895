"""Knowledge distillation: a small student trained to reproduce a large teacher.

Logit distillation with a softened teacher follows Hinton, Vinyals and Dean, "Distilling the Knowledge in a
Neural Network" (2015); reverse KL MiniLLM (Gu et al. 2024); generalized JSD GKD (Agarwal et al. 2024);
hidden-state and attention transfer TinyBERT (Jiao et al. 2020); self-attention relations MiniLM (Wang et al.
2020). Students come from the teacher's own layers (`students`); `cache` keeps a teacher's top-k
next-token distribution on disk so it runs once.
"""

from jaxcompress.distillation import cache, losses, students
from jaxcompress.distillation.kd import (PROJ, DistillConfig, distillation, init_projections, last_layer_qkv,
                                         logit_distillation, prepare_teacher, split_params)

__all__ = ['PROJ', 'DistillConfig', 'cache', 'distillation', 'init_projections', 'last_layer_qkv', 'logit_distillation',
           'losses', 'prepare_teacher', 'split_params', 'students']
