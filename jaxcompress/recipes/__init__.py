"""Recipes: compression methods of every family by name, chained into checked, reproducible pipelines.

    from jaxcompress import recipes
    stages = recipes.parse('sparsegpt(sparsity=0.5, pattern="2:4") > gptq(bits=4, group_size=128) > distill(steps=500)')
    model, params = recipes.run(stages, recipes.Context(...), model, params)

`registry.register(name, Config, apply, family=..., paper=...)` adds a method in one line; `describe()` lists them.
"""

from jaxcompress.recipes import stages as _stages  # registers every family's methods
from jaxcompress.recipes.recipe import Stage, parse, plan, run, scopes, split_stages, to_string
from jaxcompress.recipes.registry import REGISTRY, Context, Method, describe, get, make_config, register

__all__ = ['REGISTRY', 'Context', 'Method', 'Stage', 'describe', 'get', 'make_config', 'parse', 'plan', 'register',
           'run', 'scopes', 'split_stages', 'to_string']
