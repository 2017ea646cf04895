"""`Model`: a frozen, hashable model spec whose methods are pure functions of a parameter pytree.

Outside `models/` nothing sees Flax: a model is `(spec, params)`. The spec builds its NNX module from the
parameters on every call (`nnx.merge` runs once, at trace time under jit), so params may hold any compressed
leaf and any layer may have been narrowed.

The pieces layer-wise calibration needs (SparseGPT, GPTQ, AWQ, ...; `jaxcompress.calibration` streams them):

    h = model.embed(params, tokens)
    ctx = model.context(tokens)
    for i in range(model.num_layers(params)):
      h, inputs = model.block_linear_inputs(model.block_params(params, i), h, ctx)  # {path: x} in call order
    logits = model.head(params, h)
    model.block_structure()   # (LinearGroup('attn_in', kernels=('attn/q_proj/kernel', ...), norm='attn_norm'), ...)
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcompress import core
from jaxcompress.core.selection import HEADS, KERNELS, Patterns
from jaxcompress.models import ids, layers, moe

Params = dict[str, Any]
# A sharding rule: (regex over weight paths, mesh axis of each dimension); the first matching rule wins.
ShardingRule = tuple[str, tuple[str | None, ...]]

# Model-agnostic rules: every 2-D kernel [in, out] and embedding table [vocab, d] split over 'fsdp' only.
FSDP_RULES: tuple[ShardingRule, ...] = (
    (r'(^|/)kernel$', ('fsdp', None)),
    (r'(^|/)embedding$', (None, 'fsdp')),
)
INTERMEDIATES = ('hidden_states', 'attention')  # what `apply(..., intermediates=...)` can return


class LinearGroup(NamedTuple):
  """Linear layers of a block that multiply the same input, in the order the block runs its groups.

  name:    a short name ('attn_in', 'attn_out', 'mlp_in', 'mlp_out').
  kernels: kernel paths within the block ('attn/q_proj/kernel', ...), in call order.
  norm:    the block's norm whose output is exactly this input ('attn_norm'), so a per-channel scale can be
           folded into it (AWQ, SmoothQuant); None when the input is not such an output (o_proj, down_proj; the
           q/k/v of a post-norm block, whose norm ends the previous block).
  """

  name: str
  kernels: tuple[str, ...]
  norm: str | None = None


@dataclasses.dataclass(frozen=True)
class Model(abc.ABC):
  """Base of the family specs (`Llama`, `GPT2`, `Bert`). Subclasses set `config` and implement `_module`."""

  config: Any

  family: ClassVar[str] = ''
  causal: ClassVar[bool] = True  # decoder (causal LM) or encoder
  block_path: ClassVar[str] = 'layers'
  hf_model_types: ClassVar[tuple[str, ...]] = ()  # HF config.json model_type values this family reads
  hf_prefixes: ClassVar[tuple[str, ...]] = ('',)  # optional base-model prefixes of HF tensor names
  hf_ignore: ClassVar[tuple[str, ...]] = ()  # regexes of HF tensors that are buffers, not parameters
  # Regexes of the output heads' paths, for core.select(heads=...); families declare theirs.
  head_patterns: ClassVar[tuple[str, ...]] = (HEADS,)
  linear_groups: ClassVar[tuple[LinearGroup, ...]] = ()  # each block's linears by shared input, in call order
  # Stacked expert weights [E, in, out] of mixture-of-experts blocks (models.moe), by the linear group whose
  # input they take: `block_structure(block)` adds them to the group of that name when the block holds them.
  routed_groups: ClassVar[tuple[LinearGroup, ...]] = ()
  # Kernels (path suffixes) whose input the forward rotates online when the config's `online_hadamard` is set: they
  # are stored as Qᵀ·W (`quantization.quarot(online=True)`; `models.hf.plain_weight` gives W back).
  online_rotated: ClassVar[tuple[str, ...]] = ()

  # Subclass hooks ---------------------------------------------------------------------------------------------

  @abc.abstractmethod
  def _module(self, rngs: nnx.Rngs, dtype) -> nnx.Module:
    """The NNX module with methods embed(tokens, positions, token_types), head(h) and a `layers` list."""

  def _window(self) -> int | None:
    return None

  def max_positions(self) -> int | None:
    """Longest sequence the model can embed (learned position tables); None for rotary positions."""
    return None

  def token_type_count(self) -> int | None:
    """Rows of the token-type (segment) table, which `token_types` ids index; None when the model has none."""
    return None

  def hf_export_prefix(self) -> str:
    """Prefix of base-model tensor names in an exported HF checkpoint."""
    return self.hf_prefixes[0]

  def sharding_rules(self) -> tuple[ShardingRule, ...]:
    """(path regex, mesh axes per dimension) rules placing this model's weights on a ('data', 'fsdp',
    'tensor') mesh; the first matching rule wins and unmatched weights are replicated. Families override this
    with their tensor-parallel layout; this default splits kernels and embeddings over 'fsdp' only."""
    return FSDP_RULES

  def select(self, params: Params, include: Patterns = KERNELS, exclude: Patterns = (), *,
             embeddings: bool = False, head: bool = False) -> core.Selection:
    """`core.select` with this model's `head_patterns` deciding which paths are heads."""
    return core.select_by(params, self.selection_rules(include=include, exclude=exclude, embeddings=embeddings,
                                                       head=head))

  def selection_rules(self, rules: core.Rules | None = None, **kwargs) -> core.Rules:
    """`rules` (or `core.Rules(**kwargs)`) with this model's `head_patterns` deciding which paths are heads, unless
    the rules name their own `heads` (a method config's `rules`, or rules for APIs that take them, e.g. hooks)."""
    if rules is not None and kwargs:
      raise TypeError(f'selection_rules: give rules or keyword arguments, not both ({sorted(kwargs)}).')
    return (core.Rules(**kwargs) if rules is None else rules).with_heads(self.head_patterns)

  # Parameters -------------------------------------------------------------------------------------------------

  def init(self, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random parameters from one PRNG key (deterministic: same key, same bits)."""
    return nnx.split(self._module(nnx.Rngs(params=key), dtype))[1].to_pure_dict()

  def abstract_params(self, dtype=jnp.float32) -> Params:
    """Shapes and dtypes of `init`'s output, without allocating anything."""
    return jax.eval_shape(lambda: self.init(jax.random.key(0), dtype))

  def num_layers(self, params: Params) -> int:
    return len(params[self.block_path])

  def bind(self, params: Params) -> nnx.Module:
    """The NNX module holding `params` (shared storage resolved). For use inside models/ and tests."""
    return nnx.merge(_graphdef(self), core.resolve(params))

  def bind_block(self, block_params: Params) -> nnx.Module:
    return nnx.merge(_block_graphdef(self), block_params)

  # Forward pieces ---------------------------------------------------------------------------------------------

  def context(self, tokens: jax.Array, *, attention_mask: jax.Array | None = None,
              positions: jax.Array | None = None) -> layers.Context:
    """Positions and attention mask for a full-sequence forward pass. tokens: [B, T] int."""
    _check_tokens(tokens, attention_mask, self, positions)
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = layers.attention_mask(jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)), t,
                                 causal=self.causal, key_valid=attention_mask, window=self._window())
    # The mask is built from index positions, so a causal model's query i never sees a key after i.
    return layers.Context(positions=positions, mask=mask,
                          causal_block=layers.CAUSAL_BLOCK if self.causal else None)

  def embed(self, params: Params, tokens: jax.Array, *, positions: jax.Array | None = None,
            token_types: jax.Array | None = None) -> jax.Array:
    """tokens: [B, T] -> hidden states [B, T, D]."""
    _check_tokens(tokens, None, self, positions)
    if token_types is not None:
      ids.check_token_types(self, tokens, token_types)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return self.bind(params).embed(tokens, positions, token_types)

  def block(self, block_params: Params, h: jax.Array, ctx: layers.Context) -> jax.Array:
    """One transformer block as a function of its own parameters: h [B, T, D] -> [B, T, D].

    block_params: `params['layers'][i]`, or `block_params(params, i)` when it holds `Shared` references.
    """
    return self.bind_block(_resolve_block(block_params))(h, ctx)[0]

  def head(self, params: Params, h: jax.Array) -> jax.Array:
    """Final norm and output head: h [B, T, D] -> logits [B, T, V] (or hidden states for an encoder)."""
    return self.bind(params).head(h)

  def apply(self, params: Params, tokens: jax.Array, *, attention_mask: jax.Array | None = None,
            positions: jax.Array | None = None, token_types: jax.Array | None = None,
            remat: bool = False, scan: bool = False, intermediates: Sequence[str] = ()
            ) -> jax.Array | tuple[jax.Array, dict[str, Any]]:
    """tokens: [B, T] int -> logits [B, T, V] (causal LM, BERT with MLM head) or hidden states [B, T, D].

    attention_mask: [B, T], 1 for real tokens and 0 for padding.
    remat: recompute each block's activations in the backward pass instead of storing them.
    scan: run the blocks as one `lax.scan` over their stacked parameters (all blocks must have the same
      shapes and leaf kinds): one block is compiled instead of L, and on sharded meshes only one block's
      gathered weights and gradients are live at a time.
    intermediates: any of ('hidden_states', 'attention'); when given, returns (output, {name: ...}) with
      'hidden_states': L + 1 arrays [B, T, D]: the embedding output, then each block's output (before the final
        norm: transformers' last hidden state of a pre-norm decoder is the final norm of ours);
      'attention': L arrays [B, N, T, T] of attention probabilities (rows over keys sum to 1).
      Without scan these are tuples of arrays; with scan, one stacked array [L + 1, ...] / [L, ...]. Both are
      indexed by layer (`out['attention'][i]`), and both differentiate (also under remat).
    """
    wanted = _check_intermediates(intermediates)
    module = self.bind(params)
    h, found = self._trunk_intermediates(module, tokens, attention_mask, positions, token_types, remat, scan,
                                         wanted)
    out = layers.constrain(module.head(h))
    return (out, found) if intermediates else out

  def hidden_states(self, params: Params, tokens: jax.Array, *, attention_mask: jax.Array | None = None,
                    positions: jax.Array | None = None, token_types: jax.Array | None = None) -> jax.Array:
    """The last block's output, before the final norm and head: [B, T, D]."""
    return self._trunk(self.bind(params), tokens, attention_mask, positions, token_types)

  def _trunk(self, module, tokens, attention_mask, positions, token_types, remat: bool = False,
             scan: bool = False) -> jax.Array:
    return self._trunk_intermediates(module, tokens, attention_mask, positions, token_types, remat, scan, ())[0]

  def _trunk_intermediates(self, module, tokens, attention_mask, positions, token_types, remat: bool,
                           scan: bool, wanted: tuple[str, ...]) -> tuple[jax.Array, dict[str, Any]]:
    """Embedding and blocks: (last block's output [B, T, D], {requested intermediate: per-layer values})."""
    ctx = self.context(tokens, attention_mask=attention_mask, positions=positions)
    if token_types is not None:
      ids.check_token_types(self, tokens, token_types)
    h = layers.constrain(module.embed(tokens, ctx.positions, token_types))
    probs = 'attention' in wanted

    def run(blk, h):  # -> (h, attention probabilities or None), returned explicitly (no traced side channel)
      out = blk(h, ctx, return_probs=True) if probs else blk(h, ctx)
      return layers.constrain(out[0]), (out[2] if probs else None)

    if not (remat or scan):
      outs = [(h, None)]
      for blk in getattr(module, self.block_path):
        outs.append(run(blk, outs[-1][0]))
      return outs[-1][0], _collect(wanted, [o[0] for o in outs], [o[1] for o in outs[1:]])
    block = lambda bp, h: run(self.bind_block(bp), h)
    if remat:
      block = jax.checkpoint(block)  # only block inputs are kept for the backward pass
    blocks = nnx.to_pure_dict(nnx.state(getattr(module, self.block_path)))
    blocks = [blocks[i] for i in range(len(blocks))]
    if not scan:
      outs = [(h, None)]
      for bp in blocks:
        outs.append(block(bp, outs[-1][0]))
      return outs[-1][0], _collect(wanted, [o[0] for o in outs], [o[1] for o in outs[1:]])
    keep_h = 'hidden_states' in wanted

    def step(h, bp):
      h, p = block(bp, h)
      return h, (h if keep_h else None, p)

    last, (hs, ps) = jax.lax.scan(step, h, _stack_blocks(blocks))
    found = {}
    if keep_h:
      found['hidden_states'] = jnp.concatenate([h[None], hs])
    if probs:
      found['attention'] = ps
    return last, found

  # Calibration ------------------------------------------------------------------------------------------------

  def linear_paths(self, params: Params) -> tuple[str, ...]:
    """Path of every kernel that `core.linear` multiplies by (params may be abstract)."""
    return tuple(_linear_names(self.bind(params)).values())

  def linear_inputs(self, params: Params, tokens: jax.Array, *, attention_mask: jax.Array | None = None,
                    positions: jax.Array | None = None, token_types: jax.Array | None = None
                    ) -> collections.OrderedDict[str, jax.Array]:
    """{kernel path: the input [B, T, in] it multiplied} for every linear layer the forward pass runs, in call
    order (an OrderedDict: `jax.jit` keeps its order, where it would sort a dict's keys).

    Holds every input of the whole batch at once: for large calibration sets use the streaming
    `jaxcompress.calibration.calibrate`.
    """
    with layers.capture_inputs() as records:
      module = self.bind(params)
      module.head(self._trunk(module, tokens, attention_mask, positions, token_types))
    name = _input_names(module)  # a mixture-of-experts MLP's stacked weights give `layers.Routed` inputs
    return collections.OrderedDict((name(i, x), x) for i, x in records)

  def block_params(self, params: Params, i: int) -> Params:
    """Block i's parameters with `Shared` references resolved against `params['_shared']`."""
    block = params[self.block_path][i]
    store = params.get(core.SHARED, {})
    used = {x.name for x in jax.tree.leaves(block, is_leaf=core.is_weight_leaf) if isinstance(x, core.Shared)}
    missing = sorted(used - set(store))
    if missing:
      raise KeyError(f"block {i} references shared storage {missing}, which params['{core.SHARED}'] lacks "
                     f'(it has {sorted(store)}).')
    return core.resolve({**block, core.SHARED: {n: store[n] for n in used}}) if used else block

  def block_structure(self, block_params: Params | None = None) -> tuple[LinearGroup, ...]:
    """The block's linears grouped by shared input, in call order (see `LinearGroup`).

    With block_params, kernels absent from them (a structurally removed layer) are left out, and groups left
    empty are dropped; a mixture-of-experts block's stacked expert weights (`routed_groups`: e.g. 'mlp/gate',
    'mlp/up' [E, d, f] in 'mlp_in', 'mlp/down' in 'mlp_out') join the group whose input they take, routed per
    expert. The router [d, E] is no group's: it stays float (it is tiny, and a rounding error in it changes
    which experts a token runs).
    """
    if not self.linear_groups:
      raise ValueError(f'{type(self).__name__} declares no linear_groups; set the class attribute to its blocks\' '
                       'linear groups in call order (see models.LinearGroup) to use block structure.')
    if block_params is None:
      return self.linear_groups
    flat = core.paths.flatten(block_params)
    routed = {g.name: g.kernels for g in self.routed_groups}
    groups = (g._replace(kernels=tuple(k for k in g.kernels + routed.get(g.name, ()) if k in flat))
              for g in self.linear_groups)
    return tuple(g for g in groups if g.kernels)

  def block_with_inputs(self, block_params: Params, h: jax.Array, ctx: layers.Context,
                        observe: Callable[[str, jax.Array], None]) -> jax.Array:
    """One block (h [B, T, D] -> [B, T, D]) that calls observe(kernel path within the block, input [B, T, in])
    as each linear runs, in call order. Inside a jit, folding x into statistics in `observe` lets XLA free
    each input as soon as it is folded, instead of returning every input of the block.

    A mixture-of-experts MLP calls observe(weight path, `layers.Routed`) for each stacked expert weight
    ('mlp/up', 'mlp/gate', 'mlp/down'): its experts' inputs [E, C, in] and which slots hold routed tokens."""
    blk = self.bind_block(_resolve_block(block_params))
    name = _input_names(blk)
    with layers.observe_inputs(lambda module, x: observe(name(id(module), x), x)):
      return blk(h, ctx)[0]

  def head_with_inputs(self, params: Params, h: jax.Array, observe: Callable[[str, jax.Array], None]
                       ) -> jax.Array:
    """`head(params, h)` calling observe(kernel path, input) for each linear of the head (e.g. lm_head)."""
    module = self.bind(params)
    names = _linear_names(module)
    with layers.observe_inputs(lambda m, x: observe(names[id(m)], x)):
      return module.head(h)

  def block_linear_inputs(self, block_params: Params, h: jax.Array, ctx: layers.Context
                          ) -> tuple[jax.Array, collections.OrderedDict[str, jax.Array]]:
    """Block output and {kernel path within the block: its input [B, T, in]} in call order (an OrderedDict,
    whose order survives `jax.jit`): the calibration step of one layer."""
    records = collections.OrderedDict()
    out = self.block_with_inputs(block_params, h, ctx, records.__setitem__)
    return out, records

  # Accounting -------------------------------------------------------------------------------------------------

  def flops_per_token(self, params: Params, seq_len: int) -> dict[str, int]:
    """FLOPs per token that no weight carries (attention scores and values; a tied head). For stats.summary."""
    flops = {}
    attn = 0
    for i in range(self.num_layers(params)):
      q = core.shape_of(core.paths.get(core.resolve(params), f'{self.block_path}/{i}/attn/q_proj/kernel'))
      ctx_len = seq_len if self._window() is None else min(seq_len, self._window())
      attn += 2 * 2 * q[1] * (ctx_len if not self.causal else (ctx_len + 1) / 2)
    flops[f'attention (T={seq_len})'] = int(attn)
    tied = self._tied_head_flops(params)
    if tied:
      flops['head (tied to embedding)'] = tied
    return flops

  def _tied_head_flops(self, params: Params) -> int:
    return 0

  def summary(self, params: Params, *, seq_len: int = 512, baseline: Params | None = None, by: str = 'block'):
    """`core.stats.summary` with this model's attention and tied-head FLOPs added."""
    once = self._per_sequence_kernels()
    return core.stats.summary(params, baseline=baseline, extra_flops=self.flops_per_token(params, seq_len), by=by,
                              per_token=lambda path: path not in once)

  def _per_sequence_kernels(self) -> tuple[str, ...]:
    """Kernels applied once per sequence rather than per token (no FLOPs per token)."""
    return ()


@functools.lru_cache(maxsize=64)
def _abstract_module(model: Model) -> nnx.Module:
  return nnx.eval_shape(lambda: model._module(nnx.Rngs(params=0), jnp.float32))


@functools.lru_cache(maxsize=64)
def _graphdef(model: Model):
  return nnx.split(_abstract_module(model))[0]


@functools.lru_cache(maxsize=64)
def _block_graphdef(model: Model):
  return nnx.split(getattr(_abstract_module(model), model.block_path)[0])[0]


def _stack_blocks(blocks: list[Params]) -> Params:
  """Per-block parameter trees -> one tree of [L, ...] arrays; blocks must agree in structure and shapes."""
  first = jax.tree.structure(blocks[0])
  for i, bp in enumerate(blocks[1:], 1):
    if jax.tree.structure(bp) != first or any(
        a.shape != b.shape for a, b in zip(jax.tree.leaves(blocks[0]), jax.tree.leaves(bp))):
      raise ValueError(f'scan=True needs blocks of identical structure and shapes; block {i} differs from block 0 '
                       '(a narrowed or differently compressed layer). Use scan=False for such models.')
  return jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)


def _check_intermediates(intermediates: Sequence[str]) -> tuple[str, ...]:
  if isinstance(intermediates, str):
    intermediates = (intermediates,)
  unknown = [n for n in intermediates if n not in INTERMEDIATES]
  if unknown:
    raise ValueError(f'apply: intermediates={tuple(intermediates)!r} names {unknown}; choose from {INTERMEDIATES}.')
  return tuple(intermediates)


def _collect(wanted: tuple[str, ...], hidden: list, probs: list) -> dict[str, Any]:
  found = {}
  if 'hidden_states' in wanted:
    found['hidden_states'] = tuple(hidden)
  if 'attention' in wanted:
    found['attention'] = tuple(probs)
  return found


def _linear_names(module: nnx.Module) -> dict[int, str]:
  return {id(node): '/'.join(str(p) for p in path) + '/kernel'
          for path, node in nnx.iter_graph(module) if isinstance(node, layers.Linear)}


def _input_names(module: nnx.Module) -> Callable[[int, Any], str]:
  """(id of a module, what observe_inputs handed over) -> the weight's path: a Linear's kernel, or a stacked expert
  weight of a mixture-of-experts MLP ('layers/0/mlp/up' for `layers.Routed('up', ...)`)."""
  names = _linear_names(module)
  names.update({id(node): '/'.join(str(p) for p in path)
                for path, node in nnx.iter_graph(module) if isinstance(node, moe.MoEMLP)})
  return lambda i, x: f'{names[i]}/{x.name}' if isinstance(x, layers.Routed) else names[i]


def _resolve_block(block_params: Params) -> Params:
  resolved = core.resolve(block_params)
  for path, x in core.paths.flatten(resolved).items():
    if isinstance(x, core.Shared):
      raise ValueError(f"block parameter '{path}' is a Shared('{x.name}') reference, whose storage is in the "
                       f"full params' '{core.SHARED}'; pass model.block_params(params, i) instead of "
                       "params['layers'][i].")
  return resolved


def _check_tokens(tokens: Any, attention_mask: Any, model: Model | None = None, positions: Any = None) -> None:
  """Shapes always; ids in [0, vocab_size) and positions inside a learned position table when the arrays are
  concrete (on the host, before anything runs; `ids.check_ids`). Under jit ids cannot be checked: an id outside
  [0, vocab) (negative ones included) or a position outside the table gives a NaN embedding (see `fill_invalid`),
  and every output of that sequence is NaN (attention multiplies its value row by 0, and 0 * NaN is NaN), never
  another token's numbers; the other sequences of the batch are unaffected."""
  if getattr(tokens, 'ndim', None) != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f'tokens must be an integer array [batch, seq], got '
                     f'{getattr(tokens, "dtype", type(tokens).__name__)} {getattr(tokens, "shape", "")}.')
  if attention_mask is not None and tuple(attention_mask.shape) != tuple(tokens.shape):
    raise ValueError(f'attention_mask shape {tuple(attention_mask.shape)} must equal tokens shape '
                     f'{tuple(tokens.shape)}.')
  if model is None:
    return
  limit = model.max_positions()
  if limit is not None and positions is None and tokens.shape[1] > limit:
    raise ValueError(f'tokens: a sequence of {tokens.shape[1]} tokens is longer than the {limit} learned '
                     f'positions of this {model.family} model; cut or split it to at most {limit}.')
  ids.check_tokens(model, tokens)
  if limit is not None and positions is not None:
    ids.check_ids(positions, limit, name='positions', what='max_positions', fix=ids.POSITION_FIX)


def fill_invalid(ids: jax.Array, n: int) -> jax.Array:
  """Negative ids replaced by n, so that every id outside [0, n) is past the table's end, where an embedding
  lookup fills NaN (jnp.take's default mode); without it a negative id would silently wrap to another row."""
  return jnp.where(ids >= 0, ids, n)
