"""What produced a result: the configuration, package versions, git revision and devices, written beside it."""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Atomic JSON write (a crash never leaves half a file)."""
  path = Path(path)
  tmp = path.with_suffix(path.suffix + '.tmp')
  tmp.write_text(json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + '\n')
  os.replace(tmp, path)


def write_run_dir(run_dir: str | os.PathLike, *, config: Any, results: Any = None) -> Path:
  """run_dir/{config.json, environment.json[, results.json]}."""
  run_dir = Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  write_json(run_dir / 'config.json', config)
  write_json(run_dir / 'environment.json', environment())
  if results is not None:
    write_json(run_dir / 'results.json', results)
  return run_dir
