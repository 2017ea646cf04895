"""jaxcompress: compression algorithms for language models as pure functions over Flax parameter pytrees."""

__version__ = '0.1.0'
