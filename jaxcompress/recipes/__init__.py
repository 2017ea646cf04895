"""Recipes: compression methods of every family by name, chained into checked, reproducible pipelines.

    from jaxcompress import recipes
    stages = recipes.parse('sparsegpt(sparsity=0.5, pattern="2:4") > gptq(bits=4, group_size=128) > distill(steps=500)')
    model, params = recipes.run(stages, recipes.Context(calib=batches, ...), model, params)
    result = recipes.compress('fixture', 'wanda(sparsity=0.5) > gptq(bits=4)', output_dir='runs/mine')
    print(result.to_markdown())             # the survey's criteria; result.to_json(), result.plot(path)

Methods live in their families and register themselves there (`registry.register`); importing this package
imports every family, so every method is known by name. This package only parses, plans, composes and runs.
"""

from jaxcompress import architecture, distillation, lowrank, pruning, quantization, sharing  # noqa: F401 (register)
from jaxcompress.recipes import fixture, model_dirs, pipeline, report, setup
from jaxcompress.recipes.pipeline import compress
from jaxcompress.recipes.recipe import Stage, parse, plan, run, scopes, split_stages, to_string
from jaxcompress.recipes.report import CompressionResult
from jaxcompress.registry import REGISTRY, Context, Method, describe, get, load_plugins, make_config, register

__all__ = ['REGISTRY', 'CompressionResult', 'Context', 'Method', 'Stage', 'compress', 'describe', 'fixture', 'get',
           'load_plugins', 'make_config', 'model_dirs', 'parse', 'pipeline', 'plan', 'register', 'report', 'run',
           'scopes', 'setup', 'split_stages', 'to_string']
