"""The formats a compression run writes its compressed model in, and which ones its leaves allow.

    formats = exports.parse('jxc,gptq')                       # checked names, before any work
    written = exports.write(out, model, params, formats)      # {format: {'path': ..., 'bytes': ...}}

  format               written as            what reads it
  jxc                  compressed.jxc        `core.serialize.load` (every leaf kind, exact disk bytes)
  compressed-tensors   compressed_tensors/   transformers / vLLM with compressed-tensors; `models.from_pretrained`
  gptq                 gptq/                 GPTQModel, transformers with optimum + gptqmodel, vLLM; `from_pretrained`
  dense                hf/                   transformers (materialized weights; a narrowed model: our own layout)

The default (`formats=None`) is jxc and dense, plus each packed format that holds every leaf of the tree as it is
and has at least one quantized Linear to pack: no weight is written dense behind the user's back. A tree with
`ActQuantized` leaves (inputs rounded at run time) leaves dense out of the default: its materialized weights compute
another function (name `dense` to write them anyway). GPTQ is written
in v1 ('gptq') when the zero points allow, else in 'gptq_v2'. A format named explicitly that cannot hold a leaf
is an error naming the paths (the exporters' refusals).
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

from jaxcompress import core, models
from jaxcompress.models import compressed_tensors, gptq_format, packed

FORMATS = ('jxc', 'compressed-tensors', 'gptq', 'dense')
PATHS = {'jxc': 'compressed.jxc', 'compressed-tensors': 'compressed_tensors', 'gptq': 'gptq', 'dense': 'hf'}
DEFAULT = ('jxc', 'dense')  # always written by default; the packed formats join when the leaves allow


def parse(spec: str | Sequence[str] | None) -> tuple[str, ...] | None:
  """Format names from 'jxc,gptq' or a list (None or empty: the default, decided once the leaves are known);
  an unknown name is a ValueError naming it and the choices."""
  if spec is None:
    return None
  names = [s.strip() for s in (spec.split(',') if isinstance(spec, str) else spec) if s.strip()]
  unknown = [n for n in names if n not in FORMATS]
  if unknown:
    raise ValueError(f'export={",".join(names)}: unknown format {", ".join(map(repr, unknown))}; choose from '
                     f'{", ".join(FORMATS)} (comma-separated).')
  return tuple(dict.fromkeys(names)) or None


def _packs_any(model, params) -> bool:
  """Whether some table row's Linear is a `Quantized` leaf, bare or in an `ActQuantized` (a packed format has
  something to pack)."""
  flat = core.flatten({k: v for k, v in params.items() if k != core.SHARED})
  return any(row.linear and packed.packable(flat[row.ours[0]]) for row in model.hf_table())


def _rounds_inputs(params) -> bool:
  return any(isinstance(w, core.ActQuantized) for w in core.flatten(params).values())


def gptq_checkpoint_format(model, params) -> str | None:
  """'gptq' (v1) if it holds every leaf, else 'gptq_v2' if that does, else None."""
  for fmt in gptq_format.CHECKPOINT_FORMATS:
    if not gptq_format.refusals(model, params, fmt):
      return fmt
  return None


def allowed(model, params) -> tuple[str, ...]:
  """The default formats for this tree: jxc, dense (unless some leaf rounds its inputs), and each packed format
  that holds all of it."""
  from jaxcompress.pruning._src.structured import is_narrowed
  dense = () if _rounds_inputs(params) else DEFAULT[1:]
  if is_narrowed(model, params) or not _packs_any(model, params):  # per-layer widths: no HF config holds them
    return DEFAULT[:1] + dense
  packed = []
  if not compressed_tensors.refusals(model, params):
    packed.append('compressed-tensors')
  if gptq_checkpoint_format(model, params) is not None:
    packed.append('gptq')
  return DEFAULT[:1] + tuple(packed) + dense


def _bytes(path: pathlib.Path) -> int:
  return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob('*') if f.is_file())


def write(out: str | pathlib.Path, model, params, formats: Sequence[str] | None = None, *,
          metadata: dict[str, Any] | None = None, parts: Sequence[Any] | None = None) -> dict[str, dict]:
  """Writes the compressed model into directory `out` in each of `formats` (None: `allowed`), jxc first:
  {format: {'path': its name under out, 'bytes': its bytes on disk}}. `metadata` goes into compressed.jxc.
  `parts`: loaders of the same tree a part at a time (`calibration.compressed_parts` of an out-of-core run): every
  format is then written from them, one part in memory at a time."""
  from jaxcompress.pruning._src.structured import is_narrowed
  from jaxcompress.pruning._src.structured import save as save_narrowed
  out = pathlib.Path(out)
  formats = allowed(model, params) if formats is None else tuple(formats)
  written = {}
  for fmt in sorted(formats, key=FORMATS.index):
    path = out / PATHS[fmt]
    if fmt == 'jxc':
      core.serialize.save_parts(path, parts or [lambda: params],
                                metadata={**(metadata or {}), **models.hf.online_metadata(model)})
    elif fmt == 'dense':
      if is_narrowed(model, params):
        save_narrowed(path, model, params)
      elif parts:
        models.hf.save_pretrained_parts(path, model, parts)
      else:
        models.save_pretrained(path, model, params)
    elif fmt == 'compressed-tensors':
      compressed_tensors.export_parts(model, parts or [lambda: params], path)
    else:
      gptq_format.export_parts(model, parts or [lambda: params], path,
                               checkpoint_format=gptq_checkpoint_format(model, params) or 'gptq')
    written[fmt] = {'path': PATHS[fmt], 'bytes': _bytes(path)}
  return written
