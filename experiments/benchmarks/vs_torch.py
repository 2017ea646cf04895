"""jaxcompress's dense model against transformers + torch, same weights, same machine, interleaved A/B pairs.

    python experiments/benchmarks/vs_torch.py                  # ~100M-parameter Llama, float32, every case
    python experiments/benchmarks/vs_torch.py --small          # smoke size, seconds
    python experiments/benchmarks/vs_torch.py --cases=forward_8x512,train_4x256 --pairs=7

One random Llama checkpoint is built with transformers (seeded), saved as safetensors, and loaded by both
frameworks from that one directory. Before anything is timed the two are checked to agree: logits (relative
error), greedy tokens, and the losses of a few AdamW + clipping training steps. Then each case is timed as
interleaved pairs (ours, theirs; the order alternates): before each pair the script waits until the other
processes on the machine use less than --idle_share of the CPU, and it records the share they used during the
pair. A ratio above 1 means jaxcompress is faster. Peak resident memory of "load + forward 1x128" is measured in
a fresh subprocess per framework.

On a GPU (JAX on CUDA and torch with CUDA) the same cases run in bfloat16.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[2]

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxcompress import models, provenance
from jaxcompress.train import objectives, optim
from jaxcompress.train import state as state_lib
from jaxcompress.train import step as step_lib

_HIDDEN = flags.DEFINE_integer('hidden', 768, 'Hidden size.')
_LAYERS = flags.DEFINE_integer('layers', 12, 'Transformer blocks.')
_HEADS = flags.DEFINE_integer('heads', 12, 'Query heads.')
_KV_HEADS = flags.DEFINE_integer('kv_heads', 4, 'Key/value heads.')
_INTERMEDIATE = flags.DEFINE_integer('intermediate', 2048, 'SwiGLU width.')
_VOCAB = flags.DEFINE_integer('vocab', 32000, 'Vocabulary (tied head: ~100M parameters by default).')
_CASES = flags.DEFINE_list('cases', ['forward_8x512', 'forward_1x128', 'decode_1x128', 'decode_8x128',
                                     'train_4x256'], 'Cases to time: forward_BxT, decode_BxN (N new tokens after '
                           'a 16-token prompt), train_BxT (AdamW + global-norm clipping).')
_PAIRS = flags.DEFINE_integer('pairs', 5, 'Timed A/B pairs per case, after one warm-up call of each.')
_IDLE_SHARE = flags.DEFINE_float('idle_share', 0.10, 'Wait before each pair until other processes use less '
                                 'than this share of all CPUs.')
_IDLE_TIMEOUT = flags.DEFINE_float('idle_timeout', 60.0, 'Seconds to wait for an idle CPU before timing anyway '
                                   '(the pair is then marked busy).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the random weights and tokens.')
_SMALL = flags.DEFINE_boolean('small', False, 'Smoke size (flags given explicitly still win).')
_RSS = flags.DEFINE_boolean('rss', True, 'Measure peak RSS of load + forward 1x128 in subprocesses.')
_OUT = flags.DEFINE_string('out', None, 'JSON results path (default: runs/benchmarks/vs_torch_<time>.json).')

SMALL = {'hidden': 128, 'layers': 2, 'heads': 4, 'kv_heads': 2, 'intermediate': 256, 'vocab': 1024, 'pairs': 3,
         'cases': ['forward_2x64', 'decode_1x16', 'train_2x64']}


# The machine's load ---------------------------------------------------------------------------------------------


def _cpu_jiffies() -> tuple[float, float]:
  """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
  with open('/proc/stat') as f:
    fields = [float(v) for v in f.readline().split()[1:]]
  idle = fields[3] + fields[4]  # idle + iowait
  return sum(fields) - idle, sum(fields)


def _own_seconds() -> float:
  t = os.times()
  return t.user + t.system


@dataclasses.dataclass
class LoadMeter:
  """Share of all CPUs used by other processes between start() and stop()."""

  busy: float = 0.0
  total: float = 0.0
  own: float = 0.0

  def start(self) -> None:
    self.busy, self.total = _cpu_jiffies()
    self.own = _own_seconds()

  def stop(self) -> float:
    busy, total = _cpu_jiffies()
    hz = os.sysconf('SC_CLK_TCK')
    others = (busy - self.busy) / hz - (_own_seconds() - self.own)
    return max(others, 0.0) / max((total - self.total) / hz, 1e-9)


def wait_for_idle(limit: float, timeout: float) -> float:
  """Waits until other processes use < limit of the CPUs over 0.5 s; returns the last share seen."""
  deadline = time.monotonic() + timeout
  meter = LoadMeter()
  while True:
    meter.start()
    time.sleep(0.5)
    share = meter.stop()
    if share < limit or time.monotonic() > deadline:
      return share


# The two implementations ----------------------------------------------------------------------------------------


def build_checkpoint(directory: pathlib.Path, seed: int) -> None:
  import torch
  import transformers
  cfg = transformers.LlamaConfig(
      vocab_size=_VOCAB.value, hidden_size=_HIDDEN.value, intermediate_size=_INTERMEDIATE.value,
      num_hidden_layers=_LAYERS.value, num_attention_heads=_HEADS.value, num_key_value_heads=_KV_HEADS.value,
      max_position_embeddings=1024, tie_word_embeddings=True, rms_norm_eps=1e-6)
  torch.manual_seed(seed)
  transformers.LlamaForCausalLM(cfg).save_pretrained(str(directory))


def load_torch(directory: pathlib.Path, dtype: str):
  import torch
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(directory), dtype=getattr(torch, dtype), attn_implementation='sdpa')
  return model.to('cuda' if torch.cuda.is_available() else 'cpu').eval()


def _torch_tokens(tokens: np.ndarray, model):
  import torch
  return torch.from_numpy(np.asarray(tokens, np.int64)).to(model.device)


def jax_cases(model, params, tokens: dict[str, np.ndarray], dtype) -> dict[str, Callable[[], Any]]:
  calls = {}
  apply = jax.jit(lambda p, t: model.apply(p, t))
  for name, t in tokens.items():
    kind, shape = name.split('_')
    b, n = (int(v) for v in shape.split('x'))
    if kind == 'forward':
      tj = jnp.asarray(t)
      calls[name] = lambda tj=tj: apply(params, tj)
    elif kind == 'decode':
      tj = jnp.asarray(t)
      calls[name] = lambda tj=tj, n=n: models.generate(model, params, tj, max_new_tokens=n)
    elif kind == 'train':
      calls[name] = _jax_train(model, params, t, dtype)
  return calls


def _optimizer_config() -> optim.OptimizerConfig:
  return optim.OptimizerConfig(name='adamw', learning_rate=1e-4, schedule='constant', weight_decay=0.01,
                               grad_clip=1.0, b1=0.9, b2=0.95)


def _jax_train(model, params, t: np.ndarray, dtype) -> Callable[[], Any]:
  """A closure that runs one engine train step per call (state carried between calls, buffers donated)."""
  tx = optim.make_optimizer(_optimizer_config())
  step = step_lib.compile_step(step_lib.make_train_step(objectives.causal_lm(model), tx,
                                                        compute_dtype=jnp.dtype(dtype)))
  batch = {'inputs': jnp.asarray(t[:, :-1]), 'targets': jnp.asarray(t[:, 1:])}
  master = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), params)  # the step donates its state
  box = {'state': state_lib.init_state(master, tx, jax.random.key(0))}

  def run():
    box['state'], metrics = step(box['state'], batch)
    return metrics['loss']

  return run


def torch_cases(model, tokens: dict[str, np.ndarray]) -> dict[str, Callable[[], Any]]:
  import torch
  calls = {}
  sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
  for name, t in tokens.items():
    kind, shape = name.split('_')
    n = int(shape.split('x')[1])
    tt = _torch_tokens(t, model)
    if kind == 'forward':
      def run(tt=tt):
        with torch.inference_mode():
          out = model(tt).logits
        sync()
        return out
    elif kind == 'decode':
      def run(tt=tt, n=n):
        with torch.inference_mode():
          out = model.generate(tt, attention_mask=torch.ones_like(tt), do_sample=False, max_new_tokens=n,
                               min_new_tokens=n, pad_token_id=0)
        sync()
        return out
    else:
      run = _torch_train(model, tt)
    calls[name] = run
  return calls


def _torch_train(model, tt) -> Callable[[], Any]:
  """One AdamW + clipping step of a copy of the model per call, the loss as ours: mean token cross-entropy."""
  import copy

  import torch
  cfg = _optimizer_config()
  train_model = copy.deepcopy(model).float().train()
  opt = torch.optim.AdamW(train_model.parameters(), lr=cfg.learning_rate, betas=(cfg.b1, cfg.b2), eps=1e-8,
                          weight_decay=cfg.weight_decay)
  inputs, targets = tt[:, :-1], tt[:, 1:]

  def run():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type=inputs.device.type, dtype=model.dtype, enabled=model.dtype != torch.float32):
      logits = train_model(inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(train_model.parameters(), cfg.grad_clip)
    opt.step()
    return loss.detach()

  return run


def _to_numpy(x) -> np.ndarray:
  if hasattr(x, 'detach'):
    return x.detach().float().cpu().numpy()
  return np.asarray(jax.device_get(x), np.float32)


# Agreement and timing -------------------------------------------------------------------------------------------


def check_agreement(ours: dict, theirs: dict, case_names: list[str]) -> dict[str, Any]:
  """Outputs of the first call of every case (and 3 train steps): relative error, tokens equal, losses."""
  out = {}
  for name in case_names:
    kind = name.split('_')[0]
    if kind == 'train':
      a = [float(_to_numpy(ours[name]())) for _ in range(3)]
      b = [float(_to_numpy(theirs[name]())) for _ in range(3)]
      out[name] = {'losses_ours': a, 'losses_torch': b,
                   'max_rel_diff': float(np.max(np.abs(np.subtract(a, b)) / np.abs(b)))}
    else:
      a, b = _to_numpy(ours[name]()), _to_numpy(theirs[name]())
      if kind == 'forward':
        out[name] = {'logits_rel_error': float(np.linalg.norm(a - b) / np.linalg.norm(b))}
      else:
        out[name] = {'tokens_equal': bool(a.shape == b.shape and np.array_equal(a, b)),
                     'tokens_agree_share': float(np.mean(a == b)) if a.shape == b.shape else 0.0}
  return out


def time_pairs(ours: Callable, theirs: Callable, pairs: int) -> dict[str, Any]:
  jax.block_until_ready(ours())  # warm-up (compiles)
  theirs()
  rows = []
  for i in range(pairs):
    waited = wait_for_idle(_IDLE_SHARE.value, _IDLE_TIMEOUT.value)
    meter = LoadMeter()
    meter.start()
    times = {}
    for who in (('ours', 'theirs') if i % 2 == 0 else ('theirs', 'ours')):
      fn = ours if who == 'ours' else theirs
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[who] = time.perf_counter() - start
    rows.append({'ours_s': times['ours'], 'torch_s': times['theirs'], 'ratio': times['theirs'] / times['ours'],
                 'other_cpu_share': meter.stop(), 'idle_before': waited})
  ratios = [r['ratio'] for r in rows]
  return {'pairs': rows, 'ratio_median': statistics.median(ratios), 'ratio_min': min(ratios),
          'ratio_max': max(ratios), 'ours_median_s': statistics.median(r['ours_s'] for r in rows),
          'torch_median_s': statistics.median(r['torch_s'] for r in rows),
          'other_cpu_share_max': max(r['other_cpu_share'] for r in rows)}


def tokens_per_call(name: str) -> int:
  kind, shape = name.split('_')
  b, n = (int(v) for v in shape.split('x'))
  return b * n if kind != 'train' else b * (n - 1)


# Peak RSS probe -------------------------------------------------------------------------------------------------

# Each runs in a fresh interpreter that imports only its own framework: load, one forward 1x128, peak RSS.
# VmHWM, not getrusage: ru_maxrss survives exec, so a child would report its parent's peak.
_HWM = "_hwm = lambda: 1024 * int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])"
_PROBES = {
    'jax': """
import sys, jax, jax.numpy as jnp, numpy as np
from jaxcompress import models
model, params = models.from_pretrained(sys.argv[1])
tokens = jnp.asarray(np.random.RandomState(0).randint(0, model.config.vocab_size, (1, 128)), jnp.int32)
jax.block_until_ready(jax.jit(model.apply)(params, tokens))
print('PEAK_RSS', _hwm())
""",
    'torch': """
import sys, numpy as np, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
tokens = torch.from_numpy(np.random.RandomState(0).randint(0, model.config.vocab_size, (1, 128)))
with torch.inference_mode():
  model(tokens)
print('PEAK_RSS', _hwm())
""",
}


def measure_rss(directory: pathlib.Path) -> dict[str, int]:
  out = {}
  for framework, code in _PROBES.items():
    res = subprocess.run([sys.executable, '-c', _HWM + code, str(directory)], capture_output=True, text=True,
                         env={**os.environ, 'PYTHONPATH': str(REPO)})
    if res.returncode:
      raise RuntimeError(f'{framework} peak-RSS probe failed:\n{res.stderr[-2000:]}')
    out[framework] = int(next(l for l in res.stdout.splitlines() if l.startswith('PEAK_RSS')).split()[1])
  return out


# Main -----------------------------------------------------------------------------------------------------------


def main(argv: list[str]) -> None:
  del argv
  if _SMALL.value:
    for name, value in SMALL.items():
      if not flags.FLAGS[name].present:
        flags.FLAGS[name].value = value
  import torch
  gpu = jax.default_backend() == 'gpu' and torch.cuda.is_available()
  dtype = 'bfloat16' if gpu else 'float32'
  if not gpu:
    torch.set_num_threads(os.cpu_count())
  rng = np.random.RandomState(_SEED.value)
  tokens = {}
  for name in _CASES.value:
    kind, _, shape = name.partition('_')
    if kind not in ('forward', 'decode', 'train') or 'x' not in shape:
      raise ValueError(f'--cases: {name!r} is not forward_BxT, decode_BxN or train_BxT.')
    b, n = (int(v) for v in shape.split('x'))
    tokens[name] = rng.randint(0, _VOCAB.value, (b, 16 if kind == 'decode' else n)).astype(np.int32)

  with tempfile.TemporaryDirectory() as tmp:
    directory = pathlib.Path(tmp)
    build_checkpoint(directory, _SEED.value)
    model, params = models.from_pretrained(directory, dtype=jnp.dtype(dtype))
    torch_model = load_torch(directory, dtype)
    num_params = sum(int(x.size) for x in jax.tree.leaves(params))
    print(f'Llama {num_params / 1e6:.1f}M parameters, {dtype}, jax {jax.__version__} on {jax.devices()[0]}, '
          f'torch {torch.__version__} with {torch.get_num_threads()} threads')
    ours, theirs = jax_cases(model, params, tokens, dtype), torch_cases(torch_model, tokens)
    agreement = check_agreement(ours, theirs, list(tokens))
    for name, a in agreement.items():
      print(f'  agree {name}: {a}')
    ours, theirs = jax_cases(model, params, tokens, dtype), torch_cases(torch_model, tokens)  # fresh train state
    results = {}
    for name in tokens:
      print(f'timing {name} ...', flush=True)
      results[name] = time_pairs(ours[name], theirs[name], _PAIRS.value)
    rss = measure_rss(directory) if _RSS.value else {}

  param_bytes = num_params * 4
  print(f'\n{"case":<16} {"ours tok/s":>11} {"torch tok/s":>12} {"ratio med":>10} {"min":>6} {"max":>6} '
        f'{"others CPU":>10}')
  for name, r in results.items():
    n = tokens_per_call(name)
    print(f'{name:<16} {n / r["ours_median_s"]:>11,.0f} {n / r["torch_median_s"]:>12,.0f} {r["ratio_median"]:>10.2f}'
          f' {r["ratio_min"]:>6.2f} {r["ratio_max"]:>6.2f} {100 * r["other_cpu_share_max"]:>9.1f}%')
  for framework, peak in rss.items():
    print(f'peak RSS load + forward 1x128, {framework}: {peak / 2**30:.2f} GiB '
          f'({peak / param_bytes:.2f}x the {param_bytes / 2**30:.2f} GiB of float32 parameters)')

  now = datetime.datetime.now(datetime.timezone.utc)
  out = pathlib.Path(_OUT.value) if _OUT.value else (
      REPO / 'runs' / 'benchmarks' / f'vs_torch_{now.strftime("%Y%m%d_%H%M%S")}.json')
  out.parent.mkdir(parents=True, exist_ok=True)
  provenance.write_json(out, {
      'benchmark': 'vs_torch', 'time_utc': now.isoformat(timespec='seconds'), 'dtype': dtype,
      'num_params': num_params, 'flags': {k: flags.FLAGS[k].value for k in (*SMALL, 'seed', 'idle_share')},
      'environment': provenance.environment(), 'agreement': agreement, 'results': results, 'peak_rss_bytes': rss,
      'torch_version': torch.__version__, 'torch_threads': torch.get_num_threads()})
  print(f'\nwrote {out}')


if __name__ == '__main__':
  app.run(main)
