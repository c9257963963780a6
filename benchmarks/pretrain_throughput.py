"""Pretraining throughput of the default model vs a STAGATE-like GATv2 graph autoencoder.

On one real slide (DLPFC 151673 by default), in the same run:

- spots/s and peak memory of ``tissuegraph pretrain`` with the default ``ModelConfig``
  (CPU, or the GPU when available);
- time per epoch (one full-graph pass, forward + backward) of a 2-layer GATv2 autoencoder
  over the spot graph that reconstructs the panel's expression (STAGATE-like baseline);

and prints the ratio (time for the default model to see every spot once / baseline epoch).
JSON goes to ``benchmarks/results/pretrain_throughput.json``.

    uv run python benchmarks/pretrain_throughput.py [--quick] [--graphs DIR] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def build_dlpfc(out: Path, n_top: int) -> Path:
    from tissuegraph.config import load_config
    from tissuegraph.graph.config import BuildConfig, SlideSpec
    from tissuegraph.graph.pipeline import build_graphs

    data = Path(os.environ.get("TISSUEGRAPH_DATA", ROOT.parent / "shared" / "data"))
    cfg = load_config(BuildConfig, None, [f"out_dir={out}", f"panel.n_top={n_top}"])
    cfg.slides = [SlideSpec(name="151673", format="visium", path=str(data / "dlpfc" / "151673"))]
    build_graphs(cfg, progress=False)
    return out


class GATv2AutoEncoder(nn.Module):
    """STAGATE-like: GATv2 encoder G -> 512 -> 30, GATv2 decoder 30 -> 512 -> G."""

    def __init__(self, n_genes: int, hidden: int = 512, latent: int = 30):
        super().__init__()
        from torch_geometric.nn import GATv2Conv

        self.e1 = GATv2Conv(n_genes, hidden, add_self_loops=True)
        self.e2 = GATv2Conv(hidden, latent, add_self_loops=True)
        self.d1 = GATv2Conv(latent, hidden, add_self_loops=True)
        self.d2 = nn.Linear(hidden, n_genes)

    def forward(self, x, edge_index):
        h = torch.nn.functional.elu(self.e1(x, edge_index))
        z = self.e2(h, edge_index)
        h = torch.nn.functional.elu(self.d1(z, edge_index))
        return self.d2(h)


def baseline_epoch_s(graph, device, epochs: int) -> float:
    from tissuegraph.graph import schema as S

    x = graph[S.SPOT][S.X].float().to(device)
    ei = graph[S.SPOT_NEAR_SPOT].edge_index.to(device)
    model = GATv2AutoEncoder(x.shape[1]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    for _ in range(epochs + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = ((model(x, ei) - x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return float(np.median(times[1:]))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small panel, few steps")
    ap.add_argument(
        "--graphs", default=None, help="a build-graphs out_dir (default: build DLPFC 151673)"
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "pretrain_throughput.json")
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from tissuegraph.graph.storage import load_graph, read_manifest
    from tissuegraph.train.loop import pretrain, resolve_device

    device = resolve_device(args.device)
    steps = 6 if args.quick else 40
    tmp = Path(tempfile.mkdtemp(prefix="tg_bench_"))
    graphs = (
        Path(args.graphs)
        if args.graphs
        else build_dlpfc(tmp / "graphs", 256 if args.quick else 2000)
    )
    man = read_manifest(graphs)
    graph = load_graph(graphs / man["slides"][0]["file"])
    n_spots = int(graph["spot"]["x"].shape[0])

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run = tmp / "run"
    cfg = {
        "graphs": str(graphs),
        "run_dir": str(run),
        "train": {
            "max_steps": steps,
            "log_every": 1,
            "eval_every": 0,
            "ckpt_every": 0,
            "device": str(device),
            "tensorboard": False,
        },
    }
    t0 = time.perf_counter()
    pretrain(cfg, progress=False)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    sps = float(np.median([r["spots_per_s"] for r in rows[1:]]))
    peak = (
        torch.cuda.max_memory_allocated(device) / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    base = baseline_epoch_s(graph, device, 2 if args.quick else 5)
    ours_epoch = n_spots / sps
    res = {
        "device": str(device),
        "threads": args.threads,
        "quick": args.quick,
        "slide": man["slides"][0]["name"],
        "n_spots": n_spots,
        "n_genes": len(man["genes"]),
        "model": "default ModelConfig (resnet10t, sage, hidden 128, 2 layers, middle fusion)",
        "steps": steps,
        "spots_per_s": sps,
        "peak_memory_mib": peak,
        "pretrain_wall_s": wall,
        "epoch_s": ours_epoch,
        "baseline": "GATv2 autoencoder (2+2 layers, 512/30), full graph",
        "baseline_epoch_s": base,
        "epoch_time_ratio": ours_epoch / base,
    }
    import datetime
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import command_line, machine_info

    from tissuegraph._utils import write_json_atomic

    res.update(
        title="Pretraining throughput vs a GATv2 graph autoencoder (same slide, same run)",
        mode="quick" if args.quick else "full",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=command_line(),
        machine=machine_info(),
        table={
            "columns": [
                "slide",
                "spots",
                "genes",
                "device",
                "tissuegraph spots/s",
                "tissuegraph s / pass",
                "peak MiB",
                "GATv2 AE s / epoch",
                "time ratio",
            ],
            "rows": [
                [
                    res["slide"],
                    n_spots,
                    res["n_genes"],
                    str(device),
                    round(sps, 1),
                    round(ours_epoch, 2),
                    round(peak),
                    round(base, 2),
                    round(ours_epoch / base, 1),
                ]
            ],
        },
        notes=[
            "tissuegraph: " + res["model"] + ", image patches at 3 scales, all four objectives",
            "baseline: " + res["baseline"] + "; ratio > 1 means tissuegraph is slower per pass",
        ],
    )
    out = Path(args.out)
    write_json_atomic(out, res)
    print(json.dumps({k: v for k, v in res.items() if k != "machine"}, indent=2))
    print(
        f"default model: {sps:.0f} spots/s, {ours_epoch:.2f} s per pass over {n_spots} spots; "
        f"GATv2 autoencoder: {base:.2f} s per epoch; ratio {ours_epoch / base:.1f}x"
    )
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
