"""SpatialData at the entry of :mod:`tissuegraph.tl`: convert the table, run, write back.

The analysis functions work on one AnnData. Those wrapped here also take a
``spatialdata.SpatialData``: its table becomes an AnnData in tissuegraph's layout
(:func:`tissuegraph.io.read_spatialdata`), the function runs on it, and what it wrote
(``obs`` columns, ``obsm`` / ``obsp`` / ``layers`` / ``uns`` entries) is copied back into
the SpatialData's table.
"""

from __future__ import annotations

import functools

from tissuegraph.io.sdata import is_spatialdata, read_spatialdata, table_key_of

__all__ = ["accepts_spatialdata"]

_NOTE = """
    A ``spatialdata.SpatialData`` (the ``tissuegraph[spatialdata]`` extra) is accepted in place
    of the AnnData: ``table_key`` / ``image_key`` choose its table and image (see
    :func:`tissuegraph.io.read_spatialdata`){what}.
"""
_MAPPINGS = ("obsm", "obsp", "layers", "uns")


def _snapshot(adata) -> dict:
    snap = {m: dict(getattr(adata, m).items()) for m in _MAPPINGS}
    snap["obs"] = adata.obs.copy()
    return snap


def _write_back(adata, before: dict, table) -> None:
    """Copy into ``table`` what the function changed in ``adata`` (same rows, same order)."""
    for m in _MAPPINGS:
        src, dst, old = getattr(adata, m), getattr(table, m), before[m]
        for k, v in src.items():
            if m == "uns" and k == "spatial":  # holds the image that read_spatialdata attached
                continue
            if k not in old or old[k] is not v:
                dst[k] = v
        for k in old:
            if k not in src and k in dst:
                del dst[k]
    obs_old = before["obs"]
    for c in adata.obs.columns:
        if c not in obs_old or not adata.obs[c].equals(obs_old[c]):
            table.obs[c] = adata.obs[c].values
    for c in obs_old.columns:
        if c not in adata.obs and c in table.obs:
            del table.obs[c]


def accepts_spatialdata(func=None, *, returns_new: bool = False):
    """Let ``func(adata, ...)`` take a SpatialData as its first argument.

    ``returns_new``: the function returns a new AnnData and writes nothing into its input
    (``predict_expression``); its result is returned as it is. Otherwise the results are
    written into the SpatialData's table, and with ``copy=True`` into a deep copy of the
    SpatialData, which is returned.
    """
    if func is None:
        return functools.partial(accepts_spatialdata, returns_new=returns_new)
    name = func.__name__

    @functools.wraps(func)
    def wrapper(data, *args, table_key: str | None = None, image_key: str | None = None, **kw):
        if not is_spatialdata(data):
            if table_key is not None or image_key is not None:
                from tissuegraph.errors import InputError

                raise InputError(f"{name}: table_key / image_key apply to a SpatialData only")
            return func(data, *args, **kw)
        key = table_key_of(data, table_key, name)
        adata = read_spatialdata(data, table_key=key, image_key=image_key)
        if returns_new:
            return func(adata, *args, **kw)
        copy = bool(kw.pop("copy", False))
        before = _snapshot(adata)
        func(adata, *args, **kw)
        if copy:
            import spatialdata

            data = spatialdata.deepcopy(data)
        _write_back(adata, before, data.tables[key])
        return data if copy else None

    what = (
        "; the result is computed from its table"
        if returns_new
        else "; the keys listed under Returns are written into its table (with ``copy``, into "
        "a copy of the SpatialData, which is returned)"
    )
    wrapper.__doc__ = (func.__doc__ or "").rstrip() + "\n" + _NOTE.format(what=what)
    return wrapper
