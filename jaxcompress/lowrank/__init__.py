"""Low-rank approximation: weights as products of thin factors.

Truncated SVD, Fisher-weighted SVD (Hsu et al., ICLR 2022), activation-aware SVD (ASVD, Yuan et al., 2023) and
whitened SVD (SVD-LLM, Wang et al., 2024) into `core.LowRank` leaves (`_src/svd.py`: the methods `svd`, `fwsvd`,
`asvd`, `svd_llm`); low-rank adapters after Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models"
(ICLR 2022), over any base (`_src/lora.py`: the methods `lora`, `qlora`).

This package re-exports the modules' public names: `lowrank.svd` and `lowrank.lora` are the method functions; the
modules' other names are imported by path (`from jaxcompress.lowrank._src.svd import scales`).
"""

from jaxcompress.lowrank._src.lora import (LORA_TRAINABLE, LOWRANK_TRAINABLE, LoRAConfig, add_lora, check_base, lora,
                                           merge, merge_into, qlora, unmerge)
from jaxcompress.lowrank._src.svd import (CALIBRATED, METHODS, LowRankConfig, RankRule, SVDConfig, activation_scale,
                                          asvd, break_even_rank, budget_ranks, check_rank, choose_ranks, compress,
                                          compress_model, energy_rank, factorize, fisher_rows, fisher_scale, fwsvd,
                                          keep_rank, output_fisher_loss, ranks_of, spectrum, svd, svd_llm,
                                          truncation_loss, whitening)

__all__ = [
    'CALIBRATED', 'LORA_TRAINABLE', 'LOWRANK_TRAINABLE', 'METHODS', 'LoRAConfig', 'LowRankConfig', 'RankRule',
    'SVDConfig', 'activation_scale', 'add_lora', 'asvd', 'break_even_rank', 'budget_ranks', 'check_base',
    'check_rank', 'choose_ranks', 'compress', 'compress_model', 'energy_rank', 'factorize', 'fisher_rows',
    'fisher_scale', 'fwsvd', 'keep_rank', 'lora', 'merge', 'merge_into', 'output_fisher_loss', 'qlora', 'ranks_of',
    'spectrum', 'svd', 'svd_llm', 'truncation_loss', 'unmerge', 'whitening',
]
