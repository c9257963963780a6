"""tissuegraph: tissue as spatial graphs.

Used the scanpy way::

    import tissuegraph as tg

    adata = tg.io.read_visium("path/to/spaceranger/outs")
    tg.tl.embed(adata, "run/checkpoints/last.pt")
    tg.tl.niches(adata)
    tg.pl.niches(adata)

The submodules (``io``, ``tl``, ``pl``, ``datasets``, ``graph``, ``nn``, ``train``) are
imported on first attribute access, so ``import tissuegraph`` is cheap; ``tl``, ``pl``,
``io`` and ``datasets`` import no torch until a function needs a model.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = ("datasets", "graph", "io", "nn", "pl", "tl", "train")

__all__ = ["__version__", *_SUBMODULES]


def __getattr__(name: str):
    if name in _SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBMODULES))
