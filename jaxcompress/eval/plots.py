"""Line and bar charts as PNG files through matplotlib: loss curves, metric-against-compression plots, and one
metric per method over named settings.

    line_chart({'train': (steps, losses), 'valid': (eval_steps, eval_losses)}, 'runs/a/loss.png',
               y_label='loss', log_y=True)
    bar_chart({'gptq': {'W4': 0.05, 'W3': 0.16}, 'rtn': {'W4': 0.17, 'W3': 0.65}}, 'runs/f/frontier.png',
              y_label='perplexity over fp32', log_y=True)
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

Series = Mapping[str, tuple[Sequence[float], Sequence[float]]]


def finite_points(name: str, xs: Sequence[float], ys: Sequence[float], *, log_y: bool
                  ) -> list[tuple[float, float]]:
  """(x, y) pairs with both finite, sorted by x; checks lengths and, with log_y, positivity."""
  xs, ys = [float(v) for v in xs], [float(v) for v in ys]
  if not xs:
    raise ValueError(f'series {name!r} is empty; give it at least one (x, y) point or leave it out.')
  if len(xs) != len(ys):
    raise ValueError(f'series {name!r} has {len(xs)} x values and {len(ys)} y values; give one y per x.')
  points = [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
  if log_y:
    bad = [y for _, y in points if y <= 0]
    if bad:
      raise ValueError(f'series {name!r} has non-positive y values (first: {bad[0]!r}) and log_y=True; use '
                       'log_y=False or plot only positive values.')
  return sorted(points, key=lambda p: p[0])


def line_figure(series: Series, *, title: str = '', x_label: str = 'step', y_label: str = '',
                log_y: bool = False, width: float = 7.2, height: float = 4.0, dpi: int = 100):
  """A matplotlib Figure with one line per series of `series` ({name: (xs, ys)}), in legend order.

  Points where x or y is NaN or inf are skipped and each series is sorted by x; a single point gets a marker.
  log_y puts y on a log10 scale (every finite y must be positive). width, height: inches.
  """
  if not series:
    raise ValueError('series is empty; give at least one {name: (xs, ys)} entry.')
  _check_size(width, height, dpi)
  points = {str(name): finite_points(str(name), xs, ys, log_y=log_y) for name, (xs, ys) in series.items()}
  if not any(points.values()):
    raise ValueError(f'no series has a finite (x, y) point (series: {sorted(points)}); nothing to draw.')
  from matplotlib.figure import Figure  # the object API: no pyplot state, no display backend needed
  fig = Figure(figsize=(width, height), dpi=dpi, layout='constrained')
  ax = fig.add_subplot()
  for name, pts in points.items():
    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, linewidth=1.5,
            marker='o' if len(pts) == 1 else None)
  if log_y:
    from matplotlib.ticker import FuncFormatter
    ax.set_yscale('log')
    plain = FuncFormatter(lambda v, _: f'{v:g}')  # 6.2, not 6.2 x 10^0, over a narrow log range
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
  ax.set_xlabel(x_label)
  ax.set_ylabel(y_label + (' (log)' if log_y and y_label else ''))
  if title:
    ax.set_title(title)
  ax.grid(True, color='#e0e0e0')
  ax.legend(loc='best')
  return fig


def _check_size(width: float, height: float, dpi: int) -> None:
  if width <= 0 or height <= 0 or dpi <= 0:
    raise ValueError(f'width={width}, height={height}, dpi={dpi} must be positive (inches, dots per inch).')


def _save(fig, path: str | os.PathLike) -> Path:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, format='png')
  return path


def line_chart(series: Series, path: str | os.PathLike, **kwargs) -> Path:
  """Write `line_figure(series, **kwargs)` to `path` as a PNG; returns the path."""
  return _save(line_figure(series, **kwargs), path)


Bars = Mapping[str, Mapping[str, float]]


def bar_figure(series: Bars, *, categories: Sequence[str] | None = None, title: str = '', y_label: str = '',
               log_y: bool = False, width: float = 7.2, height: float = 4.0, dpi: int = 100):
  """A matplotlib Figure of grouped bars: one group per category (x axis, in `categories` order, default the
  order first seen), one bar per series ({name: {category: value}}) in legend order, side by side in each group.

  A value that is NaN or inf, or a category a series lacks, draws no bar there (the slot stays empty, so every
  series keeps its place in each group). log_y puts y on a log10 scale (every finite value must be positive).
  """
  if not series:
    raise ValueError('series is empty; give at least one {name: {category: value}} entry.')
  _check_size(width, height, dpi)
  seen = list(dict.fromkeys(c for values in series.values() for c in values))
  order = list(seen if categories is None else categories)
  unknown = sorted(set(seen) - set(order))
  if unknown:
    raise ValueError(f'categories={order} lacks {unknown}, which the series hold; add them or drop those values.')
  values = {}
  for name, by_category in series.items():
    pts = {c: float(v) for c, v in by_category.items() if math.isfinite(float(v))}
    bad = [v for v in pts.values() if v <= 0] if log_y else []
    if bad:
      raise ValueError(f'series {name!r} has non-positive values (first: {bad[0]!r}) and log_y=True; use '
                       'log_y=False or plot only positive values.')
    values[str(name)] = pts
  if not any(values.values()):
    raise ValueError(f'no series has a finite value (series: {sorted(values)}); nothing to draw.')
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width, height), dpi=dpi, layout='constrained')
  ax = fig.add_subplot()
  step = 0.8 / len(values)
  for j, (name, pts) in enumerate(values.items()):
    xs = [i - 0.4 + (j + 0.5) * step for i, c in enumerate(order) if c in pts]
    ax.bar(xs, [pts[c] for c in order if c in pts], width=step, label=name)
  ax.set_xticks(range(len(order)), order)
  if log_y:
    ax.set_yscale('log')
  ax.set_ylabel(y_label + (' (log)' if log_y and y_label else ''))
  if title:
    ax.set_title(title)
  ax.grid(True, axis='y', color='#e0e0e0')
  ax.set_axisbelow(True)
  ax.legend(loc='best', fontsize='small')
  return fig


def bar_chart(series: Bars, path: str | os.PathLike, **kwargs) -> Path:
  """Write `bar_figure(series, **kwargs)` to `path` as a PNG; returns the path."""
  return _save(bar_figure(series, **kwargs), path)
