"""Metrics files read back by an independent TFRecord/protobuf reader and by TensorBoard's own loader."""

from __future__ import annotations

import io
import math
import os
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.train import metrics as M

REPO = Path(__file__).resolve().parents[2]


# An independent reader: TFRecord framing and a generic protobuf wire-format decoder ---------------------------


def read_records(path: Path) -> list[bytes]:
  data, out, pos = path.read_bytes(), [], 0
  while pos < len(data):
    (length,) = struct.unpack_from('<Q', data, pos)
    (length_crc,) = struct.unpack_from('<I', data, pos + 8)
    assert length_crc == M.masked_crc32c(data[pos:pos + 8])
    payload = data[pos + 12:pos + 12 + length]
    (payload_crc,) = struct.unpack_from('<I', data, pos + 12 + length)
    assert payload_crc == M.masked_crc32c(payload)
    out.append(payload)
    pos += 16 + length
  return out


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    b = data[pos]
    value |= (b & 0x7F) << shift
    pos, shift = pos + 1, shift + 7
    if not b & 0x80:
      return value, pos


def decode(data: bytes) -> dict[int, list]:
  """{field number: [raw values]}: ints for varints, bytes for fixed and length-delimited fields."""
  fields: dict[int, list] = {}
  pos = 0
  while pos < len(data):
    key, pos = read_varint(data, pos)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = read_varint(data, pos)
    elif wire == 1:
      value, pos = data[pos:pos + 8], pos + 8
    elif wire == 5:
      value, pos = data[pos:pos + 4], pos + 4
    else:
      assert wire == 2, wire
      length, pos = read_varint(data, pos)
      value, pos = data[pos:pos + length], pos + length
    fields.setdefault(number, []).append(value)
  return fields


def read_scalars(path: Path) -> tuple[str, list[tuple[int, str, float]]]:
  """(file_version of the first event, [(step, tag, value)]) of one event file."""
  events = [decode(r) for r in read_records(path)]
  version = events[0][3][0].decode()
  out = []
  for e in events[1:]:
    for value in decode(e[5][0]).get(1, []) if 5 in e else []:
      v = decode(value)
      out.append((e.get(2, [0])[0], v[1][0].decode(), struct.unpack('<f', v[2][0])[0]))
  return version, out


def event_files(run_dir: Path) -> list[Path]:
  return sorted((run_dir / 'tb').glob('events.out.tfevents.*'))


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
  pytest.importorskip('tensorboard')
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  acc = EventAccumulator(str(run_dir / 'tb'), size_guidance={'scalars': 0})
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}


# CRC32C -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('data, expected', [
    (b'', 0x00000000),
    (b'123456789', 0xE3069283),
    (bytes(32), 0x8A9136AA),  # RFC 3720 B.4
    (b'\xff' * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
])
def test_crc32c_known_vectors(data, expected):
  assert M.crc32c(data) == expected


def test_masked_crc_matches_definition():
  crc = M.crc32c(b'hello')
  assert M.masked_crc32c(b'hello') == ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) % 2**32


# MetricsWriter ------------------------------------------------------------------------------------------------


def fake_clock(start: float = 1_700_000_000.0, dt: float = 0.5):
  t = [start - dt]

  def clock():
    t[0] += dt
    return t[0]
  return clock


def test_jsonl_and_events_round_trip(tmp_path):
  steps = range(5)
  with M.MetricsWriter(tmp_path, clock=fake_clock()) as w:
    for s in steps:
      w.write(s, {'loss': jnp.asarray(2.0 / (s + 1)), 'lr': np.float32(1e-3 * s), 'finite': 1})
    w.write(4, {'loss': 0.25}, prefix='eval')
  records = M.read_jsonl(tmp_path / 'metrics.jsonl')
  assert [r['step'] for r in records] == [0, 1, 2, 3, 4, 4]
  assert all(isinstance(r['time'], float) and r['time'] >= 1_700_000_000 for r in records)
  assert records[2]['loss'] == pytest.approx(2.0 / 3) and records[3]['lr'] == pytest.approx(3e-3)
  assert records[-1] == {'step': 4, 'time': records[-1]['time'], 'eval/loss': 0.25}

  (path,) = event_files(tmp_path)
  assert path.name.startswith('events.out.tfevents.1700000000.')
  version, scalars = read_scalars(path)
  assert version == 'brain.Event:2'
  expected = [(s, tag, v) for s in steps for tag, v in (('loss', 2.0 / (s + 1)), ('lr', 1e-3 * s),
                                                         ('finite', 1.0))] + [(4, 'eval/loss', 0.25)]
  assert [(s, t) for s, t, _ in scalars] == [(s, t) for s, t, _ in expected]
  np.testing.assert_allclose([v for *_, v in scalars], [v for *_, v in expected], rtol=1e-6)

  tb = tensorboard_scalars(tmp_path)
  assert sorted(tb) == ['eval/loss', 'finite', 'loss', 'lr']
  assert [s for s, _ in tb['loss']] == list(steps)
  np.testing.assert_allclose([v for _, v in tb['loss']], [2.0 / (s + 1) for s in steps], rtol=1e-6)
  np.testing.assert_allclose([v for _, v in tb['lr']], [1e-3 * s for s in steps], rtol=1e-6)
  assert tb['eval/loss'] == [(4, 0.25)]


def test_non_finite_values_survive(tmp_path):
  with M.MetricsWriter(tmp_path) as w:
    w.write(0, {'nan': float('nan'), 'inf': np.inf, 'huge': 1e300})
  (record,) = M.read_jsonl(tmp_path / 'metrics.jsonl')
  assert math.isnan(record['nan']) and record['inf'] == math.inf and record['huge'] == 1e300
  values = {tag: v for _, tag, v in read_scalars(event_files(tmp_path)[0])[1]}
  assert math.isnan(values['nan']) and values['inf'] == math.inf and values['huge'] == math.inf  # float32


def test_prefix_with_or_without_slash():
  assert M.scalars({'loss': 1}, 'train/') == M.scalars({'loss': 1}, 'train') == {'train/loss': 1.0}
  assert M.scalars({'loss': 1}) == {'loss': 1.0}


def test_disabled_writer_makes_no_files(tmp_path):
  run = tmp_path / 'run'
  with M.MetricsWriter(run, enabled=False, resume_step=3) as w:
    w.write(0, {'loss': 1.0})
  assert not run.exists()


def test_bad_values_are_named(tmp_path):
  with M.MetricsWriter(tmp_path) as w:
    with pytest.raises(ValueError, match="'loss'.*not a scalar"):
      w.write(0, {'loss': np.ones(3)})
    with pytest.raises(ValueError, match="'step' is reserved"):
      w.write(0, {'step': 1.0})
    with pytest.raises(ValueError, match='step=-1'):
      w.write(-1, {'loss': 1.0})
  with pytest.raises(ValueError, match='after close'):
    w.write(0, {'loss': 1.0})
  with pytest.raises(ValueError, match='resume_step=-2'):
    M.MetricsWriter(tmp_path, resume_step=-2)


def test_resume_drops_later_steps(tmp_path):
  with M.MetricsWriter(tmp_path, clock=fake_clock()) as w:
    for s in range(10):
      w.write(s, {'loss': float(s)})
  # Resumed from the checkpoint of step 5 in the same second: steps 6.. are written again.
  with M.MetricsWriter(tmp_path, resume_step=5, clock=fake_clock()) as w:
    for s in range(6, 10):
      w.write(s, {'loss': 100.0 + s})
  expected = [(s, float(s) if s <= 5 else 100.0 + s) for s in range(10)]
  assert [(r['step'], r['loss']) for r in M.read_jsonl(tmp_path / 'metrics.jsonl')] == expected
  assert not (tmp_path / 'metrics.jsonl.tmp').exists()
  files = event_files(tmp_path)
  assert len(files) == 2 and files[1].name > files[0].name  # replayed in name order
  assert tensorboard_scalars(tmp_path)['loss'] == expected


def test_truncated_last_line(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  with M.MetricsWriter(tmp_path) as w:
    for s in range(3):
      w.write(s, {'loss': 1.0})
  with open(path, 'a') as f:
    f.write('{"step": 3, "time": 1.0, "lo')  # killed mid-write
  assert [r['step'] for r in M.read_jsonl(path)] == [0, 1, 2]
  with M.MetricsWriter(tmp_path) as w:  # appending repairs the cut-short line first
    w.write(3, {'loss': 2.0})
  assert [r['step'] for r in M.read_jsonl(path)] == [0, 1, 2, 3]
  with open(path, 'a') as f:
    f.write('{"step": 4, "time": 1.0}')  # whole record, newline never written: kept
  assert [r['step'] for r in M.read_jsonl(path)] == [0, 1, 2, 3, 4]


def test_corrupt_middle_line_is_an_error(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 0}\n{"step": 1, oops\n{"step": 2}\n')
  with pytest.raises(ValueError, match='line 2 is not valid JSON'):
    M.read_jsonl(path)


def test_latest_by_step():
  records = [{'step': 2, 'loss': 1.0}, {'step': 1, 'loss': 2.0}, {'time': 3.0}, {'step': 2, 'loss': 0.5}]
  assert M.latest_by_step(records) == [{'step': 1, 'loss': 2.0}, {'step': 2, 'loss': 0.5}]
  merged = M.latest_by_step(records + [{'step': 2, 'valid/loss': 0.7}])
  assert merged[-1] == {'step': 2, 'loss': 0.5, 'valid/loss': 0.7}


def test_sigkill_leaves_every_record_readable(tmp_path):
  script = textwrap.dedent(f"""
      import sys, time
      from jaxcompress.train.metrics import MetricsWriter
      w = MetricsWriter({str(tmp_path)!r})
      for s in range(50):
        w.write(s, {{'loss': s / 10}})
      print('written', flush=True)
      time.sleep(60)
  """)
  env = {**os.environ, 'PYTHONPATH': str(REPO)}
  proc = subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE, env=env, text=True)
  try:
    assert proc.stdout.readline().strip() == 'written'
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
  assert proc.returncode == -signal.SIGKILL
  assert [r['step'] for r in M.read_jsonl(tmp_path / 'metrics.jsonl')] == list(range(50))
  _, scalars = read_scalars(event_files(tmp_path)[0])
  assert [s for s, _, _ in scalars] == list(range(50))
  assert [s for s, _ in tensorboard_scalars(tmp_path)['loss']] == list(range(50))


# Progress -----------------------------------------------------------------------------------------------------


class Clock:
  def __init__(self):
    self.t = 1000.0

  def __call__(self) -> float:
    return self.t


class Terminal(io.StringIO):
  def isatty(self) -> bool:
    return True


def test_progress_rates_and_eta():
  clock, out = Clock(), io.StringIO()
  p = M.Progress(100, stream=out, clock=clock, every_seconds=10.0, window_seconds=1000.0)
  for step in range(1, 11):
    clock.t += 2.0  # 2 s a step, 512 tokens a step
    p.update(step, tokens=512 * step, metrics={'loss': 3.14159, 'lr': 1e-4})
  steps_per_s, tokens_per_s = p.rates()
  assert steps_per_s == pytest.approx(0.5) and tokens_per_s == pytest.approx(256.0)
  assert p.eta() == pytest.approx(90 * 2.0)
  line = p.line({'finite': 1.0, 'lr': 1e-4, 'loss': 3.14159})
  assert 'step 10/100' in line and '10.0%' in line and '256 tok/s' in line
  assert 'elapsed 0:00:20' in line and 'eta 0:03:00' in line
  assert line.endswith('loss 3.142  lr 0.0001')  # the chosen keys, in their order


def test_progress_window_forgets_slow_start():
  clock = Clock()
  p = M.Progress(1000, stream=io.StringIO(), clock=clock, window_seconds=10.0)
  clock.t += 60.0  # compilation
  p.update(1, tokens=100)
  for step in range(2, 30):
    clock.t += 1.0
    p.update(step, tokens=100 * step)
  assert p.rates() == pytest.approx((1.0, 100.0))
  assert p.eta() == pytest.approx(1000 - 29)


def test_progress_plain_stream_prints_every_interval():
  clock, out = Clock(), io.StringIO()
  p = M.Progress(40, stream=out, clock=clock, every_seconds=10.0)
  for step in range(1, 40):
    clock.t += 1.0
    p.update(step, tokens=10 * step, metrics={'loss': 1.0})
  p.close()
  lines = out.getvalue().splitlines()
  assert '\r' not in out.getvalue()
  assert [line.split()[1] for line in lines] == ['1/40', '11/40', '21/40', '31/40', '39/40']


def test_progress_terminal_redraws_one_line():
  clock, out = Clock(), Terminal()
  with M.Progress(3, stream=out, clock=clock) as p:
    for step in range(1, 4):
      clock.t += 1.0
      p.update(step, tokens=10 * step, metrics={'loss': 1.0})
  text = out.getvalue()
  assert text.count('\r') == 3 and text.endswith('\n') and text.count('\n') == 1
  assert 'step 3/3' in text.split('\r')[-1] and 'eta 0:00:00' in text


def test_progress_keys_none_shows_first_metrics():
  p = M.Progress(10, stream=io.StringIO(), clock=Clock(), keys=None, max_metrics=2)
  p.update(1, tokens=5)
  assert p.line({'a': 1.0, 'b': 2.0, 'c': 3.0}).endswith('a 1  b 2')


def test_progress_disabled_is_silent():
  out = io.StringIO()
  p = M.Progress(10, enabled=False, stream=out)
  p.update(1, tokens=5, metrics={'loss': 1.0})
  p.close()
  assert out.getvalue() == ''


def test_formatting():
  assert M.format_duration(3725.4) == '1:02:05' and M.format_duration(math.nan) == '-'
  assert M.format_count(1234.0) == '1.23k' and M.format_count(2.5e6) == '2.5M' and M.format_count(12) == '12'
