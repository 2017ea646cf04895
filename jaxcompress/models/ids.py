"""Host checks of the integer ids a model is fed: token ids, token types (segment ids) and positions.

One implementation and one message for every place ids enter: a model's concrete inputs (`apply`, `embed`,
`context`, `generate`), calibration batches, evaluation streams and rows, training batches.

    check_tokens(model, batch['tokens'], where='calibration batch 3: ')
    # ValueError: calibration batch 3: tokens: 1 id is outside [0, 64) (vocab_size=64), e.g. -1 at
    #   [row, position] [0, 5]; tokenize with the tokenizer this model was built with.

Under jit ids cannot be checked, and an id outside a table embeds as NaN (`base.fill_invalid`): every output
of that sequence is NaN, so a perplexity or a loss silently turns into NaN. So ids are checked on the host where
data enters, once per batch: a dtype check, one min and one max (the offending position is looked up only when
one is out of range). Float arrays are refused, never cast: 2.7 would silently become token 2.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

TOKEN_FIX = 'tokenize with the tokenizer this model was built with'
TYPE_FIX = 'token types are segment ids: 0 for a single text, 1 for the second text of a pair'
POSITION_FIX = 'give positions below max_positions, the rows of the learned position table'


def checkable(x: Any) -> bool:
  """Whether x's values can be read on the host now: not a tracer, not an array sharded across processes."""
  return not isinstance(x, jax.core.Tracer) and getattr(x, 'is_fully_addressable', True)


def check_integer(ids: Any, *, name: str = 'tokens', where: str = '') -> None:
  """Refuses ids whose dtype is not an integer type (floats, bools): they are never cast."""
  dtype = np.dtype(ids.dtype if hasattr(ids, 'dtype') else np.asarray(ids).dtype)
  if not np.issubdtype(dtype, np.integer):
    raise ValueError(f'{where}{name} has dtype {dtype}; ids must be integers (int32). Floats are refused, not '
                     'cast (2.7 would silently become 2): pass the integer ids the tokenizer gave.')


def check_ids(ids: Any, n: int, *, name: str = 'tokens', what: str = 'vocab_size', fix: str = TOKEN_FIX,
              where: str = '') -> None:
  """Integer ids in [0, n), checked on the host (a tracer or a multi-process array is left alone).

  ids: [...] integer array (numpy or jax); n: the table's size; name: how the message names the array (e.g.
  "batch['inputs']"); what: the size's name ('vocab_size', 'type_vocab_size', 'max_positions'); fix: what
  to do about it; where: a prefix locating the array ('step 3: ', 'calibration batch 0: ').
  """
  if not checkable(ids):
    return
  check_integer(ids, name=name, where=where)
  x = np.asarray(ids)
  if not x.size:
    return
  lo, hi = x.min(), x.max()
  if lo >= 0 and hi < n:
    return
  bad = (x < 0) | (x >= n)
  count = int(np.count_nonzero(bad))
  at = tuple(int(i) for i in np.argwhere(bad)[0])
  axes = {1: 'position', 2: 'row, position'}.get(x.ndim, 'index')
  raise ValueError(f'{where}{name}: {count} {"id is" if count == 1 else "ids are"} outside [0, {n}) ({what}={n}), '
                   f'e.g. {int(x[at])} at [{axes}] {list(at)}; {fix}.')


def check_tokens(model: Any, tokens: Any, *, token_types: Any = None, name: str = 'tokens',
                 where: str = '') -> None:
  """Token ids in [0, model.config.vocab_size) and, when given, token types in [0, model.token_type_count())
  with the tokens' shape (see `check_ids`)."""
  check_ids(tokens, model.config.vocab_size, name=name, where=where)
  if token_types is not None:
    check_token_types(model, tokens, token_types, where=where)


def check_token_types(model: Any, tokens: Any, token_types: Any, *, where: str = '') -> None:
  """token_types [B, T] (segment ids): the tokens' shape, integers in [0, type_vocab_size) of a model that
  has a token-type table; ignored by models that have none (their embedding reads no token types)."""
  count = model.token_type_count()
  if count is None:
    return
  if tuple(np.shape(token_types)) != tuple(np.shape(tokens)):
    raise ValueError(f'{where}token_types has shape {tuple(np.shape(token_types))}, tokens '
                     f'{tuple(np.shape(tokens))}; they must match (one segment id per token).')
  check_ids(token_types, count, name='token_types', what='type_vocab_size', fix=TYPE_FIX, where=where)
