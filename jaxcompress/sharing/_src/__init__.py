"""The implementation of `jaxcompress.sharing`: one module per method and the helpers they share.

The public names are those `jaxcompress.sharing` re-exports; a module's other names are reached by path
(`from jaxcompress.sharing._src.<module> import name`).
"""
