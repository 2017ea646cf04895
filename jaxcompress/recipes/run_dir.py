"""A compression run owns its output directory: it is written whole into a staging sibling and swapped in at the end.

    staging = run_dir.claim('runs/x', config, overwrite=False)   # refuses another run's directory, before any work
    run_dir.open_staging(staging, config)                       # runs/x.partial/ with config.json, environment.json
    ...                                                          # the run writes every file into staging
    run_dir.publish(staging, 'runs/x')                           # one rename: runs/x is the new run, whole

So a directory never mixes files of two runs, and a run that fails leaves the one before it untouched. A
directory holding another run (its config.json differs, or there is none) is replaced only with overwrite=True;
a rerun of the same configuration replaces its own earlier result. A directory holding files no run writes is
never replaced. A failed run's staging directory is removed, unless it holds out-of-core blocks (`blocks/`,
resumable): then it stays, and a rerun of the same configuration continues from it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any

from jaxcompress.recipes.preflight import PreflightError

# what `pipeline.compress` writes into its output directory
RUN_FILES = ('config.json', 'environment.json', 'metrics.jsonl', 'compressed.jxc', 'orbax', 'hf', 'report.md',
             'results.json', 'stages.png', 'blocks', 'input_hf', 'stages', 'compressed_tensors', 'gptq')
RESUMABLE = ('blocks', 'input_hf')  # what a rerun of the same configuration continues from
STAGING, REPLACED = '.partial', '.replaced'  # suffixes of the siblings: the run being written, the run replaced
IGNORED = ('output_dir',)  # config keys that do not make another run (the same directory, spelled otherwise)


def siblings(out: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
  """(output directory, its staging sibling, where a replaced run goes while it is deleted), links resolved (a
  linked output directory is replaced where it points)."""
  out = pathlib.Path(os.path.realpath(out))
  return out, out.with_name(out.name + STAGING), out.with_name(out.name + REPLACED)


def claim(output_dir: str | os.PathLike, config: Mapping[str, Any], *, overwrite: bool = False) -> pathlib.Path:
  """The staging directory the run `config` writes into (not created yet); a PreflightError (a ValueError)
  naming what is found and how to go on if `output_dir` holds another run (without overwrite) or files no run
  writes."""
  out, staging, replaced = siblings(output_dir)
  if replaced.exists():  # a replacement stopped part way
    if out.exists():
      shutil.rmtree(replaced)
    else:
      os.rename(replaced, out)  # only the two-rename fallback leaves this: the earlier run comes back
  if out.exists() and not out.is_dir():
    raise PreflightError(f'output_dir={str(output_dir)!r} is a file; give a directory (new or a run directory).')
  found = sorted(out.iterdir()) if out.is_dir() else []
  foreign = [p for p in found if not is_run_file(p.name)]
  if foreign:
    raise PreflightError(f'output_dir={str(output_dir)!r} holds files a compression run does not write '
                         f'({_names(foreign)}); give an empty or new directory (overwrite=True / --overwrite replaces '
                         'only a run directory).')
  old = read_config(out)
  if found and not overwrite and (old is None or not same(old, config)):
    why = ('no readable config.json tells its settings' if old is None
           else f'its config.json differs: {diff(old, config)}')
    raise PreflightError(f'output_dir={str(output_dir)!r} holds another run ({why}; files: {_names(found)}). Pass '
                         'overwrite=True (--overwrite) to replace that run as a whole, or choose another output_dir.')
  if staging.exists():
    old = read_config(staging)
    if not (staging / 'blocks' / 'manifest.json').is_file():  # nothing a rerun could continue from
      shutil.rmtree(staging)
    elif old is None or not same(old, config):
      if not overwrite:
        why = 'no readable config.json' if old is None else f'another configuration: {diff(old, config)}'
        raise PreflightError(f"output_dir={str(output_dir)!r}: '{staging}' holds an unfinished out-of-core run "
                             f'({why}); rerun with its settings to resume it, or pass overwrite=True (--overwrite) '
                             'to discard it.')
      shutil.rmtree(staging)
  return staging


def open_staging(staging: pathlib.Path, config: Mapping[str, Any]) -> pathlib.Path:
  """Creates (or, for a resumed run, clears all but `RESUMABLE` of) the staging directory and writes config.json
  and environment.json into it."""
  from jaxcompress import provenance
  staging.mkdir(parents=True, exist_ok=True)
  for p in staging.iterdir():
    if p.name not in RESUMABLE:
      _remove(p)
  provenance.write_run_dir(staging, config=dict(config))
  return staging


def publish(staging: pathlib.Path, output_dir: str | os.PathLike) -> pathlib.Path:
  """Puts the finished run in `staging` in place of `output_dir` (an atomic exchange where the OS has one) and
  deletes the run it replaced."""
  out, _, replaced = siblings(output_dir)
  if not out.exists():
    os.rename(staging, out)
    return out
  if _exchange(staging, out):
    os.rename(staging, replaced)  # staging now holds the earlier run
  else:
    os.rename(out, replaced)
    os.rename(staging, out)
  shutil.rmtree(replaced)
  return out


def abandon(staging: pathlib.Path) -> bool:
  """After a failed run: removes its staging directory unless it holds out-of-core blocks a rerun resumes;
  returns whether it was kept."""
  if not staging.exists():
    return False
  if (staging / 'blocks' / 'manifest.json').is_file():
    return True
  shutil.rmtree(staging, ignore_errors=True)
  return False


def is_run_file(name: str) -> bool:
  """Whether a run may have written `name` (its files, and the temporaries of atomic writes and orbax)."""
  return (name in RUN_FILES or name.startswith('orbax') or name.startswith('.tmp-')
          or (name.startswith('.') and name.endswith('.tmp')))


def read_config(directory: pathlib.Path) -> dict | None:
  try:
    config = json.loads((directory / 'config.json').read_text())
  except (OSError, ValueError):
    return None
  return config if isinstance(config, dict) else None


def same(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
  """Whether two configs describe the same run (as JSON, the output directory's spelling aside)."""
  return not diff(old, new)


def diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
  """'key: old -> new, ...' over the keys whose JSON values differ ('' when none)."""
  a, b = _as_json(old), _as_json(new)
  keys = sorted(k for k in set(a) | set(b) if k not in IGNORED and a.get(k, _UNSET) != b.get(k, _UNSET))
  show = lambda d, k: 'unset' if k not in d else _short(repr(d[k]))
  return ', '.join(f'{k}: {show(a, k)} -> {show(b, k)}' for k in keys)


_UNSET = object()


def _as_json(config: Mapping[str, Any]) -> dict:
  from jaxcompress import provenance
  return json.loads(json.dumps(provenance.to_jsonable(dict(config))))


def _short(text: str, n: int = 60) -> str:
  return text if len(text) <= n else text[:n - 3] + '...'


def _names(paths: list[pathlib.Path], n: int = 8) -> str:
  names = [p.name + ('/' if p.is_dir() else '') for p in paths]
  return ', '.join(names[:n]) + (f' and {len(names) - n} more' if len(names) > n else '')


def _remove(p: pathlib.Path) -> None:
  if p.is_dir() and not p.is_symlink():
    shutil.rmtree(p)
  else:
    with contextlib.suppress(FileNotFoundError):
      p.unlink()


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
  """Swaps two directories in one step (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
  try:
    fn = ctypes.CDLL(None, use_errno=True).renameat2
  except (OSError, AttributeError):
    return False
  fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
  at_cwd, exchange = -100, 2
  return fn(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), exchange) == 0
