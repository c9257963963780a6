"""Prior-knowledge tables: TF -> target, pathway weights, GMT gene sets, ligand -> receptor.

Formats are detected from the header line:

- CollecTRI (``decoupler``/OmniPath export): ``source, target, weight`` (csv or tsv);
- DoRothEA: ``tf, confidence, target, mor`` (or ``source, confidence, target, weight``),
  filtered by confidence ``levels``;
- PROGENy long format: ``source, target, weight`` (pathway, gene, weight);
- GMT: ``name <tab> description <tab> gene <tab> gene ...`` per line;
- LIANA consensus: ``ligand, receptor``; complexes written ``A_B`` are split into subunits.

All symbols are kept as written; :func:`match_genes` maps them case-insensitively onto a
gene panel and :func:`prior_coverage` reports what each table contributes to a panel.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from tissuegraph._genes import match_positions, upper_set
from tissuegraph.errors import InputError, one_line
from tissuegraph.io._common import as_path

__all__ = [
    "read_tf_targets",
    "read_pathways",
    "read_gmt",
    "read_ligand_receptor",
    "match_genes",
    "filter_to_panel",
    "prior_coverage",
]

COLLECTRI = "source,target,weight"
DOROTHEA = "tf,confidence,target,mor"


def _open_text(path: Path):
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)


def _read_table(path: Path, expected: str) -> pd.DataFrame:
    """A delimited table with a header; separator sniffed from the first line."""
    try:
        with _open_text(path) as fh:
            first = fh.readline()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: unreadable ({exc}); expected columns {expected}") from None
    if not first.strip():
        raise InputError(f"{path}: empty file; expected columns {expected}")
    sep = "\t" if "\t" in first else ","
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise InputError(
            f"{path}: unreadable table ({one_line(exc, limit=None)}); expected columns {expected}"
        ) from None
    df.columns = [str(c).strip().strip('"').lower() for c in df.columns]
    return df


def _weights(col: pd.Series, path: Path, name: str) -> np.ndarray:
    w = pd.to_numeric(col, errors="coerce")
    if w.isna().any():
        raise InputError(f"{path}: non-numeric values in column {name!r}")
    return w.to_numpy(np.float32)


def _finish(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    df = df[(df["source"] != "") & (df["target"] != "")]
    df = df.drop_duplicates(["source", "target"], keep="first").reset_index(drop=True)
    if df.empty:
        raise InputError(f"{path}: no edges after filtering; check the file and its options")
    return df


def read_tf_targets(
    path: str | os.PathLike, format: str = "auto", *, levels: str = "ABC"
) -> pd.DataFrame:
    """Read a TF -> target regulon table.

    Parameters
    ----------
    path
        CollecTRI (``source,target,weight``) or DoRothEA (``tf,confidence,target,mor``) table,
        comma- or tab-separated, optionally gzipped.
    format
        ``"auto"`` (from the header), ``"collectri"`` or ``"dorothea"``.
    levels
        DoRothEA confidence levels to keep, e.g. ``"ABC"``.

    Returns
    -------
    DataFrame with ``source`` (TF), ``target`` (gene) and ``weight`` (float32 signed mode of
    regulation), one row per unique TF-target pair.
    """
    path = as_path(path, "TF-target table")
    fmt = str(format).lower()
    if fmt not in ("auto", "collectri", "dorothea"):
        raise InputError(
            f"tf_format = {format!r} for {path}: expected 'auto', 'collectri' or 'dorothea'"
        )
    expected = f"CollecTRI '{COLLECTRI}' or DoRothEA '{DOROTHEA}'"
    df = _read_table(path, expected)
    cols = set(df.columns)
    is_doro = "confidence" in cols and ({"tf", "source"} & cols) and "target" in cols
    is_coll = {"source", "target"} <= cols and "confidence" not in cols
    if fmt == "auto":
        fmt = "dorothea" if is_doro else "collectri" if is_coll else ""
    if fmt == "dorothea" and not is_doro:
        raise InputError(
            f"{path}: not a DoRothEA table (columns {list(df.columns)}); expected {DOROTHEA}"
        )
    if fmt == "collectri" and not {"source", "target"} <= cols:
        raise InputError(
            f"{path}: not a CollecTRI table (columns {list(df.columns)}); expected {COLLECTRI}"
        )
    if not fmt:
        raise InputError(
            f"{path}: unrecognised TF-target table (columns {list(df.columns)[:6]}); expected {expected}"
        )
    if fmt == "dorothea":
        src = "tf" if "tf" in cols else "source"
        wcol = "mor" if "mor" in cols else "weight" if "weight" in cols else None
        lv = {c for c in str(levels).upper() if c.isalpha()}
        if not lv:
            raise InputError(f"dorothea_levels = {levels!r}: give confidence letters, e.g. 'ABC'")
        df = df[df["confidence"].str.strip().str.upper().isin(lv)]
        out = pd.DataFrame(
            {
                "source": df[src].str.strip(),
                "target": df["target"].str.strip(),
                "weight": _weights(df[wcol], path, wcol) if wcol else np.ones(len(df), np.float32),
            }
        )
    else:
        out = pd.DataFrame(
            {
                "source": df["source"].str.strip(),
                "target": df["target"].str.strip(),
                "weight": _weights(df["weight"], path, "weight")
                if "weight" in cols
                else np.ones(len(df), np.float32),
            }
        )
    return _finish(out, path)


def read_pathways(path: str | os.PathLike) -> pd.DataFrame:
    """Read weighted pathway gene sets in long format (PROGENy: ``source,target,weight``;
    ``pathway,gene,weight`` is accepted too). A ``.gmt`` file is passed to :func:`read_gmt`.

    Returns
    -------
    DataFrame ``source`` (pathway), ``target`` (gene), ``weight`` (float32).
    """
    path = as_path(path, "pathway table")
    if path.name.lower().endswith((".gmt", ".gmt.gz")):
        return read_gmt(path)
    expected = "PROGENy 'source,target,weight' (or 'pathway,gene,weight')"
    df = _read_table(path, expected)
    cols = set(df.columns)
    if {"source", "target"} <= cols:
        s, t = "source", "target"
    elif {"pathway", "gene"} <= cols:
        s, t = "pathway", "gene"
    else:
        raise InputError(
            f"{path}: unrecognised pathway table (columns {list(df.columns)[:6]}); expected "
            f"{expected}, or a .gmt file"
        )
    w = _weights(df["weight"], path, "weight") if "weight" in cols else np.ones(len(df), np.float32)
    out = pd.DataFrame({"source": df[s].str.strip(), "target": df[t].str.strip(), "weight": w})
    return _finish(out, path)


def read_gmt(path: str | os.PathLike) -> pd.DataFrame:
    """Read a GMT gene-set file (``name <tab> description <tab> genes...`` per line).

    Returns
    -------
    DataFrame ``source`` (set name), ``target`` (gene), ``weight`` (1.0).
    """
    path = as_path(path, "GMT file")
    rows: list[tuple[str, str]] = []
    try:
        with _open_text(path) as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                parts = line.rstrip("\n\r").split("\t")
                if len(parts) < 3:
                    raise InputError(
                        f"{path}: line {i} has {len(parts)} tab-separated field(s); GMT lines are "
                        "'name<TAB>description<TAB>gene<TAB>gene...'"
                    )
                rows.extend((parts[0].strip(), g.strip()) for g in parts[2:] if g.strip())
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: unreadable GMT file ({exc})") from None
    if not rows:
        raise InputError(
            f"{path}: no gene sets; expected 'name<TAB>description<TAB>genes...' lines"
        )
    out = pd.DataFrame(rows, columns=["source", "target"])
    out["weight"] = np.float32(1.0)
    return _finish(out, path)


def read_ligand_receptor(path: str | os.PathLike, *, split_complexes: bool = True) -> pd.DataFrame:
    """Read ligand -> receptor pairs (LIANA consensus: ``ligand,receptor``; also
    ``source,target`` or ``ligand_complex,receptor_complex``).

    Complexes written ``A_B`` are split into subunits and every ligand subunit is paired with
    every receptor subunit (``split_complexes=False`` keeps them whole).

    Returns
    -------
    DataFrame ``ligand``, ``receptor`` (gene symbols) plus ``ligand_complex``,
    ``receptor_complex`` (the pair as written), one row per unique ligand-receptor pair.
    """
    path = as_path(path, "ligand-receptor table")
    expected = "LIANA 'ligand,receptor'"
    df = _read_table(path, expected)
    cols = set(df.columns)
    for a, b in (
        ("ligand", "receptor"),
        ("ligand_complex", "receptor_complex"),
        ("source", "target"),
        ("source_genesymbol", "target_genesymbol"),
    ):
        if {a, b} <= cols:
            break
    else:
        raise InputError(
            f"{path}: unrecognised ligand-receptor table (columns {list(df.columns)[:6]}); "
            f"expected {expected}"
        )
    rows = []
    for lc, rc in zip(df[a].str.strip(), df[b].str.strip()):
        if not lc or not rc:
            continue
        ls = [x for x in lc.split("_") if x] if split_complexes else [lc]
        rs = [x for x in rc.split("_") if x] if split_complexes else [rc]
        rows.extend((li, ri, lc, rc) for li in ls for ri in rs)
    out = pd.DataFrame(rows, columns=["ligand", "receptor", "ligand_complex", "receptor_complex"])
    out = out.drop_duplicates(["ligand", "receptor"]).reset_index(drop=True)
    if out.empty:
        raise InputError(f"{path}: no ligand-receptor pairs; expected {expected}")
    return out


# ----------------------------------------------------------------------------- matching
def match_genes(table_genes: Iterable[str], panel: Sequence[str]) -> np.ndarray:
    """Map symbols onto a gene panel, case-insensitively (an exact-case match wins).

    Parameters
    ----------
    table_genes
        Symbols of a prior table (e.g. ``df["target"]``).
    panel
        The panel's gene symbols (e.g. ``adata.var_names``).

    Returns
    -------
    int64 ``[len(table_genes)]``: index into ``panel``, ``-1`` where the symbol is absent.
    """
    if len(panel) == 0:
        raise InputError("empty gene panel: nothing to match prior-knowledge genes to")
    return np.asarray(match_positions(table_genes, panel), dtype=np.int64)


def filter_to_panel(
    df: pd.DataFrame, panel: Sequence[str], columns: Sequence[str] = ("source", "target")
) -> pd.DataFrame:
    """Rows of ``df`` whose ``columns`` all match ``panel`` (case-insensitive), with the
    symbols rewritten to the panel's spelling and ``<column>_index`` columns added."""
    panel = [str(g) for g in panel]
    keep = np.ones(len(df), dtype=bool)
    idx = {}
    for c in columns:
        idx[c] = match_genes(df[c], panel)
        keep &= idx[c] >= 0
    out = df.loc[keep].copy()
    for c in columns:
        ii = idx[c][keep]
        out[c] = [panel[i] for i in ii]
        out[f"{c}_index"] = ii
    return out.reset_index(drop=True)


def _as_table(obj, reader) -> pd.DataFrame | None:
    if obj is None:
        return None
    if isinstance(obj, pd.DataFrame):
        return obj
    return reader(obj)


def prior_coverage(
    panel: Sequence[str],
    *,
    tf_targets=None,
    pathways=None,
    gmt=None,
    ligand_receptor=None,
    min_pathway_genes: int = 3,
) -> dict[str, dict[str, float | int]]:
    """What each prior table contributes to a gene panel.

    Parameters
    ----------
    panel
        Panel gene symbols.
    tf_targets, pathways, gmt, ligand_receptor
        A path or a DataFrame from the matching reader (``None`` to leave out).
    min_pathway_genes
        Pathways / gene sets with fewer panel genes are not counted as kept.

    Returns
    -------
    ``{name: {"edges_total", "edges_kept", "genes_in_table", "panel_genes_covered",
    "panel_fraction", "sources_total", "sources_kept"}}`` for each table given. For
    ``tf_targets`` and ``ligand_receptor`` an edge is kept when both ends are in the panel;
    for ``pathways`` / ``gmt`` when the gene is in the panel and its set keeps at least
    ``min_pathway_genes`` panel genes.
    """
    panel = [str(g) for g in panel]
    if len(panel) == 0:
        raise InputError("empty gene panel: prior coverage needs at least one gene")
    report: dict[str, dict] = {}
    n = len(panel)
    specs = (
        ("tf_targets", _as_table(tf_targets, read_tf_targets), ("source", "target"), False),
        ("pathways", _as_table(pathways, read_pathways), ("target",), True),
        ("gmt", _as_table(gmt, read_gmt), ("target",), True),
        (
            "ligand_receptor",
            _as_table(ligand_receptor, read_ligand_receptor),
            ("ligand", "receptor"),
            False,
        ),
    )
    for name, df, gene_cols, is_sets in specs:
        if df is None:
            continue
        idx = {c: match_genes(df[c], panel) for c in gene_cols}
        keep = np.ones(len(df), dtype=bool)
        for c in gene_cols:
            keep &= idx[c] >= 0
        src_col = gene_cols[0] if not is_sets else "source"
        if is_sets:
            per_set = pd.Series(keep).groupby(df["source"].to_numpy()).sum()
            big = set(per_set.index[per_set >= min_pathway_genes])
            keep &= df["source"].isin(big).to_numpy()
        genes_in_table = set()
        covered = set()
        for c in gene_cols:
            genes_in_table |= upper_set(df[c])
            covered |= set(idx[c][keep].tolist())
        report[name] = {
            "edges_total": int(len(df)),
            "edges_kept": int(keep.sum()),
            "genes_in_table": len(genes_in_table),
            "panel_genes_covered": len(covered),
            "panel_fraction": round(len(covered) / n, 4),
            "sources_total": int(df[src_col].nunique()),
            "sources_kept": int(df.loc[keep, src_col].nunique()),
        }
    return report
