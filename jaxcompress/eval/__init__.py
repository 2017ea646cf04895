"""Evaluation: perplexity on token streams and fidelity of a compressed model to its reference."""

from jaxcompress.eval.fidelity import (CosineSimilarity, compare_lm, embedding_cosine, logit_kl, relative_error,
                                       token_kl, top1_agreement)
from jaxcompress.eval.lm import (PerplexityResult, perplexity, rows_perplexity, token_nll, unigram_perplexity,
                                 windows)

__all__ = [
    'CosineSimilarity',
    'PerplexityResult',
    'compare_lm',
    'embedding_cosine',
    'logit_kl',
    'perplexity',
    'rows_perplexity',
    'relative_error',
    'token_kl',
    'token_nll',
    'top1_agreement',
    'unigram_perplexity',
    'windows',
]
