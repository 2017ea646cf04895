"""Evaluation: perplexity on token streams and fidelity of a compressed model to its reference."""

from jaxcompress.eval.fidelity import (CosineSimilarity, compare_lm, embedding_cosine, logit_kl, relative_error,
                                       token_kl, top1_agreement)
from jaxcompress.eval.perplexity import PerplexityResult, perplexity, token_nll, unigram_perplexity, windows
