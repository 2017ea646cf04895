"""Text corpora, byte-level BPE tokenizers, and packed causal-LM batches addressed by step number."""

from jaxcompress.data.corpus import (default_cache_dir, fortunes_documents, hf_dataset_texts, read_jsonl,
                                     read_text_files, split_documents)
from jaxcompress.data.pipeline import LMBatches, cache_key, fortunes_lm_data, pack, token_cache
from jaxcompress.data.tokenizer import EOS, encode_documents, load_tokenizer, save_tokenizer, train_bpe

__all__ = [
    'EOS',
    'LMBatches',
    'cache_key',
    'default_cache_dir',
    'encode_documents',
    'fortunes_documents',
    'fortunes_lm_data',
    'hf_dataset_texts',
    'load_tokenizer',
    'pack',
    'read_jsonl',
    'read_text_files',
    'save_tokenizer',
    'split_documents',
    'token_cache',
    'train_bpe',
]
