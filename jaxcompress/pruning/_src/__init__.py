"""The implementation of `jaxcompress.pruning`: one module per method and the helpers they share.

The public names are those `jaxcompress.pruning` re-exports; a module's other names are reached by path
(`from jaxcompress.pruning._src.<module> import name`).
"""
