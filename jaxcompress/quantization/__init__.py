"""Quantization: weights (and activations) stored and multiplied in fewer bits.

Quantization-aware training with fake quantization and a straight-through estimator follows Jacob et al.,
"Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference" (CVPR 2018).
GPTQ follows Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (ICLR 2023); AWQ Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression
and Acceleration" (MLSys 2024); SmoothQuant Xiao et al. (ICML 2023); LLM.int8() Dettmers et al. (NeurIPS 2022);
non-uniform codebooks in the manner of SqueezeLLM, Kim et al. (ICML 2024); learned step sizes (LSQ)
Esser et al. (ICLR 2020).
"""

from jaxcompress.quantization.awq import AWQConfig, Prescaled, awq, awq_from_stats, awq_layer
from jaxcompress.quantization.gptq import GPTQConfig, gptq, gptq_from_factor, gptq_from_hessian, gptq_layer, layer_error
from jaxcompress.quantization import kernels  # kernels.enable(): the GPU/TPU weight-only kernel (opt-in)
from jaxcompress.quantization import quantizers
from jaxcompress.quantization import llm_qat
from jaxcompress.quantization.lsq import LSQWeight, add_lsq
from jaxcompress.quantization.lsq import finalize as finalize_lsq
from jaxcompress.quantization.mixed import allocate, mixed_precision
from jaxcompress.quantization.nonuniform import (Outliers, squeezellm, squeezellm_from_hessian,
                                                   squeezellm_layer)
from jaxcompress.quantization.pq import ProductQuantized, product_quantize
from jaxcompress.quantization import qat
from jaxcompress.quantization.qat import ActQuantized, fake_quant, straight_through
from jaxcompress.quantization.qat import finalize as finalize_qat
from jaxcompress.quantization.quantizers import max_error, quantize_weight
from jaxcompress.quantization.w8a8 import Int8Linear, W8A8Config, w8a8, w8a8_layer

__all__ = ['ActQuantized', 'finalize_qat', 'qat', 'LSQWeight', 'add_lsq', 'finalize_lsq', 'AWQConfig', 'GPTQConfig', 'Int8Linear', 'W8A8Config', 'w8a8', 'w8a8_layer', 'Prescaled', 'awq', 'awq_from_stats', 'awq_layer', 'fake_quant', 'gptq', 'gptq_from_factor', 'gptq_from_hessian', 'gptq_layer', 'layer_error', 'allocate', 'max_error', 'ProductQuantized', 'product_quantize', 'mixed_precision', 'Outliers', 'squeezellm', 'squeezellm_from_hessian', 'squeezellm_layer', 'quantize_weight',
           'quantizers', 'straight_through', 'llm_qat', 'kernels']
