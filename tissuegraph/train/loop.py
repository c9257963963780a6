"""The pretraining loop: spatial tiles, AdamW + warm-up + cosine, AMP, DDP, checkpoints, logs.

Multi-GPU / multi-node: ``torchrun --nproc-per-node N -m tissuegraph pretrain --config FILE``
(``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` in the environment turn on DDP: NCCL on CUDA,
gloo on CPU; each rank draws different tiles; only rank 0 writes).

Long runs: SIGINT (Ctrl-C) or SIGTERM finishes the current step, writes
``checkpoints/last.pt`` and raises :class:`TrainingInterrupted`; ``resume=True`` continues
exactly. ``train.ckpt_every_min`` also checkpoints on a time interval. Under DDP the ranks
agree on both through the all-reduce every step already does, so they never diverge.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from tissuegraph import __version__
from tissuegraph._utils import bound_onednn_cache, cuda_available, release_heap, set_torch_threads
from tissuegraph._utils import resolve_device as _resolve_device
from tissuegraph.config import save_config, to_dict, with_defaults
from tissuegraph.errors import ConfigError, InputError, TissueGraphError
from tissuegraph.graph import schema as S
from tissuegraph.graph.schema import DataSpec
from tissuegraph.nn import checkpoint as K
from tissuegraph.nn.model import build_model, model_config
from tissuegraph.train.checkpoint import Checkpoint, load, rng_state, save_checkpoint, set_rng_state
from tissuegraph.train.config import PretrainConfig
from tissuegraph.train.evaluate import evaluate
from tissuegraph.train.objectives import MASKING_TERMS, TERMS, Objectives, apply_masks
from tissuegraph.train.sampler import SlideIndex, TileSampler

__all__ = [
    "pretrain",
    "Trainer",
    "TrainingInterrupted",
    "load_graph_dir",
    "read_graph_manifest",
    "resolve_device",
]

CKPT_DIR = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"
METRICS = "metrics.jsonl"
#: steps between two hand-backs of freed heap pages to the system (``_utils.release_heap``)
HEAP_RELEASE_EVERY = 25

_clock = time.monotonic  # the clock of time-based checkpoints (tests replace it)
log = logging.getLogger("tissuegraph.train")


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after writing a checkpoint it can be resumed from.

    Attributes: ``checkpoint`` (path), ``step`` (steps done and saved), ``signum``.
    """

    def __init__(self, checkpoint: Path, step: int, max_steps: int, signum: int):
        self.checkpoint, self.step, self.signum = Path(checkpoint), int(step), int(signum)
        super().__init__(
            f"pretrain interrupted ({_signame(signum)}) at step {step} of {max_steps}: "
            f"wrote {checkpoint}; continue with --resume"
        )


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class _StopOnSignal:
    """While active, SIGINT and SIGTERM only record that a stop was asked for; the loop
    checks :attr:`signum` once per step. A second Ctrl-C aborts at once, without saving."""

    def __init__(self, announce: bool):
        self.signum = 0
        self.announce = announce
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # signals are only delivered to the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except (ValueError, OSError):  # pragma: no cover - e.g. an embedded interpreter
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum:
            if signum == signal.SIGINT == self.signum:
                raise KeyboardInterrupt
            return
        self.signum = signum
        if self.announce:
            log.warning(
                "pretrain: %s: saving a checkpoint after this step "
                "(Ctrl-C again to stop without saving)",
                _signame(signum),
            )

    def __exit__(self, *exc) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous = {}


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``train.device``: ``auto`` -> ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``
    (:func:`tissuegraph._utils.resolve_device`); a CUDA device without CUDA is refused."""
    try:
        dev = _resolve_device(device, local_rank)
    except RuntimeError as exc:
        raise ConfigError(
            f"train.device={device!r} is not a device (auto, cpu, cuda, cuda:N)"
        ) from exc
    if dev.type == "cuda" and not cuda_available():
        raise ConfigError("train.device=cuda but CUDA is not available: use train.device=cpu")
    return dev


def read_graph_manifest(path: str | os.PathLike) -> dict:
    """The checked manifest of a ``build-graphs`` output folder (no graph is opened)."""
    from tissuegraph.graph.storage import read_manifest

    p = Path(path)
    if not p.is_dir():
        raise InputError(f"graphs={p} is not a folder: run tissuegraph build-graphs first")
    if not (p / S.MANIFEST).is_file():
        raise InputError(f"graphs={p} has no {S.MANIFEST}: point graphs= at a build-graphs out_dir")
    manifest = read_manifest(p)
    sv = manifest.get("schema_version")
    if sv != S.SCHEMA_VERSION:
        raise InputError(
            f"{p / S.MANIFEST}: schema_version {sv} but this tissuegraph reads "
            f"{S.SCHEMA_VERSION}: rebuild the graphs with this version"
        )
    if not manifest.get("slides"):
        raise InputError(f"{p / S.MANIFEST} lists no slides")
    return manifest


def load_graph_dir(path: str | os.PathLike) -> tuple[dict, list, list[str]]:
    """The manifest, the graphs and slide names of a ``build-graphs`` output folder."""
    from tissuegraph.graph.storage import load_graph

    p = Path(path)
    manifest = read_graph_manifest(p)
    graphs, names = [], []
    for s in manifest["slides"]:
        g = load_graph(p / s["file"])
        if S.SPOT not in g.node_types or S.X not in g[S.SPOT] or S.POS not in g[S.SPOT]:
            raise InputError(
                f"{p / s['file']}: no spot nodes with x and pos (see the graph schema)"
            )
        if int(g[S.SPOT][S.X].shape[1]) != len(manifest.get("genes", [])):
            raise InputError(
                f"{p / s['file']}: {g[S.SPOT][S.X].shape[1]} expression columns but the "
                f"manifest lists {len(manifest.get('genes', []))} genes"
            )
        graphs.append(g)
        names.append(s["name"])
    return manifest, graphs, names


def _as_config(cfg) -> DictConfig:
    return with_defaults(PretrainConfig, cfg, what="pretrain config")


def _validate(cfg: DictConfig) -> None:
    t, o = cfg.train, cfg.objectives
    if t.max_steps < 1:
        raise ConfigError("train.max_steps must be >= 1")
    if t.threads < 0:
        raise ConfigError("train.threads must be >= 0 (0: one share of the CPUs per local rank)")
    if t.ckpt_every_min < 0:
        raise ConfigError("train.ckpt_every_min must be >= 0 (0: no time-based checkpoints)")
    if t.batch_spots < 2:
        raise ConfigError("train.batch_spots must be >= 2")
    if t.max_cached_slides < 0:
        raise ConfigError("train.max_cached_slides must be >= 0 (0: all slides in memory)")
    if t.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"train.precision={t.precision!r} is not one of auto, bf16, fp32")
    if not 0.0 <= t.val_fraction < 1.0:
        raise ConfigError("train.val_fraction must be in [0, 1)")
    if not 0.0 <= o.mask_ratio < 1.0 or not 0.0 <= o.contrastive_fraction <= 1.0:
        raise ConfigError("objectives.mask_ratio must be in [0, 1), contrastive_fraction in [0, 1]")
    if all(float(getattr(o, k)) <= 0 for k in TERMS):
        raise ConfigError("all objective weights are 0: nothing to train")
    if o.temperature_min <= 0:
        raise ConfigError("objectives.temperature_min must be > 0")
    if o.local_global_hops < 1:
        raise ConfigError(
            f"objectives.local_global_hops={o.local_global_hops} must be >= 1 (1: adjacent spots)"
        )


def _clamp_warmup(cfg: DictConfig, warn: bool) -> None:
    """Warm-up longer than a fifth of the run leaves too little of the cosine decay: clamp it."""
    t = cfg.train
    if t.warmup_steps > t.max_steps / 5:
        cap = t.max_steps // 5
        if warn:
            log.warning(
                "train.warmup_steps=%d is more than a fifth of train.max_steps=%d: using %d",
                t.warmup_steps,
                t.max_steps,
                cap,
            )
        t.warmup_steps = cap


def _lr_lambda(warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        prog = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog))

    return f


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


class Trainer:
    """Sets everything up (validating input before anything is written); :meth:`fit` trains.

    Attributes: ``model`` (the bare model), ``sampler``, ``step``, ``run_dir``, ``rank``,
    ``world_size``, ``device``.
    """

    def __init__(self, cfg, *, resume: bool = False, progress: bool = True):
        cfg = _as_config(cfg)
        _validate(cfg)
        self.cfg, self.progress, self.resume = cfg, progress, resume
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_path = self.run_dir / CKPT_DIR / LAST
        self.metrics_path = self.run_dir / METRICS

        # distributed
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.distributed = self.world_size > 1
        _clamp_warmup(cfg, warn=self.rank == 0)
        self.threads = set_torch_threads(cfg.train.threads)
        bound_onednn_cache()
        self.device = resolve_device(cfg.train.device, self.local_rank)

        # input (nothing written yet): the manifest is the index; a folder of more than
        # train.max_cached_slides slides is opened on demand, a smaller one loaded whole
        self.manifest = read_graph_manifest(cfg.graphs)
        cap = int(cfg.train.max_cached_slides)
        self.lazy = 0 < cap < len(self.manifest["slides"])
        if self.lazy:
            from tissuegraph.train.dataset import SlideDataset, manifest_data_spec

            graphs = None
            self.dataset = SlideDataset(cfg.graphs, self.manifest, max_cached=cap)
            self.slide_names = self.dataset.names
            spec = manifest_data_spec(cfg.graphs, self.manifest)
        else:
            self.dataset = None
            self.manifest, graphs, self.slide_names = load_graph_dir(cfg.graphs)
            spec = DataSpec.merge([DataSpec.from_graph(g) for g in graphs], self.slide_names)
        std = self.manifest.get("standardize")  # fitted on the fit slides at build time
        spec = spec.with_standardization(std)
        self.build_info = {
            K.BUILD_CONFIG: self.manifest.get("build_config", {}),
            K.GENES: list(self.manifest.get("genes", [])),
            K.PATHWAYS: list(self.manifest.get("pathways", [])),
            K.SCHEMA_VERSION: self.manifest.get("schema_version"),
            K.CONFIG_HASH: self.manifest.get("config_hash"),
        }
        ckpt: Checkpoint | None = None
        if resume:
            ckpt = load(self.ckpt_path, model=False)
            self._check_resume(ckpt, spec)
        elif self.ckpt_path.exists():
            raise ConfigError(
                f"{self.ckpt_path} exists: pass --resume to continue it or choose another run_dir"
            )

        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        model_cfg = ckpt.model_cfg if ckpt else cfg.model
        self.model = build_model(
            None, model_cfg, spec.to_dict(), load_backbone_weights=ckpt is None
        )
        if std and ckpt is None:
            from tissuegraph.graph.standardize import standardization_tensors

            st = standardization_tensors(std)
            self.model.expr_encoder.set_standardization(st["mean"], st["sd"], st["basis"])
        self.objectives = Objectives(self.model, cfg.objectives)
        if not self.objectives.active():
            raise ConfigError(
                "no objective can be computed on these graphs (image terms need patches: "
                "set objectives.masked_expression > 0 or build graphs with patches)"
            )
        tiling = (cfg.train.batch_spots, self.model.n_layers)
        where = dict(
            seed=cfg.seed,
            rank=self.rank,
            world_size=self.world_size,
            val_fraction=cfg.train.val_fraction,
        )
        if self.lazy:
            from tissuegraph.train.dataset import LazyTileSampler

            self.indices = None
            self.sampler = LazyTileSampler(
                self.dataset,
                *tiling,
                **where,
                chunk_slides=cap,
                max_val_tiles=cfg.train.max_eval_tiles,
            )
        else:
            self.indices = [SlideIndex(g, n) for g, n in zip(graphs, self.slide_names)]
            self.sampler = TileSampler(self.indices, *tiling, **where)
        self.model.to(self.device)
        decay, no_decay = [], []
        for n, p in self.model.named_parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 and "emb" not in n else no_decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.train.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.train.lr,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            _lr_lambda(cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.min_lr_ratio),
        )
        self.step = 0
        self._rng_to_restore = None
        if ckpt is not None:
            raw = ckpt.raw
            self.model.load_state_dict(ckpt.state_dict)
            self.optimizer.load_state_dict(raw[K.OPTIMIZER])
            self.scheduler.load_state_dict(raw[K.SCHEDULER])
            same_world = ckpt.world_size == self.world_size
            samplers = raw.get(K.SAMPLERS) or []  # one per rank (lazy ranks differ)
            self.sampler.load_state_dict(
                samplers[self.rank] if same_world and self.rank < len(samplers) else raw[K.SAMPLER]
            )
            self.step = int(raw[K.STEP])
            rngs = raw.get(K.RNG) or []
            if rngs:
                self._rng_to_restore = (
                    rngs[self.rank] if same_world and self.rank < len(rngs) else rngs[0]
                )
        enc = self.model.expr_encoder
        if enc.standardize and enc.n_pcs:
            # the standardised input (n_pcs wide) is fixed: compute it once per slide (on a
            # lazy dataset: when the slide is opened)
            if self.lazy:
                self.dataset.on_load.insert(0, lambda ix, s: self._standardize(ix.data))
            else:
                for g in graphs:
                    self._standardize(g)
        self.precision = cfg.train.precision
        if self.precision == "auto":
            self.precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.module: torch.nn.Module = self.objectives
        if cfg.train.compile:
            self.module = torch.compile(self.objectives, dynamic=True)

    # ------------------------------------------------------------------ helpers
    @torch.no_grad()
    def _standardize(self, g) -> None:
        """``spot.z``: the standardised expression the expression encoder starts from."""
        enc = self.model.expr_encoder
        x = g[S.SPOT][S.X]
        parts = []
        for a in range(0, x.shape[0], 65536):  # bounded memory on huge slides
            xa = (
                x[a : a + 65536]
                if not x.is_sparse
                else x.index_select(0, torch.arange(a, min(a + 65536, x.shape[0]))).to_dense()
            )
            parts.append(enc.standardized(xa.to(self.device)).cpu())
        g[S.SPOT][S.Z] = torch.cat(parts)

    def _check_resume(self, ckpt: Checkpoint, spec: DataSpec) -> None:
        where = str(self.ckpt_path)
        if ckpt.schema_version != self.build_info[K.SCHEMA_VERSION]:
            raise InputError(
                f"{where} was trained on schema_version {ckpt.schema_version}, graphs "
                f"have {self.build_info[K.SCHEMA_VERSION]}"
            )
        if ckpt.genes != self.build_info[K.GENES]:
            raise InputError(
                f"{where} was trained on a different gene panel ({len(ckpt.genes)} "
                f"genes) than graphs={self.cfg.graphs} ({len(self.build_info[K.GENES])}): "
                "resume on graphs built with the same panel"
            )
        ckpt.data_spec.check_fits(spec, what=f"graphs={self.cfg.graphs}")
        old = ckpt.config
        new = to_dict(self.cfg)
        for key in ("model", "objectives", "seed"):
            if not _same(old.get(key), new.get(key)):
                raise ConfigError(
                    f"cannot resume {where}: config field {key!r} differs from the checkpoint's"
                )
        for key in ("batch_spots", "val_fraction", "max_cached_slides"):
            if old.get("train", {}).get(key, new["train"][key]) != new["train"][key]:
                raise ConfigError(
                    f"cannot resume {where}: train.{key} differs from the checkpoint's "
                    f"({old.get('train', {}).get(key)})"
                )

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _tile(self, step: int):
        s, core = self.sampler.next_tile()
        tile = self.sampler.build(s, core, train=True)
        o = self.cfg.objectives
        g = torch.Generator().manual_seed(int(self.cfg.seed) * 1_000_003 + self.rank * 7_919 + step)
        tile = apply_masks(
            tile,
            mask_ratio=o.mask_ratio if any(o[t] > 0 for t in MASKING_TERMS) else 0.0,
            anchor_fraction=o.contrastive_fraction if o.contrastive > 0 else 0.0,
            generator=g,
            cut_identity=self.model.fusion == "middle",
        )
        return tile

    def _checkpoint(self, path: Path, states: tuple[list, list]) -> None:
        rngs, samplers = states
        obj = {
            K.MODEL: self.model.state_dict(),
            K.OPTIMIZER: self.optimizer.state_dict(),
            K.SCHEDULER: self.scheduler.state_dict(),
            K.STEP: self.step,
            K.RNG: rngs,
            K.SAMPLER: self.sampler.state_dict(),
            K.SAMPLERS: samplers,
            K.CONFIG: to_dict(self.cfg),
            K.MODEL_CONFIG: model_config(self.model),
            K.BUILD: self.build_info,
            K.VERSION: __version__,
            K.WORLD_SIZE: self.world_size,
        }
        save_checkpoint(obj, path)

    def _gather_states(self) -> tuple[list, list]:
        """Every rank's RNG and sampler states (for rank 0's checkpoint)."""
        st = (rng_state(), self.sampler.state_dict())
        if not self.distributed:
            return [st[0]], [st[1]]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, st)
        return [o[0] for o in out], [o[1] for o in out]

    # ------------------------------------------------------------------ fit
    def fit(self) -> Path:
        """Train to ``train.max_steps``; returns the path of ``checkpoints/last.pt``."""
        import torch.distributed as dist

        own_group = False
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            own_group = True
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        try:
            return self._fit(dist)
        finally:
            if own_group:
                dist.destroy_process_group()

    def _fit(self, dist) -> Path:
        cfg, t = self.cfg, self.cfg.train
        main = self.rank == 0
        module = self.module
        if self.distributed:
            module = torch.nn.parallel.DistributedDataParallel(
                self.module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        # seeds per rank (dropout); a resumed run restores the saved states instead
        torch.manual_seed(int(cfg.seed) + 1 + self.rank)
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore)
        metrics_path = self.metrics_path
        writer = None
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / S.RESOLVED_CONFIG)
            csv_path = self.run_dir / "metrics.csv"
            if self.resume:  # drop rows logged after the checkpoint (a stop after it)
                self._truncate_metrics(metrics_path, csv_path)
            else:
                metrics_path.unlink(missing_ok=True)
                csv_path.unlink(missing_ok=True)
            if t.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    writer = SummaryWriter(str(self.run_dir / "tensorboard"))
                except Exception:
                    writer = None
        bar = None
        if main and self.progress:
            from tissuegraph._utils import progress_bar

            bar = progress_bar(
                total=t.max_steps,
                initial=self.step,
                desc="pretrain",
                unit="step",
                dynamic_ncols=True,
            )
        self.model.train()
        n_spots, t0 = 0, time.perf_counter()
        last_eval: dict = {}
        every_s = float(t.ckpt_every_min) * 60.0
        last_ckpt = _clock()
        stop = _StopOnSignal(announce=main)
        try:
            stop.__enter__()
            while self.step < t.max_steps:
                tile = self._tile(self.step).to(self.device)
                with self._autocast():
                    losses = module(tile)
                bad = [k for k, v in losses.items() if not bool(torch.isfinite(v.detach()).all())]
                # one collective per step: a non-finite loss anywhere, a stop signal anywhere,
                # rank 0's clock saying a checkpoint is due; so every rank decides alike
                due = main and every_s > 0 and _clock() - last_ckpt >= every_s
                flag = torch.tensor(
                    [1.0 if bad else 0.0, float(stop.signum), 1.0 if due else 0.0],
                    device=self.device,
                )
                if self.distributed:
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                nonfinite, signum, due = (float(v) for v in flag.tolist())
                if nonfinite > 0:
                    name = bad[0] if bad else "on another rank"
                    raise TissueGraphError(
                        f"non-finite loss term {name!r} at step {self.step + 1} "
                        f"({ {k: float(v.detach()) for k, v in losses.items()} }): lower train.lr, raise "
                        "train.warmup_steps or use train.precision=fp32"
                    )
                self.optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
                if t.grad_clip and t.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                if self.step % HEAP_RELEASE_EVERY == 0:
                    release_heap()  # tiles of varying size fragment the heap
                n_spots += int(tile[S.SPOT]["core"].sum())
                at_end = self.step == t.max_steps
                row = None
                if self.step % max(1, t.log_every) == 0 or at_end:
                    dt = max(time.perf_counter() - t0, 1e-9)
                    row = {"step": self.step}
                    row.update({k: float(v.detach()) for k, v in losses.items()})
                    row["lr"] = self.optimizer.param_groups[0]["lr"]
                    row["spots_per_s"] = n_spots * self.world_size / dt
                    n_spots, t0 = 0, time.perf_counter()
                if (
                    t.eval_every
                    and (self.step % t.eval_every == 0 or at_end)
                    and main  # only rank 0 opens the held-out slides
                    and self.sampler.val_tiles
                ):
                    last_eval = evaluate(
                        self.model,
                        self.sampler,
                        cfg.objectives,
                        self.device,
                        max_tiles=t.max_eval_tiles,
                        autocast=self._autocast,
                    )
                    row = row or {"step": self.step}
                    row.update(last_eval)
                    self._keep_best(last_eval)
                    t0 = time.perf_counter()
                if row is not None and main:
                    with open(metrics_path, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
                    if t.csv:
                        self._csv(row)
                    if writer is not None:
                        for k, v in row.items():
                            if k != "step":
                                writer.add_scalar(k, v, self.step)
                if bar is not None:
                    bar.update(1)
                    if row is not None:
                        bar.set_postfix(
                            {
                                k: f"{row[k]:.3g}"
                                for k in ("loss", *TERMS, "spots_per_s")
                                if k in row
                            }
                        )
                # the step is complete: a stop saves it, so a resumed run repeats nothing
                interrupted = signum > 0 and not at_end
                every = bool(t.ckpt_every) and self.step % t.ckpt_every == 0
                if every or at_end or due > 0 or interrupted:
                    states = self._gather_states()
                    if main:
                        self._checkpoint(self.ckpt_path, states)
                        if t.keep_step_checkpoints and every and not at_end:
                            self._checkpoint(self.ckpt_path.parent / f"step_{self.step}.pt", states)
                    last_ckpt = _clock()
                if interrupted:
                    if self.distributed:
                        dist.barrier()  # rank 0 has written the checkpoint
                    raise TrainingInterrupted(self.ckpt_path, self.step, t.max_steps, int(signum))
        finally:
            stop.__exit__()
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        if self.distributed:
            dist.barrier()
        self.last_eval = last_eval
        if main and t.probe and self.model.image_encoder is not None:
            from tissuegraph.train.probe import attach_probe

            attach_probe(self)
        return self.ckpt_path

    def _keep_best(self, metrics: dict) -> None:
        """Write ``checkpoints/best.pt`` when ``train.keep_best`` improved (lower is better)."""
        key = self.cfg.train.keep_best
        if not key or key not in metrics:
            return
        value = float(metrics[key])
        if value < getattr(self, "best_value", math.inf):
            self.best_value, self.best_step = value, self.step
            # rank 0 alone (no collective): best.pt is for its weights, not for resuming
            self._checkpoint(
                self.ckpt_path.parent / BEST, ([rng_state()], [self.sampler.state_dict()])
            )

    def _truncate_metrics(self, jsonl: Path, csv: Path) -> None:
        from tissuegraph._utils import write_text_atomic

        if jsonl.exists():
            rows = [ln for ln in jsonl.read_text().splitlines() if ln.strip()]
            rows = [r for r in rows if json.loads(r).get("step", 0) <= self.step]
            write_text_atomic(jsonl, "".join(r + "\n" for r in rows))
        if csv.exists():
            lines = csv.read_text().splitlines()
            kept = lines[:1] + [ln for ln in lines[1:] if int(ln.split(",")[0]) <= self.step]
            write_text_atomic(csv, "".join(ln + "\n" for ln in kept))

    def _csv(self, row: dict) -> None:
        p = self.run_dir / "metrics.csv"
        keys = list(row)
        new = not p.exists()
        with open(p, "a") as fh:
            if new:
                fh.write(",".join(keys) + "\n")
            fh.write(",".join(str(row[k]) for k in keys) + "\n")


def pretrain(cfg, *, resume: bool = False, progress: bool = True) -> Path:
    """Self-supervised pretraining on the graphs of ``cfg.graphs``.

    Parameters
    ----------
    cfg
        A :class:`~tissuegraph.train.config.PretrainConfig` (dataclass, DictConfig or dict).
    resume
        Continue from ``run_dir/checkpoints/last.pt`` (exactly: model, optimiser, scheduler,
        sampler and RNG states).
    progress
        Show a tqdm bar (rank 0) with the run's ETA.

    Raises
    ------
    TrainingInterrupted
        On SIGINT (Ctrl-C) or SIGTERM, after finishing the current step and writing
        ``run_dir/checkpoints/last.pt``; ``resume=True`` continues from it.

    Returns
    -------
    Path of ``run_dir/checkpoints/last.pt``. Also written: ``run_dir/metrics.jsonl`` (one JSON
    object per logged step: ``step``, ``loss``, one field per term, ``lr``, ``spots_per_s``,
    ``val_*`` at evaluation steps) and ``run_dir/config.yaml``.
    """
    return Trainer(cfg, resume=resume, progress=progress).fit()
