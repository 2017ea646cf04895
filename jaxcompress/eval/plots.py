"""Line charts as PNG files through matplotlib: loss curves and metric-against-compression plots.

    line_chart({'train': (steps, losses), 'valid': (eval_steps, eval_losses)}, 'runs/a/loss.png',
               y_label='loss', log_y=True)
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
  if width <= 0 or height <= 0 or dpi <= 0:
    raise ValueError(f'width={width}, height={height}, dpi={dpi} must be positive (inches, dots per inch).')
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


def line_chart(series: Series, path: str | os.PathLike, **kwargs) -> Path:
  """Write `line_figure(series, **kwargs)` to `path` as a PNG; returns the path."""
  fig = line_figure(series, **kwargs)
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, format='png')
  return path
