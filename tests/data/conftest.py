"""The real fortunes corpus, fetched once per test run into the default cache (reused by later runs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from jaxcompress.data import corpus


@pytest.fixture(scope='session')
def fortunes_cache() -> Path:
  """The default cache directory, holding the unpacked fortunes packages (downloaded if missing)."""
  corpus.fortunes_dir()
  return corpus.default_cache_dir()


@pytest.fixture(scope='session')
def fortunes_docs(fortunes_cache: Path) -> list[str]:
  return corpus.fortunes_documents(fortunes_cache)
