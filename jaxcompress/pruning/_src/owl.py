"""OWL: outlier-weighed layerwise sparsity (Yin et al., "Outlier Weighed Layerwise Sparsity (OWL): A Missing
Secret Sauce for Pruning LLMs to High Sparsity", ICML 2024).

Blocks holding more outlier scores keep more of their weights. On the dense model (block l fed by the unpruned
blocks before it), with A = |W[j, o]| · ‖X_j‖₂ (Wanda's score) over every pruned kernel of block l:

    D_l = mean(A > M · mean(A))                                    the block's outlier ratio
    r_l = (D_l - min D) / (max D - min D) · 2λ                      in [0, 2λ]
    S_l = 1 - (r_l - mean(r) + 1 - S)                               mean S_l = S; a higher D_l, a lower S_l

then Wanda prunes block l at S_l, block by block on the pruned model's activations. Each S_l lies strictly
within S ± 2λ, so λ <= min(S, 1 - S) / 2 keeps every S_l in [0, 1) (the reference code clamps instead; the
configs refuse such a λ). The distribution is an axis of Wanda and SparseGPT (`distribution='owl'`); the method
`owl` is Wanda with it:

    model, params = pruning.owl(model, params, batches, config=pruning.WandaConfig(sparsity=0.7,
                                                                                   distribution='owl'))
    recipe: owl(sparsity=0.7)            # = wanda(sparsity=0.7, distribution='owl')

The ratios need the whole dense model before the first block is pruned: in memory one `calibration.calibrate`
pass of column norms; out of core (`calibration.compress_checkpoint`, `--out_of_core`) a first pass streamed
block by block from the checkpoint that keeps only the column norms, then each block's kernels read once more
for its ratio (`calibration.DensePass`). Both give the same sparsities and masks, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import registry
from jaxcompress.models import Model, Params
from jaxcompress.pruning._src import masks as masks_lib
from jaxcompress.pruning._src.oneshot import DenseStatistics, check_kernels
from jaxcompress.pruning._src.wanda import WandaConfig, wanda


def outlier_ratio(scores: Iterable[jax.Array], threshold: float = 5.0) -> float:
  """D = the fraction of the scores above threshold × their mean, over every array of scores together (a
  block's kernels, concatenated). scores: arrays of any shape (e.g. [in, out]) ≥ 0."""
  scores = list(scores)
  if not scores:
    raise ValueError('outlier_ratio: no scores; give the scores of at least one kernel.')
  total = sum(float(jnp.sum(s.astype(jnp.float32))) for s in scores)
  size = sum(int(np.prod(s.shape)) for s in scores)
  cut = jnp.float32(threshold * total / size)
  return sum(int(jnp.sum(s.astype(jnp.float32) > cut)) for s in scores) / size


def owl_sparsities(ratios: Sequence[float], sparsity: float, lam: float = 0.08) -> np.ndarray:
  """OWL's block sparsities [L] float64 from the outlier ratios D [L] (any common scale, e.g. percent).

  The ratios rescaled to [0, 2λ] and shifted to mean 1 - sparsity are the block densities: the mean sparsity is
  `sparsity` and the blocks spread over 2λ, the most outlier-rich block the densest. Equal ratios give every
  block `sparsity`. Raises ValueError for λ outside [0, min(sparsity, 1 - sparsity) / 2].
  """
  s = masks_lib.check_sparsity(sparsity, caller='owl_sparsities')
  if not 0 <= lam <= min(s, 1 - s) / 2:
    raise ValueError(f'owl_sparsities: lam={lam!r} with sparsity={s} can put a block outside [0, 1); give lam in '
                     f'[0, {min(s, 1 - s) / 2:.4g}] (min(sparsity, 1 - sparsity) / 2).')
  d = np.asarray(ratios, np.float64)
  if d.ndim != 1 or not d.size or not np.isfinite(d).all():
    raise ValueError(f'owl_sparsities: ratios must be a non-empty finite vector [L], got {ratios!r}.')
  span = d.max() - d.min()
  r = (d - d.min()) / span * (2 * lam) if span > 0 else np.zeros_like(d)
  return 1 - (r - r.mean() + (1 - s))


def owl_distribution(threshold: float = 5.0, lam: float = 0.08):
  """OWL as a distribution: (shapes {path: shape}, sparsity, *, stats: `oneshot.DenseStatistics`) -> {path:
  sparsity}, every kernel of block l at S_l (`outlier_ratio` of the block's Wanda scores, then `owl_sparsities`).
  """

  def owl_layers(shapes: Mapping[str, tuple[int, ...]], sparsity: float, *,
                 stats: DenseStatistics) -> dict[str, float]:
    by_block: dict[int, list[str]] = {}
    for p in shapes:
      by_block.setdefault(stats.blocks[p], []).append(p)
    order = sorted(by_block)
    ratios = [_block_ratio(stats, by_block[b], threshold) for b in order]
    per_block = owl_sparsities(ratios, sparsity, lam)
    return {p: float(per_block[k]) for k, b in enumerate(order) for p in by_block[b]}

  return owl_layers


def _block_ratio(stats: DenseStatistics, paths: Sequence[str], threshold: float) -> float:
  """`outlier_ratio` of one block's kernels, holding one kernel's scores at a time (each is computed twice: once
  for the block's mean, once for the count; the same sums and comparisons, so the same ratio to the bit)."""
  total, size = 0.0, 0
  for p in paths:
    a = stats.scores(p)
    total += float(jnp.sum(a))
    size += int(np.prod(a.shape))
    del a
  cut = jnp.float32(threshold * total / size)
  return sum(int(jnp.sum(stats.scores(p) > cut)) for p in paths) / size


def owl(model: Model, params: Params, calib, *, config: WandaConfig = WandaConfig(distribution='owl'),
        **driver_kwargs) -> tuple[Model, Params]:
  """Wanda with OWL's block sparsities (config.distribution='owl'; `outlier_threshold` M, `owl_lambda` λ).

  calib: a `registry.Context` or a list of calibration batches; driver_kwargs as for `wanda`.
  """
  if config.distribution != 'owl':
    raise ValueError(f"owl: distribution={config.distribution!r}; owl is Wanda with distribution='owl' (leave it "
                     f"out), or run wanda(distribution={config.distribution!r}).")
  return wanda(model, params, calib, config=config, **driver_kwargs)


registry.register('owl', WandaConfig, owl, family='pruning', forbids=registry.COMPRESSED, adds='masked',
                  defaults={'distribution': 'owl'}, calibrated=True, check=check_kernels,
                  paper='Yin et al., "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning '
                  'LLMs to High Sparsity" (ICML 2024)')
