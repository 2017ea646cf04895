"""Pruning: weights set to zero, with the zeros kept through training.

Orthogonal pieces (`masks`): a score (|W|, Wanda's |W|·‖X_j‖₂), a pattern (per layer, per output, N:M along the
input dimension), a distribution over layers (uniform, ERK, global, per-layer overrides) and `prune(...)` that
turns params into `core.Masked` leaves. Layer solvers with kernels w [in, out] and inputs x [tokens, in]:
`wanda_layer` (Sun et al. 2023) and `sparsegpt_layer` (Frantar & Alistarh 2023), and their variants on streamed
statistics. Training the surviving weights under a fixed mask follows Han et al., "Learning both Weights and
Connections for Efficient Neural Networks" (NeurIPS 2015).

The methods, one file each, with the calling convention of every method
(`method(model, params, calib, *, config) -> (model, params)`):
  one-shot                 `magnitude`, `wanda`, `sparsegpt` (layer by layer through the calibration driver);
                           `owl` (Wanda with OWL's outlier-weighed block sparsities, Yin et al. 2024); `ria`
                           (relative importance and activations, Zhang et al. 2024). Wanda's, RIA's and
                           SparseGPT's per-layer `distribution`: 'uniform', 'erk', 'owl' or a callable
  structured               `structured`: whole heads and neurons to a FLOPs budget (Kwon et al. 2022)
  during fine-tuning       `gradual` (gradual magnitude), `set`, `rigl` (gradual.py); `movement`,
                           `soft_movement` (movement.py)

The modules live under `pruning/_src/` (`_src/wanda.py`, `_src/masks.py`, ...) and this package re-exports their
public names, so `pruning.structured` is the method and nothing else; a module's other functions are imported by
path (`from jaxcompress.pruning._src.structured import fisher`).
"""

from jaxcompress.pruning._src.masks import (erk_sparsities, layer_sparsities, magnitude_score, mask_from_scores,
                                            nm_mask, parse_pattern, prune, sparsity_of)
from jaxcompress.pruning._src.sparse_training import MaskState, keep_masks, mask_tree, masked_optimizer
from jaxcompress.pruning._src.magnitude import MagnitudeConfig, magnitude
from jaxcompress.pruning._src.wanda import WandaConfig, wanda, wanda_from_norms, wanda_layer, wanda_score
from jaxcompress.pruning._src.sparsegpt import (SparseGPTConfig, sparsegpt, sparsegpt_from_factor,
                                                sparsegpt_from_hessian, sparsegpt_layer)
from jaxcompress.pruning._src.oneshot import DenseStatistics
from jaxcompress.pruning._src.owl import owl, owl_sparsities
from jaxcompress.pruning._src.ria import RIAConfig, ria, ria_from_norms, ria_layer, ria_score
from jaxcompress.pruning._src.structured import StructuredConfig, structured
from jaxcompress.pruning._src.gradual import DynamicSparseConfig, GradualPruneConfig, gradual, rigl
from jaxcompress.pruning._src.gradual import set  # noqa: A004 (the method SET shares the builtin's name)
from jaxcompress.pruning._src.movement import MovementPruneConfig, SoftMovementPruneConfig, movement, soft_movement

__all__ = [
    'DenseStatistics',
    'DynamicSparseConfig',
    'GradualPruneConfig',
    'MagnitudeConfig',
    'MaskState',
    'MovementPruneConfig',
    'RIAConfig',
    'SoftMovementPruneConfig',
    'SparseGPTConfig',
    'StructuredConfig',
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
    'owl',
    'owl_sparsities',
    'parse_pattern',
    'prune',
    'ria',
    'ria_from_norms',
    'ria_layer',
    'ria_score',
    'rigl',
    'set',
    'soft_movement',
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
