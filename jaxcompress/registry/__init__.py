"""Every compression method by name: its frozen config, its function, its paper and what it composes with.

The registry sits below the families, so a method's file holds everything about it: its config, its pure function
and its one `register(...)` line.

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class WandaConfig:
      sparsity: float = registry.field(0.5, range='(0.0, 1.0)')  # fraction pruned
      ...

    def wanda(model, params, calib, *, config=WandaConfig()) -> tuple[model, params]: ...

    registry.register('wanda', WandaConfig, wanda, family='pruning', paper='Sun et al. (ICLR 2024)',
                      forbids=registry.COMPRESSED, adds='masked', calibrated=True)

Every method has one calling convention: `method(model, params, calib, *, config, key=None) -> (model, params)`,
with `calib` a `Context` (calibration batches, their mesh and row split, training batches, the uncompressed
model for distillation, the seed) or just a list of calibration batches. Methods outside this package register the
same way from their own module, found through the `jaxcompress.methods` entry-point group or imported by name
(`load_plugins`, `compress.py --import=module`).

A method that chooses which weights it touches holds `rules: core.Rules` in its config (`selects`); a recipe writes
them as the method's arguments `include=`, `exclude=`, `embeddings=`, `head=` (`SELECTION_ARGS`), which
`make_config` builds into the config's `rules`. An argument a config no longer takes is declared with `retired`,
which refuses it with what replaced it.
"""

from jaxcompress.registry.context import Context, as_context, local
from jaxcompress.registry.methods import (COMPRESSED, ENTRY_POINTS, REGISTRY, SELECTION_ARGS, TAGS, Method,
                                          check_ranges, describe, field, get, load_plugins, make_config, register,
                                          retired, selects)

__all__ = ['COMPRESSED', 'ENTRY_POINTS', 'REGISTRY', 'SELECTION_ARGS', 'TAGS', 'Context', 'Method', 'as_context',
           'check_ranges', 'describe', 'field', 'get', 'load_plugins', 'local', 'make_config', 'register', 'retired',
           'selects']
