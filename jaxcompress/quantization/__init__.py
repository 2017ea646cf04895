"""Quantization: weights (and activations) stored and multiplied in fewer bits.

Quantization-aware training with fake quantization and a straight-through estimator follows Jacob et al.,
"Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference" (CVPR 2018).
GPTQ follows Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (ICLR 2023); AWQ Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression
and Acceleration" (MLSys 2024); SmoothQuant Xiao et al. (ICML 2023); LLM.int8() Dettmers et al. (NeurIPS 2022);
non-uniform codebooks in the manner of SqueezeLLM, Kim et al. (ICML 2024); learned step sizes (LSQ)
Esser et al. (ICLR 2020); randomized Hadamard rotations fused into the weights (QuaRot) Ashkboos et al.
(NeurIPS 2024); incoherence processing with randomized Hadamards around GPTQ (QuIP) Chee et al. (NeurIPS
2023); a learned residual rotation on top of it (SpinQuant) Liu et al. (ICLR 2025); learnable weight clipping and equivalent transforms fitted block by block (OmniQuant) Shao et
al. (ICLR 2024); absmean ternary weights trained quantization-aware (BitNet b1.58) Ma et al. (2024).

Per-token dynamic activation quantization after any weight quantizer (`act_quant`: W4A8, W4A4) follows QuaRot.

Every method (`quarot`, `spinquant`, `quip`, `act_quant`, `rtn`, `gptq`, `awq`, `omniquant`, `w8a8` / `smoothquant` / `llm_int8`, `nonuniform`, `mixed`, `pq`,
`qat`, `llm_qat`, `lsq`, `bitnet`, and `kivi`, a KV-cache format: Liu et al., ICML 2024) is
`method(model, params, calib, *, config) -> (model, params)`, registered by name in its own module under
`quantization/_src/` (`_src/gptq.py`, `_src/qat.py`, ...); importing this package registers them all.
This package re-exports the modules' public names, so `quantization.qat` is the method; a module's other functions
are imported by path (`from jaxcompress.quantization._src.llm_qat import distillation_objective`).
"""

from jaxcompress.quantization._src import kernels  # kernels.enable(): the GPU/TPU weight-only kernel (opt-in)
from jaxcompress.quantization._src import quantizers
from jaxcompress.quantization._src.act_quant import ActQuantConfig, act_quant
from jaxcompress.quantization._src.awq import AWQConfig, Prescaled, awq, awq_from_stats, awq_layer
from jaxcompress.quantization._src.gptq import (GPTQConfig, gptq, gptq_from_factor, gptq_from_hessian, gptq_layer,
                                                layer_error)
from jaxcompress.quantization._src.bitnet import BitNetConfig, bitnet, ternarize
from jaxcompress.quantization._src.kivi import KIVIConfig, kivi
from jaxcompress.quantization._src.llm_qat import llm_qat
from jaxcompress.quantization._src.lsq import LSQConfig, LSQWeight, add_lsq, lsq
from jaxcompress.quantization._src.lsq import finalize as finalize_lsq
from jaxcompress.quantization._src.mixed import MixedConfig, allocate, bit_allocation, mixed
from jaxcompress.quantization._src.omniquant import OmniQuantConfig, omniquant
from jaxcompress.quantization._src.nonuniform import (NonUniformConfig, Outliers, nonuniform,
                                                      squeezellm_from_hessian, squeezellm_layer)
from jaxcompress.quantization._src.pq import PQConfig, ProductQuantized, pq, product_quantize
from jaxcompress.core.activations import ActQuantized, straight_through
from jaxcompress.quantization._src.qat import QATConfig, fake_quant, qat
from jaxcompress.quantization._src.qat import finalize as finalize_qat
from jaxcompress.quantization._src.quantizers import max_error, quantize_weight
from jaxcompress.quantization._src.quarot import QuaRotConfig, quarot, random_hadamard
from jaxcompress.quantization._src.spinquant import SpinQuantConfig, cayley_sgd, spinquant
from jaxcompress.quantization._src.quip import Incoherent, QuIPConfig, quip, quip_layer
from jaxcompress.quantization._src.rtn import RTNConfig, rtn
from jaxcompress.quantization._src.w8a8 import Int8Linear, W8A8Config, w8a8, w8a8_layer

__all__ = ['AWQConfig', 'ActQuantConfig', 'ActQuantized', 'BitNetConfig', 'GPTQConfig', 'Incoherent', 'Int8Linear', 'KIVIConfig', 'LSQConfig', 'LSQWeight',
           'MixedConfig', 'NonUniformConfig', 'OmniQuantConfig', 'Outliers', 'PQConfig', 'Prescaled', 'ProductQuantized', 'QATConfig',
           'QuIPConfig', 'QuaRotConfig', 'RTNConfig', 'SpinQuantConfig', 'W8A8Config', 'act_quant', 'add_lsq', 'allocate', 'awq', 'awq_from_stats', 'awq_layer',
           'bit_allocation', 'cayley_sgd', 'bitnet', 'fake_quant', 'finalize_lsq', 'finalize_qat', 'gptq', 'gptq_from_factor',
           'gptq_from_hessian', 'gptq_layer', 'kernels', 'kivi', 'layer_error', 'llm_qat', 'lsq', 'max_error', 'mixed',
           'nonuniform', 'omniquant', 'pq', 'product_quantize', 'qat', 'quantize_weight', 'quantizers', 'quarot', 'quip', 'quip_layer', 'random_hadamard',
           'rtn', 'spinquant', 'squeezellm_from_hessian', 'squeezellm_layer', 'straight_through', 'ternarize', 'w8a8', 'w8a8_layer']
