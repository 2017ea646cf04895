"""The implementation of `jaxcompress.architecture`: one module per method and the helpers they share.

The public names are those `jaxcompress.architecture` re-exports; a module's other names are reached by path
(`from jaxcompress.architecture._src.<module> import name`).
"""
