"""Pruning: weights set to zero, with the zeros kept through training.

Orthogonal pieces (`masks`): a score (|W|, Wanda's |W|·‖X_j‖₂), a pattern (per layer, per output, N:M along the
input dimension), a distribution over layers (uniform, ERK, global, per-layer overrides) and `prune(...)` that
turns params into `core.Masked` leaves. Layer solvers with kernels w [in, out] and inputs x [tokens, in]:
`wanda_layer` (Sun et al. 2023) and `sparsegpt_layer` (Frantar & Alistarh 2023), and their variants on streamed
statistics. Model-level one-shot methods (`magnitude`, `wanda`, `sparsegpt`) run through the calibration driver.
Training the surviving weights under a fixed mask follows Han et al., "Learning both Weights and Connections
for Efficient Neural Networks" (NeurIPS 2015). Pruning during training: `gradual` (gradual magnitude, SET,
RigL) and `movement` (hard and soft movement pruning with learned scores). `structured` removes whole
heads, neurons and blocks without retraining (Kwon et al. 2022).
"""

from jaxcompress.pruning.masks import (erk_sparsities, layer_sparsities, magnitude_score, mask_from_scores, nm_mask,
                                       parse_pattern, prune, sparsity_of)
from jaxcompress.pruning.oneshot import (MagnitudeConfig, SparseGPTConfig, WandaConfig, magnitude, sparsegpt,
                                         wanda)
from jaxcompress.pruning import gradual, movement, structured
from jaxcompress.pruning.sparse_training import MaskState, keep_masks, mask_tree, masked_optimizer
from jaxcompress.pruning.sparsegpt import sparsegpt_from_factor, sparsegpt_from_hessian, sparsegpt_layer
from jaxcompress.pruning.wanda import wanda_from_norms, wanda_layer, wanda_score

__all__ = [
    'MagnitudeConfig',
    'MaskState',
    'SparseGPTConfig',
    'WandaConfig',
    'erk_sparsities',
    'gradual',
    'keep_masks',
    'layer_sparsities',
    'magnitude',
    'magnitude_score',
    'mask_from_scores',
    'mask_tree',
    'masked_optimizer',
    'movement',
    'nm_mask',
    'parse_pattern',
    'prune',
    'sparsegpt',
    'sparsegpt_from_factor',
    'sparsegpt_from_hessian',
    'sparsegpt_layer',
    'sparsity_of',
    'structured',
    'wanda',
    'wanda_from_norms',
    'wanda_layer',
    'wanda_score',
]
