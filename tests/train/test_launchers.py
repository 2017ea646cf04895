"""Every launcher renders the command or manifest it would run (dry run), with the program's flags passed through
unchanged; the local launcher really runs a 2-process evaluation that matches the 1-process numbers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
FLAGS = ['--model=/runs/a b', '--reference=fixture', '--batch_size=8']  # a space: quoting must survive


def dry_run(launcher: str, *args: str, **env: str) -> str:
  proc = subprocess.run(['bash', str(ROOT / 'launch' / launcher), *args], capture_output=True, text=True,
                        cwd=ROOT, env={**os.environ, 'DRY_RUN': '1', **env}, timeout=60)
  assert proc.returncode == 0, proc.stderr
  return proc.stdout


def bash_words(line: str) -> list[str]:
  """The words bash reads from a printed command line (printf %q quoting, $'...' included)."""
  proc = subprocess.run(['bash', '-c', 'eval "words=($LINE)" || exit 1; printf "%s\\0" "${words[@]}"'], capture_output=True,
                        text=True, env={**os.environ, 'LINE': line}, timeout=60)
  assert proc.returncode == 0, proc.stderr
  return proc.stdout.split('\0')[:-1]


def test_local_renders_one_command_per_process():
  out = dry_run('local_multihost.sh', '3', '2', 'experiments/evaluate.py', *FLAGS).splitlines()
  assert out[0] == 'XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu'
  commands = [bash_words(line) for line in out[1:]]
  assert len(commands) == 3
  coordinators = set()
  for i, c in enumerate(commands):
    assert c[:2 + len(FLAGS)] == ['python3', 'experiments/evaluate.py', *FLAGS]
    extra = dict(a.split('=', 1) for a in c[2 + len(FLAGS):])
    assert extra['--num_processes'] == '3' and extra['--process_id'] == str(i)
    assert extra['--cpu_collectives'] == 'gloo'
    coordinators.add(extra['--coordinator'])
  assert len(coordinators) == 1 and coordinators.pop().startswith('localhost:')


def test_slurm_runs_one_task_per_host_with_the_flags_unchanged():
  header = (ROOT / 'launch' / 'slurm.sbatch').read_text()
  assert '#SBATCH --ntasks-per-node=1' in header  # one JAX process per host; SLURM gives the peers
  command = bash_words(dry_run('slurm.sbatch', 'experiments/evaluate.py', *FLAGS))
  assert command == ['srun', '--kill-on-bad-exit=1', 'python3', 'experiments/evaluate.py', *FLAGS]


def test_tpu_vm_runs_the_same_command_on_every_worker():
  command = bash_words(dry_run('tpu_pod.sh', 'experiments/evaluate.py', *FLAGS, TPU='v5e-16', ZONE='z1'))
  assert command[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'v5e-16']
  assert '--zone=z1' in command and '--worker=all' in command
  remote = next(a for a in command if a.startswith('--command='))
  last = bash_words(remote.rsplit('&& ', 1)[1])  # after '. .venv/bin/activate &&'
  assert last == ['python3', 'experiments/evaluate.py', *FLAGS]
  assert 'cd ~/jaxcompress' in remote  # the home directory of the workers, not of this machine


def gke(*args: str) -> dict:
  proc = subprocess.run([sys.executable, str(ROOT / 'launch' / 'gke_jobset.py'), *args], capture_output=True,
                        text=True, cwd=ROOT, timeout=60)
  assert proc.returncode == 0, proc.stderr
  return yaml.safe_load(proc.stdout)


def _pods(manifest: dict) -> tuple[dict, dict]:
  (job,) = manifest['spec']['replicatedJobs']
  spec = job['template']['spec']
  return spec, spec['template']['spec']['containers'][0]


@pytest.mark.subprocess
def test_gke_gpu_jobset_names_the_coordinator_and_process_ids():
  m = gke('--name=ev1', '--image=img:1', '--accelerator=gpu', '--hosts=4', '--gpus_per_host=8',
          'experiments/evaluate.py', *FLAGS)
  assert m['kind'] == 'JobSet' and m['metadata']['name'] == 'ev1'
  job, container = _pods(m)
  assert job['parallelism'] == job['completions'] == 4 and job['completionMode'] == 'Indexed'
  assert container['resources']['limits'] == {'nvidia.com/gpu': 8}
  command = container['command']
  assert command[:2 + len(FLAGS)] == ['python3', 'experiments/evaluate.py', *FLAGS]
  assert command[2 + len(FLAGS):] == ['--coordinator=ev1-workers-0-0.ev1:8476', '--num_processes=4',
                                      '--process_id=$(JOB_COMPLETION_INDEX)']
  env = {e['name']: e for e in container['env']}
  assert 'job-completion-index' in env['JOB_COMPLETION_INDEX']['valueFrom']['fieldRef']['fieldPath']


@pytest.mark.subprocess
def test_gke_tpu_jobset_leaves_the_peers_to_the_platform():
  m = gke('--name=pt', '--image=img', '--hosts=4', '--chips_per_host=4', '--tpu_topology=4x4',
          '--run_dir_volume=runs:/mnt/runs', 'experiments/pretrain.py', '--run_dir=/mnt/runs/x', '--fsdp=16')
  job, container = _pods(m)
  assert job['parallelism'] == 4
  assert container['command'] == ['python3', 'experiments/pretrain.py', '--run_dir=/mnt/runs/x', '--fsdp=16']
  assert container['resources']['limits'] == {'google.com/tpu': 4}
  assert job['template']['spec']['nodeSelector']['cloud.google.com/gke-tpu-topology'] == '4x4'
  assert container['volumeMounts'] == [{'name': 'runs', 'mountPath': '/mnt/runs'}]


@pytest.mark.subprocess
@pytest.mark.parametrize('args, message', [
    (['--name=Bad_Name'], "--name='Bad_Name'"),
    (['--name=ok', '--hosts=2', '--chips_per_host=4', '--tpu_topology=4x4'],
     '--tpu_topology=4x4 has 16 chips but --hosts=2 x --chips_per_host=4 = 8'),
])
def test_gke_refuses_bad_flags_by_name(args, message):
  proc = subprocess.run([sys.executable, str(ROOT / 'launch' / 'gke_jobset.py'), *args, '--image=i',
                         'experiments/evaluate.py'], capture_output=True, text=True, cwd=ROOT, timeout=60)
  assert proc.returncode != 0 and message in proc.stderr


@pytest.fixture(scope='module')
def tiny_dirs(tmp_path_factory):
  """A random Llama as an HF checkpoint, its 4-bit version as a compressed checkpoint, and held-out rows."""
  import jax

  from jaxcompress.recipes import model_dirs
  from jaxcompress import core, models
  d = tmp_path_factory.mktemp('tiny')
  model = models.Llama(models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                                          num_heads=4, num_kv_heads=2, max_position_embeddings=64))
  params = model.init(jax.random.key(0))
  quantized = core.select(params).map(lambda _, w: core.quantize(w, bits=4, group_size=16), params)
  models.save_pretrained(d / 'ref', model, params)
  model_dirs.save_compressed(d / 'w4', model, quantized)
  rows = np.random.RandomState(0).randint(0, 64, (20, 17)).astype(np.int32)
  np.save(d / 'rows.npy', rows)
  return d, model, params, quantized, rows


def test_compressed_directory_round_trips(tiny_dirs):
  from jaxcompress.recipes import model_dirs
  from jaxcompress import core, models
  d, _, _, quantized, _ = tiny_dirs
  loaded, params, kind = model_dirs.load(d / 'w4')
  assert kind == 'compressed' and loaded == models.load_model(d / 'ref')  # the spec the HF checkpoint gives
  for a, b in zip(core.flatten(quantized).values(), core.flatten(params).values()):
    np.testing.assert_array_equal(np.asarray(core.materialize(a)), np.asarray(core.materialize(b)))


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_process_evaluate_matches_one_process(tiny_dirs, tmp_path):
  """2 gloo processes (1 device each, batches split over them) give the 1-process perplexities and sizes."""
  from jaxcompress import core
  from jaxcompress.eval import lm
  d, model, params, quantized, rows = tiny_dirs
  out = tmp_path / 'ev'
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  proc = subprocess.run(['bash', str(ROOT / 'launch' / 'local_multihost.sh'), '2', '1', 'experiments/evaluate.py',
                         f'--model={d / "w4"}', f'--reference={d / "ref"}', f'--rows={d / "rows.npy"}',
                         '--batch_size=8', '--speed_repeats=1', f'--output_dir={out}'],
                        capture_output=True, text=True, cwd=ROOT, env={**env, 'PYTHONPATH': str(ROOT)}, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads((out / 'results.json').read_text())
  assert r['processes'] == 2 and r['devices'] == 2 and r['mesh']['data'] == 2
  q = r['quality']
  # 20 rows in batches of 8: the last batch is padded and masked, so the count says padding was excluded.
  assert q['model']['tokens'] == q['reference']['tokens'] == rows[:, 1:].size
  for key, p in (('model', quantized), ('reference', params)):
    one = lm.rows_perplexity(model, p, rows).perplexity  # the 1-process number every table uses
    np.testing.assert_allclose(q[key]['perplexity'], one, rtol=1e-5)
  assert q['model']['perplexity'] != q['reference']['perplexity']
  assert r['size']['model']['bits_per_weight'] == pytest.approx(core.stats.totals(quantized).bits_per_weight)
  assert r['size']['reference']['disk'] == core.stats.totals(params).disk
  assert r['speed']['speedup'] > 0
  assert 'held-out perplexity (20 rows x 16 tokens)' in (out / 'report.md').read_text()


@pytest.mark.subprocess
def test_evaluate_names_a_missing_model_directory(tmp_path):
  missing = tmp_path / 'no_such_model'
  proc = subprocess.run([sys.executable, str(ROOT / 'experiments' / 'evaluate.py'), f'--model={missing}',
                         '--reference=fixture'], capture_output=True, text=True, cwd=ROOT, timeout=120,
                        env={**os.environ, 'PYTHONPATH': str(ROOT)})
  assert proc.returncode != 0
  assert f"--model='{missing}': the directory '{missing}' does not exist" in proc.stderr + proc.stdout
