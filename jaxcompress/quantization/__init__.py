"""Quantization: weights stored in fewer bits.

Quantization-aware training with fake quantization and a straight-through estimator follows Jacob et al.,
"Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference" (CVPR 2018).
"""

from jaxcompress.quantization.qat import fake_quant, straight_through

__all__ = ['fake_quant', 'straight_through']
