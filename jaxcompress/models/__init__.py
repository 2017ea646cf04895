"""Model families as (spec, params): Llama (Llama 2/3, Mistral, Qwen2), GPT-2, BERT (BERT, MiniLM).

Flax NNX lives inside this package only. Everything else sees a frozen `Model` spec whose methods are pure
functions of a parameter pytree (`apply`, `embed`, `block`, `head`, `linear_inputs`, ...).
"""

from jaxcompress.models.base import LinearGroup, Model, Params
from jaxcompress.models.bert import Bert, BertConfig, mean_pool
from jaxcompress.models.decode import generate
from jaxcompress.models.gpt2 import GPT2, GPT2Config
from jaxcompress.models.hf import (FAMILIES, from_pretrained, load_model, minilm_dir, save_pretrained,
                                  supported_model_types)
from jaxcompress.models.layers import Context
from jaxcompress.models.llama import Llama, LlamaConfig

__all__ = [
    'Bert',
    'BertConfig',
    'Context',
    'FAMILIES',
    'GPT2',
    'GPT2Config',
    'LinearGroup',
    'Llama',
    'LlamaConfig',
    'Model',
    'Params',
    'from_pretrained',
    'generate',
    'load_model',
    'mean_pool',
    'minilm_dir',
    'save_pretrained',
    'supported_model_types',
]
