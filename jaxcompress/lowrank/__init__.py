"""Low-rank approximation: weights as products of thin factors.

Truncated SVD, Fisher-weighted SVD (Hsu et al., ICLR 2022), activation-aware SVD (ASVD, Yuan et al., 2023) and
whitened SVD (SVD-LLM, Wang et al., 2024) into `core.LowRank` leaves (`svd.py`); low-rank adapters after
Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022), over any base (`lora.py`).
"""

from jaxcompress.lowrank.lora import (LORA_TRAINABLE, LOWRANK_TRAINABLE, add_lora, check_base, merge, merge_into,
                                      unmerge)
from jaxcompress.lowrank.svd import (CALIBRATED, METHODS, RankRule, SVDConfig, activation_scale, break_even_rank,
                                     budget_ranks, check_rank, choose_ranks, compress, compress_model, energy_rank,
                                     factorize, fisher_rows, fisher_scale, keep_rank, output_fisher_loss, ranks_of,
                                     spectrum, truncation_loss, whitening)

__all__ = [
    'CALIBRATED', 'LORA_TRAINABLE', 'LOWRANK_TRAINABLE', 'METHODS', 'RankRule', 'SVDConfig', 'activation_scale',
    'add_lora', 'break_even_rank', 'budget_ranks', 'check_base', 'check_rank', 'choose_ranks', 'compress',
    'compress_model', 'energy_rank', 'factorize', 'fisher_rows', 'fisher_scale', 'keep_rank', 'merge', 'merge_into',
    'output_fisher_loss', 'ranks_of', 'spectrum', 'truncation_loss', 'unmerge', 'whitening',
]
