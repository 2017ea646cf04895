"""Parameter sharing: one stored tensor used by several layers.

Cross-layer sharing after Lan et al., "ALBERT: A Lite BERT for self-supervised learning of language
representations" (ICLR 2020), with per-layer low-rank deltas after Bae et al., "Relaxed recursive transformers"
(2024) (`_src/cross_layer.py`: the method `share`), and tied input/output embeddings (`_src/embeddings.py`: the
method `tie_embeddings`), re-exported here. Built on `core.tie` / `core.Shared`.
"""

from jaxcompress.sharing._src.cross_layer import (DELTA_TRAINABLE, Groups, ShareConfig, add_deltas, all_blocks,
                                                  consecutive_groups, flat_block, share, share_blocks, similarity,
                                                  similarity_groups)
from jaxcompress.sharing._src.embeddings import TieConfig, tie_embeddings

__all__ = ['DELTA_TRAINABLE', 'Groups', 'ShareConfig', 'TieConfig', 'add_deltas', 'all_blocks', 'consecutive_groups',
           'flat_block', 'share', 'share_blocks', 'similarity', 'similarity_groups', 'tie_embeddings']
