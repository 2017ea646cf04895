"""Low-rank approximation: weights as products of thin factors.

Low-rank adapters follow Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022).
"""

from jaxcompress.lowrank.lora import LORA_TRAINABLE, add_lora

__all__ = ['LORA_TRAINABLE', 'add_lora']
