"""Parameter sharing: one stored tensor used by several layers.

Cross-layer sharing after Lan et al., "ALBERT: A Lite BERT for self-supervised learning of language
representations" (ICLR 2020), with per-layer low-rank deltas after Bae et al., "Relaxed recursive transformers"
(2024), and tied input/output embeddings. Built on `core.tie` / `core.Shared`.
"""

from jaxcompress.sharing.cross_layer import (DELTA_TRAINABLE, Groups, add_deltas, all_blocks, consecutive_groups,
                                             flat_block, share_blocks, similarity, similarity_groups,
                                             tie_embeddings)

__all__ = ['DELTA_TRAINABLE', 'Groups', 'add_deltas', 'all_blocks', 'consecutive_groups', 'flat_block',
           'share_blocks', 'similarity', 'similarity_groups', 'tie_embeddings']
