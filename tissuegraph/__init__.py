"""tissuegraph: tissue as spatial graphs."""

__version__ = "0.1.0"
