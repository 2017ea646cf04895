"""What produced a result: the configuration, package versions, git revision and devices, written beside it;
and the small file helpers every layer shares (atomic writes, JSON-lines reading)."""

from __future__ import annotations

import dataclasses
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

PACKAGES = ('jaxcompress', 'jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'chex', 'transformers',
            'tokenizers', 'safetensors', 'numpy', 'absl-py', 'torch')


def git_revision(path: str | os.PathLike | None = None) -> str | None:
  """HEAD of the repository holding `path` (default: this package), with '+dirty' for local changes."""
  where = Path(path or __file__).resolve()
  where = where if where.is_dir() else where.parent
  try:
    rev = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=where, capture_output=True, text=True, check=True,
                         timeout=10).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=where,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return rev + ('+dirty' if dirty else '')
  except (OSError, subprocess.SubprocessError):
    return None


def versions() -> dict[str, str | None]:
  out = {}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def environment() -> dict[str, Any]:
  import jax
  return {
      'time_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'git_revision': git_revision(),
      'python': sys.version.split()[0],
      'platform': platform.platform(),
      'host': platform.node(),
      'packages': versions(),
      'backend': jax.default_backend(),
      'devices': [str(d) for d in jax.devices()],
      'device_kind': jax.devices()[0].device_kind,
      'process_count': jax.process_count(),
      'argv': sys.argv,
  }


def to_jsonable(x: Any) -> Any:
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    return {f.name: to_jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
  if isinstance(x, dict):
    return {str(k): to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_jsonable(v) for v in x]
  if isinstance(x, (str, int, float, bool)) or x is None:
    return x
  if hasattr(x, 'tolist'):
    return x.tolist()
  return repr(x)


def atomic_write(path: str | os.PathLike, content: str | bytes | Callable[[BinaryIO], object]) -> Path:
  """Writes `content` (text as UTF-8, bytes, or a function writing into a binary file) to a temporary file
  beside `path`, syncs it and renames it over `path`: readers and crashes never see half a file."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}-', suffix='.tmp', dir=path.parent)
  try:
    with os.fdopen(fd, 'wb') as f:
      if callable(content):
        content(f)
      else:
        f.write(content.encode('utf-8') if isinstance(content, str) else content)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  return path


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Atomic JSON write (a crash never leaves half a file)."""
  atomic_write(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + '\n')


def parse_jsonl(text: str, path: str | os.PathLike = '<text>', *, skip_truncated_tail: bool = True
                ) -> list[tuple[int, str, dict]]:
  """(line number, line, object) for every non-blank line of JSON-lines `text`.

  Every line must hold one JSON object. skip_truncated_tail: text after the last newline that does not parse
  is dropped (a writer killed mid-write); a whole object there, whose newline never came, is kept.
  """
  lines = text.split('\n')
  complete, tail = lines[:-1], lines[-1]
  out = []
  for number, line in enumerate(complete, start=1):
    if line.strip():
      out.append((number, line, _parse_object(line, path, number)))
  if tail.strip():
    try:
      out.append((len(lines), tail, _parse_object(tail, path, len(lines))))
    except ValueError:
      if not skip_truncated_tail:
        raise
  return out


def _parse_object(line: str, path: str | os.PathLike, number: int) -> dict:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: line {number} is not valid JSON ({e.msg} at column {e.colno}); fix or remove '
                     'that line (each line must hold one JSON object).') from None
  if not isinstance(record, dict):
    raise ValueError(f'{path}: line {number} holds a JSON {type(record).__name__}, not an object; each line '
                     'must hold one JSON object.')
  return record


def read_jsonl(path: str | os.PathLike, *, skip_truncated_tail: bool = True, line_numbers: bool = False
               ) -> list[dict] | list[tuple[int, dict]]:
  """The objects of a JSON-lines file in file order (blank lines skipped; see `parse_jsonl`), each paired
  with its line number when line_numbers=True."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"read_jsonl: '{path}' is not a file; give a JSON-lines file (one object a line).")
  parsed = parse_jsonl(path.read_text(encoding='utf-8'), path, skip_truncated_tail=skip_truncated_tail)
  return [(n, record) if line_numbers else record for n, _, record in parsed]


def write_run_dir(run_dir: str | os.PathLike, *, config: Any, results: Any = None) -> Path:
  """run_dir/{config.json, environment.json[, results.json]}."""
  run_dir = Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  write_json(run_dir / 'config.json', config)
  write_json(run_dir / 'environment.json', environment())
  if results is not None:
    write_json(run_dir / 'results.json', results)
  return run_dir
