"""Efficient architecture: converting a pretrained model into a cheaper one of the same weights.

MHA -> GQA/MQA by mean-pooling key/value heads (Ainslie et al. 2023); MoEfication of dense FFNs into experts by
clustering their neurons (Zhang et al. 2022).
"""

from jaxcompress.architecture import moefication
from jaxcompress.architecture.gqa import convert_to_gqa, kv_cache_bytes, pool_heads
from jaxcompress.architecture.moefication import moe_mlp, moe_mlp_dispatch, moefy, moefy_model

__all__ = ['convert_to_gqa', 'kv_cache_bytes', 'moe_mlp', 'moe_mlp_dispatch', 'moefication', 'moefy', 'moefy_model',
           'pool_heads']
