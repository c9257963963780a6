"""Run one published spatial-domain method ("peer") on one Visium section; write its embedding.

This script runs under the *peer* environment's Python (see ``benchmarks/peers/README.md``),
never under tissuegraph's: it imports the peer packages and scanpy, not tissuegraph.
``benchmarks/domains_dlpfc.py --peer-python PATH`` calls it once per (peer, section, seed) and
clusters the embedding with the same Gaussian mixture as every other method of its table.

Usage::

    python run_peer.py --list
    python run_peer.py --peer STAGATE --section-dir DIR --genes panel.txt --seed 0 \
        --out out.npz [--threads 1] [--set key=value ...] [--max-spots N]

Each peer follows its own DLPFC recipe with its documented defaults; the gene selection is the
benchmark's panel (``--genes``, one gene per line) in place of each tool's own HVG step, so
that every method of the table sees the same genes:

``STAGATE``     (``stagate-modern``, import ``STAGATE_pyG``) normalize_total 1e4 + log1p,
                ``Cal_Spatial_Net(rad_cutoff=150)``, ``train_STAGATE`` defaults (1000 epochs,
                hidden [512, 30]); embedding ``obsm["STAGATE"]`` (30-d).
``GraphST``     (``graphst-modern``) normalize_total 1e4 + log1p + scale(zero_center=False,
                max_value=10) as ``GraphST.preprocess``, ``GraphST(...).train()`` defaults
                (600 epochs, seed 41); embedding: the 20 principal components of
                ``obsm["emb"]`` that ``GraphST.clustering`` clusters.
``BANKSY``      (``pybanksy``) the DLPFC notebook: normalize_total, k_geom 18, scaled
                gaussian decay, AGF max_m 1, lambda 0.2, 20 PCs of the BANKSY matrix.
``CellCharter`` (``cellcharter``) scVI latent space (n_latent 5, early stopping; the
                CellCharter DLPFC benchmark setting), Delaunay graph + ``remove_long_links``,
                ``aggregate_neighbors(n_layers=4)``. Without scvi-tools: 30 PCs of the
                log-normalised panel and ``n_layers=3`` (recorded as ``variant``).
``novae``       (``novae``) trained from scratch on the section (``Novae(adata).fit()``,
                defaults; the pretrained weights are on a model hub this script never calls);
                embedding ``obsm["novae_latent"]``.

``--seed`` is added to each tool's default seed (STAGATE 0, GraphST 41, ...), so seed 0 is
the tool's documented run. ``--set key=value`` overrides one recipe parameter (e.g.
``--set lambda=0.8`` for BANKSY, ``--set n_epochs=200`` for STAGATE).

The output ``.npz`` holds ``rep`` (float32 ``[n_spots, d]``), ``obs_names`` (the spot
barcodes, in the order of the section's matrix), ``seconds`` (the peer's own pipeline:
preprocessing, graph, training, embedding; not the reading of the files), ``peer``,
``version`` (of the peer's package), ``params`` (JSON of the recipe actually run),
``n_genes`` (panel genes found in the section), ``threads`` and ``peak_rss_mb`` (of the
whole peer process).
"""

from __future__ import annotations

import argparse
import os
import sys

# Threads must be fixed before numpy / torch are imported.
if __name__ == "__main__":
    _n = "1"
    for _i, _a in enumerate(sys.argv):
        if _a == "--threads" and _i + 1 < len(sys.argv):
            _n = sys.argv[_i + 1]
        elif _a.startswith("--threads="):
            _n = _a.split("=", 1)[1]
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[_var] = _n
    os.environ.setdefault("MPLBACKEND", "Agg")
    # the peers must never reach a model hub: fail at once instead of hanging on the network
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from importlib import metadata  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

#: peer name -> (distribution on the package registry, import name)
PEERS = {
    "STAGATE": ("stagate-modern", "STAGATE_pyG"),
    "GraphST": ("graphst-modern", "GraphST"),
    "BANKSY": ("pybanksy", "banksy"),
    "CellCharter": ("cellcharter", "cellcharter"),
    "novae": ("novae", "novae"),
}


# ----------------------------------------------------------------------------- input
def read_section(section_dir: str | os.PathLike):
    """Raw counts of a Space Ranger folder as AnnData: the spots of the filtered matrix that
    have a position (matrix order), gene symbols as ``var_names`` (made unique),
    ``obsm["spatial"]`` = full-resolution pixels (x = column, y = row)."""
    import pandas as pd
    import scanpy as sc

    root = Path(section_dir)
    h5 = root / "filtered_feature_bc_matrix.h5"
    if not h5.exists():
        raise FileNotFoundError(f"{h5} not found (a Space Ranger folder with the HDF5 matrix)")
    with contextlib.redirect_stdout(io.StringIO()):
        adata = sc.read_10x_h5(h5)
    adata.var_names_make_unique()
    spatial = root / "spatial"
    v2 = spatial / "tissue_positions.csv"
    v1 = spatial / "tissue_positions_list.csv"
    cols = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row", "pxl_col"]
    if v2.exists():
        pos = pd.read_csv(v2, header=0)
        pos.columns = cols
    elif v1.exists():
        pos = pd.read_csv(v1, header=None, names=cols)
    else:
        raise FileNotFoundError(f"{spatial}: no tissue_positions(.csv|_list.csv)")
    pos = pos.set_index(pos["barcode"].astype(str))
    keep = adata.obs_names.isin(pos.index)
    adata = adata[keep].copy()
    pos = pos.loc[adata.obs_names]
    adata.obs["array_row"] = pos["array_row"].to_numpy()
    adata.obs["array_col"] = pos["array_col"].to_numpy()
    adata.obsm["spatial"] = pos[["pxl_col", "pxl_row"]].to_numpy(dtype=np.float64)
    if adata.n_obs > 1:  # the Visium lattice pitch (nearest spot centres) is 100 µm
        from scipy.spatial import cKDTree

        d, _ = cKDTree(adata.obsm["spatial"]).query(adata.obsm["spatial"], k=2)
        pitch = float(np.median(d[:, 1]))
        if pitch > 0:
            adata.uns["microns_per_pixel"] = 100.0 / pitch
    return adata


def read_genes(path: str | os.PathLike | None) -> list[str] | None:
    if not path:
        return None
    genes = [g.strip() for g in Path(path).read_text().splitlines() if g.strip()]
    return genes or None


def mark_panel(adata, genes: list[str] | None) -> int:
    """``var["highly_variable"]`` = the benchmark's panel (or seurat_v3 3000 HVGs without one,
    the default of STAGATE and GraphST); returns the number of genes marked."""
    import scanpy as sc

    if genes is None:
        sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=3000)
    else:
        adata.var["highly_variable"] = adata.var_names.isin(genes)
    n = int(adata.var["highly_variable"].sum())
    if n == 0:
        raise ValueError("none of the panel genes is in the section")
    return n


def subset_spots(adata, n: int):
    """The ``n`` spots nearest the centre of the section (a contiguous patch, for smoke runs)."""
    if not n or n >= adata.n_obs:
        return adata
    xy = adata.obsm["spatial"]
    d = ((xy - np.median(xy, axis=0)) ** 2).sum(1)
    keep = np.sort(np.argsort(d, kind="stable")[:n])
    return adata[keep].copy()


def parse_sets(items: list[str]) -> dict:
    """``["k=v", ...]`` -> dict, values read as JSON where they parse (numbers, lists)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except ValueError:
            out[k.strip()] = v
    return out


def version_of(peer: str) -> str | None:
    try:
        return metadata.version(PEERS[peer][0])
    except metadata.PackageNotFoundError:
        return None


def available() -> dict[str, str | None]:
    """Peer -> installed version (``None``: not installed or not importable)."""
    import importlib.util

    out = {}
    for peer, (_, module) in PEERS.items():
        ok = importlib.util.find_spec(module) is not None
        out[peer] = version_of(peer) if ok else None
    return out


def _quiet():
    """Silence the peers' progress prints (stdout) while keeping stderr for errors."""
    return contextlib.redirect_stdout(io.StringIO())


# ----------------------------------------------------------------------------- peers
def run_stagate(adata, genes, seed, opts):
    import scanpy as sc
    import STAGATE_pyG

    p = {"rad_cutoff": 150.0, "n_epochs": 1000, "hidden_dims": [512, 30], "lr": 0.001}
    p.update(opts)
    p["random_seed"] = int(p.get("random_seed", 0)) + seed
    n = mark_panel(adata, genes)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    with _quiet():
        STAGATE_pyG.Cal_Spatial_Net(adata, rad_cutoff=p["rad_cutoff"], verbose=False)
        STAGATE_pyG.train_STAGATE(
            adata,
            hidden_dims=list(p["hidden_dims"]),
            n_epochs=int(p["n_epochs"]),
            lr=float(p["lr"]),
            random_seed=p["random_seed"],
            verbose=False,
            device="cpu",
        )
    return np.asarray(adata.obsm["STAGATE"]), p, n


def run_graphst(adata, genes, seed, opts):
    import scanpy as sc
    import torch
    from GraphST import GraphST
    from sklearn.decomposition import PCA

    p = {"epochs": 600, "random_seed": 41, "n_pcs": 20, "pca_random_state": 42}
    p.update(opts)
    p["random_seed"] = int(p["random_seed"]) + seed
    n = mark_panel(adata, genes)
    # GraphST.preprocess minus its HVG step (the panel is given)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.scale(adata, zero_center=False, max_value=10)
    with _quiet():
        model = GraphST.GraphST(
            adata,
            device=torch.device("cpu"),
            epochs=int(p["epochs"]),
            random_seed=p["random_seed"],
        )
        out = model.train()
    emb = np.asarray(out.obsm["emb"], dtype=np.float64)
    # GraphST.clustering: PCA(20, random_state=42) of the reconstruction, then mclust
    rep = PCA(n_components=int(p["n_pcs"]), random_state=int(p["pca_random_state"])).fit_transform(
        emb
    )
    return rep, p, n


def run_banksy(adata, genes, seed, opts):
    import scanpy as sc
    from banksy.embed_banksy import generate_banksy_matrix
    from banksy.initialize_banksy import initialize_banksy
    from banksy_utils.umap_pca import pca_umap

    p = {"k_geom": 18, "lambda": 0.2, "max_m": 1, "decay": "scaled_gaussian", "pca_dims": 20}
    p.update(opts)
    np.random.seed(seed)  # pca_umap's PCA takes no seed (randomized solver)
    if genes is None:
        sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=2000)
        genes = list(adata.var_names[adata.var["highly_variable"]])
    sc.pp.normalize_total(adata)  # the DLPFC notebook: no log transform
    adata = adata[:, adata.var_names.isin(genes)].copy()
    n = int(adata.n_vars)
    if n == 0:
        raise ValueError("none of the panel genes is in the section")
    adata.obsm["coord_xy"] = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    lam = float(p["lambda"])
    with _quiet():
        bd = initialize_banksy(
            adata,
            ("x", "y", "coord_xy"),
            int(p["k_geom"]),
            nbr_weight_decay=p["decay"],
            max_m=int(p["max_m"]),
            plt_edge_hist=False,
            plt_nbr_weights=False,
            plt_agf_angles=False,
            plt_theta=False,
        )
        bd, _ = generate_banksy_matrix(adata, bd, [lam], max_m=int(p["max_m"]), verbose=False)
        pca_umap(bd, pca_dims=[int(p["pca_dims"])], plt_remaining_var=False, add_umap=False)
    out = bd[p["decay"]][lam]["adata"]
    if list(out.obs_names) != list(adata.obs_names):
        raise RuntimeError("BANKSY changed the spot order")
    return np.asarray(out.obsm[f"reduced_pc_{int(p['pca_dims'])}"]), p, n


def run_cellcharter(adata, genes, seed, opts):
    import cellcharter as cc
    import scanpy as sc
    import squidpy as sq

    try:
        import scvi
    except ImportError:
        scvi = None
    variant = opts.pop("variant", "scvi" if scvi is not None else "pca")
    if variant == "scvi" and scvi is None:
        raise ImportError("variant=scvi needs scvi-tools in the peer environment")
    if variant == "scvi":
        p = {
            "variant": "scvi",
            "n_latent": 5,
            "n_layers": 4,
            "scvi_seed": 12345,
            "max_epochs": None,  # scvi-tools' default: min(400, 20000 / n_spots * 400)
        }
    else:
        p = {"variant": "pca", "n_pcs": 30, "n_layers": 3}
    p.update(opts)
    n = mark_panel(adata, genes)
    adata = adata[:, adata.var["highly_variable"].to_numpy()].copy()
    if variant == "scvi":
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        adata.layers["counts"] = adata.X.copy()
        scvi.settings.seed = int(p["scvi_seed"]) + seed
        scvi.settings.dl_num_workers = 0
        with _quiet():
            scvi.model.SCVI.setup_anndata(adata, layer="counts")
            model = scvi.model.SCVI(adata, n_latent=int(p["n_latent"]))
            model.train(
                max_epochs=p["max_epochs"],
                early_stopping=True,
                enable_progress_bar=False,
                accelerator="cpu",
            )
        adata.obsm["X_peer"] = model.get_latent_representation(adata).astype(np.float32)
        p["epochs_run"] = int(len(model.history.get("elbo_train", [])))
    else:
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
        sc.pp.pca(adata, n_comps=int(p["n_pcs"]), random_state=seed)
        adata.obsm["X_peer"] = adata.obsm["X_pca"]
    with _quiet():
        sq.gr.spatial_neighbors(adata, coord_type="generic", delaunay=True, spatial_key="spatial")
        cc.gr.remove_long_links(adata)
        cc.gr.aggregate_neighbors(
            adata, n_layers=int(p["n_layers"]), use_rep="X_peer", out_key="X_cellcharter"
        )
    return np.asarray(adata.obsm["X_cellcharter"]), p, n


def run_novae(adata, genes, seed, opts):
    import lightning as L
    import novae
    import scanpy as sc

    p = {"max_epochs": 20, "technology": "visium"}
    p.update(opts)
    L.seed_everything(seed, verbose=False)
    novae.settings.scale_to_microns = float(adata.uns.get("microns_per_pixel", 1.0))
    n = mark_panel(adata, genes)
    adata = adata[:, adata.var["highly_variable"].to_numpy()].copy()
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    with _quiet():
        novae.spatial_neighbors(adata, technology=p["technology"], verbose=False)
        model = novae.Novae(adata)
        model.fit(adata, max_epochs=int(p["max_epochs"]), accelerator="cpu", num_workers=0)
        model.compute_representations(adata, accelerator="cpu", num_workers=0)
    return np.asarray(adata.obsm["novae_latent"]), p, n


#: modules imported before the clock starts (import time is not the peer's run time)
IMPORTS = {
    "STAGATE": ["scanpy", "STAGATE_pyG"],
    "GraphST": ["scanpy", "GraphST", "sklearn.decomposition"],
    "BANKSY": [
        "scanpy",
        "banksy.embed_banksy",
        "banksy.initialize_banksy",
        "banksy_utils.umap_pca",
    ],
    "CellCharter": ["scanpy", "squidpy", "cellcharter", "scvi"],
    "novae": ["scanpy", "lightning", "novae"],
}

RUNNERS = {
    "STAGATE": run_stagate,
    "GraphST": run_graphst,
    "BANKSY": run_banksy,
    "CellCharter": run_cellcharter,
    "novae": run_novae,
}


def run_peer(peer, section_dir, genes, seed, opts, max_spots=None, threads=1):
    """Read the section, run ``peer``; returns the fields of the output ``.npz``."""
    if peer not in RUNNERS:
        raise ValueError(f"unknown peer {peer!r}: one of {', '.join(RUNNERS)}")
    try:
        import torch

        torch.set_num_threads(int(threads))
    except ImportError:
        pass
    import importlib

    for module in IMPORTS[peer]:
        try:
            with _quiet():
                importlib.import_module(module)
        except ImportError:
            if module != "scvi":  # optional (CellCharter falls back to PCA)
                raise
    adata = subset_spots(read_section(section_dir), max_spots or 0)
    obs_names = np.asarray(adata.obs_names, dtype=str)
    t0 = time.perf_counter()
    rep, params, n_genes = RUNNERS[peer](adata, genes, int(seed), dict(opts))
    seconds = time.perf_counter() - t0
    rep = np.asarray(rep, dtype=np.float32)
    if rep.ndim != 2 or rep.shape[0] != len(obs_names):
        raise RuntimeError(f"{peer} returned an embedding of shape {rep.shape}")
    if not np.isfinite(rep).all():
        raise RuntimeError(f"{peer} returned non-finite values in its embedding")
    return {
        "rep": rep,
        "obs_names": obs_names,
        "seconds": np.float64(seconds),
        "peer": np.str_(peer),
        "version": np.str_(version_of(peer) or "unknown"),
        "params": np.str_(json.dumps(params, sort_keys=True)),
        "n_genes": np.int64(n_genes),
        "threads": np.int64(threads),
        "seed": np.int64(seed),
        "peak_rss_mb": np.float64(peak_rss_mb()),
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1024.0 * 1024.0) if sys.platform == "darwin" else kb / 1024.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--list", action="store_true", help="print the installed peers as JSON")
    ap.add_argument("--peer", choices=sorted(RUNNERS))
    ap.add_argument("--section-dir")
    ap.add_argument("--genes", default=None, help="gene panel, one symbol per line")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--max-spots", type=int, default=None, help="central patch (smoke runs)")
    a = ap.parse_args(argv)
    if a.list:
        print(json.dumps(available()))
        return 0
    if not (a.peer and a.section_dir and a.out):
        ap.error("--peer, --section-dir and --out are required (or --list)")
    fields = run_peer(
        a.peer,
        a.section_dir,
        read_genes(a.genes),
        a.seed,
        parse_sets(a.set),
        max_spots=a.max_spots,
        threads=a.threads,
    )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part.npz")
    np.savez(tmp, **fields)
    os.replace(tmp, out)
    print(
        f"{a.peer} {fields['version']}: {fields['rep'].shape[0]} spots x "
        f"{fields['rep'].shape[1]} dims, {float(fields['seconds']):.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
