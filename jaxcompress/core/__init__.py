"""The pytree vocabulary every compression family shares.

Typed weights (`Masked`, `Quantized`, `ActQuantized`, `LowRank`, `LoRA`, `Shared`), the one `linear` every model calls, path
selection, size accounting, compact serialization and the fast Walsh–Hadamard transform (`hadamard`). Nothing
here knows about models.
"""

from jaxcompress.core import activations, hadamard, paths, serialize, stats
from jaxcompress.core.activations import ActQuantized, quantize_tokens, straight_through
from jaxcompress.core.hadamard import hadamard_transform
from jaxcompress.core.leaf import (Compressed, dtype_of, disk_bytes, is_compressed, is_weight_leaf,
                                   materialize, materialize_tree, matmul_flops, memory_bytes, nonzeros,
                                   shape_of, stored_params)
from jaxcompress.core.matmul import embedding_lookup, linear, linear_transposed
from jaxcompress.core.lowrank import LoRA, LowRank
from jaxcompress.core.masked import Masked, PackedMasked
from jaxcompress.core.paths import flatten, map_with_path
from jaxcompress.core.quantized import Quantized, fake_quantize, quantize
from jaxcompress.core.selection import Rules, Selection, select, select_by
from jaxcompress.core.shared import SHARED, Shared, resolve, tie
from jaxcompress.core.stats import summary

__all__ = [
    'ActQuantized',
    'activations',
    'Compressed',
    'LoRA',
    'LowRank',
    'Masked',
    'PackedMasked',
    'Quantized',
    'Rules',
    'Selection',
    'Shared',
    'SHARED',
    'disk_bytes',
    'dtype_of',
    'embedding_lookup',
    'fake_quantize',
    'flatten',
    'hadamard',
    'hadamard_transform',
    'is_compressed',
    'is_weight_leaf',
    'linear',
    'linear_transposed',
    'map_with_path',
    'materialize',
    'materialize_tree',
    'matmul_flops',
    'memory_bytes',
    'nonzeros',
    'paths',
    'quantize',
    'quantize_tokens',
    'resolve',
    'select',
    'select_by',
    'serialize',
    'shape_of',
    'stats',
    'stored_params',
    'straight_through',
    'summary',
    'tie',
]
