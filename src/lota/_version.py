"""lota's version, readable without importing the package (keep it equal to pyproject.toml's)."""

__version__ = "0.1.0"
