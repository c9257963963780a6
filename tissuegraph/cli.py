"""The ``tissuegraph`` command line: parses a config and overrides, calls the public API.

Start-up stays light: ``--help``, usage errors and config errors (checked against the config
dataclasses) answer before torch or scanpy is imported; each command imports what it needs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tissuegraph import __version__
from tissuegraph import _layout as L
from tissuegraph.errors import TissueGraphError, one_line

EPILOG = "Configs are OmegaConf YAML; any field can be overridden as key=value after --config."


def _common(debug_only: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    # SUPPRESS: given before or after the command, neither parser resets the other's value
    p.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug messages"
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="warnings and errors only, no progress bars",
    )
    return p


def _min_gene_overlap(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--min-gene-overlap",
        type=float,
        default=0.5,
        help="refuse a slide with less than this fraction of the checkpoint's genes (0.5)",
    )


def _with_config(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", "-c", required=required, help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


# ---------------------------------------------------------------------------- handlers
def _build_graphs(args) -> int:
    from tissuegraph.config import load_config
    from tissuegraph.graph.config import BuildConfig

    cfg = load_config(BuildConfig, args.config, args.overrides)
    if args.n_jobs is not None:
        cfg.n_jobs = args.n_jobs
    # torch: only once the config is valid
    from tissuegraph.graph.pipeline import build_graphs, merge_shards, parse_shard

    if args.merge:
        if args.shard:
            raise TissueGraphError("--merge and --shard exclude each other: merge after all shards")
        merge_shards(cfg.out_dir, progress=not args.quiet)
        return 0
    shard, launcher = None, None
    if args.shard:
        shard = parse_shard(args.shard)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: one shard per process
        shard = parse_shard(f"{os.environ.get('RANK', '0')}/{os.environ['WORLD_SIZE']}")
        launcher = "torchrun"
    if shard is None:
        build_graphs(cfg, force=args.force, progress=not args.quiet)
        return 0
    try:
        build_graphs(cfg, force=args.force, progress=not args.quiet, shard=shard)
    finally:
        if launcher:  # every process waits for the others (also when its shard failed)
            _barrier()
    if launcher and shard[0] == 0:  # merge refuses a shard that failed, naming its file
        merge_shards(cfg.out_dir, progress=not args.quiet)
    return 0


def _barrier() -> None:
    """Wait for all torchrun processes (a gloo process group, left once all arrived)."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(days=2))
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _inspect(args) -> int:
    from tissuegraph.graph.inspect import inspect_path

    print(inspect_path(args.path))
    return 0


def _pretrain(args) -> int:
    from tissuegraph.config import load_config
    from tissuegraph.train.config import PretrainConfig

    cfg = load_config(PretrainConfig, args.config, args.overrides)
    from tissuegraph.train.loop import METRICS, TrainingInterrupted, pretrain

    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        ckpt = pretrain(cfg, resume=args.resume, progress=not args.quiet)
    except TrainingInterrupted as exc:  # a checkpoint was written: say where, exit 128 + signal
        if rank0:
            print(f"tissuegraph: {exc}", file=sys.stderr)
        return 128 + exc.signum
    if rank0:
        print(f"pretrain: wrote {ckpt}; metrics {Path(cfg.run_dir) / METRICS}")
    return 0


def _torch_threads() -> None:
    from tissuegraph._utils import set_torch_threads

    set_torch_threads()


def _embed(args) -> int:
    from tissuegraph import io, tl

    _torch_threads()
    adata = io.read_any(args.input)
    keys = []
    for i, ckpt in enumerate(args.checkpoint):
        key = args.key if i == 0 else f"{args.key}_{i}"
        tl.embed(
            adata,
            ckpt,
            kind=args.kind,
            device=args.device,
            key_added=key,
            min_gene_overlap=args.min_gene_overlap,
        )
        keys.append(key)
    io.write_h5ad(adata, args.out)
    shapes = ", ".join(f"obsm[{k!r}]: {adata.obsm[k].shape}" for k in keys)
    print(f"wrote {args.out} ({shapes})")
    return 0


def _niches(args) -> int:
    from tissuegraph import io, pl, tl

    adata = io.read_any(args.input)
    tl.niches(adata, n_niches=args.n_niches, method=args.method, use_rep=list(args.use_rep))
    io.write_h5ad(adata, args.out)
    figdir = Path(args.figdir) if args.figdir else Path(args.out).with_suffix("")
    written = pl.save_niche_figures(adata, figdir)
    print(f"wrote {args.out} and {len(written)} figure(s) in {figdir}")
    return 0


def _predict(args) -> int:
    from tissuegraph import io, tl

    _torch_threads()
    pred = tl.predict_expression(
        args.input,
        args.checkpoint,
        device=args.device,
        pseudo_spacing_um=args.spacing_um,
        microns_per_pixel=args.microns_per_pixel,
        min_gene_overlap=args.min_gene_overlap,
        method=args.method,
    )
    io.write_h5ad(pred, args.out)
    print(f"wrote {args.out} ({pred.n_obs} spots x {pred.n_vars} genes predicted)")
    return 0


def _demo(args) -> int:
    from tissuegraph.demo import run_demo

    _torch_threads()
    report = run_demo(args.out, quick=args.quick, progress=not args.quiet, seed=args.seed)
    print(report)
    return 0


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="tissuegraph",
        description="Tissue as spatial graphs: build heterogeneous graphs from spatial "
        "transcriptomics + H&E, pretrain a heterogeneous GNN, analyse niches.",
        epilog=EPILOG,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"tissuegraph {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "build-graphs",
        parents=[common],
        help="turn slides into heterogeneous graphs (<out_dir>/<slide>.pt + manifest.json)",
        description="Read every slide of the config, choose the shared gene panel, and write "
        "one HeteroData per slide plus manifest.json and the resolved config to out_dir. "
        "Up-to-date slides are skipped.",
        epilog=EPILOG,
    )
    _with_config(p)
    p.add_argument("--force", action="store_true", help="rebuild slides that are up to date")
    p.add_argument("--n-jobs", type=int, default=None, help="slides built in parallel")
    p.add_argument(
        "--shard",
        default=None,
        metavar="INDEX/COUNT",
        help="build every COUNT-th slide from INDEX (0-based; e.g. a SLURM array: "
        "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT) and write a shard manifest; under "
        "torchrun RANK/WORLD_SIZE are the shard and rank 0 merges",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="merge the shard manifests of out_dir into manifest.json",
    )
    p.set_defaults(func=_build_graphs)

    p = sub.add_parser(
        "inspect",
        parents=[common],
        help="summarise a graph file or a graph directory",
        description="Print node/edge counts, degree summary and prior coverage.",
    )
    p.add_argument("path", help="a <slide>.pt graph file or a build-graphs out_dir")
    p.set_defaults(func=_inspect)

    p = sub.add_parser(
        "pretrain",
        parents=[common],
        help="self-supervised pretraining of the heterogeneous GNN on built graphs",
        description="Train on spatial tiles drawn across all slides of graphs=DIR; writes "
        "run_dir/checkpoints/last.pt and run_dir/metrics.jsonl. Multi-GPU: "
        "torchrun --nproc-per-node N -m tissuegraph pretrain --config FILE",
        epilog=EPILOG,
    )
    _with_config(p)
    p.add_argument(
        "--resume", action="store_true", help="continue from run_dir/checkpoints/last.pt"
    )
    p.set_defaults(func=_pretrain)

    p = sub.add_parser(
        "embed",
        parents=[common],
        help="encode a slide with a pretrained checkpoint (writes .h5ad with obsm embeddings)",
        description="Read a slide (.h5ad, Space Ranger folder, or ST folder with counts.tsv.gz, "
        "spots.tsv and an image), build its graph with the checkpoint's panel and options, "
        "and write spot embeddings to obsm.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        nargs="+",
        help="checkpoint .pt written by pretrain; several (e.g. one per seed) write KEY, "
        "KEY_1, KEY_2, ... for a consensus with `niches --use-rep`",
    )
    p.add_argument("--input", "-i", required=True, help=".h5ad, Space Ranger folder or ST folder")
    p.add_argument("--out", "-o", required=True, help="output .h5ad")
    p.add_argument("--kind", default="fused", choices=["fused", "expression", "image"])
    p.add_argument("--key", default=L.EMBEDDING, help="obsm key to write (the first checkpoint's)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    _min_gene_overlap(p)
    p.set_defaults(func=_embed)

    p = sub.add_parser(
        "niches",
        parents=[common],
        help="cluster embeddings into niches (writes .h5ad and PNG figures)",
        description="Cluster obsm[use_rep] into niches; with no --n-niches, choose K by "
        "cluster stability over restarts.",
    )
    p.add_argument("--input", "-i", required=True, help=".h5ad with embeddings (from embed)")
    p.add_argument("--out", "-o", required=True, help="output .h5ad")
    p.add_argument("--n-niches", type=int, default=None, help="number of niches (default: auto)")
    p.add_argument("--method", default="gmm", choices=["gmm", "kmeans", "leiden"])
    p.add_argument(
        "--use-rep",
        nargs="+",
        default=[L.EMBEDDING],
        help="obsm key to cluster; several keys: cluster each and take the majority vote",
    )
    p.add_argument("--figdir", default=None, help="folder for PNGs (default: beside --out)")
    p.set_defaults(func=_niches)

    p = sub.add_parser(
        "predict",
        parents=[common],
        help="predict expression from an H&E image (spots or a pseudo-spot lattice)",
        description="Predict the checkpoint's gene panel from the image alone.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint .pt written by pretrain")
    p.add_argument(
        "--input", "-i", required=True, help="slide (.h5ad / Visium / ST folder) or an image file"
    )
    p.add_argument("--out", "-o", required=True, help="output .h5ad")
    p.add_argument(
        "--spacing-um", type=float, default=None, help="pseudo-spot spacing for a bare image"
    )
    p.add_argument(
        "--microns-per-pixel",
        type=float,
        default=None,
        help="pixel size of a bare image (default: TIFF metadata, else 0.5 with a warning)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--method",
        choices=("auto", "probe", "decoder"),
        default="auto",
        help="probe: the ridge probe stored at the end of pretraining; decoder: the model's "
        "image-only decoder; auto (default): the probe when the checkpoint holds one",
    )
    _min_gene_overlap(p)
    p.set_defaults(func=_predict)

    p = sub.add_parser(
        "demo",
        parents=[common],
        help="end to end on the simulated demo slide: build, pretrain, embed, niches, report",
        description="Simulate the demo slide, build its graph, pretrain briefly, embed, find "
        "niches, and write demo.h5ad, figures and a report (ARI against the true niches).",
    )
    p.add_argument("--out", "-o", default="tg_demo", help="output folder (default: tg_demo)")
    p.add_argument("--quick", action="store_true", help="smaller slide and fewer steps")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.quiet = bool(getattr(args, "quiet", False))
    args.verbose = bool(getattr(args, "verbose", False))
    from tissuegraph._logging import set_verbosity

    set_verbosity(verbose=args.verbose, quiet=args.quiet)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("tissuegraph: interrupted", file=sys.stderr)
        return 130
    except TissueGraphError as exc:
        if args.debug:
            raise
        print(f"tissuegraph: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # unexpected: one line unless --debug
        if args.debug:
            raise
        msg = one_line(exc, limit=None) if str(exc).strip() else ""
        print(
            f"tissuegraph: error: {type(exc).__name__}: {msg} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
