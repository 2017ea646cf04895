"""The implementation of `jaxcompress.distillation`: one module per method and the helpers they share.

The public names are those `jaxcompress.distillation` re-exports; a module's other names are reached by path
(`from jaxcompress.distillation._src.<module> import name`).
"""
