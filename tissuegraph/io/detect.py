"""Format detection (``read_any``) and dispatch on a ``SlideSpec`` (``read_slide``)."""

from __future__ import annotations

import os
from pathlib import Path

from tissuegraph.errors import ConfigError, InputError
from tissuegraph.io._common import as_path

__all__ = ["detect_format", "read_any", "read_slide", "find_st_files"]

FORMATS = ("visium", "st", "h5ad", "synthetic")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".tif", ".tiff", ".btf", ".png", ".svs")


def find_st_files(folder: str | os.PathLike) -> tuple[Path, Path, Path | None] | None:
    """``(counts, spots, image)`` of a legacy ST folder, or ``None`` when it is not one."""
    folder = Path(folder)
    counts = [
        p
        for p in sorted(folder.iterdir())
        if p.is_file()
        and "count" in p.name.lower()
        and p.name.lower().endswith((".tsv", ".tsv.gz", ".csv", ".csv.gz"))
    ]
    spots = [
        p
        for p in sorted(folder.iterdir())
        if p.is_file()
        and "spot" in p.name.lower()
        and p.name.lower().endswith((".tsv", ".csv", ".tsv.gz"))
    ]
    if not counts or not spots:
        return None
    images = [p for p in sorted(folder.iterdir()) if p.suffix.lower() in _IMAGE_SUFFIXES]
    pref = [p for p in images if p.stem.lower() in ("he", "image", "hne", "h&e")]
    image = (pref or images or [None])[0]
    return counts[0], spots[0], image


def detect_format(path: str | os.PathLike) -> str:
    """``"h5ad"``, ``"visium"`` or ``"st"`` for a file / folder, else :class:`InputError`."""
    path = as_path(path, "input")
    if path.is_file():
        if path.suffix == ".h5ad":
            return "h5ad"
        raise InputError(
            f"{path}: unknown input file; pass an .h5ad file, a Space Ranger folder or a "
            "legacy ST folder (counts.tsv[.gz] + spots.tsv + image)"
        )
    names = {p.name for p in path.iterdir()}
    if (
        names & {"filtered_feature_bc_matrix.h5", "filtered_feature_bc_matrix", "binned_outputs"}
        or "spatial" in names
        or (path / "outs").is_dir()
    ):
        return "visium"
    if find_st_files(path) is not None:
        return "st"
    raise InputError(
        f"{path}: not a Space Ranger folder (filtered_feature_bc_matrix.h5 + spatial/) nor a "
        "legacy ST folder (counts.tsv[.gz] + spots.tsv + image)"
    )


def read_any(path: str | os.PathLike, *, expression: str | None = None, **kwargs):
    """Read an ``.h5ad``, a Space Ranger output folder or a legacy ST folder (detected).

    ``expression`` (``"raw"``, ``"normalized"`` or ``None``: as the file records) says what an
    ``.h5ad``'s ``X`` holds (see :func:`~tissuegraph.io.read_h5ad`); Space Ranger and ST
    files always hold raw counts.
    Other keyword arguments go to :func:`~tissuegraph.io.read_visium` or
    :func:`~tissuegraph.io.read_st`.
    """
    from tissuegraph.io.h5ad import read_h5ad
    from tissuegraph.io.st import read_st
    from tissuegraph.io.visium import read_visium

    fmt = detect_format(path)
    if fmt == "h5ad":
        return read_h5ad(path, expression=expression)
    if expression not in (None, "raw"):
        raise ConfigError(
            f"expression={expression!r} applies to .h5ad input only; {path} is a {fmt} "
            "folder of raw counts"
        )
    if fmt == "visium":
        return read_visium(path, **kwargs)
    counts, spots, image = find_st_files(path)
    return read_st(counts, spots, image, **kwargs)


def read_slide(spec):
    """Read one slide of a ``BuildConfig`` (a :class:`tissuegraph.graph.config.SlideSpec`).

    ``spec.format``: ``visium`` (``path``, ``image_path``), ``st`` (``counts``, ``spots``,
    ``image``, or ``path`` of an ST folder), ``h5ad`` (``path``). ``synthetic`` slides are
    simulated by :func:`tissuegraph.datasets.read_slide`, which reads every other format here.
    """
    from tissuegraph.io._common import EXPRESSION, check_values

    fmt = str(getattr(spec, "format", "") or "").lower()
    name = getattr(spec, "name", "?")
    lib = getattr(spec, "library_id", None) or (name if name not in (None, "???") else None)
    if fmt not in FORMATS:
        raise ConfigError(
            f"slides[{name}].format = {spec.format!r}: expected one of {', '.join(FORMATS)}"
        )
    expression = str(getattr(spec, "expression", None) or "raw")
    if expression not in EXPRESSION:
        raise ConfigError(
            f"slides[{name}].expression = {expression!r}: expected one of {', '.join(EXPRESSION)}"
        )
    if expression != "raw" and fmt != "h5ad":
        raise ConfigError(
            f"slides[{name}].expression = {expression!r} applies to format h5ad only; {fmt} "
            "files hold raw counts"
        )

    def need(field: str):
        v = getattr(spec, field, None)
        if not v:
            raise ConfigError(f"slides[{name}].{field} is required for format {fmt!r}")
        return v

    if fmt == "visium":
        from tissuegraph.io.visium import read_visium

        return read_visium(need("path"), image_path=spec.image_path, library_id=lib)
    if fmt == "st":
        from tissuegraph.io.st import read_st

        counts, spots, image = spec.counts, spec.spots, spec.image or spec.image_path
        if not (counts and spots) and spec.path:
            found = find_st_files(as_path(spec.path, f"slides[{name}].path"))
            if found is None:
                raise InputError(
                    f"slides[{name}].path = {spec.path}: no counts*.tsv[.gz] + spots*.tsv there; "
                    "set counts, spots and image"
                )
            counts, spots, image = found[0], found[1], image or found[2]
        if not counts:
            need("counts")
        if not spots:
            need("spots")
        return read_st(counts, spots, image, library_id=lib)
    if fmt == "h5ad":
        from tissuegraph.io.h5ad import read_h5ad

        # the config decides what X holds, never the file; a graph needs values >= 0
        # (log-normalised, not scaled)
        adata = read_h5ad(need("path"), expression=expression)
        if expression == "normalized":
            check_values(
                adata.X,
                source=spec.path,
                obs_names=adata.obs_names,
                var_names=adata.var_names,
                expression="normalized",
                allow_negative=False,
                what="expression in X",
            )
        return adata
    # synthetic: simulated, not read (io never imports datasets)
    raise ConfigError(
        f"slides[{name}].format = 'synthetic' is simulated, not read: use "
        "tissuegraph.datasets.read_slide (build-graphs does)"
    )
