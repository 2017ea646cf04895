"""SVG line charts: well-formed, one polyline per series, data range mapped onto the drawn axes."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from jaxcompress.eval import plots
from jaxcompress.train import metrics

NS = '{http://www.w3.org/2000/svg}'


def parse(path) -> ET.Element:
  return ET.parse(path).getroot()


def polylines(root: ET.Element) -> list[ET.Element]:
  return root.findall(f'.//{NS}polyline')


def coords(line: ET.Element) -> np.ndarray:
  text = line.get('points').split()
  return np.array([[float(v) for v in p.split(',')] for p in text]).reshape(-1, 2)


def axes_box(root: ET.Element) -> tuple[float, float, float, float]:
  """(left, top, right, bottom) of the drawn plot frame."""
  (rect,) = [r for r in root.iter(f'{NS}rect') if r.get('class') == 'axes']
  x, y, w, h = (float(rect.get(k)) for k in ('x', 'y', 'width', 'height'))
  return x, y, x + w, y + h


def expected_pixels(x, y, x_range, y_range, box):
  """Linear map of data (x, y) onto the box: x_range to left..right, y_range to bottom..top."""
  left, top, right, bottom = box
  u = (np.asarray(x, float) - x_range[0]) / (x_range[1] - x_range[0])
  v = (np.asarray(y, float) - y_range[0]) / (y_range[1] - y_range[0])
  return np.stack([left + u * (right - left), bottom - v * (bottom - top)], axis=-1)


def test_two_series_map_onto_axes(tmp_path):
  steps = np.arange(0, 200, 10)
  train = 5.0 * np.exp(-steps / 50) + 1.0
  evals = ([0, 50, 100, 150, 190], [5.5, 2.8, 1.9, 1.5, 1.4])
  path = plots.line_chart_svg({'train': (steps, train), 'eval': evals}, tmp_path / 'loss.svg', title='run a',
                              y_label='loss')
  root = parse(path)
  lines = polylines(root)
  assert [line.get('data-series') for line in lines] == ['train', 'eval']
  assert lines[0].get('stroke') != lines[1].get('stroke')
  box = axes_box(root)
  x_range, y_range = (0, 190), (1.0 + 5.0 * math.exp(-190 / 50), 6.0)
  for line, (xs, ys) in zip(lines, [(steps, train), evals]):
    got = coords(line)
    assert len(got) == len(xs)
    assert np.all(np.diff(got[:, 0]) > 0)
    np.testing.assert_allclose(got, expected_pixels(xs, ys, x_range, y_range, box), atol=0.01)
  everything = np.concatenate([coords(line) for line in lines])
  left, top, right, bottom = box
  assert everything[:, 0].min() == pytest.approx(left) and everything[:, 0].max() == pytest.approx(right)
  assert everything[:, 1].max() == pytest.approx(bottom) and everything[:, 1].min() == pytest.approx(top)
  legend = [t.text for g in root.iter(f'{NS}g') if g.get('class') == 'legend' for t in g.iter(f'{NS}text')]
  assert legend == ['train', 'eval']
  texts = [t.text for t in root.iter(f'{NS}text')]
  assert 'run a' in texts and 'step' in texts and 'loss' in texts


def test_ticks_lie_inside_the_axes(tmp_path):
  root = parse(plots.line_chart_svg({'a': ([3, 97], [0.13, 0.71])}, tmp_path / 'a.svg'))
  left, top, right, bottom = axes_box(root)
  (x_ticks,) = [g for g in root.iter(f'{NS}g') if g.get('class') == 'x-ticks']
  labels = [float(t.text) for t in x_ticks.iter(f'{NS}text')]
  assert labels == [20, 40, 60, 80]
  xs = [float(t.get('x')) for t in x_ticks.iter(f'{NS}text')]
  np.testing.assert_allclose(xs, expected_pixels(labels, [0.13] * 4, (3, 97), (0.13, 0.71),
                                                 (left, top, right, bottom))[:, 0], atol=0.01)
  (y_ticks,) = [g for g in root.iter(f'{NS}g') if g.get('class') == 'y-ticks']
  y_labels = [float(t.text) for t in y_ticks.iter(f'{NS}text')]
  assert y_labels == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6, 0.7])


def test_log_y_maps_log10(tmp_path):
  xs, ys = [1, 2, 3, 4], [100.0, 10.0, 3.0, 1.0]
  root = parse(plots.line_chart_svg({'loss': (xs, ys)}, tmp_path / 'log.svg', log_y=True))
  got = coords(polylines(root)[0])
  np.testing.assert_allclose(got, expected_pixels(xs, np.log10(ys), (1, 4), (0.0, 2.0), axes_box(root)),
                             atol=0.01)
  (y_ticks,) = [g for g in root.iter(f'{NS}g') if g.get('class') == 'y-ticks']
  assert [float(t.text) for t in y_ticks.iter(f'{NS}text')] == [1, 2, 5, 10, 20, 50, 100]


def test_non_finite_points_are_skipped(tmp_path):
  xs, ys = [0, 1, 2, 3, 4, math.inf], [1.0, math.nan, 3.0, math.inf, 2.0, 5.0]
  root = parse(plots.line_chart_svg({'a': (xs, ys)}, tmp_path / 'a.svg'))
  got = coords(polylines(root)[0])
  np.testing.assert_allclose(got, expected_pixels([0, 2, 4], [1.0, 3.0, 2.0], (0, 4), (1, 3), axes_box(root)),
                             atol=0.01)


def test_unsorted_x_and_constant_series(tmp_path):
  root = parse(plots.line_chart_svg({'flat': ([3, 1, 2], [7.0, 7.0, 7.0])}, tmp_path / 'a.svg'))
  got = coords(polylines(root)[0])
  left, top, right, bottom = axes_box(root)
  assert np.all(np.diff(got[:, 0]) > 0) and got[0, 0] == pytest.approx(left) and got[-1, 0] == pytest.approx(right)
  assert np.all(got[:, 1] == pytest.approx((top + bottom) / 2))


def test_single_point_gets_a_marker(tmp_path):
  root = parse(plots.line_chart_svg({'a': ([0, 10], [1.0, 2.0]), 'b': ([5], [1.5])}, tmp_path / 'a.svg'))
  (circle,) = root.iter(f'{NS}circle')
  expected = expected_pixels([5], [1.5], (0, 10), (1, 2), axes_box(root))[0]
  np.testing.assert_allclose([float(circle.get('cx')), float(circle.get('cy'))], expected, atol=0.01)
  assert circle.get('fill') == polylines(root)[1].get('stroke')


def test_names_are_escaped_and_colours_distinct(tmp_path):
  series = {f'<s{i}> & "q"': ([0, 1], [i, i + 1]) for i in range(12)}
  root = parse(plots.line_chart_svg(series, tmp_path / 'many.svg', title='a < b'))
  lines = polylines(root)
  assert [line.get('data-series') for line in lines] == list(series)
  assert len({line.get('stroke') for line in lines}) == 12


@pytest.mark.parametrize('series, kwargs, match', [
    ({}, {}, 'series is empty'),
    ({'a': ([], [])}, {}, "series 'a' is empty"),
    ({'a': ([1, 2, 3], [1, 2])}, {}, "series 'a' has 3 x values and 2 y values"),
    ({'a': ([1, 2], [1.0, 0.0])}, {'log_y': True}, "series 'a' has non-positive y values.*log_y"),
    ({'a': ([1, 2], [math.nan, math.nan])}, {}, 'no series has a finite'),
    ({'a': ([1, 2], [1, 2])}, {'width': 50}, 'width=50'),
])
def test_bad_input(tmp_path, series, kwargs, match):
  with pytest.raises(ValueError, match=match):
    plots.line_chart_svg(series, tmp_path / 'bad.svg', **kwargs)
  assert not (tmp_path / 'bad.svg').exists()


def test_plot_metrics_from_jsonl(tmp_path):
  run = tmp_path / 'run-7'
  run.mkdir()
  lines = [f'{{"step": {s}, "time": 0.0, "loss": {4.0 - s}}}' for s in range(4)]
  lines += ['{"step": 3, "time": 1.0, "loss": 0.5, "eval/loss": 0.75}', '{"step": 4, "time": 1.0, "lo']
  (run / 'metrics.jsonl').write_text('\n'.join(lines))
  svg = metrics.plot_metrics(run / 'metrics.jsonl', tmp_path / 'out' / 'loss.svg', keys=('loss', 'eval/loss'))
  root = parse(svg)
  train, evals = polylines(root)
  box = axes_box(root)
  np.testing.assert_allclose(coords(train), expected_pixels([0, 1, 2, 3], [4, 3, 2, 0.5], (0, 3), (0.5, 4), box),
                             atol=0.01)
  np.testing.assert_allclose(coords(evals), expected_pixels([3], [0.75], (0, 3), (0.5, 4), box), atol=0.01)
  assert 'run-7' in [t.text for t in root.iter(f'{NS}text')]
  with pytest.raises(ValueError, match=r"\['acc'\] not in .*metrics there: \['eval/loss', 'loss'\]"):
    metrics.plot_metrics(run / 'metrics.jsonl', tmp_path / 'x.svg', keys=('loss', 'acc'))
