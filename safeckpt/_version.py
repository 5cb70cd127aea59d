"""The version of safeckpt (one place; ``safeckpt.__version__`` re-exports it)."""

__version__ = "0.1.0"
