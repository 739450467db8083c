"""LLMOS: local-first creative writing with language models."""

__version__ = "0.1.0"
