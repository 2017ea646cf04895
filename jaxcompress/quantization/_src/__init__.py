"""The implementation of `jaxcompress.quantization`: one module per method and the helpers they share.

The public names are those `jaxcompress.quantization` re-exports; a module's other names are reached by path
(`from jaxcompress.quantization._src.<module> import name`).
"""
