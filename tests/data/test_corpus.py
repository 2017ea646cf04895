"""Corpus readers: the real fortunes download, its parsing and caching, splits, text and JSON-lines files."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import threading
from pathlib import Path

import pytest

from jaxcompress.data import corpus


def test_fortunes_corpus_is_large_real_english(fortunes_docs):
  n_bytes = sum(len(d.encode('utf-8')) for d in fortunes_docs)
  assert n_bytes > 2_000_000
  assert len(fortunes_docs) > 10_000
  assert all(d and d == d.strip() for d in fortunes_docs)
  assert not any('\n%\n' in d or '\b' in d for d in fortunes_docs)
  assert len(set(fortunes_docs)) == len(fortunes_docs)
  text = ' '.join(fortunes_docs[:2000]).lower()
  assert text.count(' the ') > 1000


def test_fortunes_read_is_deterministic_and_cached(fortunes_cache, fortunes_docs):
  root = fortunes_cache / corpus.FORTUNES_SUBDIR
  assert (root / corpus.COMPLETE_MARKER).is_file()
  assert corpus.fortunes_documents(fortunes_cache) == fortunes_docs
  files = [p.name for p in corpus.fortune_files(root / corpus.FORTUNES_DATA)]
  assert files == sorted(files) and 'fortunes' in files and 'computers' in files
  assert not any(f.endswith(('.dat', '.u8')) for f in files)


def test_split_is_deterministic_disjoint_and_complete(fortunes_docs):
  train, valid = corpus.split_documents(fortunes_docs, valid_fraction=0.05, seed=0)
  assert corpus.split_documents(fortunes_docs, valid_fraction=0.05, seed=0) == (train, valid)
  assert len(valid) == round(0.05 * len(fortunes_docs))
  assert len(train) + len(valid) == len(fortunes_docs)
  assert not set(train) & set(valid)
  assert set(train) | set(valid) == set(fortunes_docs)
  _, valid_other = corpus.split_documents(fortunes_docs, valid_fraction=0.05, seed=1)
  assert valid_other != valid
  positions = {d: i for i, d in enumerate(fortunes_docs)}
  assert [positions[d] for d in train] == sorted(positions[d] for d in train)  # original order kept


def test_split_edge_cases():
  docs = [f'doc {i}' for i in range(10)]
  assert corpus.split_documents(docs, valid_fraction=0.0) == (docs, [])
  train, valid = corpus.split_documents(docs, valid_fraction=0.01)
  assert len(valid) == 1 and len(train) == 9
  with pytest.raises(ValueError, match='valid_fraction=1.0'):
    corpus.split_documents(docs, valid_fraction=1.0)
  with pytest.raises(ValueError, match='leave no training'):
    corpus.split_documents(['only'], valid_fraction=0.5)


def test_parse_fortunes_and_overstrike():
  text = 'first\nline\n%\n\n%\n  second  \n%\n50% off\n%'
  assert corpus.parse_fortunes(text) == ['first\nline', 'second', '50% off']
  assert corpus.strip_overstrike('whiter *___\b\b\band* teeth') == 'whiter *and* teeth'
  assert corpus.strip_overstrike('B\bBold\nx\b\by') == 'Bold\ny'


def _fake_tools(tmp_path: Path, counter: Path) -> Path:
  """Stand-ins for apt-get and dpkg that build a tiny fortunes tree and count downloads."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  scripts = {
      'apt-get': f'#!/bin/sh\necho x >> "{counter}"\nsleep 0.2\nfor p in "$@"; do\n'
                 '  [ "$p" = download ] || echo "$p" > "${p}_1_all.deb"\ndone\n',
      'dpkg': '#!/bin/sh\nd="$3/usr/share/games/fortunes"\nmkdir -p "$d"\nname=$(cat "$2")\n'
              'printf "%s one\\n%%\\n%s two\\n" "$name" "$name" > "$d/$name"\n'
              'printf "index" > "$d/$name.dat"\nln -sf "$name" "$d/$name.u8"\n',
  }
  for name, body in scripts.items():
    path = bin_dir / name
    path.write_text(body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return bin_dir


def test_fetch_runs_once_under_concurrency(tmp_path, monkeypatch):
  counter = tmp_path / 'downloads'
  bin_dir = _fake_tools(tmp_path, counter)
  monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
  cache = tmp_path / 'cache'
  (cache / corpus.FORTUNES_SUBDIR).mkdir(parents=True)  # a leftover tree without its marker gets replaced
  (cache / corpus.FORTUNES_SUBDIR / 'stale').write_text('x')
  results = [None] * 4

  def read(i):
    results[i] = corpus.fortunes_documents(cache)

  threads = [threading.Thread(target=read, args=(i,)) for i in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  expected = ['fortunes one', 'fortunes two', 'fortunes-min one', 'fortunes-min two']
  assert results == [expected] * 4
  assert counter.read_text().count('x') == 1
  assert not (cache / corpus.FORTUNES_SUBDIR / 'stale').exists()
  assert sorted(p.name for p in cache.iterdir()) == [corpus.FORTUNES_SUBDIR, f'{corpus.FORTUNES_SUBDIR}.lock']


def test_missing_tools_error_says_what_to_run(tmp_path, monkeypatch):
  monkeypatch.setenv('PATH', str(tmp_path / 'empty'))
  with pytest.raises(RuntimeError) as info:
    corpus.fortunes_documents(tmp_path / 'cache')
  message = str(info.value)
  assert 'apt-get download fortunes fortunes-min' in message
  assert 'dpkg -x' in message and corpus.CACHE_ENV in message and corpus.COMPLETE_MARKER in message
  assert not (tmp_path / 'cache' / corpus.FORTUNES_SUBDIR).exists()  # nothing half-made left behind
  assert [p.name for p in (tmp_path / 'cache').iterdir()] == [f'{corpus.FORTUNES_SUBDIR}.lock']


def test_cache_dir_from_environment(tmp_path, monkeypatch):
  monkeypatch.setenv(corpus.CACHE_ENV, str(tmp_path))
  assert corpus.default_cache_dir() == tmp_path
  monkeypatch.delenv(corpus.CACHE_ENV)
  assert corpus.default_cache_dir() == Path.home() / '.cache' / 'jaxcompress'


def test_read_text_files(tmp_path):
  (tmp_path / 'a.txt').write_text('alpha\n')
  (tmp_path / 'b.txt').write_bytes(b'beta \xff')
  assert corpus.read_text_files([tmp_path / 'a.txt', tmp_path / 'b.txt']) == ['alpha\n', 'beta \ufffd']
  assert corpus.read_text_files(str(tmp_path / 'a.txt')) == ['alpha\n']
  with pytest.raises(FileNotFoundError, match='missing.txt'):
    corpus.read_text_files([tmp_path / 'missing.txt'])


def test_read_jsonl(tmp_path):
  path = tmp_path / 'docs.jsonl'
  path.write_text(json.dumps({'text': 'one', 'id': 1}) + '\n\n' + json.dumps({'body': 'two', 'text': 'x'}) + '\n')
  assert corpus.read_jsonl(path) == ['one', 'x']
  path.write_text(json.dumps({'text': 'one'}) + '\n' + '{"text": "broken\n')
  with pytest.raises(ValueError, match='line 2 is not valid JSON'):
    corpus.read_jsonl(path)
  path.write_text(json.dumps({'text': 'one'}) + '\n' + json.dumps({'body': 'two'}) + '\n')
  with pytest.raises(ValueError, match=r"line 2 has no field 'text' \(found \['body'\]\); pass field="):
    corpus.read_jsonl(path)
  path.write_text(json.dumps({'text': 3}) + '\n')
  with pytest.raises(ValueError, match="line 1 field 'text' is a int"):
    corpus.read_jsonl(path)
  path.write_text('[1, 2]\n')
  with pytest.raises(ValueError, match='line 1 holds a JSON list, not an object'):
    corpus.read_jsonl(path)
  with pytest.raises(FileNotFoundError, match='nope.jsonl'):
    corpus.read_jsonl(tmp_path / 'nope.jsonl')
  path.write_text(json.dumps({'text': 'one'}) + '\n' + '{"text": "cut sh')  # truncated: not silently dropped
  with pytest.raises(ValueError, match='line 2 is not valid JSON'):
    corpus.read_jsonl(path)


@pytest.mark.skipif(importlib.util.find_spec('datasets') is not None, reason='datasets is installed')
def test_hf_dataset_texts_without_datasets():
  with pytest.raises(ImportError, match='pip install datasets'):
    corpus.hf_dataset_texts('some/dataset')
