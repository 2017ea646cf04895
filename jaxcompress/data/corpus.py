"""Text corpora as lists of documents (str), with no model hub involved.

    docs = fortunes_documents()                       # Debian's fortune cookies: ~2.5 MB of English
    train, valid = split_documents(docs, valid_fraction=0.05, seed=0)

The fortunes corpus is fetched once with `apt-get download` (no root needed) and unpacked with `dpkg -x` into
a cache directory: `cache_dir`, else `$JAXCOMPRESS_CACHE`, else `~/.cache/jaxcompress`. Other sources: plain
text files, JSON lines, and (when the optional `datasets` package is installed) Hugging Face datasets.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import numpy as np

from jaxcompress import provenance

CACHE_ENV = 'JAXCOMPRESS_CACHE'
# `fortunes` holds most files; it depends on `fortunes-min`, which alone carries fortunes, literature, riddles.
FORTUNES_PACKAGES = ('fortunes', 'fortunes-min')
FORTUNES_SUBDIR = 'fortunes'  # under the cache directory
FORTUNES_DATA = Path('usr/share/games/fortunes')  # inside the unpacked packages
COMPLETE_MARKER = '.complete'  # written last: its presence means the unpacked tree is whole
SPLIT_STREAM = 0  # split_documents draws from fold_in(key(seed), SPLIT_STREAM)


def default_cache_dir() -> Path:
  """`$JAXCOMPRESS_CACHE` if set, else `~/.cache/jaxcompress`."""
  env = os.environ.get(CACHE_ENV)
  return Path(env).expanduser() if env else Path.home() / '.cache' / 'jaxcompress'


def _manual_instructions(root: Path) -> str:
  debs = ' '.join(f'{p}_*.deb' for p in FORTUNES_PACKAGES)
  extract = ' && '.join(f'dpkg -x {p}_*.deb {root}' for p in FORTUNES_PACKAGES)
  return (f'To fetch it by hand, run:\n'
          f'  cd "$(mktemp -d)" && apt-get download {" ".join(FORTUNES_PACKAGES)}\n'
          f'  {extract} && touch {root / COMPLETE_MARKER}\n'
          f'(the .deb files {debs} can also be copied from another Debian/Ubuntu machine; run `apt-get update` '
          f'first if apt cannot locate the packages). To use another location, pass cache_dir= or set '
          f'{CACHE_ENV} to a directory whose {FORTUNES_SUBDIR}/ subdirectory holds {FORTUNES_DATA}/ and the '
          f'{COMPLETE_MARKER} file.')


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
  """An exclusive advisory lock held for the duration of the block (blocks until free)."""
  with open(path, 'a+') as f:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _run(cmd: Sequence[str], cwd: Path, root: Path) -> None:
  try:
    subprocess.run(list(cmd), cwd=cwd, check=True, capture_output=True, text=True)
  except FileNotFoundError as e:
    raise RuntimeError(f'fortunes corpus: `{cmd[0]}` is not installed ({e}). {_manual_instructions(root)}') from e
  except subprocess.CalledProcessError as e:
    raise RuntimeError(f'fortunes corpus: `{" ".join(cmd)}` failed with exit status {e.returncode}:\n'
                       f'{(e.stderr or e.stdout).strip()}\n{_manual_instructions(root)}') from e


def _fetch_fortunes(root: Path) -> None:
  """Downloads and unpacks the packages into a temporary sibling of `root`, then renames it into place."""
  parent = root.parent
  work = Path(tempfile.mkdtemp(prefix=f'.{root.name}-', dir=parent))
  try:
    debs, tree = work / 'debs', work / 'tree'
    debs.mkdir()
    tree.mkdir()
    _run(['apt-get', 'download', *FORTUNES_PACKAGES], debs, root)
    files = sorted(debs.glob('*.deb'))
    if len(files) != len(FORTUNES_PACKAGES):
      raise RuntimeError(f'fortunes corpus: expected {len(FORTUNES_PACKAGES)} .deb files from apt-get download, '
                         f'got {[f.name for f in files]}. {_manual_instructions(root)}')
    for deb in files:
      _run(['dpkg', '-x', str(deb), str(tree)], work, root)
    if not (tree / FORTUNES_DATA).is_dir():
      raise RuntimeError(f'fortunes corpus: the packages did not contain {FORTUNES_DATA}. '
                         f'{_manual_instructions(root)}')
    # The marker names the package files (their versions), and is the last thing written into the tree.
    (tree / COMPLETE_MARKER).write_text('\n'.join(f.name for f in files) + '\n')
    if root.exists():  # a tree without its marker: an interrupted manual copy; replace it
      shutil.rmtree(root)
    os.replace(tree, root)
  finally:
    shutil.rmtree(work, ignore_errors=True)


def fortunes_dir(cache_dir: str | os.PathLike | None = None) -> Path:
  """The directory holding the fortune files, downloading them first if the cache lacks them.

  Safe under concurrent processes: one downloads while the others wait on a lock file, and the unpacked tree
  appears by an atomic rename with its completion marker already inside.
  """
  cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
  root = cache / FORTUNES_SUBDIR
  if (root / COMPLETE_MARKER).is_file():
    return root / FORTUNES_DATA
  try:
    cache.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise RuntimeError(f'fortunes corpus: cannot create the cache directory {cache} ({e}); pass a writable '
                       f'cache_dir= or set {CACHE_ENV}.') from e
  with _file_lock(cache / f'{FORTUNES_SUBDIR}.lock'):
    if not (root / COMPLETE_MARKER).is_file():  # another process may have finished while this one waited
      _fetch_fortunes(root)
  return root / FORTUNES_DATA


def strip_overstrike(text: str) -> str:
  """Applies backspaces as a terminal would: 'X\\bX' (bold) -> 'X', '__\\b\\bab' (underline) -> 'ab'."""
  if '\b' not in text:
    return text
  out: list[str] = []
  for ch in text:
    if ch == '\b':
      if out and out[-1] != '\n':
        out.pop()
    else:
      out.append(ch)
  return ''.join(out)


def parse_fortunes(text: str) -> list[str]:
  """Splits a fortune file on lines that are exactly '%'; strips each entry and drops empty ones."""
  docs = (strip_overstrike(d).strip() for d in re.split(r'^%$', text, flags=re.MULTILINE))
  return [d for d in docs if d]


def fortune_files(directory: str | os.PathLike) -> list[Path]:
  """The plain-text fortune files of a directory, sorted by name (no .dat indices, no .u8 links)."""
  directory = Path(directory)
  return [p for p in sorted(directory.iterdir(), key=lambda p: p.name)
          if p.is_file() and not p.is_symlink() and not p.name.startswith('.')
          and p.suffix not in ('.dat', '.u8')]


def fortunes_documents(cache_dir: str | os.PathLike | None = None, *, deduplicate: bool = True) -> list[str]:
  """Every fortune of Debian's `fortunes` and `fortunes-min` packages, files in sorted order.

  About 15,000 documents, 2.5 MB of UTF-8. Backspace overstriking (old terminal bold/underline) is applied,
  and bytes that are not UTF-8 become U+FFFD. With deduplicate, a fortune that appears in several files is
  kept only where it first appears (so no text lands in both halves of a split).
  """
  docs: list[str] = []
  for path in fortune_files(fortunes_dir(cache_dir)):
    docs.extend(parse_fortunes(path.read_bytes().decode('utf-8', errors='replace')))
  return list(dict.fromkeys(docs)) if deduplicate else docs


def split_documents(docs: Sequence[str], *, valid_fraction: float = 0.05,
                    seed: int = 0) -> tuple[list[str], list[str]]:
  """A random (train, valid) split of whole documents; each keeps the documents' original order.

  The valid set holds round(len(docs) * valid_fraction) documents (at least one when valid_fraction > 0),
  chosen by a permutation drawn from jax.random.fold_in(jax.random.key(seed), SPLIT_STREAM).
  """
  if not 0.0 <= valid_fraction < 1.0:
    raise ValueError(f'split_documents: valid_fraction={valid_fraction} must lie in [0, 1); '
                     'use e.g. 0.05 for a 5% validation set.')
  n = len(docs)
  n_valid = int(round(n * valid_fraction))
  if valid_fraction > 0:
    n_valid = max(n_valid, 1)
  if n - n_valid < 1:
    raise ValueError(f'split_documents: {n} documents with valid_fraction={valid_fraction} leave no training '
                     'documents; give more documents or a smaller valid_fraction.')
  key = jax.random.fold_in(jax.random.key(seed), SPLIT_STREAM)
  with jax.default_device(jax.local_devices(backend='cpu')[0]):
    order = np.asarray(jax.random.permutation(key, n))
  is_valid = np.zeros(n, bool)
  is_valid[order[:n_valid]] = True
  train = [d for d, v in zip(docs, is_valid) if not v]
  valid = [d for d, v in zip(docs, is_valid) if v]
  return train, valid


def read_text_files(paths: Sequence[str | os.PathLike] | str | os.PathLike) -> list[str]:
  """One document per file, decoded as UTF-8 (undecodable bytes become U+FFFD), in the order given."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  docs = []
  for p in paths:
    path = Path(p)
    if not path.is_file():
      raise FileNotFoundError(f"read_text_files: '{path}' is not a file; give paths of UTF-8 text files.")
    docs.append(path.read_bytes().decode('utf-8', errors='replace'))
  return docs


def read_jsonl(path: str | os.PathLike, field: str = 'text') -> list[str]:
  """The string `field` of every JSON object in a JSON-lines file (blank lines are skipped; a truncated last
  line is an error, not skipped: a corpus must not silently lose a document)."""
  docs = []
  for lineno, record in provenance.read_jsonl(path, skip_truncated_tail=False, line_numbers=True):
    if field not in record:
      raise ValueError(f"read_jsonl: {path} line {lineno} has no field {field!r} (found {sorted(record)}); "
                       "pass field= naming the text field.")
    if not isinstance(record[field], str):
      raise ValueError(f"read_jsonl: {path} line {lineno} field {field!r} is a "
                       f"{type(record[field]).__name__}, not a string; pass field= naming a text field.")
    docs.append(record[field])
  return docs


def hf_dataset_texts(name: str, split: str = 'train', field: str = 'text') -> list[str]:
  """The string `field` of every row of a Hugging Face dataset (needs the optional `datasets` package)."""
  try:
    import datasets
  except ImportError as e:
    raise ImportError(f'hf_dataset_texts({name!r}) needs the optional `datasets` package: '
                      'pip install datasets') from e
  ds = datasets.load_dataset(name, split=split)
  if field not in ds.column_names:
    raise ValueError(f'hf_dataset_texts: dataset {name!r} split {split!r} has no column {field!r} (columns: '
                   f'{ds.column_names}); pass field= naming the text column.')
  return list(ds[field])
