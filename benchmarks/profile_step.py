"""Where the time of a pretraining step goes: a table of its parts in percent.

Runs ``--steps`` training steps of one configuration (after ``--warmup`` steps that are not
counted) with the real :class:`tissuegraph.train.loop.Trainer` and times, with wall-clock
timers around the parts of each step (exclusive times: a part nested in another is
subtracted from it):

- tile: the tile sampler and masks; ``extract_tile`` (the subgraph) separately;
- expression encoder, image encoder (``img`` crops or stored ``feat``), the GNN
  (HeteroConv layers, every pass: the local-global term runs a second, corrupted one);
- localisation cells: the 3x3 cells of each parent crop through the image encoder;
- objectives: the rest of the forward pass (loss terms, projection heads, fusion);
- backward (all of it), optimizer (zero_grad, gradient clipping, AdamW, schedule).

``--torch-profiler`` also prints torch.profiler's operators by self CPU time (which shows
how the backward pass splits). The percentages, not the absolute times, are the point:
run it with one thread and few steps while the machine is busy.

    uv run python benchmarks/profile_step.py --config pixel [--graphs DIR] [--steps 3]
        [--threads 1] [--torch-profiler] [key=value ...]

``--config`` names a configuration of ``pretrain_throughput.py`` (``recipe``, ``frozen``,
``pixel``, ``pixel_channels_last``); without ``--graphs`` its graphs are built from DLPFC
151673 into ``--workdir``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pretrain_throughput as pt  # noqa: E402
from _common import markdown_table, set_threads  # noqa: E402

#: the order of the table
PARTS = (
    "tile sampler + masks",
    "extract_tile",
    "to device",
    "expression encoder",
    "image encoder",
    "localisation cells",
    "GNN (HeteroConv)",
    "objectives (loss terms, heads, fusion)",
    "backward",
    "optimizer (zero_grad, clip, AdamW, schedule)",
)


class StepTimer:
    """Nested wall-clock timers; each label gets its exclusive time."""

    def __init__(self, sync=None):
        self.totals: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []  # [label, start, time of children]
        self.sync = sync or (lambda: None)
        self.on = True

    def push(self, label: str) -> None:
        if self.on:
            self.sync()
            self.stack.append([label, time.perf_counter(), 0.0])

    def pop(self) -> None:
        if self.on:
            self.sync()
            label, start, child = self.stack.pop()
            elapsed = time.perf_counter() - start
            self.totals[label] += elapsed - child
            if self.stack:
                self.stack[-1][2] += elapsed

    def inside(self, label: str) -> bool:
        return any(f[0] == label for f in self.stack)

    def region(self, label: str):
        timer = self

        class _Region:
            def __enter__(self):
                timer.push(label)

            def __exit__(self, *exc):
                timer.pop()

        return _Region()

    def wrap(self, fn, label: str):
        def wrapped(*args, **kwargs):
            with self.region(label):
                return fn(*args, **kwargs)

        return wrapped

    def hook(self, module, label) -> None:
        """Time ``module``'s forward; ``label`` may be a function of the timer."""

        def pre(mod, args):
            self.push(label(self) if callable(label) else label)

        def post(mod, args, out):
            self.pop()

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


def instrument(trainer, timer: StepTimer) -> None:
    """Hooks on the trainer's model, sampler and objectives (forward-pass parts)."""
    m = trainer.model
    timer.hook(m.expr_encoder, "expression encoder")
    if m.image_encoder is not None:
        # inside localisation_logits the encoder runs on the parents' 3x3 cells
        timer.hook(
            m.image_encoder,
            lambda t: "localisation cells" if t.inside("localisation cells") else "image encoder",
        )
    for gnn in (m.gnn, getattr(m, "gnn_image", None)):
        if gnn is not None:
            timer.hook(gnn, "GNN (HeteroConv)")
    m.localisation_logits = timer.wrap(m.localisation_logits, "localisation cells")
    trainer.sampler.build = timer.wrap(trainer.sampler.build, "extract_tile")


def train_step(trainer, step: int, timer: StepTimer) -> int:
    """One training step as the trainer's loop runs it; returns the tile's core spots."""
    import torch

    from tissuegraph.graph import schema as S

    t, dev = trainer.cfg.train, trainer.device
    with timer.region("tile sampler + masks"):
        tile = trainer._tile(step)
    with timer.region("to device"):
        tile = tile.to(dev)
    with timer.region("objectives (loss terms, heads, fusion)"):
        with trainer._autocast():
            losses = trainer.module(tile)
    with timer.region("optimizer (zero_grad, clip, AdamW, schedule)"):
        trainer.optimizer.zero_grad(set_to_none=True)
    with timer.region("backward"):
        losses["loss"].backward()
    with timer.region("optimizer (zero_grad, clip, AdamW, schedule)"):
        if t.grad_clip and t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), t.grad_clip)
        trainer.optimizer.step()
        trainer.scheduler.step()
    return int(tile[S.SPOT]["core"].sum())


def profile(
    graphs: str | Path,
    overrides,
    *,
    steps: int,
    warmup: int,
    threads: int,
    device: str = "cpu",
    config=None,
    torch_profiler: bool = False,
) -> dict:
    """Run ``warmup + steps`` steps; returns ``{"parts": {label: s/step}, ...}``."""
    import torch

    from tissuegraph.config import load_config
    from tissuegraph.train.config import PretrainConfig
    from tissuegraph.train.loop import Trainer

    run_dir = Path(tempfile.mkdtemp(prefix="tg_profile_run_"))
    cfg = load_config(
        PretrainConfig,
        config or pt.PRETRAIN_CONFIG,
        [
            f"graphs={graphs}",
            f"run_dir={run_dir}",
            f"train.device={device}",
            f"train.threads={threads}",
            f"train.max_steps={warmup + steps}",
            "train.tensorboard=false",
            *overrides,
        ],
    )
    trainer = Trainer(cfg, progress=False)
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else None
    timer = StepTimer(sync)
    instrument(trainer, timer)
    trainer.model.train()
    timer.on = False
    for i in range(warmup):
        train_step(trainer, i, timer)
    timer.on = True
    prof = None
    if torch_profiler:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as tprofile

        acts = [ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if trainer.device.type == "cuda" else []
        )
        prof = tprofile(activities=acts)
        prof.__enter__()
    spots = 0
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        spots += train_step(trainer, i, timer)
    total = time.perf_counter() - t0
    if prof is not None:
        prof.__exit__(None, None, None)
    parts = {k: v / steps for k, v in timer.totals.items()}
    out = {
        "parts": parts,
        "step_s": total / steps,
        "steps": steps,
        "threads": threads,
        "device": str(trainer.device),
        "spots_per_step": spots / steps,
        "spots_per_s": spots / total,
    }
    if prof is not None:
        out["torch_profiler"] = prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=20
        )
    return out


def table(res: dict) -> tuple[list[str], list[list]]:
    """Rows ``[part, ms / step, % of the step]``; the last row is what no timer covered."""
    parts, step = res["parts"], res["step_s"]
    order = [p for p in PARTS if p in parts] + sorted(set(parts) - set(PARTS))
    rows = [[p, round(1000 * parts[p], 1), f"{100 * parts[p] / step:.1f}%"] for p in order]
    other = step - sum(parts.values())
    rows.append(["other (loop, untimed)", round(1000 * other, 1), f"{100 * other / step:.1f}%"])
    return ["part of the step", "ms / step", "% of the step"], rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="pixel", help="a pretrain_throughput.py configuration")
    ap.add_argument("--graphs", default=None, help="graphs folder (default: build DLPFC 151673)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--torch-profiler", action="store_true")
    ap.add_argument("overrides", nargs="*", help="pretrain key=value overrides")
    args = ap.parse_args(argv)
    set_threads(args.threads)

    kind, cfg_overrides, label = pt.CONFIGS[args.config]
    graphs = args.graphs
    if graphs is None:
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tg_profile_"))
        s = pt.Settings(threads=args.threads)
        graphs = pt.build_all(pt.dlpfc_spec(), workdir, s, [kind])[kind]["dir"]
    res = profile(
        graphs,
        [*cfg_overrides, *args.overrides],
        steps=args.steps,
        warmup=args.warmup,
        threads=args.threads,
        device=args.device,
        torch_profiler=args.torch_profiler,
    )
    cols, rows = table(res)
    print(
        f"\n{args.config} ({label}): {res['steps']} steps after {args.warmup} warm-up, "
        f"{res['threads']} thread(s), {res['device']}, {res['step_s']:.3f} s / step, "
        f"{res['spots_per_step']:.0f} spots per step ({res['spots_per_s']:.0f} spots/s)\n"
    )
    print(markdown_table(cols, rows))
    if "torch_profiler" in res:
        print("\n" + res["torch_profiler"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
