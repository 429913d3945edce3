"""The version of clipscope (its own module, so that light modules can read it without the package root)."""

__version__ = "0.1.0"
