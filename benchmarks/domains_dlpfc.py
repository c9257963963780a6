"""Spatial domains on DLPFC: adjusted Rand index (ARI) against the manual cortical layers.

Every DLPFC section found under ``$TISSUEGRAPH_DATA/dlpfc/`` (the 12 spatialLIBD sample names,
or any folder with a ``layers.tsv``; 10x Visium), K = 7 domains (L1-L6, WM; K = the number of
labels of a section when it has fewer), ARI on the spots that carry a layer label, mean ± sd
over seeds.

The tissuegraph arm is the shipped recipe: ``configs/build/dlpfc.yaml`` and
``configs/pretrain/dlpfc.yaml`` (``--build-config`` / ``--pretrain-config`` to try others).

Protocols
---------
``per_section``
    Every method is fitted on the section it is scored on (tissuegraph pretrains on the
    section itself, as STAGATE / GraphST do), then embeds and clusters it.
``transfer``
    Fitted on one section, applied to the other: tissuegraph pretrains on the training
    section only (the held-out section never enters pretraining, checked on the graph
    manifest and on the checkpoint), then embeds and clusters the held-out section; the
    baselines' gene panel, scaling and PCA are fitted on the training section only. The gene
    panel is chosen on the training section alone (``panel.fit_slides``).

Methods (all clustered by the same ``tissuegraph.tl.niches(method="gmm",
covariance_type="tied")``, i.e. a Gaussian mixture with one shared covariance, R mclust's
EEE, with ``n_init`` k-means starts)
---------------------------------------------------------------------------------------------
``tissuegraph``   build_graphs -> pretrain -> tl.embed -> tl.niches (shipped configs)
``tissuegraph_agg`` the same embedding, concatenated with its means over the 1-, 2- and 3-hop
                  rings (``tl.aggregate_neighbors(use_rep="X_tissuegraph")``) -> tl.niches
``tissuegraph_consensus`` the vote of ``--consensus-models`` (default 5) pretrained models:
                  for seed ``s`` the models of seeds ``s .. s+4`` each embed the section and
                  ``tl.niches(use_rep=[...])`` clusters each embedding (GMM seed = model seed)
                  and takes the majority vote after matching labels. Five seeds need models
                  0-8 (windows overlap, so its seed sd understates the spread of independent
                  groups); pretraining time is the sum over the five models
``pca``           log1p-CP10k of the HVG panel, scaled, PCA
``aggregation``   the PCA above, concatenated with its means over the spots exactly 1, 2 and
                  3 hops away on the spot grid (CellCharter-style, ``tl.aggregate_neighbors``)

Optional peers (published methods; never dependencies of tissuegraph)
---------------------------------------------------------------------
``STAGATE``, ``GraphST``, ``BANKSY``, ``CellCharter`` and ``novae`` run in a separate Python
environment (``benchmarks/peers/README.md`` says how to make it) named by ``--peer-python`` or
``$TISSUEGRAPH_PEER_PYTHON``; without one they are skipped with a note. For every section and
seed of the ``per_section`` protocol, ``benchmarks/peers/run_peer.py`` runs the peer's own
DLPFC recipe with its default hyper-parameters on the benchmark's gene panel in a subprocess
and writes its embedding; the benchmark aligns it to the section's spots by barcode and
clusters it exactly like the methods above (same GMM, same ``scale`` settings), so the peers
are rows of the same table. They are per-section methods: under ``transfer`` they are marked
"not applicable". A peer that fails is recorded with ``status: failed`` and a one-line reason
and the benchmark goes on. Embeddings are kept in ``--peer-cache`` (default: the work dir) and
reused when the peer's version, the panel and ``run_peer.py`` are unchanged. ``--peers``
chooses peers, ``--peer-seeds N`` runs them with fewer seeds (on one CPU thread a section
takes STAGATE about 18 min and GraphST about 22), ``--peers-only`` skips tissuegraph and the
baselines.

The DLPFC folders hold only the 600 x 600 px lowres H&E (a 55 µm spot is about 4 px wide), so
by default the graphs are built without image patches (expression, spot graph, gene nodes);
``--patches`` adds the (upsampled) lowres patches and the image objectives.

Run ``uv run python benchmarks/domains_dlpfc.py [--quick] [--peer-python PATH]``; results go
to ``benchmarks/results/domains_dlpfc.json`` (``domains_dlpfc_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    Target,
    build_graph_dir,
    check_training_slides,
    ensure_data_env,
    finish,
    fmt_mean_sd,
    mean_sd,
    measure,
    pretrain_checkpoint,
    results_path,
    set_threads,
)

ROOT = Path(__file__).resolve().parent.parent
BUILD_CONFIG = ROOT / "configs" / "build" / "dlpfc.yaml"
PRETRAIN_CONFIG = ROOT / "configs" / "pretrain" / "dlpfc.yaml"
NAME = "domains_dlpfc"
TITLE = "Spatial domains on DLPFC (ARI vs manual layers, K = 7)"
METHODS = ("tissuegraph", "tissuegraph_agg", "tissuegraph_consensus", "pca", "aggregation")
TG_METHODS = ("tissuegraph", "tissuegraph_agg", "tissuegraph_consensus")
CONSENSUS_MODELS = 5
PROTOCOLS = ("per_section", "transfer")
#: published methods run by ``benchmarks/peers/run_peer.py`` in a separate environment
PEERS = ("STAGATE", "GraphST", "BANKSY", "CellCharter", "novae")
PEER_SCRIPT = Path(__file__).resolve().parent / "peers" / "run_peer.py"
PEER_PYTHON_ENV = "TISSUEGRAPH_PEER_PYTHON"
PEER_TIMEOUT_S = 3 * 3600
TRUTH = "truth"

FULL_SEEDS = 5
TARGET_PER_SECTION = 0.60  # and above the aggregation baseline of the same run; goal 0.65
TARGET_TRANSFER = 0.55
REFERENCE = (
    "published context: GraphST 0.638 / 0.610 and STAGATE about 0.50 (mean over DLPFC sections) "
    "in an independent 20-run benchmark; STAGATE takes about 11 min of CPU per section here"
)


@dataclass
class Section:
    """One section to score: the AnnData (``obs['truth']``: labels, NaN = unlabelled) and the
    ``SlideSpec`` that ``build_graphs`` reads it from."""

    name: str
    adata: object
    spec: object


@dataclass
class Settings:
    """Everything that changes the numbers (stored in the results JSON)."""

    k: int = 7
    seeds: list[int] = field(default_factory=lambda: list(range(FULL_SEEDS)))
    steps: int | None = None
    n_top: int | None = None
    build_config: str = str(BUILD_CONFIG)
    pretrain_config: str = str(PRETRAIN_CONFIG)
    n_pcs: int = 30
    n_hops: int = 3
    n_init: int = 10
    restarts: int = 5
    #: models voting in the ``tissuegraph_consensus`` arm (seed s: models s .. s+n-1)
    consensus_models: int = CONSENSUS_MODELS
    #: ``tl.niches(scale=...)`` settings to cluster every representation with; the first is the
    #: headline protocol (what tl.niches does by default with the recipe's embedding; every
    #: method is clustered the same way), the others are reported beside it
    scales: list[bool] = field(default_factory=lambda: [False, True])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    protocols: list[str] = field(default_factory=lambda: list(PROTOCOLS))
    kind: str = "fused"
    patches: bool | None = None
    device: str = "cpu"
    pretrain_overrides: list[str] = field(default_factory=list)
    build_overrides: list[str] = field(default_factory=list)
    trace_python: bool = False
    #: peers to run (per-section protocol only) and with which seeds (``None``: ``seeds``)
    peers: list[str] = field(default_factory=list)
    peer_seeds: list[int] | None = None
    peer_python: str | None = None
    peer_threads: int = 1
    peer_timeout: float = PEER_TIMEOUT_S
    #: ``None``: a ``peer_cache`` folder in the work directory
    peer_cache: str | None = None
    #: peer -> installed version (``run_peer.py --list``), filled by :func:`probe_peers`
    peer_versions: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- data
def load_dlpfc(sample: str) -> Section:
    """A DLPFC section with its layer labels in ``obs['truth']``."""
    from tissuegraph import datasets
    from tissuegraph.graph.config import SlideSpec

    root = ensure_data_env()
    adata = datasets.dlpfc(sample)
    labels = datasets.dlpfc_labels(sample)
    adata.obs[TRUTH] = labels.astype(object).reindex(adata.obs_names).to_numpy()
    spec = SlideSpec(
        name=str(sample),
        format="visium",
        path=str(root / "dlpfc" / str(sample)),
        library_id=str(sample),
    )
    return Section(str(sample), adata, spec)


# ----------------------------------------------------------------------------- baselines
def choose_panel(train: dict[str, object], n_top: int) -> list[str]:
    """HVG panel fitted on the training sections only (``panel.fit_slides = train``).

    Uses tissuegraph's own panel selection, so the baselines see the genes the graph build
    sees. Only the training AnnDatas are passed in: nothing of a held-out section can
    influence the choice.
    """
    from tissuegraph.config import load_config
    from tissuegraph.graph.config import BuildConfig
    from tissuegraph.graph.pipeline import select_panel

    cfg = load_config(BuildConfig)
    cfg.panel.mode = "hvg"
    cfg.panel.n_top = int(n_top)
    cfg.panel.fit_slides = list(train)
    return list(select_panel(dict(train), cfg))


def log_expression(adata, genes: Sequence[str]) -> np.ndarray:
    """log1p(CP10k) of ``genes`` (library size over all genes of the spot), dense ``[N, G]``;
    panel genes absent from the section are zero columns."""
    from tissuegraph.graph.genes import normalize_counts, panel_matrix

    x = normalize_counts(adata.X, "log1p_cp10k")
    m, _ = panel_matrix(x, adata.var_names, list(genes))
    return m.toarray()


class PcaModel:
    """Scale (mean / sd of the training spots, clipped at ±10) then PCA, fitted on training.

    Parameters
    ----------
    n_pcs
        Principal components kept.
    seed
        Seed of the randomized SVD.
    """

    def __init__(self, n_pcs: int = 30, seed: int = 0):
        self.n_pcs = n_pcs
        self.seed = seed

    def fit(self, x: np.ndarray) -> PcaModel:
        from sklearn.decomposition import PCA

        self.mean_ = x.mean(0)
        sd = x.std(0)
        self.sd_ = np.where(sd > 0, sd, 1.0)
        n = int(min(self.n_pcs, x.shape[0] - 1, x.shape[1] - 1))
        self.pca_ = PCA(n_components=n, random_state=self.seed).fit(self._scale(x))
        return self

    def _scale(self, x: np.ndarray) -> np.ndarray:
        return np.clip((x - self.mean_) / self.sd_, -10, 10)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """``[N, G]`` log expression (same panel order) -> ``[N, n_pcs]`` float32."""
        return self.pca_.transform(self._scale(x)).astype(np.float32)


def aggregate(adata, rep: np.ndarray, n_hops: int) -> np.ndarray:
    """``[rep, mean over hop ring 1, ..., ring n_hops]`` on the section's spot grid."""
    from anndata import AnnData

    from tissuegraph import tl

    tmp = AnnData(obs=adata.obs[[]].copy(), obsm={k: adata.obsm[k] for k in adata.obsm})
    tmp.uns["tissuegraph"] = adata.uns.get("tissuegraph", {})
    tmp.obsm["X_bench_rep"] = rep
    tl.spatial_neighbors(tmp, method="grid")
    tl.aggregate_neighbors(tmp, n_hops=n_hops, use_rep="X_bench_rep", key_added="X_bench_agg")
    return np.asarray(tmp.obsm["X_bench_agg"])


# ----------------------------------------------------------------------------- clustering / score
def cluster(rep, k: int, seed: int, n_init: int, scale: bool = False) -> np.ndarray:
    """``tl.niches(method="gmm", covariance_type="tied", scale=scale)`` on ``rep``; returns the
    labels. A list of representations: each clustered so (the ``i``-th with seed
    ``seed + i``), then their majority vote (``tl.niches(use_rep=[...])``)."""
    from anndata import AnnData

    from tissuegraph import tl

    reps = list(rep) if isinstance(rep, list | tuple) else [rep]
    tmp = AnnData(obs={"i": np.arange(reps[0].shape[0])})
    keys = [f"X_bench{i}" for i in range(len(reps))]
    for key, r in zip(keys, reps, strict=True):
        tmp.obsm[key] = np.asarray(r, dtype=np.float32)
    tl.niches(
        tmp,
        n_niches=k,
        method="gmm",
        use_rep=keys,
        key_added="bench_niche",
        covariance_type="tied",
        n_init=n_init,
        scale=scale,
        random_state=seed,
    )
    return np.asarray(tmp.obs["bench_niche"].astype(str))


def peak_of(measures) -> float:
    """The largest ``peak_rss_mb`` of several measurements (NaN when none was measured)."""
    v = [float(m.get("peak_rss_mb", np.nan)) for m in measures]
    v = [x for x in v if x == x]
    return max(v) if v else float("nan")


def consensus_group(seed: int, s: Settings) -> list[int]:
    """The model seeds whose vote is the ``tissuegraph_consensus`` result for ``seed``."""
    return list(range(seed, seed + max(1, s.consensus_models)))


def model_seeds(s: Settings) -> list[int]:
    """Every model seed the tissuegraph arms need."""
    need = set(s.seeds)
    if "tissuegraph_consensus" in s.methods:
        for seed in s.seeds:
            need.update(consensus_group(seed, s))
    return sorted(need)


def n_domains(truth, k_max: int) -> int:
    """K: the section's number of distinct labels (5 on 151669-151672), at most ``k_max``."""
    t = [str(v) for v in np.asarray(truth, dtype=object) if v is not None and v == v and v != ""]
    return int(min(k_max, len(set(t)))) if t else int(k_max)


def ari_labelled(pred: np.ndarray, truth) -> float:
    """ARI on the spots with a ground-truth label (NaN / None / '' dropped)."""
    from sklearn.metrics import adjusted_rand_score

    t = np.asarray(truth, dtype=object)
    ok = np.array([v is not None and v == v and str(v) != "" for v in t])
    return float(adjusted_rand_score(t[ok].astype(str), np.asarray(pred)[ok]))


def score_rep(rep, truth, *, k, seed, n_init, restarts, scale=False) -> dict:
    """Cluster ``rep`` with ``n_init`` starts (the reported ARI) and, to show the spread, with
    ``restarts`` single starts."""
    with measure() as mc:
        labels = cluster(rep, k, seed, n_init, scale)
    out = {"ari": ari_labelled(labels, truth), "cluster_s": mc.seconds, "scale": bool(scale)}
    singles = [
        ari_labelled(cluster(rep, k, 1000 * seed + r + 1, 1, scale), truth) for r in range(restarts)
    ]
    if singles:
        out.update(
            restart_aris=singles,
            restart_min=float(min(singles)),
            restart_max=float(max(singles)),
            restart_sd=float(np.std(singles, ddof=1)) if len(singles) > 1 else 0.0,
        )
    return out


# ----------------------------------------------------------------------------- tissuegraph arm
def train_tissuegraph(
    train: Section, heldout: Sequence[str], workdir: Path, s: Settings
) -> tuple[dict[int, Path], dict]:
    """Build the training section's graph (panel fitted on it alone) and pretrain one model
    per seed. The protocol guard :func:`_common.check_training_slides` asserts that only
    ``train`` is in the graphs used for pretraining."""
    graphs = workdir / f"graphs_{train.name}"
    with measure(s.trace_python) as mb:
        manifest = build_graph_dir(
            [train.spec],
            graphs,
            n_top=s.n_top,
            fit_slides=[train.name],
            patches=s.patches,
            overrides=s.build_overrides,
            config=s.build_config,
        )
    check_training_slides(graphs, [train.name], heldout)
    info = {"build": mb.as_dict(), "panel": list(manifest["genes"]), "pretrain": {}}
    ckpts = {}
    for seed in model_seeds(s):
        with measure(s.trace_python) as mt:
            ckpt = pretrain_checkpoint(
                graphs,
                workdir / f"run_{train.name}_seed{seed}",
                steps=s.steps,
                seed=seed,
                device=s.device,
                overrides=s.pretrain_overrides,
                config=s.pretrain_config,
            )
        check_checkpoint_slides(ckpt, [train.name], heldout)
        ckpts[seed] = ckpt
        info["pretrain"][seed] = mt.as_dict()
    return ckpts, info


def check_checkpoint_slides(ckpt: Path, train: Sequence[str], heldout: Sequence[str]) -> None:
    """Leakage guard on the checkpoint: its recorded build config lists only ``train``."""
    from tissuegraph.train.checkpoint import load

    build_config = load(ckpt, model=False).build_config
    slides = [sl.get("name") for sl in (build_config or {}).get("slides", [])]
    leaked = sorted(set(slides) & set(heldout))
    if leaked:
        raise RuntimeError(f"leakage: checkpoint {ckpt} was pretrained on held-out {leaked}")
    if slides and sorted(slides) != sorted(train):
        raise RuntimeError(f"checkpoint {ckpt} was pretrained on {slides}, expected {list(train)}")


def embed_tissuegraph(section: Section, ckpt: Path, s: Settings) -> np.ndarray:
    """``tl.embed`` of the section with a checkpoint (graph built with its panel)."""
    from tissuegraph import tl

    adata = section.adata.copy()
    tl.embed(
        adata,
        str(ckpt),
        kind=s.kind,
        device=s.device,
        key_added="X_tissuegraph",
    )
    return np.asarray(adata.obsm["X_tissuegraph"], dtype=np.float32)


# ----------------------------------------------------------------------------- peers
class PeerError(RuntimeError):
    """A peer run that failed; the message is one line."""


def one_line(text: str, limit: int = 300) -> str:
    """The last informative line of ``text`` (a traceback's exception line), shortened."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ("Error" in ln or "Exception" in ln) and ":" in ln]
    line = (errors or lines or ["no output"])[-1]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def resolve_peer_python(arg: str | None) -> str | None:
    """``--peer-python``, else ``$TISSUEGRAPH_PEER_PYTHON``, else ``None`` (no peers)."""
    value = arg if arg else os.environ.get(PEER_PYTHON_ENV, "")
    return value.strip() or None


def _peer_env(threads: int) -> dict[str, str]:
    """The environment of a peer process: this one's, without tissuegraph's interpreter
    settings, with its thread count fixed."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT")
    }
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("MPLBACKEND", "Agg")
    env["HF_HUB_OFFLINE"] = "1"
    return env


def probe_peers(python: str | None, timeout: float = 300) -> tuple[dict[str, str], str | None]:
    """Installed peers of the peer environment (``run_peer.py --list``): ``({peer: version},
    None)``, or ``({}, reason)`` when there is no usable peer environment."""
    if not python:
        return {}, (
            f"no peer environment (--peer-python or ${PEER_PYTHON_ENV}); "
            "see benchmarks/peers/README.md"
        )
    try:
        proc = subprocess.run(
            [python, str(PEER_SCRIPT), "--list"],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_peer_env(1),
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return {}, f"peer environment {python} unusable: {one_line(str(exc))}"
    if proc.returncode != 0:
        return {}, f"peer environment {python} unusable: {one_line(proc.stderr or proc.stdout)}"
    try:
        listed = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {}, f"peer environment {python}: unreadable --list output"
    return {k: str(v) for k, v in listed.items() if v}, None


def select_peers(
    requested: Sequence[str] | None, installed: dict[str, str]
) -> tuple[list[str], list[str]]:
    """Peers to run (``requested``, default: every installed one) and a note for each
    requested peer that is not installed."""
    wanted = list(PEERS) if requested is None else list(requested)
    unknown = [p for p in wanted if p not in PEERS]
    if unknown:
        raise ValueError(f"unknown peer(s) {unknown}: choose from {', '.join(PEERS)}")
    run = [p for p in wanted if p in installed]
    notes = [
        f"{p} not run: not installed in the peer environment (optional peer)"
        for p in wanted
        if p not in installed and requested is not None
    ]
    return run, notes


def peer_cache_key(peer: str, version: str, panel: Sequence[str], threads: int) -> str:
    """What a cached peer result depends on besides section and seed: the panel, the peer's
    version and the recipe (the text of ``run_peer.py``)."""
    h = hashlib.sha1()
    for part in (peer, version, "\n".join(panel), str(threads)):
        h.update(part.encode())
        h.update(b"\0")
    h.update(PEER_SCRIPT.read_bytes())
    return h.hexdigest()[:12]


def run_peer_process(
    python: str,
    peer: str,
    section_dir: str | os.PathLike,
    genes_file: Path,
    seed: int,
    out: Path,
    threads: int = 1,
    timeout: float | None = PEER_TIMEOUT_S,
) -> float:
    """``run_peer.py`` in the peer environment; returns the wall time. Raises
    :class:`PeerError` with a one-line reason."""
    cmd = [
        python,
        str(PEER_SCRIPT),
        "--peer",
        peer,
        "--section-dir",
        str(section_dir),
        "--genes",
        str(genes_file),
        "--seed",
        str(seed),
        "--threads",
        str(threads),
        "--out",
        str(out),
    ]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=_peer_env(threads)
        )
    except subprocess.TimeoutExpired:
        raise PeerError(f"timed out after {timeout:.0f} s") from None
    except OSError as exc:
        raise PeerError(one_line(str(exc))) from None
    if proc.returncode != 0:
        raise PeerError(f"exit {proc.returncode}: {one_line(proc.stderr or proc.stdout)}")
    if not out.exists():
        raise PeerError("run_peer.py wrote no output")
    return time.perf_counter() - t0


def load_peer_result(path: str | os.PathLike) -> dict:
    """A ``run_peer.py`` output: ``rep``, ``obs_names``, ``seconds``, ``version``, ``params``,
    ``n_genes``, ``peak_rss_mb`` (of the peer process)."""
    with np.load(path, allow_pickle=False) as z:
        return {
            "rep": np.asarray(z["rep"], dtype=np.float32),
            "obs_names": np.asarray(z["obs_names"]).astype(str),
            "seconds": float(z["seconds"]),
            "version": str(z["version"]),
            "params": json.loads(str(z["params"])),
            "n_genes": int(z["n_genes"]),
            "peak_rss_mb": float(z["peak_rss_mb"]) if "peak_rss_mb" in z.files else None,
        }


def align_rep(rep: np.ndarray, obs_names: Sequence[str], spots: Sequence[str]) -> np.ndarray:
    """Rows of ``rep`` (one per ``obs_names``) in the order of ``spots``; every spot must be
    there once (spots the peer has beyond ``spots`` are dropped)."""
    import pandas as pd

    index = pd.Index([str(x) for x in obs_names])
    if len(index) != len(rep):
        raise ValueError(f"{len(rep)} embedding rows for {len(index)} barcodes")
    if not index.is_unique:
        raise ValueError(f"barcode {index[index.duplicated()][0]!r} occurs twice")
    where = index.get_indexer([str(x) for x in spots])
    missing = np.flatnonzero(where < 0)
    if missing.size:
        some = ", ".join(str(spots[i]) for i in missing[:3])
        raise ValueError(f"{missing.size} of {len(spots)} spots not in the peer output ({some})")
    return np.asarray(rep)[where]


def peer_rep(
    section: Section, peer: str, seed: int, panel: Sequence[str], s: Settings, cache: Path
) -> tuple[np.ndarray, float, dict]:
    """The peer's embedding of ``section`` aligned to its spots, from the cache or a fresh
    run; returns ``(rep, seconds of the peer's own run, info)``. Raises :class:`PeerError`."""
    version = s.peer_versions.get(peer, "unknown")
    key = peer_cache_key(peer, version, panel, s.peer_threads)
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"{peer}_{section.name}_seed{seed}_{key}.npz"
    panel_hash = hashlib.sha1("\n".join(panel).encode()).hexdigest()[:12]
    genes = cache / f"panel_{section.name}_{panel_hash}.txt"
    if not genes.exists():
        genes.write_text("\n".join(panel) + "\n")
    cached = out.exists()
    wall = None
    if not cached:
        if not s.peer_python:
            raise PeerError("no peer environment")
        wall = run_peer_process(
            s.peer_python,
            peer,
            section.spec.path,
            genes,
            seed,
            out,
            threads=s.peer_threads,
            timeout=s.peer_timeout,
        )
    try:
        res = load_peer_result(out)
        rep = align_rep(res["rep"], res["obs_names"], list(section.adata.obs_names))
    except (OSError, ValueError, KeyError) as exc:
        raise PeerError(f"unusable output {out.name}: {one_line(str(exc))}") from None
    info = {
        "peer_version": res["version"],
        "peer_params": res["params"],
        "peer_n_genes": res["n_genes"],
        "peer_threads": s.peer_threads,
        "peer_cached": cached,
        "peer_wall_s": wall,
        "fit_peak_rss_mb": res["peak_rss_mb"],
    }
    return rep, res["seconds"], info


# ----------------------------------------------------------------------------- the benchmark
def run(sections: Sequence[Section], s: Settings, workdir: Path) -> list[dict]:
    """All methods x protocols x seeds; one record per (method, protocol, train, test, seed)."""
    runs: list[dict] = []
    names = [sec.name for sec in sections]
    cache = Path(s.peer_cache) if s.peer_cache else workdir / "peer_cache"
    # warm-up (imports, first-call compilation) so that no method is charged for it
    PcaModel(2).fit(
        log_expression(sections[0].adata, choose_panel({names[0]: sections[0].adata}, 50))
    )
    for train in sections:
        others = [n for n in names if n != train.name]
        evals = []
        if "per_section" in s.protocols:
            evals.append(("per_section", train))
        if "transfer" in s.protocols:
            evals += [("transfer", sec) for sec in sections if sec.name != train.name]
        if not evals:
            continue
        # --- fit on the training section only
        with measure(s.trace_python) as mp:
            panel = choose_panel({train.name: train.adata}, panel_size(s))
            pca = PcaModel(s.n_pcs).fit(log_expression(train.adata, panel))
        ckpts, tg_info = {}, {}
        tg_methods = [m for m in TG_METHODS if m in s.methods]
        if tg_methods:
            ckpts, tg_info = train_tissuegraph(train, others, workdir, s)
            tg_info["panel_equals_baseline_panel"] = tg_info["panel"] == panel
        for protocol, test in evals:
            base = {"protocol": protocol, "train": train.name, "test": test.name}
            truth = test.adata.obs[TRUTH].to_numpy()
            k = n_domains(truth, s.k)

            def scored(method, rep, seed, base=base, truth=truth, k=k) -> list[dict]:
                rec = {**base, "method": method, "seed": seed, "dim": int(rep.shape[1])}
                return [
                    rec
                    | score_rep(
                        rep,
                        truth,
                        k=k,
                        seed=seed,
                        n_init=s.n_init,
                        restarts=s.restarts,
                        scale=scale,
                    )
                    for scale in s.scales
                ]

            with measure() as mtr:
                z = pca.transform(log_expression(test.adata, panel))
            reps = {}
            if "pca" in s.methods:
                reps["pca"] = (z, mp.seconds + mtr.seconds, mp)
            if "aggregation" in s.methods:
                with measure() as ma:
                    za = aggregate(test.adata, z, s.n_hops)
                reps["aggregation"] = (za, mp.seconds + mtr.seconds + ma.seconds, mp)
            for method, (rep, fit_s, mem) in reps.items():
                for seed in s.seeds:
                    for rec in scored(method, rep, seed):
                        rec.update(
                            train_s=fit_s, total_s=fit_s + rec["cluster_s"], **mem.as_dict("fit_")
                        )
                        runs.append(rec)
                        _log(rec)
            build_s = tg_info["build"]["seconds"] if tg_methods else 0.0
            embs: dict[int, tuple[np.ndarray, float]] = {}

            def embedding(seed, test=test, embs=embs, ckpts=ckpts):
                if seed not in embs:
                    with measure() as me:
                        e = embed_tissuegraph(test, ckpts[seed], s)
                    embs[seed] = (e, me.seconds)
                return embs[seed]

            for seed in s.seeds if "tissuegraph_consensus" in tg_methods else []:
                group = consensus_group(seed, s)
                reps_g = [embedding(m)[0] for m in group]
                pre_s = sum(tg_info["pretrain"][m]["seconds"] for m in group)
                embed_s = sum(embedding(m)[1] for m in group)
                for scale in s.scales:
                    with measure() as mc:
                        labels = cluster(reps_g, k, seed, s.n_init, scale)
                    rec = {**base, "method": "tissuegraph_consensus", "seed": seed}
                    rec.update(
                        dim=int(reps_g[0].shape[1]),
                        ari=ari_labelled(labels, truth),
                        cluster_s=mc.seconds,
                        scale=bool(scale),
                        models=group,
                        build_s=build_s,
                        pretrain_s=pre_s,
                        embed_s=embed_s,
                        train_s=build_s + pre_s,
                        total_s=build_s + pre_s + embed_s + mc.seconds,
                        steps=s.steps,
                        patches=s.patches,
                        panel_equals_baseline_panel=tg_info["panel_equals_baseline_panel"],
                        fit_peak_rss_mb=peak_of(tg_info["pretrain"][m] for m in group),
                    )
                    runs.append(rec)
                    _log(rec)
            single = [m for m in tg_methods if m != "tissuegraph_consensus"]
            for seed in s.seeds if single else []:
                emb, embed0_s = embedding(seed)
                tg_reps = {"tissuegraph": (emb, 0.0)}
                if "tissuegraph_agg" in s.methods:
                    with measure() as ma:
                        emb_agg = aggregate(test.adata, emb, s.n_hops)
                    tg_reps["tissuegraph_agg"] = (emb_agg, ma.seconds)
                for method in single:
                    rep, extra_s = tg_reps[method]
                    for rec in scored(method, rep, seed):
                        pt = tg_info["pretrain"][seed]
                        embed_s = embed0_s + extra_s
                        rec.update(
                            build_s=build_s,
                            pretrain_s=pt["seconds"],
                            embed_s=embed_s,
                            train_s=build_s + pt["seconds"],
                            total_s=build_s + pt["seconds"] + embed_s + rec["cluster_s"],
                            steps=s.steps,
                            patches=s.patches,
                            panel_equals_baseline_panel=tg_info["panel_equals_baseline_panel"],
                            **{f"fit_{k}": v for k, v in pt.items()},
                        )
                        runs.append(rec)
                        _log(rec)
            # --- peers: per-section methods, fitted on the section they are scored on
            for peer in s.peers if protocol == "per_section" else []:
                for seed in peer_seed_list(s):
                    try:
                        rep, peer_s, info = peer_rep(test, peer, seed, panel, s, cache)
                    except PeerError as exc:
                        rec = {**base, "method": peer, "seed": seed, "status": "failed"}
                        rec["reason"] = str(exc)
                        runs.append(rec)
                        _log(rec)
                        continue
                    for rec in scored(peer, rep, seed):
                        rec.update(
                            status="ok",
                            train_s=peer_s,
                            total_s=peer_s + rec["cluster_s"],
                            **info,
                        )
                        runs.append(rec)
                        _log(rec)
    return runs


def peer_seed_list(s: Settings) -> list[int]:
    """The seeds the peers run with: ``peer_seeds``, else the benchmark's."""
    return list(s.seeds if s.peer_seeds is None else s.peer_seeds)


def panel_size(s: Settings) -> int:
    """The HVG panel size: ``--n-top`` or the build config's ``panel.n_top``."""
    if s.n_top is not None:
        return int(s.n_top)
    from tissuegraph.config import load_config
    from tissuegraph.graph.config import BuildConfig

    return int(load_config(BuildConfig, s.build_config).panel.n_top)


def _log(rec: dict) -> None:
    if rec.get("status") == "failed":
        print(
            f"  {rec['protocol']:<11} {rec['train']}->{rec['test']} {rec['method']:<12} "
            f"seed {rec['seed']}: FAILED ({rec.get('reason', '')})",
            flush=True,
        )
        return
    if "restart_min" in rec:
        spread = f"(restarts {rec['restart_min']:.3f}-{rec['restart_max']:.3f}) "
    elif "models" in rec:
        spread = f"(vote of models {rec['models'][0]}-{rec['models'][-1]}) "
    else:
        spread = ""
    print(
        f"  {rec['protocol']:<11} {rec['train']}->{rec['test']} {rec['method']:<12} "
        f"seed {rec['seed']}{' scale' if rec.get('scale') else ''}: ARI {rec['ari']:.3f} "
        f"{spread}train {rec.get('train_s', 0):.1f}s",
        flush=True,
    )


def summarise(runs: list[dict], s: Settings) -> tuple[list[str], list[list], list[Target]]:
    """Summary table rows (mean ± sd over seeds) and the targets. Failed peer runs get a row
    with their reason; peers get a "not applicable" row under the transfer protocol."""
    failed = [r for r in runs if r.get("status") == "failed"]
    runs = [r for r in runs if r.get("status", "ok") == "ok"]
    cols = [
        "protocol",
        "train → test",
        "method",
        "clustering",
        f"ARI (mean ± sd, {len(s.seeds)} seed(s))",
        "single-start ARI range",
        "train s",
        "peak RSS MB (fit)",
    ]
    rows = []
    keys = []

    def key_of(r):
        return (r["protocol"], r["train"], r["test"], r["method"], bool(r.get("scale", False)))

    headline = bool(s.scales[0]) if s.scales else False
    for r in sorted(runs, key=lambda r: bool(r.get("scale", False)) != headline):
        key = key_of(r)
        if key not in keys:
            keys.append(key)
    for key in keys:
        rs = [r for r in runs if key_of(r) == key]
        lo = min((r.get("restart_min", np.nan) for r in rs), default=np.nan)
        hi = max((r.get("restart_max", np.nan) for r in rs), default=np.nan)
        rows.append(
            [
                key[0],
                f"{key[1]} → {key[2]}",
                key[3],
                "scale=True" if key[4] else "scale=False",
                fmt_mean_sd([r["ari"] for r in rs]),
                f"{lo:.3f}–{hi:.3f}" if np.isfinite(lo) else "n/a",
                round(mean_sd([r["train_s"] for r in rs])[0], 1),
                round(mean_sd([r.get("fit_peak_rss_mb") for r in rs])[0], 0),
            ]
        )
    for key in dict.fromkeys((r["protocol"], r["train"], r["test"], r["method"]) for r in failed):
        rs = [r for r in failed if (r["protocol"], r["train"], r["test"], r["method"]) == key]
        seeds = ", ".join(str(r["seed"]) for r in rs)
        reason = rs[0].get("reason", "")
        label = f"failed (seed {seeds}): {reason}"
        rows.append([key[0], f"{key[1]} → {key[2]}", key[3], "—", label, "n/a", "", ""])
    if "transfer" in s.protocols:
        for peer in s.peers:
            na = "not applicable (per-section method)"
            rows.append(["transfer", "—", peer, "—", na, "n/a", "", ""])

    def mean_of(method, protocol, test=None):
        v = [
            r["ari"]
            for r in runs
            if r["method"] == method
            and r["protocol"] == protocol
            and bool(r.get("scale", False)) == headline
            and (test is None or r["test"] == test)
        ]
        return mean_sd(v)[0] if v else None

    targets = []
    agg_ctx = mean_of("aggregation", "per_section")
    agg_txt = (
        f"aggregation baseline in this run: {agg_ctx:.3f} (same mean, same clustering); "
        if agg_ctx is not None
        else ""
    )
    for method in [m for m in TG_METHODS if m in s.methods]:
        if "per_section" in s.protocols:
            targets.append(
                Target(
                    f"{method} per-section ARI (mean over sections and seeds)",
                    mean_of(method, "per_section"),
                    TARGET_PER_SECTION,
                    context=agg_txt + REFERENCE,
                )
            )
        if "transfer" in s.protocols:
            targets.append(
                Target(
                    f"{method} transfer ARI (mean over directions and seeds)",
                    mean_of(method, "transfer"),
                    TARGET_TRANSFER,
                    context="pretrained on one section, embedded + clustered on the other",
                )
            )
    return cols, rows, targets


#: one line per peer: the recipe run_peer.py follows (its docstring has the details)
PEER_RECIPES = {
    "STAGATE": "STAGATE_pyG, rad_cutoff 150, 1000 epochs, 30-d embedding",
    "GraphST": "600 epochs, 20 PCs of its reconstruction (what GraphST.clustering clusters; "
    "its label refinement is not applied)",
    "BANKSY": "the DLPFC notebook: k_geom 18, AGF m = 1, lambda 0.2, 20 PCs",
    "CellCharter": "scVI (n_latent 5) + aggregate_neighbors(n_layers=4) on a Delaunay graph, "
    "as its DLPFC benchmark; 30 PCs and n_layers 3 without scvi-tools",
    "novae": "trained from scratch on the section (its pretrained weights sit on a model hub "
    "that the benchmark never calls)",
}


def peer_notes(s: Settings, unavailable: str | None = None, extra: Sequence[str] = ()) -> list[str]:
    """Notes on the optional peers: why none ran (``unavailable``), what each one that ran
    did, and ``extra`` (e.g. requested peers that are not installed)."""
    if unavailable:
        return [f"peers ({', '.join(PEERS)}) not run: {unavailable}", *extra]
    notes = []
    if s.peers:
        seeds = peer_seed_list(s)
        notes.append(
            "peers run by benchmarks/peers/run_peer.py in their own environment "
            f"({s.peer_python}), never a tissuegraph dependency: each one's DLPFC recipe with "
            "its defaults, on the benchmark's gene panel, "
            f"{s.peer_threads} thread(s), seed(s) {', '.join(map(str, seeds))}; the embedding "
            "is clustered exactly like every other method; per-section only (transfer: not "
            "applicable); train s = the peer's own run"
        )
        notes += [f"{p} {s.peer_versions.get(p, '')}: {PEER_RECIPES[p]}" for p in s.peers]
    return notes + list(extra)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 seed, few steps, fewer restarts")
    p.add_argument(
        "--sections", nargs="+", default=None, help="default: every section found in the data"
    )
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5; quick 1)")
    p.add_argument(
        "--steps", type=int, default=None, help="pretraining steps (default: the config's)"
    )
    p.add_argument(
        "--n-top", type=int, default=None, help="HVG panel size (default: the build config's)"
    )
    p.add_argument("--build-config", default=str(BUILD_CONFIG))
    p.add_argument("--pretrain-config", default=str(PRETRAIN_CONFIG))
    p.add_argument("--n-pcs", type=int, default=30)
    p.add_argument("--n-init", type=int, default=None, help="GMM starts (default 10; quick 3)")
    p.add_argument("--restarts", type=int, default=None, help="single-start fits for the spread")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument(
        "--consensus-models",
        type=int,
        default=CONSENSUS_MODELS,
        help="models voting in the tissuegraph_consensus arm (default 5)",
    )
    p.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=PROTOCOLS)
    p.add_argument("--kind", default="fused", choices=["fused", "expression", "image"])
    p.add_argument(
        "--patches",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="build the graphs with (lowres) image patches (default: the build config's)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--pretrain-override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--build-override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--priors",
        action="store_true",
        help="add CollecTRI TF->target and PROGENy pathway edges from $TISSUEGRAPH_DATA/priors",
    )
    p.add_argument("--threads", type=int, default=None, help="torch / BLAS threads")
    p.add_argument("--workdir", default=None, help="keep graphs and runs here (default: temp)")
    p.add_argument(
        "--tracemalloc",
        action="store_true",
        help="also record the Python-heap peak (tracemalloc slows pretraining several-fold, "
        "so the times are then not comparable)",
    )
    p.add_argument("--out", default=None, help="results JSON path")
    g = p.add_argument_group("optional peers (run in a separate environment)")
    g.add_argument(
        "--peer-python",
        default=None,
        help=f"Python of the peer environment (default: ${PEER_PYTHON_ENV}; none: no peers)",
    )
    g.add_argument(
        "--peers",
        nargs="*",
        default=None,
        choices=PEERS,
        help="peers to run (default: every one installed there; no names: none)",
    )
    g.add_argument("--peer-seeds", type=int, default=None, help="seeds per peer (default: --seeds)")
    g.add_argument("--peer-threads", type=int, default=1, help="threads of a peer process")
    g.add_argument(
        "--peer-cache",
        default=None,
        help="keep the peers' embeddings here and reuse them (default: in the work dir)",
    )
    g.add_argument(
        "--peer-timeout", type=float, default=PEER_TIMEOUT_S, help="seconds per peer run"
    )
    g.add_argument(
        "--peers-only",
        action="store_true",
        help="run only the peers (no tissuegraph, no baselines); per-section protocol",
    )
    a = p.parse_args(argv)
    if a.peer_seeds is not None and a.peer_seeds < 1:
        p.error("--peer-seeds must be at least 1")
    if a.peer_threads < 1:
        p.error("--peer-threads must be at least 1")
    if a.consensus_models < 1:
        p.error("--consensus-models must be at least 1")
    return a


def settings_from_args(a: argparse.Namespace) -> Settings:
    q = a.quick
    if a.peers_only:
        a.methods, a.protocols = [], ["per_section"]
    return Settings(
        seeds=list(range(a.seeds if a.seeds is not None else (1 if q else FULL_SEEDS))),
        steps=a.steps if a.steps is not None else (60 if q else None),
        n_top=a.n_top,
        build_config=a.build_config,
        pretrain_config=a.pretrain_config,
        n_pcs=a.n_pcs,
        n_init=a.n_init if a.n_init is not None else (3 if q else 10),
        restarts=a.restarts if a.restarts is not None else (2 if q else 5),
        consensus_models=a.consensus_models if not q else min(a.consensus_models, 3),
        methods=list(a.methods),
        protocols=list(a.protocols),
        kind=a.kind,
        patches=a.patches,
        device=a.device,
        pretrain_overrides=list(a.pretrain_override),
        build_overrides=list(a.build_override),
        trace_python=a.tracemalloc,
        peer_seeds=None if a.peer_seeds is None else list(range(a.peer_seeds)),
        peer_python=resolve_peer_python(a.peer_python),
        peer_threads=a.peer_threads,
        peer_timeout=a.peer_timeout,
        peer_cache=a.peer_cache,
    )


def main(argv=None) -> dict:
    a = parse_args(argv)
    set_threads(a.threads)
    s = settings_from_args(a)
    peer_extra: list[str] = []
    unavailable = None
    if a.peers == []:
        unavailable = "--peers given without names"
    else:
        installed, unavailable = probe_peers(s.peer_python)
        if not unavailable:
            s.peers, peer_extra = select_peers(a.peers, installed)
            s.peer_versions = {p: installed[p] for p in s.peers}
            if not s.peers:
                unavailable = f"none of {a.peers or list(PEERS)} is installed in {s.peer_python}"
    if a.peers_only and not s.peers:
        raise SystemExit(f"--peers-only: no peer to run ({unavailable})")
    if a.priors:
        pri = ensure_data_env() / "priors"
        s.build_overrides = [
            f"priors.tf_targets={pri / 'collectri_human.csv'}",
            f"priors.pathways={pri / 'progeny_human_top100.tsv'}",
            *s.build_overrides,
        ]
    t0 = time.perf_counter()
    from tissuegraph.datasets import dlpfc_sections

    ensure_data_env()
    found = dlpfc_sections()
    a.sections = a.sections or found
    if not a.sections:
        raise SystemExit("no DLPFC section found under $TISSUEGRAPH_DATA/dlpfc")
    sections = [load_dlpfc(x) for x in a.sections]
    if "transfer" in s.protocols and len(sections) < 2:
        s.protocols = [p for p in s.protocols if p != "transfer"]
    tmp = None
    if a.workdir:
        workdir = Path(a.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="tg_bench_domains_")
        workdir = Path(tmp)
    try:
        runs = run(sections, s, workdir)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    cols, rows, targets = summarise(runs, s)
    notes = peer_notes(s, unavailable, peer_extra)
    notes.append(
        "ARI on labelled spots only; all in-tissue spots are clustered. Memory: peak RSS of the "
        "process while fitting (pretraining for tissuegraph, panel + PCA for the baselines, the "
        "whole peer process for a peer)."
    )
    # a peers-only run is its own results file and README table (it never replaces the
    # headline run of tissuegraph and the baselines)
    name, title = (NAME + "_peers", TITLE + ": published peers") if a.peers_only else (NAME, TITLE)
    return finish(
        results_path(name, a.quick, a.out),
        benchmark=name,
        title=title,
        quick=a.quick,
        params={**asdict(s), "sections": a.sections, "elapsed_s": time.perf_counter() - t0},
        extra=None
        if a.quick
        or (
            s.steps is None
            and not s.pretrain_overrides
            and not s.build_overrides
            and s.build_config == str(BUILD_CONFIG)
            and s.pretrain_config == str(PRETRAIN_CONFIG)
            and len(s.seeds) >= FULL_SEEDS
            and set(a.sections) == set(found)
            and set(s.methods) == set(METHODS)
            and set(s.protocols) == set(PROTOCOLS)
        )
        else {"mode": "reduced"},
        runs=runs,
        table=(cols, rows),
        targets=targets,
        notes=notes,
    )


if __name__ == "__main__":
    main()
