"""The implementation of `jaxcompress.lowrank`: one module per method and the helpers they share.

The public names are those `jaxcompress.lowrank` re-exports; a module's other names are reached by path
(`from jaxcompress.lowrank._src.<module> import name`).
"""
