"""Line charts as standalone SVG files, with no plotting library: loss curves one can open in any browser.

    line_chart_svg({'train': (steps, losses)}, 'runs/a/loss.svg', y_label='loss', log_y=True)

Data map linearly (or through log10 with log_y) onto the plot area: the smallest x over all series lands on
its left edge, the largest on its right edge, and likewise the y range on its bottom and top edges.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr


# Tableau 10: distinct and colour-blind friendly; more series get evenly spread hues.
PALETTE = ('#4e79a7', '#f28e2b', '#e15759', '#76b7b2', '#59a14f', '#edc948', '#b07aa1', '#ff9da7', '#9c755f',
           '#bab0ac')
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_BOTTOM = 72, 24, 52
MARGIN_TOP, MARGIN_TOP_TITLED = 20, 40
FONT = 'font-family="sans-serif" font-size="12"'

Series = Mapping[str, tuple[Sequence[float], Sequence[float]]]


def color(index: int) -> str:
  """The colour of series `index`."""
  if index < len(PALETTE):
    return PALETTE[index]
  return f'hsl({(index * 137.508) % 360:.1f}, 65%, 42%)'  # golden-angle hues stay apart


def plot_area(width: int, height: int, *, titled: bool) -> tuple[float, float, float, float]:
  """(left, top, right, bottom) pixel bounds of the plot area inside a width x height image."""
  top = MARGIN_TOP_TITLED if titled else MARGIN_TOP
  return MARGIN_LEFT, top, width - MARGIN_RIGHT, height - MARGIN_BOTTOM


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


def _span(lo: float, hi: float) -> tuple[float, float]:
  """(lo, hi) widened around a single value, so the mapping has a non-zero range."""
  if hi > lo:
    return lo, hi
  pad = abs(lo) * 0.1 if lo else 1.0
  return lo - pad, hi + pad


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
  """Round values (1, 2 or 5 times a power of ten apart) within [lo, hi], as close to `target` of them as can be."""
  power = 10.0 ** math.floor(math.log10((hi - lo) / target))

  def count(step: float) -> int:
    return math.floor(hi / step + 1e-9) - math.ceil(lo / step - 1e-9) + 1

  step = min((m * power for m in (1, 2, 5, 10)), key=lambda st: abs(count(st) - target))
  first = math.ceil(lo / step - 1e-9)
  return [0.0 if k == 0 else k * step for k in range(first, first + count(step))]


def log_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
  """Values within [lo, hi] (positive) at 1, 2, 5 x 10^k; powers of ten only when those are plenty."""
  k0, k1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
  ticks = [m * 10.0 ** k for k in range(k0, k1 + 1) for m in (1, 2, 5) if lo <= m * 10.0 ** k <= hi]
  if len(ticks) < 3:
    return nice_ticks(lo, hi, target)  # within a decade or so, evenly spaced values read better
  if len(ticks) <= 2 * target:
    return ticks
  decades = [10.0 ** k for k in range(k0, k1 + 1) if lo <= 10.0 ** k <= hi]
  return decades[::math.ceil(len(decades) / (2 * target))]


def format_tick(value: float) -> str:
  """Up to 6 significant digits; exponents without padding (1e6, 2e-5)."""
  text = f'{value:.6g}'.replace('e+0', 'e').replace('e+', 'e').replace('e-0', 'e-')
  return '0' if text in ('-0', '0') else text


def line_chart_svg(series: Series, path: str | os.PathLike, *, title: str = '', x_label: str = 'step',
                   y_label: str = '', log_y: bool = False, width: int = 720, height: int = 400) -> Path:
  """Write a line chart of `series` ({name: (xs, ys)}) to `path` as a standalone SVG; returns the path.

  One polyline per series, in legend order; points where x or y is NaN or inf are skipped. log_y puts y on a
  log10 scale (every finite y must be positive).
  """
  if not series:
    raise ValueError('series is empty; give at least one {name: (xs, ys)} entry.')
  if width < 200 or height < 150:
    raise ValueError(f'width={width}, height={height} leaves no room for axes; use at least 200 x 150.')
  points = {str(name): finite_points(str(name), xs, ys, log_y=log_y) for name, (xs, ys) in series.items()}
  every = [p for pts in points.values() for p in pts]
  if not every:
    raise ValueError(f'no series has a finite (x, y) point (series: {sorted(points)}); nothing to draw.')
  fy = math.log10 if log_y else float
  x0, x1 = _span(min(x for x, _ in every), max(x for x, _ in every))
  y0, y1 = _span(fy(min(y for _, y in every)), fy(max(y for _, y in every)))
  box = left, top, right, bottom = plot_area(width, height, titled=bool(title))

  def px(x: float) -> float:
    return left + (x - x0) / (x1 - x0) * (right - left)

  def py(y: float) -> float:
    return bottom - (fy(y) - y0) / (y1 - y0) * (bottom - top)

  x_ticks = nice_ticks(x0, x1)
  y_ticks = log_ticks(10 ** y0, 10 ** y1) if log_y else nice_ticks(y0, y1)
  out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'viewBox="0 0 {width} {height}">',
         f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>']
  out += _axes([(px(t), format_tick(t)) for t in x_ticks], [(py(t), format_tick(t)) for t in y_ticks], box)
  out += _labels(title, x_label, y_label + (' (log)' if log_y and y_label else ''), box, width, height)
  for i, (name, pts) in enumerate(points.items()):
    coords = ' '.join(f'{px(x):.2f},{py(y):.2f}' for x, y in pts)
    out.append(f'<polyline data-series={quoteattr(name)} points="{coords}" fill="none" stroke="{color(i)}" '
               'stroke-width="1.5" stroke-linejoin="round"/>')
    if len(pts) == 1:  # a one-point polyline draws nothing
      out.append(f'<circle cx="{px(pts[0][0]):.2f}" cy="{py(pts[0][1]):.2f}" r="3" fill="{color(i)}"/>')
  out += _legend(list(points), right, top)
  out.append('</svg>')
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text('\n'.join(out) + '\n', encoding='utf-8')
  return path


def _axes(x_ticks: list[tuple[float, str]], y_ticks: list[tuple[float, str]],
          box: tuple[float, float, float, float]) -> list[str]:
  """Grid lines, the frame of the plot area, tick marks and tick labels; ticks given as (pixel, label)."""
  left, top, right, bottom = box
  out = ['<g class="grid" stroke="#e0e0e0" stroke-width="1">']
  out += [f'<line x1="{x:.2f}" y1="{top}" x2="{x:.2f}" y2="{bottom}"/>' for x, _ in x_ticks]
  out += [f'<line x1="{left}" y1="{y:.2f}" x2="{right}" y2="{y:.2f}"/>' for y, _ in y_ticks]
  out += ['</g>', f'<rect class="axes" x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" '
          'fill="none" stroke="#333" stroke-width="1"/>', f'<g class="x-ticks" {FONT} text-anchor="middle">']
  out += [f'<line x1="{x:.2f}" y1="{bottom}" x2="{x:.2f}" y2="{bottom + 5}" stroke="#333"/>'
          f'<text x="{x:.2f}" y="{bottom + 18}">{label}</text>' for x, label in x_ticks]
  out += ['</g>', f'<g class="y-ticks" {FONT} text-anchor="end">']
  out += [f'<line x1="{left - 5}" y1="{y:.2f}" x2="{left}" y2="{y:.2f}" stroke="#333"/>'
          f'<text x="{left - 8}" y="{y + 4:.2f}">{label}</text>' for y, label in y_ticks]
  return out + ['</g>']


def _labels(title: str, x_label: str, y_label: str, box: tuple[float, float, float, float], width: int,
            height: int) -> list[str]:
  """Title above the plot area, x label below it, y label rotated along its left side."""
  left, top, right, bottom = box
  out = []
  if title:
    out.append(f'<text class="title" x="{width / 2:.1f}" y="24" text-anchor="middle" font-family="sans-serif" '
               f'font-size="15" font-weight="bold">{escape(title)}</text>')
  if x_label:
    out.append(f'<text class="x-label" x="{(left + right) / 2:.1f}" y="{height - 12}" {FONT} '
               f'text-anchor="middle">{escape(x_label)}</text>')
  if y_label:
    cx, cy = 16, (top + bottom) / 2
    out.append(f'<text class="y-label" x="{cx}" y="{cy:.1f}" {FONT} text-anchor="middle" '
               f'transform="rotate(-90 {cx} {cy:.1f})">{escape(y_label)}</text>')
  return out


def _legend(names: list[str], right: float, top: float) -> list[str]:
  """A boxed legend in the top-right corner of the plot area; text width estimated at 7 px a character."""
  row, width = 18, 34 + 7 * max(len(n) for n in names)
  x, y = right - width - 8, top + 8
  out = [f'<g class="legend" {FONT}>',
         f'<rect x="{x}" y="{y}" width="{width}" height="{row * len(names) + 8}" fill="white" '
         'fill-opacity="0.85" stroke="#ccc"/>']
  for i, name in enumerate(names):
    cy = y + 4 + row * i + row / 2
    out.append(f'<line x1="{x + 6}" y1="{cy:.1f}" x2="{x + 24}" y2="{cy:.1f}" stroke="{color(i)}" '
               f'stroke-width="2.5"/><text x="{x + 30}" y="{cy + 4:.1f}">{escape(name)}</text>')
  return out + ['</g>']
