"""Prior-knowledge edges between panel genes and pathways.

Tables are read once per build (``tissuegraph.io`` readers) into plain arrays, then turned
into ``(gene, regulates, gene)`` (signed TF -> target), ``(gene, binds, gene)`` (ligand ->
receptor) and ``(gene, member_of, pathway)`` (weighted) edges over a given panel. Gene
symbols are matched case-insensitively. Self loops (auto-regulation, autocrine pairs) are
dropped; a pair listed twice keeps its first row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tissuegraph._genes import upper_index
from tissuegraph.errors import InputError

__all__ = ["PriorTables", "PriorEdges", "read_prior_tables", "prior_edges"]


@dataclass
class PriorTables:
    """Prior tables as arrays of upper-case symbols (``None`` = not configured)."""

    tf_targets: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    ligand_receptor: tuple[np.ndarray, np.ndarray] | None = None
    pathways: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    files: dict[str, str] = field(default_factory=dict)


@dataclass
class PriorEdges:
    """Edges of the priors over one panel (indices into the panel / the kept pathways)."""

    regulates: np.ndarray  # int64 [2, E]
    regulates_weight: np.ndarray  # float32 [E]
    binds: np.ndarray | None  # int64 [2, E] or None when no ligand-receptor table
    member_of: np.ndarray | None  # int64 [2, E] gene -> pathway, or None
    member_of_weight: np.ndarray | None
    pathways: list[str]
    coverage: dict
    has_tf: bool = False


def _upper(values) -> np.ndarray:
    return np.asarray([str(v).strip().upper() for v in values], dtype=object)


def _check_file(path, field_name: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"priors.{field_name}: file not found: {p}")
    return p


def read_prior_tables(priors_cfg) -> PriorTables:
    """Read the configured prior files (``PriorConfig``) into :class:`PriorTables`."""
    from tissuegraph import io

    t = PriorTables()
    if priors_cfg.tf_targets:
        p = _check_file(priors_cfg.tf_targets, "tf_targets")
        kwargs = {"format": priors_cfg.tf_format}
        if str(priors_cfg.tf_format) in ("dorothea", "auto"):
            kwargs["levels"] = priors_cfg.dorothea_levels
        try:
            df = io.read_tf_targets(p, **kwargs)
        except TypeError:  # reader without a ``levels`` argument
            df = io.read_tf_targets(p, format=priors_cfg.tf_format)
        t.tf_targets = (
            _upper(df["source"]),
            _upper(df["target"]),
            np.asarray(df["weight"], dtype=np.float32),
        )
        t.files["tf_targets"] = str(p)
    if priors_cfg.ligand_receptor:
        p = _check_file(priors_cfg.ligand_receptor, "ligand_receptor")
        df = io.read_ligand_receptor(p)
        t.ligand_receptor = (_upper(df["ligand"]), _upper(df["receptor"]))
        t.files["ligand_receptor"] = str(p)
    srcs, tgts, ws = [], [], []
    for key, reader in (("pathways", io.read_pathways), ("gmt", io.read_gmt)):
        if not getattr(priors_cfg, key):
            continue
        p = _check_file(getattr(priors_cfg, key), key)
        df = reader(p)
        srcs.append(np.asarray([str(s) for s in df["source"]], dtype=object))
        tgts.append(_upper(df["target"]))
        ws.append(np.asarray(df["weight"], dtype=np.float32))
        t.files[key] = str(p)
    if srcs:
        t.pathways = (np.concatenate(srcs), np.concatenate(tgts), np.concatenate(ws))
    return t


def _lookup(symbols: np.ndarray, index: dict[str, int]) -> np.ndarray:
    return np.fromiter((index.get(s, -1) for s in symbols), dtype=np.int64, count=len(symbols))


def _dedup_pairs(a: np.ndarray, b: np.ndarray, n_b: int) -> np.ndarray:
    """Indices of the first occurrence of every (a, b) pair, in table order."""
    key = a * max(n_b, 1) + b
    _, first = np.unique(key, return_index=True)
    return np.sort(first)


def _coverage(table_genes: np.ndarray, matched: np.ndarray, n_rows: int, n_kept: int, g: int):
    genes_in_table = set(table_genes.tolist())
    covered = int(len(set(matched.tolist())))
    return {
        "rows": int(n_rows),
        "edges_kept": int(n_kept),
        "genes_in_table": len(genes_in_table),
        "panel_genes_covered": covered,
        "panel_fraction": round(covered / g, 4) if g else 0.0,
    }


def prior_edges(genes: list[str], tables: PriorTables, *, min_pathway_genes: int = 3) -> PriorEdges:
    """Prior edges over the panel ``genes`` (case-insensitive matching).

    Returns
    -------
    :class:`PriorEdges`; ``coverage[name]`` has ``rows``, ``edges_kept``,
    ``genes_in_table``, ``panel_genes_covered``, ``panel_fraction`` (and for pathways
    ``pathways_in_table``, ``pathways_kept``).
    """
    g = len(genes)
    index = upper_index(genes)
    cov: dict = {}
    empty2 = np.zeros((2, 0), dtype=np.int64)

    regulates, reg_w = empty2, np.zeros(0, np.float32)
    if tables.tf_targets is not None:
        src_s, tgt_s, w = tables.tf_targets
        s, t = _lookup(src_s, index), _lookup(tgt_s, index)
        ok = np.nonzero((s >= 0) & (t >= 0) & (s != t))[0]
        ok = ok[_dedup_pairs(s[ok], t[ok], g)]
        regulates = np.stack([s[ok], t[ok]]).astype(np.int64)
        reg_w = np.sign(w[ok]).astype(np.float32)
        reg_w[reg_w == 0] = 1.0
        hit = np.concatenate([s[s >= 0], t[t >= 0]])
        cov["tf_targets"] = _coverage(
            np.concatenate([src_s, tgt_s]), hit, len(src_s), regulates.shape[1], g
        )
        cov["tf_targets"]["tfs_kept"] = int(len(np.unique(regulates[0])))
        cov["tf_targets"]["file"] = tables.files.get("tf_targets")

    binds = None
    if tables.ligand_receptor is not None:
        lig_s, rec_s = tables.ligand_receptor
        a, b = _lookup(lig_s, index), _lookup(rec_s, index)
        ok = np.nonzero((a >= 0) & (b >= 0) & (a != b))[0]
        ok = ok[_dedup_pairs(a[ok], b[ok], g)]
        binds = np.stack([a[ok], b[ok]]).astype(np.int64)
        hit = np.concatenate([a[a >= 0], b[b >= 0]])
        cov["ligand_receptor"] = _coverage(
            np.concatenate([lig_s, rec_s]), hit, len(lig_s), binds.shape[1], g
        )
        cov["ligand_receptor"]["file"] = tables.files.get("ligand_receptor")

    member_of, mem_w, pathways = None, None, []
    if tables.pathways is not None:
        pw_s, gene_s, w = tables.pathways
        gi = _lookup(gene_s, index)
        names, pw_idx = np.unique(pw_s.astype(str), return_inverse=True)
        ok = np.nonzero(gi >= 0)[0]
        ok = ok[_dedup_pairs(pw_idx[ok], gi[ok], g)]
        n_per = np.bincount(pw_idx[ok], minlength=len(names))
        keep_pw = n_per >= int(min_pathway_genes)
        new_id = np.full(len(names), -1, dtype=np.int64)
        new_id[keep_pw] = np.arange(int(keep_pw.sum()))
        sel = ok[keep_pw[pw_idx[ok]]]
        member_of = np.stack([gi[sel], new_id[pw_idx[sel]]]).astype(np.int64)
        order = np.lexsort((member_of[0], member_of[1]))
        member_of = member_of[:, order]
        mem_w = w[sel][order].astype(np.float32)
        pathways = [str(n) for n in names[keep_pw]]
        cov["pathways"] = _coverage(gene_s, gi[gi >= 0], len(gene_s), member_of.shape[1], g)
        cov["pathways"]["pathways_in_table"] = int(len(names))
        cov["pathways"]["pathways_kept"] = len(pathways)
        cov["pathways"]["min_pathway_genes"] = int(min_pathway_genes)
        cov["pathways"]["file"] = ",".join(
            f for k in ("pathways", "gmt") if (f := tables.files.get(k))
        )

    return PriorEdges(
        regulates=regulates,
        regulates_weight=reg_w,
        binds=binds,
        member_of=member_of,
        member_of_weight=mem_w,
        pathways=pathways,
        coverage=cov,
        has_tf=tables.tf_targets is not None,
    )
