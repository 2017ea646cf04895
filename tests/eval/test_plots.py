"""PNG line charts through matplotlib: the drawn lines hold exactly the finite data, in order, on the asked
scale; bad input is named before any file is written."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jaxcompress.eval import plots
from jaxcompress.train import metrics

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def drawn(fig) -> dict[str, np.ndarray]:
  """{label: [n, 2] (x, y)} of every line on the figure's axes."""
  (ax,) = fig.axes
  return {line.get_label(): np.stack([line.get_xdata(), line.get_ydata()], axis=-1).astype(float)
          for line in ax.get_lines()}


def test_two_series_are_drawn_with_their_data(tmp_path):
  steps = np.arange(0, 200, 10)
  train = 5.0 * np.exp(-steps / 50) + 1.0
  evals = ([0, 50, 100, 150, 190], [5.5, 2.8, 1.9, 1.5, 1.4])
  fig = plots.line_figure({'train': (steps, train), 'eval': evals}, title='run a', y_label='loss')
  lines = drawn(fig)
  assert list(lines) == ['train', 'eval']
  np.testing.assert_array_equal(lines['train'], np.stack([steps, train], -1))
  np.testing.assert_array_equal(lines['eval'], np.asarray(evals, float).T)
  (ax,) = fig.axes
  assert ax.get_title() == 'run a' and ax.get_xlabel() == 'step' and ax.get_ylabel() == 'loss'
  assert [t.get_text() for t in ax.get_legend().get_texts()] == ['train', 'eval']
  colors = [line.get_color() for line in ax.get_lines()]
  assert colors[0] != colors[1]


def test_png_file(tmp_path):
  path = plots.line_chart({'a': ([0, 1, 2], [3.0, 2.0, 1.0])}, tmp_path / 'out' / 'a.png', width=4, height=3,
                          dpi=50)
  data = path.read_bytes()
  assert data[:8] == PNG_MAGIC
  width, height = int.from_bytes(data[16:20], 'big'), int.from_bytes(data[20:24], 'big')
  assert (width, height) == (200, 150)


def test_log_y_non_finite_skipped_and_unsorted_x():
  fig = plots.line_figure({'a': ([4, 0, 1, 2, 3, math.inf], [2.0, 1.0, math.nan, 3.0, math.inf, 5.0])},
                          log_y=True, y_label='loss')
  np.testing.assert_array_equal(drawn(fig)['a'], [[0, 1.0], [2, 3.0], [4, 2.0]])
  (ax,) = fig.axes
  assert ax.get_yscale() == 'log' and ax.get_ylabel() == 'loss (log)'


def test_single_point_gets_a_marker():
  fig = plots.line_figure({'a': ([0, 10], [1.0, 2.0]), 'b': ([5], [1.5])})
  markers = {line.get_label(): line.get_marker() for line in fig.axes[0].get_lines()}
  assert markers['b'] == 'o' and markers['a'] in (None, 'None', '')


@pytest.mark.parametrize('series, kwargs, match', [
    ({}, {}, 'series is empty'),
    ({'a': ([], [])}, {}, "series 'a' is empty"),
    ({'a': ([1, 2, 3], [1, 2])}, {}, "series 'a' has 3 x values and 2 y values"),
    ({'a': ([1, 2], [1.0, 0.0])}, {'log_y': True}, "series 'a' has non-positive y values.*log_y"),
    ({'a': ([1, 2], [math.nan, math.nan])}, {}, 'no series has a finite'),
    ({'a': ([1, 2], [1, 2])}, {'width': 0}, 'width=0'),
])
def test_bad_input(tmp_path, series, kwargs, match):
  with pytest.raises(ValueError, match=match):
    plots.line_chart(series, tmp_path / 'bad.png', **kwargs)
  assert not (tmp_path / 'bad.png').exists()


def test_plot_metrics_from_jsonl(tmp_path):
  run = tmp_path / 'run-7'
  run.mkdir()
  lines = [f'{{"step": {s}, "time": 0.0, "loss": {4.0 - s}}}' for s in range(4)]
  lines += ['{"step": 3, "time": 1.0, "loss": 0.5, "eval/loss": 0.75}', '{"step": 4, "time": 1.0, "lo']
  (run / 'metrics.jsonl').write_text('\n'.join(lines))
  series = metrics.metric_series(run / 'metrics.jsonl', ('loss', 'eval/loss'))
  assert series == {'loss': ([0, 1, 2, 3], [4.0, 3.0, 2.0, 0.5]), 'eval/loss': ([3], [0.75])}
  png = metrics.plot_metrics(run / 'metrics.jsonl', tmp_path / 'out' / 'loss.png', keys=('loss', 'eval/loss'))
  assert png.read_bytes()[:8] == PNG_MAGIC
  with pytest.raises(ValueError, match=r"\['acc'\] not in .*metrics there: \['eval/loss', 'loss'\]"):
    metrics.plot_metrics(run / 'metrics.jsonl', tmp_path / 'x.png', keys=('loss', 'acc'))


def bars(fig) -> dict[str, np.ndarray]:
  """{label: [n, 2] (bar centre x, height)} of every bar series on the figure's axes."""
  (ax,) = fig.axes
  return {c.get_label(): np.array([(r.get_x() + r.get_width() / 2, r.get_height()) for r in c.patches])
          for c in ax.containers}


def test_bars_are_grouped_by_category_and_keep_their_slots():
  fig = plots.bar_figure({'gptq': {'W4': 0.05, 'W3': 0.16, 'W2': 1.5}, 'rtn': {'W3': 0.65, 'W4': math.nan}},
                         categories=['W4', 'W3', 'W2'], y_label='ppl over fp32', log_y=True, title='frontier')
  got = bars(fig)
  assert list(got) == ['gptq', 'rtn']
  np.testing.assert_allclose(got['gptq'], [[-0.2, 0.05], [0.8, 0.16], [1.8, 1.5]])
  np.testing.assert_allclose(got['rtn'], [[1.2, 0.65]])  # NaN and a missing W2 draw no bar; the slot stays
  (ax,) = fig.axes
  assert [t.get_text() for t in ax.get_xticklabels()] == ['W4', 'W3', 'W2']
  assert ax.get_yscale() == 'log' and ax.get_ylabel() == 'ppl over fp32 (log)' and ax.get_title() == 'frontier'
  assert [p.get_facecolor() for p in ax.containers[0].patches][0] != ax.containers[1].patches[0].get_facecolor()
  order = plots.bar_figure({'a': {'x': 1.0}, 'b': {'y': 2.0, 'x': 3.0}})  # categories as first seen
  assert [t.get_text() for t in order.axes[0].get_xticklabels()] == ['x', 'y']


def test_bar_chart_png_and_bad_input(tmp_path):
  path = plots.bar_chart({'a': {'W4': 1.0}}, tmp_path / 'out' / 'b.png', width=4, height=3, dpi=50)
  data = path.read_bytes()
  assert data[:8] == PNG_MAGIC and int.from_bytes(data[16:20], 'big') == 200
  for series, kwargs, match in [
      ({}, {}, 'series is empty'),
      ({'a': {'W4': 1.0, 'W9': 2.0}}, {'categories': ['W4']}, r"categories=\['W4'\] lacks \['W9'\]"),
      ({'a': {'W4': -1.0}}, {'log_y': True}, "series 'a' has non-positive values.*log_y"),
      ({'a': {'W4': math.inf}}, {}, 'no series has a finite value'),
      ({'a': {'W4': 1.0}}, {'dpi': 0}, 'dpi=0')]:
    with pytest.raises(ValueError, match=match):
      plots.bar_chart(series, tmp_path / 'bad.png', **kwargs)
    assert not (tmp_path / 'bad.png').exists()
