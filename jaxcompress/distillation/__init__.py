"""Knowledge distillation: a small student trained to reproduce a large teacher.

Logit distillation with a softened teacher follows Hinton, Vinyals and Dean, "Distilling the Knowledge in a
Neural Network" (2015).
"""

from jaxcompress.distillation.kd import logit_distillation

__all__ = ['logit_distillation']
