"""Every family's methods as recipe stages: `(ctx, model, params, config) -> (model, params)`, registered by name.

Each stage calls the family's public functions; the configs defined here only exist where a family's function
takes loose arguments instead of a config dataclass. A quantizer given `core.Masked` kernels quantizes the
surviving values (pruned entries at zero) and keeps the mask around the quantized value (sparse + quantized).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import re
import shutil
import zlib
from typing import Any

import jax
import jax.numpy as jnp

from jaxcompress import (architecture, core, distillation, lowrank, pruning, quantization, sharing)
from jaxcompress.recipes.registry import Context, register

BLOCKS = r'kernel$'
MAY_TRAIN = ('pruning', 'quantization')  # families whose leaves keep training (masks / codes stay fixed)


def stage_key(ctx: Context, name: str) -> jax.Array:
  """The key of a stage: the run's seed folded with the method's name (the same recipe and seed, the same key)."""
  return jax.random.fold_in(jax.random.key(ctx.seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def _batches(ctx: Context, *, split: bool = False) -> list:
  """The calibration batches. split: this process's share of each batch's rows, for family functions that take
  `mesh=` (the calibration driver all-reduces their statistics); functions without it see every row."""
  if not ctx.calib:
    raise ValueError('this stage needs calibration batches (--calib_data); none were given.')
  if not split or ctx.mesh is None or jax.process_count() == 1:
    return list(ctx.calib)
  n, i = jax.process_count(), jax.process_index()

  def mine(b):
    rows = len(next(iter(b.values())))
    if rows % n:
      raise ValueError(f'calibration batches of {rows} rows do not split over {n} processes; use a multiple.')
    return {k: v[i * rows // n:(i + 1) * rows // n] for k, v in b.items()}
  return [mine(b) for b in ctx.calib]


def _mesh_kwargs(ctx: Context) -> dict:
  return {} if ctx.mesh is None else {'mesh': ctx.mesh}


def _local(tree):
  """Arrays replicated over a multi-process mesh -> this process's copy (later stages run on one device)."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if not x.is_fully_replicated:
        raise ValueError(f'a stage returned an array of shape {x.shape} split over processes; expected replicated.')
      return jnp.asarray(x.addressable_data(0))
    return x
  return jax.tree.map(one, tree)


# Masked kernels under quantizers ---------------------------------------------------------------------------------

def _unmask(params):
  """(params with every `Masked` leaf materialized, {path: mask})."""
  flat = core.paths.flatten(params)
  masks = {p: w.mask for p, w in flat.items() if isinstance(w, core.Masked)}
  if not masks:
    return params, masks
  return core.paths.replace(params, {p: flat[p].materialize() for p in masks}), masks


def _remask(params, masks):
  if not masks:
    return params
  flat = core.paths.flatten(params)
  return core.paths.replace(params, {p: core.Masked(flat[p], m) for p, m in masks.items()})


def _masked_through(fn):
  """A model-level quantizer that also takes `Masked` kernels (quantized values, masks kept)."""
  def apply(ctx, model, params, cfg):
    dense, masks = _unmask(params)
    model, out = fn(ctx, model, dense, cfg)
    return model, _remask(out, masks)
  return apply


# Pruning -----------------------------------------------------------------------------------------------------------

def magnitude(ctx, model, params, cfg):
  return model, pruning.magnitude(params, config=cfg, model=model)


def wanda(ctx, model, params, cfg):
  return model, _local(pruning.wanda(model, params, _batches(ctx, split=True), config=cfg, **_mesh_kwargs(ctx)))


def sparsegpt(ctx, model, params, cfg):
  return model, _local(pruning.sparsegpt(model, params, _batches(ctx, split=True), config=cfg,
                                           **_mesh_kwargs(ctx)))


# Quantization ------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class RTNConfig:
  bits: int = 4  # weight bits (2..8)
  group_size: int | None = 128  # rows per scale (None: one per output column); kernels it does not divide: None
  symmetric: bool = False  # symmetric grid instead of min-max
  target: str = 'blocks'  # 'blocks' (block kernels), 'embeddings' (embedding tables) or 'all'
  include: str = '.'  # path regex within the target
  fmt: str = 'int'  # 'int' (min-max / absmax grid), 'nf4' (QLoRA's NormalFloat, 4 bits), 'fp8' or 'fp8_e5m2'
  clip: str = 'none'  # 'mse': search a shrink of each group's range minimising the weight error (int, nf4)


def _target_selection(model, params, target: str, include: str):
  if target not in ('blocks', 'embeddings', 'all'):
    raise ValueError(f"target={target!r}: choose 'blocks', 'embeddings' or 'all'.")
  sel = model.select(params, embeddings=target != 'blocks')
  emb = core.select(params, include=r'embedding$', embeddings=True).paths
  keep = [p for p in sel.paths if (target == 'all' or (p in emb) == (target == 'embeddings'))]
  rx = re.compile(include)
  keep = [p for p in keep if rx.search(p)]
  if not keep:
    raise ValueError(f'target={target!r} include={include!r} selects no weight of {type(model).__name__}.')
  # A tied head is the embedding table: selecting heads for a blocks-only target would quantize it too.
  wide = target != 'blocks'
  return core.select(params, include=[f'^{re.escape(p)}$' for p in keep], embeddings=wide, head=wide)


def rtn(ctx, model, params, cfg: RTNConfig):
  def one(_, w):
    gs = cfg.group_size if cfg.group_size is None or core.shape_of(w)[0] % cfg.group_size == 0 else None
    return quantization.quantize_weight(jnp.asarray(w), bits=cfg.bits, group_size=gs, symmetric=cfg.symmetric,
                                        fmt=cfg.fmt, clip=cfg.clip)
  return model, _target_selection(model, params, cfg.target, cfg.include).map(one, params)


def gptq(ctx, model, params, cfg):
  return model, quantization.gptq(model, params, _batches(ctx), cfg)


def awq(ctx, model, params, cfg):
  return model, quantization.awq(model, params, _batches(ctx), cfg)


def w8a8(ctx, model, params, cfg):
  return model, quantization.w8a8(model, params, _batches(ctx), cfg)


@dataclasses.dataclass(frozen=True, kw_only=True)
class NonUniformConfig:
  bits: int = 3  # codebook entries 2^bits per output column
  outlier_fraction: float = 0.0  # fraction of weights kept in float (dense-and-sparse)
  iters: int = 20  # weighted k-means iterations


def nonuniform(ctx, model, params, cfg: NonUniformConfig):
  return model, quantization.squeezellm(model, params, _batches(ctx), bits=cfg.bits,
                                        outlier_fraction=cfg.outlier_fraction, iters=cfg.iters)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixedConfig:
  average_bits: float = 3.5  # mean code bits over all block kernels
  candidates: tuple[int, ...] = (2, 3, 4, 8)  # widths a kernel may get
  group_size: int | None = 128  # GPTQ rows per scale
  damp: float = 0.01  # GPTQ damping


def mixed(ctx, model, params, cfg: MixedConfig):
  out, _ = quantization.mixed_precision(model, params, _batches(ctx), average_bits=cfg.average_bits,
                                        candidates=cfg.candidates, group_size=cfg.group_size, damp=cfg.damp)
  return model, out


@dataclasses.dataclass(frozen=True, kw_only=True)
class PQConfig:
  d: int = 4  # rows per sub-vector
  bits: int = 8  # log2 of the centroids per subspace
  iters: int = 20  # k-means iterations


def pq(ctx, model, params, cfg: PQConfig):
  key = stage_key(ctx, 'pq')
  sel = model.select(params)
  keys = dict(zip(sel.paths, jax.random.split(key, len(sel.paths))))
  return model, sel.map(lambda p, w: quantization.product_quantize(jnp.asarray(w), keys[p], d=cfg.d, bits=cfg.bits,
                                                                   iters=cfg.iters), params)


# Low-rank ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class LowRankConfig:
  keep: float | None = 0.5  # each kernel keeps this fraction of its parameters (unless rank/energy/budget is set)
  rank: int | None = None  # one rank for every kernel
  energy: float | None = None  # smallest rank reaching this fraction of the (weighted) spectrum's energy
  budget: float | None = None  # all kernels together keep this fraction; ranks allocated greedily
  alpha: float = 0.5  # ASVD's exponent of the mean activation magnitude
  damp: float = 1e-4  # SVD-LLM's damping of XᵀX


def _lowrank(method: str):
  def apply(ctx, model, params, cfg: LowRankConfig):
    chosen = {k: getattr(cfg, k) for k in ('rank', 'energy', 'budget') if getattr(cfg, k) is not None}
    rule = lowrank.RankRule(**(chosen or {'keep': cfg.keep}))
    svd_cfg = lowrank.SVDConfig(method=method, ranks=rule, alpha=cfg.alpha, damp=cfg.damp,
                                rules=model.selection_rules())
    if method in lowrank.CALIBRATED:  # block by block unless the rule needs every kernel's statistics
      return model, _local(lowrank.compress_model(model, params, _batches(ctx, split=True), config=svd_cfg,
                                                  **_mesh_kwargs(ctx)))
    stats = None
    if method == 'fwsvd':
      if ctx.train is None:
        raise ValueError('fwsvd needs training batches with targets for its Fisher rows.')
      stats = lowrank.fisher_rows(model, params, [ctx.train.batch(i) for i in range(len(ctx.calib) or 1)],
                                  rules=model.selection_rules())
    return model, lowrank.compress(params, config=svd_cfg, stats=stats)
  return apply


# Sharing and architecture ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class ShareConfig:
  group: int = 2  # consecutive blocks per shared group (ALBERT: all of them)
  include: str = '.'  # regex over paths inside a block ('mlp/' shares only the MLPs)
  average: bool = True  # the shared storage starts as the group's mean (False: the first block's weights)
  lora_rank: int = 0  # > 0: each block's shared kernels get their own LoRA delta of this rank (train with distill)
  by: str = 'consecutive'  # grouping: 'consecutive' blocks, or by weight cosine: 'agglomerative' / 'greedy'

  def __post_init__(self):
    if self.lora_rank < 0:
      raise ValueError(f'lora_rank={self.lora_rank} must be >= 0 (0: no per-block deltas).')
    if self.by not in ('consecutive', 'agglomerative', 'greedy'):
      raise ValueError(f"by={self.by!r}; choose 'consecutive', 'agglomerative' or 'greedy'.")


def share(ctx, model, params, cfg: ShareConfig):
  n = model.num_layers(params)
  if cfg.by == 'consecutive':
    groups = sharing.consecutive_groups(n, cfg.group)
  else:  # as many groups as consecutive sharing would make, chosen by the similarity of the blocks' kernels
    groups = sharing.similarity_groups(params, -(-n // cfg.group), block_path=model.block_path, method=cfg.by)
  out = sharing.share_blocks(params, groups, block_path=model.block_path, include=cfg.include, average=cfg.average)
  if cfg.lora_rank:  # relaxed recursive sharing (Bae et al. 2024): a per-place low-rank delta over the storage
    out = sharing.add_deltas(out, stage_key(ctx, 'share'), rank=cfg.lora_rank)
  return model, out


@dataclasses.dataclass(frozen=True, kw_only=True)
class TieConfig:
  how: str = 'average'  # 'average' of the input table and the head, or 'embedding' (keep the input table)


def tie(ctx, model, params, cfg: TieConfig):
  return sharing.tie_embeddings(model, params, how=cfg.how)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GQAConfig:
  kv_heads: int = 1  # key/value heads after mean-pooling (1: MQA)


def gqa(ctx, model, params, cfg: GQAConfig):
  return architecture.convert_to_gqa(model, params, cfg.kv_heads)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StructuredConfig:
  flops: float = 0.6  # kept fraction of the blocks' head and neuron FLOPs, in (0, 1]
  tune: bool = True  # least-squares scales of the kept units (Kwon's mask tuning)
  probes: int = 4  # encoders: sampled targets per sentence of the embedding Fisher


def structured(ctx, model, params, cfg: StructuredConfig):
  """Kwon et al.: Fisher of head and neuron masks on the calibration rows, the FLOPs-budget search, slicing,
  then least-squares tuning. The result has physically narrower layers."""
  batches = _batches(ctx)
  loss = pruning.structured.next_token_loss(model) if model.causal else pruning.structured.embedding_loss(
      model, cfg.probes)
  heads, neurons = pruning.structured.fisher(model, params, batches, loss, key=stage_key(ctx, 'structured'))
  seq_len = int(batches[0]['tokens'].shape[1])
  keep = pruning.structured.search(model, params, heads, neurons, budget=cfg.flops, seq_len=seq_len)
  small_model, small = pruning.structured.slice_units(model, params, keep)
  if cfg.tune:
    tune_batches = [{**b, 'tokens': b['tokens'][:, :-1]} if model.causal else b for b in batches]
    small = pruning.structured.tune(model, params, small_model, small, tune_batches)
  return small_model, small


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEfyConfig:
  num_experts: int = 8  # experts each MLP's neurons are clustered into
  top_k: int = 4  # experts each token runs
  capacity: float = 1.25  # tokens an expert takes, as a multiple of its even share


def moefy(ctx, model, params, cfg: MoEfyConfig):
  return architecture.moefy_model(model, params, num_experts=cfg.num_experts, top_k=cfg.top_k,
                                  capacity=cfg.capacity, key=stage_key(ctx, 'moefy'))


# Training stages ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class RecoverConfig:
  steps: int = 100  # optimizer steps
  learning_rate: float = 1e-4  # peak learning rate (warm-up then cosine decay)
  output: str | None = None  # KD output term: None picks 'soft_kl' for causal LMs, 'embedding' for encoders
  temperature: float = 2.0  # softening of both distributions in the logit terms
  alpha: float = 0.5  # weight of KD against the task loss (causal LMs; encoders use KD alone)
  beta: float = 0.5  # generalized JSD's beta for output='jsd' (GKD on the data)
  hidden_weight: float = 0.0  # TinyBERT: weight of the hidden-state MSE over layer_map
  attention_weight: float = 0.0  # TinyBERT: weight of the attention-map MSE over layer_map
  relation_weight: float = 0.0  # MiniLM: weight of the last block's Q-Q, K-K, V-V relation KL
  relation_heads: int = 1  # MiniLM: relation heads the Q/K/V widths are split into
  layer_map: tuple[tuple[int, int], ...] = ()  # (student, teacher) hidden-state layers; (): TinyBERT's uniform map

  def __post_init__(self):  # the distillation family's checks of these values, at parse time
    distillation.DistillConfig(output=self.output or 'soft_kl', temperature=self.temperature, alpha=self.alpha,
                               beta=self.beta, hidden_weight=self.hidden_weight,
                               attention_weight=self.attention_weight, relation_weight=self.relation_weight,
                               relation_heads=self.relation_heads, layer_map=self.layer_map)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig:
  rank: int = 8  # adapter rank
  lora_alpha: float = 16.0  # adapter scale numerator (scale = lora_alpha / rank)
  steps: int = 100  # optimizer steps (KD from the uncompressed model)
  learning_rate: float = 1e-3  # peak learning rate
  merge: bool = False  # fold the adapters into dense kernels afterwards (False keeps base + adapter leaves)


def _fit(ctx: Context, name: str, model, params, objective, *, steps: int, learning_rate: float, trainable=None,
         wrap=None, transforms=(), finish=None, teacher: bool = True):
  """Trains `params` for `steps` on ctx.train with a warm-up + cosine AdamW; wrap(tx) -> tx replaces the optimizer
  (a method's optax wrapper), `transforms` run inside the step, finish(final TrainState) -> params (default: its
  params); teacher: hold the uncompressed params as `frozen` (objectives that distil read them)."""
  from jaxcompress.train import loop, optim, state
  if ctx.train is None:
    raise ValueError(f'{name} trains, and this run has no training batches.')
  if steps <= 0:
    raise ValueError(f'{name}: steps={steps} must be > 0.')
  run_dir = pathlib.Path(ctx.run_dir or '.') / 'stages' / name
  shutil.rmtree(run_dir, ignore_errors=True)
  cfg = loop.LoopConfig(steps=steps, batch_size=ctx.train.batch_size, run_dir=str(run_dir), seed=ctx.seed,
                        checkpoint_every=0, async_checkpoint=False, progress=False, resume=False,
                        log_every=max(1, steps // 4), mesh=(1, 1, 1))
  opt = optim.make_optimizer(optim.OptimizerConfig(learning_rate=learning_rate, warmup_steps=max(1, steps // 10),
                                                   total_steps=steps))
  if wrap is not None:
    opt = wrap(opt)
  result = loop.fit(cfg, model=model, params=params, objective=objective, optimizer=opt, data=ctx.train,
                    trainable=trainable or state.floating, frozen=ctx.reference if teacher else None,
                    transforms=transforms)
  return result.state.params if finish is None else finish(result.state)


def _kd(model, ctx: Context, cfg) -> Any:
  output = cfg.output or ('soft_kl' if model.causal else 'embedding')
  # An encoder has no task loss: its objective is the KD term alone (alpha=1).
  alpha = getattr(cfg, 'alpha', 0.5) if model.causal else 1.0
  extra = {k: getattr(cfg, k) for k in ('beta', 'hidden_weight', 'attention_weight', 'relation_weight',
                                        'relation_heads') if hasattr(cfg, k)}
  if extra.get('hidden_weight') or extra.get('attention_weight'):
    extra['layer_map'] = getattr(cfg, 'layer_map', ()) or uniform_layer_map(
        model, ctx.reference_model, embeddings=not extra.get('attention_weight'))
  dcfg = distillation.DistillConfig(output=output, temperature=getattr(cfg, 'temperature', 2.0), alpha=alpha,
                                    **extra)
  return distillation.distillation(model, ctx.reference_model, dcfg)


def uniform_layer_map(student, teacher, *, embeddings: bool = True) -> tuple[tuple[int, int], ...]:
  """TinyBERT's uniform mapping: student block m (1..M) <- teacher block m·N/M, plus the embeddings (0, 0)
  unless `embeddings` is False (attention transfer: the embeddings have no attention map)."""
  m, n = student.config.num_layers, teacher.config.num_layers
  return ((0, 0),) * embeddings + tuple((k, k * n // m) for k in range(1, m + 1))


def distill(ctx, model, params, cfg: RecoverConfig):
  return model, _fit(ctx, 'distill', model, params, _kd(model, ctx, cfg), steps=cfg.steps,
                     learning_rate=cfg.learning_rate)


def lora(ctx, model, params, cfg: LoRAConfig):
  adapted = lowrank.add_lora(params, stage_key(ctx, 'lora'), rank=cfg.rank, alpha=cfg.lora_alpha,
                             rules=model.selection_rules())
  kd = _kd(model, ctx, RecoverConfig(output=None))
  out = _fit(ctx, 'lora', model, adapted, kd, steps=cfg.steps, learning_rate=cfg.learning_rate,
             trainable=lowrank.LORA_TRAINABLE)
  return model, lowrank.merge(out) if cfg.merge else out


# Pruning during training -----------------------------------------------------------------------------------------
# Each trains with `_fit` and returns `core.Masked` block kernels (what later stages, e.g. gptq, take).

_PRUNE_FORBIDS = ('masked', 'quantized', 'lowrank', 'shared', 'adapter')  # dense kernels only


def _check_steps(cfg) -> None:
  """Schedule steps fall inside the run: 0 <= begin_step <= end_step <= steps, update_every >= 1."""
  begin = getattr(cfg, 'begin_step', 0)
  end = cfg.end_step if cfg.end_step is not None else cfg.steps
  if not 0 <= begin <= end:
    raise ValueError(f'begin_step={begin} must lie in [0, end_step={end}].')
  if cfg.end_step is not None and not 1 <= cfg.end_step <= cfg.steps:
    raise ValueError(f'end_step={cfg.end_step} must lie in [1, steps={cfg.steps}] (the schedule ends inside the '
                     'run); None picks a default.')
  if cfg.update_every is not None and cfg.update_every < 1:
    raise ValueError(f'update_every={cfg.update_every} must be >= 1 (None: a tenth of the steps).')
  if not 0.0 <= cfg.alpha <= 1.0:
    raise ValueError(f'alpha={cfg.alpha} must lie in [0, 1] (0: task loss only, 1: KD only).')


@dataclasses.dataclass(frozen=True, kw_only=True)
class GradualPruneConfig:
  sparsity: float = 0.5  # sparsity of every block kernel once the cubic schedule ends
  steps: int = 100  # optimizer steps
  learning_rate: float = 1e-4  # peak learning rate (warm-up then cosine decay)
  begin_step: int = 0  # first pruning step
  end_step: int | None = None  # step where the schedule reaches `sparsity` (None: 70% of steps)
  update_every: int | None = None  # steps between mask updates (None: a tenth of the steps)
  alpha: float = 0.0  # weight of KD from the uncompressed model against the task loss (0: task loss only)

  def __post_init__(self):
    _check_steps(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MovementStageConfig:
  sparsity: float = 0.5  # sparsity of every block kernel once the cubic schedule ends
  steps: int = 100  # optimizer steps
  learning_rate: float = 1e-4  # peak learning rate of the weights (warm-up then cosine decay)
  score_learning_rate: float = 1e-2  # Adam step size of the scores (constant)
  begin_step: int = 0  # first step the schedule moves
  end_step: int | None = None  # step where the schedule reaches `sparsity` (None: 70% of steps)
  update_every: int | None = None  # steps between changes of the kept count (None: every step, as the paper)
  alpha: float = 0.0  # weight of KD from the uncompressed model against the task loss (0: task loss only)

  def __post_init__(self):
    _check_steps(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DynamicSparseConfig:
  sparsity: float = 0.5  # constant sparsity of every block kernel from step 0
  init: str = 'magnitude'  # step-0 mask: 'magnitude' (largest |W|, for the pretrained models stages take) | 'random'
  steps: int = 100  # optimizer steps
  learning_rate: float = 1e-4  # peak learning rate (warm-up then cosine decay)
  update_every: int | None = None  # steps between drop-and-regrow updates (None: a tenth of the steps)
  end_step: int | None = None  # last mask update (None: 75% of steps, as RigL)
  drop_fraction: float = 0.3  # fraction of kept weights replaced at the first update (cosine decay)
  alpha: float = 0.0  # weight of KD from the uncompressed model against the task loss (0: task loss only)

  def __post_init__(self):
    _check_steps(self)
    if not 0.0 < self.drop_fraction < 1.0:
      raise ValueError(f'drop_fraction={self.drop_fraction} must lie in (0, 1).')
    if self.init not in ('magnitude', 'random'):
      raise ValueError(f"init={self.init!r} must be 'magnitude' (pretrained weights) or 'random' (from scratch).")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SoftMovementStageConfig:
  penalty: float = 10.0  # λ on mean σ(S): sets the sparsity reached (larger: sparser); no target is hit exactly
  steps: int = 100  # optimizer steps
  learning_rate: float = 1e-4  # peak learning rate of the weights (warm-up then cosine decay)
  score_learning_rate: float = 1e-2  # Adam step size of the scores (constant)
  threshold: float = 0.0  # τ: a weight is kept while its score is above it
  initial_score: float = 0.1  # every score at the start (above τ: the run starts dense)
  alpha: float = 0.0  # weight of KD from the uncompressed model against the task loss (0: task loss only)

  def __post_init__(self):
    pruning.movement.check_config(pruning.movement.SoftMovementConfig(
        penalty=self.penalty, threshold=self.threshold, initial_score=self.initial_score,
        score_learning_rate=self.score_learning_rate))
    if not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f'alpha={self.alpha} must lie in [0, 1] (0: task loss only, 1: KD only).')


def _prune_objective(model, ctx: Context, alpha: float):
  """The task loss alone (alpha=0, causal LMs: no teacher forward), else KD mixed in as `distill` does."""
  from jaxcompress.train import objectives
  if model.causal and alpha == 0.0:
    return objectives.causal_lm(model)
  return _kd(model, ctx, RecoverConfig(alpha=alpha))


def _stage_seed(ctx: Context, name: str) -> int:
  return int(jax.random.randint(stage_key(ctx, name), (), 0, 2 ** 31 - 1))


def gradual(ctx, model, params, cfg: GradualPruneConfig):
  end = cfg.end_step if cfg.end_step is not None else max(cfg.begin_step, 1, round(0.7 * cfg.steps))
  gcfg = pruning.gradual.GradualConfig(final_sparsity=cfg.sparsity, begin_step=cfg.begin_step, end_step=end,
                                       frequency=cfg.update_every or max(1, cfg.steps // 10),
                                       exclude=tuple(model.head_patterns))
  out = _fit(ctx, 'gradual', model, params, _prune_objective(model, ctx, cfg.alpha), steps=cfg.steps,
             learning_rate=cfg.learning_rate, transforms=pruning.gradual.gradual_magnitude(gcfg),
             finish=lambda s: pruning.gradual.as_masked(s.params, s.transform_state))
  return model, out


def _sparse_optimizer(name: str):
  def apply(ctx, model, params, cfg):
    end = cfg.end_step if cfg.end_step is not None else max(1, round(0.75 * cfg.steps))
    scfg = pruning.gradual.SparseTrainingConfig(method=name, sparsity=cfg.sparsity, init=cfg.init, end_step=end,
                                                update_every=cfg.update_every or max(1, cfg.steps // 10),
                                                drop_fraction=cfg.drop_fraction, seed=_stage_seed(ctx, name),
                                                exclude=tuple(model.head_patterns))
    out = _fit(ctx, name, model, params, _prune_objective(model, ctx, cfg.alpha), steps=cfg.steps,
               learning_rate=cfg.learning_rate, wrap=lambda tx: pruning.gradual.sparse_optimizer(tx, scfg),
               finish=lambda s: pruning.gradual.as_masked(s.params, pruning.gradual.sparse_masks(s.opt_state)))
    return model, out
  return apply


def movement(ctx, model, params, cfg: MovementStageConfig):
  end = cfg.end_step if cfg.end_step is not None else max(cfg.begin_step, 1, round(0.7 * cfg.steps))
  mcfg = pruning.movement.HardMovementConfig(sparsity=cfg.sparsity, begin_step=cfg.begin_step, end_step=end,
                                             update_every=cfg.update_every or 1,
                                             score_learning_rate=cfg.score_learning_rate,
                                             exclude=tuple(model.head_patterns))
  out = _fit(ctx, 'movement', model, pruning.movement.with_scores(params, mcfg),
             _prune_objective(model, ctx, cfg.alpha), steps=cfg.steps, learning_rate=cfg.learning_rate,
             wrap=lambda tx: pruning.movement.hard_movement_optimizer(tx, mcfg),
             transforms=pruning.movement.topk_schedule(mcfg), finish=lambda s: pruning.movement.to_masked(s.params))
  return model, out


def soft_movement(ctx, model, params, cfg: SoftMovementStageConfig):
  mcfg = pruning.movement.SoftMovementConfig(penalty=cfg.penalty, threshold=cfg.threshold,
                                             initial_score=cfg.initial_score,
                                             score_learning_rate=cfg.score_learning_rate,
                                             exclude=tuple(model.head_patterns))
  out = _fit(ctx, 'soft_movement', model, pruning.movement.with_scores(params, mcfg),
             _prune_objective(model, ctx, cfg.alpha), steps=cfg.steps, learning_rate=cfg.learning_rate,
             wrap=lambda tx: pruning.movement.soft_movement_optimizer(tx, mcfg),
             finish=lambda s: pruning.movement.to_masked(s.params))
  return model, out


register('gradual', GradualPruneConfig, gradual, family='pruning', forbids=_PRUNE_FORBIDS, adds='masked',
         trains=True, paper='Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of pruning for model '
         'compression" (2017): magnitude pruning to a cubic schedule during training')
register('movement', MovementStageConfig, movement, family='pruning', forbids=_PRUNE_FORBIDS, adds='masked',
         trains=True, paper='Sanh, Wolf & Rush, "Movement Pruning: Adaptive Sparsity by Fine-Tuning" (NeurIPS '
         '2020): hard movement, W ⊙ Top_v(S) with learned straight-through scores, v on the cubic schedule')
register('soft_movement', SoftMovementStageConfig, soft_movement, family='pruning', forbids=_PRUNE_FORBIDS,
         adds='masked', trains=True, paper='Sanh, Wolf & Rush, "Movement Pruning: Adaptive Sparsity by Fine-Tuning" '
         '(NeurIPS 2020): soft movement, learned scores above a fixed threshold, sparsity set by λ·mean σ(S)')
register('set', DynamicSparseConfig, _sparse_optimizer('set'), family='pruning', forbids=_PRUNE_FORBIDS,
         adds='masked', trains=True, paper='Mocanu et al., "Scalable training of artificial neural networks with '
         'adaptive sparse connectivity inspired by network science" (Nature Communications 2018): SET')
register('rigl', DynamicSparseConfig, _sparse_optimizer('rigl'), family='pruning', forbids=_PRUNE_FORBIDS,
         adds='masked', trains=True, paper='Evci et al., "Rigging the Lottery: Making All Tickets Winners" '
         '(ICML 2020): RigL')


# The registry ------------------------------------------------------------------------------------------------------

COMPRESSED = ('masked', 'quantized', 'lowrank', 'shared', 'adapter')

register('magnitude', pruning.MagnitudeConfig, magnitude, family='pruning', forbids=COMPRESSED, adds='masked',
         paper='Han et al., "Learning both Weights and Connections for Efficient Neural Networks" (NeurIPS 2015)')
register('wanda', pruning.WandaConfig, wanda, family='pruning', forbids=COMPRESSED, adds='masked', calibrated=True,
         paper='Sun et al., "A Simple and Effective Pruning Approach for Large Language Models" (ICLR 2024)')
register('sparsegpt', pruning.SparseGPTConfig, sparsegpt, family='pruning', forbids=COMPRESSED, adds='masked',
         calibrated=True, paper='Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately '
         'Pruned in One-Shot" (ICML 2023)')
register('rtn', RTNConfig, _masked_through(rtn), family='quantization',
         forbids=('quantized', 'lowrank', 'shared', 'adapter'), adds='quantized',
         paper='round-to-nearest min-max baseline (Jacob et al., CVPR 2018 grids)')
register('gptq', quantization.GPTQConfig, gptq, family='quantization',
         forbids=('quantized', 'lowrank', 'shared', 'adapter'), adds='quantized', calibrated=True,
         paper='Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained '
         'Transformers" (ICLR 2023)')
register('awq', quantization.AWQConfig, awq, family='quantization',
         forbids=('quantized', 'lowrank', 'shared', 'adapter'), adds='quantized', calibrated=True,
         paper='Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration" '
         '(MLSys 2024)')
register('w8a8', quantization.W8A8Config, w8a8, family='quantization', forbids=COMPRESSED, adds='quantized',
         calibrated=True, defaults={'alpha': None}, paper='int8 weights per channel, int8 activations per token')
register('smoothquant', quantization.W8A8Config, w8a8, family='quantization', forbids=COMPRESSED, adds='quantized',
         calibrated=True, defaults={'alpha': 0.5},
         paper='Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for LLMs" (ICML 2023)')
register('llm_int8', quantization.W8A8Config, w8a8, family='quantization', forbids=COMPRESSED, adds='quantized',
         calibrated=True, defaults={'alpha': None, 'outlier_threshold': 6.0},
         paper='Dettmers et al., "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale" (NeurIPS 2022)')
register('nonuniform', NonUniformConfig, nonuniform, family='quantization', forbids=COMPRESSED, adds='quantized',
         calibrated=True, paper='Kim et al., "SqueezeLLM: Dense-and-Sparse Quantization" (ICML 2024)')
register('mixed', MixedConfig, mixed, family='quantization', forbids=COMPRESSED, adds='quantized', calibrated=True,
         paper='per-layer widths from measured GPTQ sensitivity (HAWQ-style allocation, Dong et al., ICCV 2019)')
register('pq', PQConfig, pq, family='quantization', forbids=COMPRESSED, adds='quantized',
         paper='Jégou et al., "Product Quantization for Nearest Neighbor Search" (TPAMI 2011); Stock et al., '
         '"And the Bit Goes Down" (ICLR 2020)')
register('svd', LowRankConfig, _lowrank('svd'), family='lowrank', forbids=COMPRESSED, adds='lowrank',
         paper='truncated SVD (Eckart-Young); Denton et al. (NeurIPS 2014)')
register('fwsvd', LowRankConfig, _lowrank('fwsvd'), family='lowrank', forbids=COMPRESSED, adds='lowrank',
         trains=False, paper='Hsu et al., "Language Model Compression with Weighted Low-rank Factorization" '
         '(ICLR 2022)')
register('asvd', LowRankConfig, _lowrank('asvd'), family='lowrank', forbids=COMPRESSED, adds='lowrank',
         calibrated=True, paper='Yuan et al., "ASVD: Activation-aware Singular Value Decomposition" (2023)')
register('svd_llm', LowRankConfig, _lowrank('svd_llm'), family='lowrank', forbids=COMPRESSED, adds='lowrank',
         calibrated=True, paper='Wang et al., "SVD-LLM: Truncation-aware Singular Value Decomposition" (2024)')
register('lora', LoRAConfig, lora, family='lowrank', forbids=('adapter', 'shared'), adds='adapter', trains=True,
         paper='Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022), trained by KD')
register('qlora', LoRAConfig, lora, family='lowrank', forbids=('adapter', 'shared'), adds='adapter', trains=True,
         paper='Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs" (NeurIPS 2023): LoRA over a '
         'quantized base')
register('share', ShareConfig, share, family='sharing', forbids=COMPRESSED + ('architecture',), adds='shared',
         paper='Lan et al., "ALBERT" (ICLR 2020): cross-layer sharing of consecutive blocks; lora_rank: Bae et al., '
         '"Relaxed Recursive Transformers" (2024)')
register('tie_embeddings', TieConfig, tie, family='sharing', forbids=COMPRESSED, adds='shared',
         paper='Press & Wolf, "Using the Output Embedding to Improve Language Models" (EACL 2017)')
register('gqa', GQAConfig, gqa, family='architecture', forbids=COMPRESSED, adds='architecture',
         paper='Ainslie et al., "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head '
         'Checkpoints" (EMNLP 2023)')
register('structured', StructuredConfig, structured, family='pruning', forbids=COMPRESSED + ('architecture',),
         adds='architecture', calibrated=True, paper='Kwon et al., "A Fast Post-Training Pruning Framework for '
         'Transformers" (NeurIPS 2022): heads and neurons to a FLOPs budget, physically smaller layers')
register('moefy', MoEfyConfig, moefy, family='architecture', forbids=COMPRESSED + ('architecture',),
         adds='architecture', paper='Zhang et al., "MoEfication: Transformer Feed-forward Layers are Mixtures of '
         'Experts" (ACL Findings 2022)')
register('distill', RecoverConfig, distill, family='distillation', trains=True,
         paper='Hinton et al., "Distilling the Knowledge in a Neural Network" (2015): recovery fine-tuning with KD '
         'from the uncompressed model')
register('recover', RecoverConfig, distill, family='distillation', trains=True, defaults={'alpha': 0.0},
         paper='task-loss fine-tuning of the compressed model (alpha=0: no KD term; encoders always use KD)')


# Training-time quantization and distillation stages ----------------------------------------------------------------
# qat, lsq, llm_qat (quantization-aware training, ending in real `core.Quantized` leaves), gkd (on-policy
# distillation), seq_kd (sequence-level KD), drop_layers (a shallower student from the model's own blocks) and
# fresh_student (a randomly initialised one).

@dataclasses.dataclass(frozen=True, kw_only=True)
class QATConfig:
  bits: int = 4  # weight bits (2..8)
  group_size: int | None = 128  # rows per scale (None: one per output column); kernels it does not divide: None
  symmetric: bool = False  # symmetric grid instead of min-max
  act_bits: int | None = None  # also round each block linear's input per token to this many bits (None: weights)
  fmt: str = 'int'  # weight grid: 'int' (min-max / absmax), 'nf4' (4 bits) or 'fp8'
  steps: int = 100  # optimizer steps with the fake-quantized forward
  learning_rate: float = 1e-4  # peak learning rate (warm-up then cosine decay)

  def __post_init__(self):
    if self.act_bits is not None and not 2 <= self.act_bits <= 16:
      raise ValueError(f'act_bits={self.act_bits} must lie in [2, 16] (or None: weights only).')
    if self.fmt not in ('int', 'nf4', 'fp8'):
      raise ValueError(f"fmt={self.fmt!r}; choose 'int', 'nf4' or 'fp8'.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LSQConfig:
  bits: int = 4  # weight bits (2..8); symmetric, one learned step per output column
  steps: int = 100  # optimizer steps training weights and steps together
  learning_rate: float = 1e-4  # peak learning rate (warm-up then cosine decay)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GKDConfig:
  steps: int = 100  # optimizer steps
  learning_rate: float = 1e-4  # peak learning rate (warm-up then cosine decay)
  fraction: float = 0.5  # lambda: probability that a batch's continuations are sampled from the student
  divergence: str = 'jsd'  # 'jsd' (generalized JSD, GKD), 'soft_kl' (forward KL) or 'reverse_kl'
  beta: float = 0.5  # the JSD's beta, in (0, 1): towards 0 forward KL, towards 1 reverse KL
  temperature: float = 1.0  # softening of both distributions in the divergence
  sample_temperature: float = 1.0  # the student's sampling temperature
  prompt_len: int = 8  # tokens of each data row kept as the prompt; the student writes the rest
  top_k: int | None = None  # sample among the student's top_k tokens only (None: the whole vocabulary)

  def __post_init__(self):  # the family's own checks, at parse time
    distillation.OnPolicyConfig(fraction=self.fraction, prompt_len=self.prompt_len,
                                temperature=self.sample_temperature, top_k=self.top_k)
    if self.divergence not in ('jsd', 'soft_kl', 'reverse_kl'):
      raise ValueError(f"divergence={self.divergence!r}; choose 'jsd', 'soft_kl' or 'reverse_kl'.")
    distillation.DistillConfig(output=self.divergence, beta=self.beta, temperature=self.temperature, alpha=1.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SeqKDConfig:
  steps: int = 100  # optimizer steps on the teacher's text
  learning_rate: float = 1e-4  # peak learning rate (warm-up then cosine decay)
  rows: int = 256  # distinct sequences the uncompressed model samples (the batches cycle over them)
  prompt_len: int = 8  # tokens of a training row each sample starts from
  sample_temperature: float = 1.0  # the teacher's sampling temperature

  def __post_init__(self):
    for name in ('rows', 'prompt_len'):
      if getattr(self, name) < 1:
        raise ValueError(f'{name}={getattr(self, name)} must be >= 1.')
    if not self.sample_temperature > 0:
      raise ValueError(f'sample_temperature={self.sample_temperature} must be > 0.')


@dataclasses.dataclass(frozen=True, kw_only=True)
class DropLayersConfig:
  layers: tuple[int, ...] | None = None  # blocks kept, increasing (None: every other block, as DistilBERT)


def _task_objective(model, ctx: Context):
  """Plain QAT's loss: next-token NLL for causal LMs; encoders have no task loss and distil their embeddings."""
  from jaxcompress.train import objectives
  return objectives.causal_lm(model) if model.causal else _kd(model, ctx, RecoverConfig(output=None))


def _qat_groups(model, params, group_size: int | None) -> list[tuple[core.Rules, int | None]]:
  """(rules, group size) per set of block kernels sharing a group size (group_size where it divides the
  kernel's input width, else one scale per column, as `rtn`)."""
  sel = model.select(params)
  groups: dict[int | None, list[str]] = {}
  for path, shape in zip(sel.paths, sel.shapes):
    gs = group_size if group_size is not None and shape[0] % group_size == 0 else None
    groups.setdefault(gs, []).append(f'^{re.escape(path)}$')
  return [(model.selection_rules(include=tuple(paths)), gs) for gs, paths in groups.items()]


def _dense_values(params):
  """`Masked` kernels with their pruned entries zeroed in the value (what a quantizer of a masked kernel sees)."""
  dense, masks = _unmask(params)
  return _remask(dense, masks)


def _quantization_aware(objective_of):
  """A QAT stage: train under `fake_quant` of every block kernel, then quantize with the same grids."""
  def apply(ctx, model, params, cfg: QATConfig):
    params = _dense_values(params)
    groups = _qat_groups(model, params, cfg.group_size)
    kw = dict(bits=cfg.bits, symmetric=cfg.symmetric, act_bits=cfg.act_bits, fmt=cfg.fmt)
    fq = [quantization.fake_quant(rules, group_size=gs, **kw) for rules, gs in groups]
    name = objective_of.__name__.strip('_')
    trained = _fit(ctx, name, model, params, objective_of(model, ctx), steps=cfg.steps,
                   learning_rate=cfg.learning_rate, transforms=fq, teacher=name == 'llm_qat' or not model.causal)
    for rules, gs in groups:  # one compiled quantization per group, not one dispatch per array op
      trained = jax.jit(functools.partial(quantization.finalize_qat, rules=rules, group_size=gs, **kw))(trained)
    return model, trained
  return apply


def _qat(model, ctx):
  return _task_objective(model, ctx)


def _llm_qat(model, ctx):
  if not model.causal:
    raise ValueError('llm_qat distils next-token distributions of a causal LM; for an encoder use qat (which '
                     'distils the embeddings).')
  return quantization.llm_qat.distillation_objective(model, teacher=ctx.reference_model)


def lsq(ctx, model, params, cfg: LSQConfig):
  dense, masks = _unmask(params)
  wrapped = _remask(quantization.add_lsq(dense, model.selection_rules(), bits=cfg.bits), masks)
  trained = _fit(ctx, 'lsq', model, wrapped, _task_objective(model, ctx), steps=cfg.steps,
                 learning_rate=cfg.learning_rate, teacher=not model.causal)
  return model, jax.jit(quantization.finalize_lsq)(trained)


def gkd(ctx, model, params, cfg: GKDConfig):
  if not model.causal:
    raise ValueError('gkd samples continuations from a causal LM; for an encoder use distill.')
  dcfg = distillation.DistillConfig(output=cfg.divergence, beta=cfg.beta, temperature=cfg.temperature, alpha=1.0)
  policy = distillation.OnPolicyConfig(fraction=cfg.fraction, prompt_len=cfg.prompt_len,
                                       temperature=cfg.sample_temperature, top_k=cfg.top_k)
  objective = distillation.on_policy_distillation(model, ctx.reference_model, dcfg, policy)
  return model, _fit(ctx, 'gkd', model, params, objective, steps=cfg.steps, learning_rate=cfg.learning_rate)


def teacher_text(ctx: Context, cfg: SeqKDConfig):
  """[rows, T + 1] int32 sequences the uncompressed model sampled from the first prompt_len tokens of training
  rows (rows drawn with the stage key; KV-cache decoding, temperature cfg.sample_temperature)."""
  import numpy as np

  from jaxcompress import models
  seqs = np.asarray(ctx.train.sequences)
  t = seqs.shape[1]
  if cfg.prompt_len >= t:
    raise ValueError(f'seq_kd: prompt_len={cfg.prompt_len} leaves nothing to sample in rows of {t} tokens.')
  key = stage_key(ctx, 'seq_kd')
  pick, sample = jax.random.split(key)
  rows = np.asarray(jax.random.choice(pick, len(seqs), (cfg.rows,), replace=len(seqs) < cfg.rows))
  prompts = jnp.asarray(seqs[rows, :cfg.prompt_len], jnp.int32)
  out, step = [], ctx.train.batch_size
  for i in range(0, cfg.rows, step):
    out.append(np.asarray(models.generate(ctx.reference_model, ctx.reference, prompts[i:i + step],
                                          max_new_tokens=t - cfg.prompt_len, temperature=cfg.sample_temperature,
                                          key=jax.random.fold_in(sample, i))))
  return np.concatenate(out).astype(np.int32)


def seq_kd(ctx, model, params, cfg: SeqKDConfig):
  from jaxcompress.data import pipeline
  from jaxcompress.train import objectives
  if not model.causal or not hasattr(ctx.train, 'sequences'):
    raise ValueError('seq_kd trains a causal LM on text its teacher samples; it needs causal-LM training rows.')
  text = pipeline.LMBatches(sequences=teacher_text(ctx, cfg), batch_size=ctx.train.batch_size, seed=ctx.seed)
  ctx = dataclasses.replace(ctx, train=text)
  return model, _fit(ctx, 'seq_kd', model, params, objectives.causal_lm(model), steps=cfg.steps,
                     learning_rate=cfg.learning_rate, teacher=False)


def fresh_student(ctx, model, params, cfg):
  student = distillation.students.fresh(model, cfg)
  return student, jax.jit(student.init)(stage_key(ctx, 'fresh_student'))


def drop_layers(ctx, model, params, cfg: DropLayersConfig):
  student, small, _ = distillation.students.select_layers(model, params, cfg.layers)
  return student, small


TRAINED_QUANT = ('quantized', 'lowrank', 'shared', 'adapter')  # fake_quant / add_lsq take dense or Masked
register('qat', QATConfig, _quantization_aware(_qat), family='quantization', forbids=TRAINED_QUANT,
         adds='quantized', trains=True,
         paper='Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only '
         'Inference" (CVPR 2018): straight-through fake quantization, then the same round-to-nearest grid')
register('lsq', LSQConfig, lsq, family='quantization', forbids=TRAINED_QUANT, adds='quantized', trains=True,
         paper='Esser et al., "Learned Step Size Quantization" (ICLR 2020)')
register('llm_qat', QATConfig, _quantization_aware(_llm_qat), family='quantization', forbids=TRAINED_QUANT,
         adds='quantized', trains=True, paper='Liu et al., "LLM-QAT: Data-Free Quantization Aware Training for '
         'Large Language Models" (2023): QAT on KL to the full-precision model (trained on the corpus)')
register('gkd', GKDConfig, gkd, family='distillation', trains=True,
         paper='Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated '
         'Mistakes" (ICLR 2024)')
register('seq_kd', SeqKDConfig, seq_kd, family='distillation', trains=True,
         paper='Kim & Rush, "Sequence-Level Knowledge Distillation" (EMNLP 2016)')
register('fresh_student', distillation.students.StudentConfig, fresh_student, family='distillation',
         forbids=COMPRESSED + ('architecture',), adds='architecture',
         paper='a randomly initialised student of the model\'s family at the given depth and width (train it with '
         'distill, e.g. Hinton et al. 2015)')
register('drop_layers', DropLayersConfig, drop_layers, family='architecture', forbids=('shared', 'architecture'),
         adds='architecture', paper='Sanh et al., "DistilBERT" (2019): a shallower student from the teacher\'s '
         'own blocks (train it with distill)')
