"""Pruning: weights set to zero, with the zeros kept through training.

Training the surviving weights under a fixed mask follows Han et al., "Learning both Weights and Connections
for Efficient Neural Networks" (NeurIPS 2015).
"""

from jaxcompress.pruning.sparse_training import MaskState, keep_masks, mask_tree, masked_optimizer

__all__ = ['MaskState', 'keep_masks', 'mask_tree', 'masked_optimizer']
