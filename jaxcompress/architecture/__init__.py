"""Efficient architecture: converting a pretrained model into a cheaper one of the same weights.

MHA -> GQA/MQA by mean-pooling key/value heads (Ainslie et al. 2023; Llama-family models get fewer key/value
heads, multi-head encoders tied groups of heads); MoEfication of dense FFNs into experts by clustering their
neurons (Zhang et al. 2022), run as a mixture that computes only each token's top-k experts.
"""

from jaxcompress.architecture import moefication
from jaxcompress.architecture.gqa import (convert_to_gqa, expand_kv_heads, group_kv_heads, kv_cache_bytes, kv_groups,
                                          pool_heads)
from jaxcompress.architecture.moefication import moe_mlp, moe_mlp_dispatch, moefy, moefy_model

__all__ = ['convert_to_gqa', 'expand_kv_heads', 'group_kv_heads', 'kv_cache_bytes', 'kv_groups', 'moe_mlp',
           'moe_mlp_dispatch', 'moefication', 'moefy', 'moefy_model', 'pool_heads']
