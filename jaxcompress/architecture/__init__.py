"""Efficient architecture: converting a pretrained model into a cheaper one of the same weights.

MHA -> GQA/MQA by mean-pooling key/value heads (Ainslie et al. 2023; Llama-family models get fewer key/value
heads, multi-head encoders tied groups of heads: `_src/gqa.py`, the method `gqa`); MoEfication of dense FFNs into
experts by clustering their neurons (Zhang et al. 2022), run as a mixture that computes only each token's top-k
experts (`_src/moefication.py`, the method `moefy`); a shallower model from a subset of the blocks (DistilBERT,
`_src/drop_layers.py`, the method `drop_layers`). This package re-exports the modules' public names (and the
module `moefication`): `architecture.gqa` and `architecture.drop_layers` are the methods.
"""

from jaxcompress.architecture._src import moefication
from jaxcompress.architecture._src.drop_layers import DropLayersConfig, drop_layers
from jaxcompress.architecture._src.gqa import (GQAConfig, convert_to_gqa, expand_kv_heads, gqa, group_kv_heads,
                                               kv_cache_bytes, kv_groups, pool_heads)
from jaxcompress.architecture._src.moefication import (MoEfyConfig, moe_mlp, moe_mlp_dispatch, moefy, moefy_mlp,
                                                       moefy_model)

__all__ = ['DropLayersConfig', 'GQAConfig', 'MoEfyConfig', 'convert_to_gqa', 'drop_layers', 'expand_kv_heads', 'gqa',
           'group_kv_heads', 'kv_cache_bytes', 'kv_groups', 'moe_mlp', 'moe_mlp_dispatch', 'moefication', 'moefy',
           'moefy_mlp', 'moefy_model', 'pool_heads']
