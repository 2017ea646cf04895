"""What a compression run refuses before any work: the model's config and weight shapes checked against the
recipe before any weight is loaded, then the loaded weights before the dense evaluation, and nothing written yet.

    from jaxcompress import recipes
    from jaxcompress.recipes import preflight
    preflight.check('fixture', recipes.parse('gptq(bits=4, group_size=48)'))
    # PreflightError: recipe: stage 1 gptq: group_size=48 does not divide the input width 256 of layers/0/...
    preflight.check_weights(params, name='fixture')   # NaN / inf weights refused

Each method declares its own shape checks where it is registered (`registry.register(..., check=fn)`); this module
adds what no method knows: the model directory itself (config.json, safetensors headers, the causal-LM fixture's
training record), the kind of data file each model takes and what runs out of core. Every refusal is a
`PreflightError` (a ValueError) naming the setting, its value and the fix; `recipes.compress` raises them before it
evaluates or writes anything, and the command lines print them as one line.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any


class PreflightError(ValueError):
  """A setting a run refuses before any work; the message names it, its value and the fix."""


def check(model, stages, *, calib_data: str = 'default', eval_data: str = 'default', out_of_core: bool = False,
          seed: int = 0):
  """The model spec after every check a run can make before loading weights (or, given a loaded `setup.Setup`,
  before running its stages): the model and its data files (`check_model`), then the recipe against the model's
  shapes (`check_stages`). Raises PreflightError."""
  from jaxcompress.recipes import setup as setup_lib
  if isinstance(model, setup_lib.Setup):  # its data are loaded already
    check_stages(model.model, stages, params=model.params, out_of_core=out_of_core)
    return model.model
  spec = check_model(model, calib_data=calib_data, eval_data=eval_data, seed=seed)
  check_stages(spec, stages, out_of_core=out_of_core)
  return spec


def check_model(name: str, *, calib_data: str = 'default', eval_data: str = 'default', seed: int = 0):
  """The spec of a named model or checkpoint directory, read from its config.json and safetensors headers only,
  with the data files it is given: a damaged or missing config.json, an unreadable header, a compression run
  directory, a causal LM without the fixture's training record, or a data file of the other kind of model is
  refused. Raises PreflightError."""
  from jaxcompress.recipes import fixture
  name = str(name)
  path = _directory(name)
  if path is not None and _causal(path) and not (path / 'training.json').is_file():
    raise PreflightError(
        f"model={name!r}: '{path}' holds a causal LM without training.json, the record of the corpus, tokenizer "
        'and split it was trained on, which gives a causal LM its calibration, training and held-out rows here '
        "(only the causal-LM fixture's folder has one). Compress model='fixture' or 'tiny', or, for a model of "
        f"the fixture's tokenizer, copy training.json and the tokenizer files of '{fixture.FIXTURE_DIR}' beside "
        'its config.json.')
  spec = model_spec(name, seed=seed)
  for param, value in (('calib_data', calib_data), ('eval_data', eval_data)):
    check_data(spec, param, value, name=name)
  return spec


def _directory(name: str) -> pathlib.Path | None:
  """The checkpoint directory a model name gives (not a named model, not a run directory), or None."""
  from jaxcompress.recipes import fixture, model_dirs
  if name in ('tiny', *fixture.NAMES) or model_dirs.is_run_dir(name):
    return None
  path = pathlib.Path(name).expanduser()
  return path if (path / 'config.json').is_file() else None


def _causal(path: pathlib.Path) -> bool:
  """Whether config.json names a causal-LM family, read without transformers (False where it cannot be read:
  `model_spec` then names the damage)."""
  import json

  from jaxcompress import models
  try:
    model_type = json.loads((path / 'config.json').read_text()).get('model_type')
  except (OSError, ValueError, AttributeError):
    return False
  family = models.supported_model_types().get(model_type)
  return family is not None and family.causal


def model_spec(name: str, *, seed: int = 0):
  """The model spec of 'tiny', 'fixture', 'minilm' or a Hugging Face checkpoint directory, without its weights
  (`models.load_model`: config.json and the safetensors headers). Raises PreflightError."""
  from jaxcompress import models
  from jaxcompress.recipes import fixture, model_dirs
  name = str(name)
  if name == 'tiny':
    return _tiny(seed)
  if name not in fixture.NAMES and model_dirs.is_run_dir(name):
    raise PreflightError(f"model={name!r} is a compression run directory (compressed.jxc): a recipe starts from a "
                         f"dense model. Give the model it compressed, or its dense equivalent "
                         f"'{pathlib.Path(name) / model_dirs.RUN_ARCHITECTURE}'.")
  try:
    path = fixture.resolve(name)
  except FileNotFoundError as e:
    raise PreflightError(str(e)) from None
  try:
    return models.load_model(path)
  except (OSError, ValueError) as e:  # damaged config.json or safetensors header, pickles, missing weights
    raise PreflightError(f'model={name!r}: {e}') from None


def _tiny(seed: int):
  """The 'tiny' model's spec, traced (`setup.tiny_model` under `jax.eval_shape`: nothing initialized)."""
  import jax

  from jaxcompress.recipes import setup as setup_lib
  held = []
  jax.eval_shape(lambda: held.append(setup_lib.tiny_model(seed)) or 0)
  return held[0][0]


def check_data(spec, param: str, value: str, *, name: str = '') -> None:
  """A calibration or evaluation file (`param`='calib_data' / 'eval_data') of the kind the model takes: token
  rows (.npy) for a causal LM, texts (.txt) for an encoder. Raises PreflightError."""
  if value == 'default':
    return
  path = pathlib.Path(value)
  model = f' ({name})' if name else ''
  if spec.causal and path.suffix != '.npy':
    raise PreflightError(f"{param}={value!r}: a causal LM{model} takes 'default' or a .npy of token rows "
                         '[N, T + 1], not a text file; tokenize the texts into rows with the model\'s tokenizer (or '
                         "give 'default').")
  if not spec.causal and path.suffix != '.txt':
    raise PreflightError(f"{param}={value!r}: an encoder{model} takes 'default' or a .txt file of texts, one per "
                         "line; give the texts rather than token ids (or 'default').")
  if not path.is_file():
    raise PreflightError(f"{param}={value!r}: no such file; give an existing {path.suffix} file or 'default'.")


def check_stages(model, stages, *, params: Any = None, out_of_core: bool = False) -> None:
  """Each stage's registered `check` against the model's weight shapes (params: the weights, or None for
  `model.abstract_params()`), up to the first stage that changes the architecture (the shapes after it are its
  own); with out_of_core, every stage must be a calibrated layer-wise method. Raises PreflightError."""
  if out_of_core:
    check_out_of_core(stages, model)
  params = model.abstract_params() if params is None else params
  for i, s in enumerate(stages):
    if s.method.check is not None:
      try:
        s.method.check(model, params, config=s.config)
      except ValueError as e:
        raise PreflightError(f'recipe: stage {i + 1} {s.name}: {e}') from None
    if s.method.adds == 'architecture':
      return


def out_of_core_refusal(method) -> str | None:
  """Why a registered method cannot run out of core, from its registration alone (it trains, changes the
  architecture or is not calibrated), or None; what it does with its arguments is known only once it is recorded
  (`pipeline.layerwise_plan`)."""
  return ('trains' if method.trains else 'changes the architecture' if method.adds == 'architecture'
          else 'is not calibrated' if not method.calibrated else None)


def record(method, config, model, ctx=None) -> list:
  """The `calibration.SequentialPlan`s `method` records on `model` (abstract params; `record_sequential`): one for
  a stage that compresses block by block. Raises `calibration.NotSequential` for one that needs the statistics of
  the whole model. ctx: the run's `registry.Context` (default: one token row; nothing is computed)."""
  import numpy as np

  from jaxcompress import calibration, registry
  ctx = registry.as_context([np.zeros((1, 8), np.int32)]) if ctx is None else ctx
  with calibration.record_sequential() as plans:
    method.fn(model, model.abstract_params(), ctx, config=config)
  return plans


def out_of_core_methods(model=None) -> str:
  """The registered methods that run out of core, as a refusal lists them: those their registration allows
  (`out_of_core_refusal`) and, given the model spec, that record one block-wise plan with their defaults."""
  from jaxcompress import registry
  registry.load_plugins()

  def runs(m) -> bool:
    try:
      return len(record(m, registry.make_config(m, {}), model)) == 1
    except Exception:  # noqa: BLE001 (whole-model statistics, or defaults that do not fit this model)
      return False

  names = sorted(m.name for m in registry.REGISTRY.values()
                 if out_of_core_refusal(m) is None and (model is None or runs(m)))
  return (f'out of core runs calibrated one-shot stages that compress block by block ({", ".join(names)}), not '
          'with arguments that allocate over the whole model at once (a low-rank budget=: give keep= instead)')


def check_out_of_core(stages, model=None) -> None:
  """What `pipeline.layerwise_plan` refuses from the registry alone (training, architecture and uncalibrated
  stages), before the weights are loaded (model: the spec, for the list of what runs); the plan itself checks the
  rest once they are."""
  for i, s in enumerate(stages):
    why = out_of_core_refusal(s.method)
    if why:
      raise PreflightError(f'out_of_core=True: stage {i + 1} {s} {why}; {out_of_core_methods(model)}. Run this '
                           'recipe without out_of_core, or split it: the layer-wise stages out of core, the rest on '
                           'the result.')


def check_weights(params, *, name: str) -> None:
  """Refuses loaded weights holding NaN or inf (a damaged or diverged checkpoint), naming the first tensors;
  run after loading and before the dense evaluation. Raises PreflightError."""
  import jax

  from jaxcompress import core
  counts = jax.device_get(_nonfinite()(core.flatten(params)))
  bad = {p: int(n) for p, n in sorted(counts.items()) if n}
  if bad:
    shown = ', '.join(f'{p} ({n})' for p, n in list(bad.items())[:3]) + (', ...' if len(bad) > 3 else '')
    raise PreflightError(f'model={name!r}: {sum(bad.values())} weights are NaN or inf, in {len(bad)} tensor(s): '
                         f'{shown}. The checkpoint is damaged or its training diverged; export or download it again '
                         '(compressing it would carry the NaNs into every figure).')


@functools.cache
def _nonfinite():
  """{path: count of NaN / inf entries} of a flat dict of arrays, as one program (compiled once per layout)."""
  import jax
  import jax.numpy as jnp

  def count(x):
    return jnp.sum(~jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.zeros((), jnp.int32)
  return jax.jit(lambda flat: {k: count(v) for k, v in flat.items()})
