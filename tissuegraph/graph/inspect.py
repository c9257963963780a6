"""``tissuegraph inspect``: a text summary of a graph file or a build-graphs folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from tissuegraph.errors import InputError
from tissuegraph.graph import schema as S
from tissuegraph.graph.storage import load_graph, read_manifest

__all__ = ["graph_summary", "inspect_graph", "inspect_path"]


def _degree_stats(edge_index: torch.Tensor, n_src: int) -> tuple[int, float, int]:
    if n_src == 0:
        return 0, 0.0, 0
    deg = torch.bincount(edge_index[0], minlength=n_src).numpy()
    return int(deg.min()), float(np.median(deg)), int(deg.max())


def graph_summary(data) -> dict:
    """Counts, per-edge-type out-degree (min / median / max over source nodes) and meta."""
    nodes = {}
    for nt in data.node_types:
        st = data[nt]
        attrs = {
            k: f"{tuple(v.shape)} {str(v.dtype).replace('torch.', '')}"
            for k, v in st.items()
            if isinstance(v, torch.Tensor)
        }
        nodes[nt] = {"count": int(st.num_nodes or 0), "attrs": attrs}
    edges = {}
    for et in data.edge_types:
        ei = data[et].edge_index
        n_src = nodes[et[0]]["count"]
        lo, med, hi = _degree_stats(ei, n_src)
        extra = {}
        if "edge_attr" in data[et]:
            ea = data[et].edge_attr.float()
            if ea.numel():
                extra["edge_attr"] = (float(ea.min()), float(ea.median()), float(ea.max()))
        if "loc" in data[et]:
            extra["loc_hist"] = torch.bincount(data[et].loc, minlength=S.N_LOC).tolist()
        edges[et] = {"count": int(ei.shape[1]), "degree": (lo, med, hi), **extra}
    return {"nodes": nodes, "edges": edges, "meta": dict(getattr(data, "meta", {}) or {})}


def _fmt_coverage(cov: dict) -> list[str]:
    lines = []
    for name, c in (cov or {}).items():
        extra = ""
        if "pathways_kept" in c:
            extra = f", pathways kept {c['pathways_kept']}/{c['pathways_in_table']}"
        if "tfs_kept" in c:
            extra = f", TFs {c['tfs_kept']}"
        lines.append(
            f"  {name:<16} edges {c.get('edges_kept', 0):>7} of {c.get('rows', 0)} rows; "
            f"panel genes covered {c.get('panel_genes_covered', 0)} "
            f"({100 * c.get('panel_fraction', 0):.1f}%){extra}"
        )
    return lines


def inspect_graph(data, title: str = "") -> str:
    """Text summary of one ``HeteroData`` graph."""
    s = graph_summary(data)
    meta = s["meta"]
    out = []
    head = title or meta.get("slide", "graph")
    out.append(
        f"graph {head}: schema v{meta.get('schema_version', '?')}, "
        f"platform {meta.get('platform', '?')}, {len(meta.get('genes', []))} genes, "
        f"{len(meta.get('pathways', []))} pathways, patches {meta.get('patch_sizes_um') or 'none'} µm"
    )
    out.append("nodes:")
    for nt, d in s["nodes"].items():
        attrs = ", ".join(f"{k} {v}" for k, v in d["attrs"].items())
        out.append(f"  {nt:<10} {d['count']:>9}   {attrs}")
    out.append("edges:                                  count   out-degree min/median/max")
    for et, d in s["edges"].items():
        name = f"({et[0]}, {et[1]}, {et[2]})"
        lo, med, hi = d["degree"]
        line = f"  {name:<36} {d['count']:>9}   {lo}/{med:g}/{hi}"
        if "edge_attr" in d:
            a = d["edge_attr"]
            line += f"   length µm {a[0]:.1f}/{a[1]:.1f}/{a[2]:.1f}"
        if "loc_hist" in d:
            line += f"   loc {d['loc_hist']}"
        out.append(line)
    if meta.get("missing_genes"):
        out.append(f"missing panel genes (zero columns): {len(meta['missing_genes'])}")
    cov = _fmt_coverage(meta.get("prior_coverage", {}))
    if cov:
        out.append("prior coverage:")
        out.extend(cov)
    return "\n".join(out)


def inspect_path(path: str | os.PathLike) -> str:
    """Summarise a ``<slide>.pt`` graph file or a build-graphs output folder.

    For a folder, the manifest lists the slides; every graph file is summarised.
    """
    p = Path(path)
    if p.is_file():
        return inspect_graph(load_graph(p), title=p.stem)
    if not p.is_dir():
        raise InputError(f"{p} is neither a graph file nor a folder")
    m = read_manifest(p)
    lines = [
        f"{p}: {len(m.get('slides', []))} slide(s), {len(m.get('genes', []))} genes, "
        f"{len(m.get('pathways', []))} pathways, config {m.get('config_hash')}, "
        f"tissuegraph {m.get('tissuegraph_version')}"
    ]
    if m.get("failed"):
        lines.append(f"failed slides: {', '.join(m['failed'])}")
    for e in m.get("slides", []):
        f = p / e["file"]
        lines.append("")
        if not f.is_file():
            lines.append(f"graph {e['name']}: file {f.name} is missing")
            continue
        lines.append(inspect_graph(load_graph(f), title=e["name"]))
    return "\n".join(lines)
