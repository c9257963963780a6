"""The tissuegraph model: encoders -> heterogeneous GNN -> fused / expression / image
embeddings, with the pretraining heads; a registry and self-describing save/load."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch_geometric.data import HeteroData

from tissuegraph._utils import atomic_path
from tissuegraph.config import with_defaults
from tissuegraph.errors import ConfigError
from tissuegraph.graph import schema as S
from tissuegraph.graph.schema import DataSpec, data_spec
from tissuegraph.nn import checkpoint as ckpt
from tissuegraph.nn.config import FUSIONS, ModelConfig
from tissuegraph.nn.encoders import ExpressionEncoder, FeatureEncoder, ImageEncoder
from tissuegraph.nn.gnn import EdgeType, HeteroGNN
from tissuegraph.nn.heads import (
    Bilinear,
    ExpressionDecoder,
    LocalisationHead,
    NeighbourDecoder,
    ProjectionHead,
)

__all__ = [
    "TissueGraphModel",
    "register_model",
    "build_model",
    "list_models",
    "model_config",
    "unwrap",
    "data_spec",
    "check_data_spec",
    "merge_data_specs",
    "edge_scalars",
    "save_model",
    "load_model",
    "resolve_model_config",
]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Class decorator: make a model buildable by ``build_model(name, cfg, data_spec)``.

    The class must accept ``(cfg: dict, data_spec: dict, *, load_backbone_weights: bool)``.
    """

    def deco(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a model named {name!r} is already registered")
        _REGISTRY[name] = cls
        cls.registry_name = name
        return cls

    return deco


def list_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return sorted(_REGISTRY)


def resolve_model_config(cfg: Any) -> dict:
    """``ModelConfig`` defaults <- ``cfg`` (dataclass, DictConfig or dict), validated, as dict."""
    merged = with_defaults(ModelConfig, cfg, what="model config")
    return OmegaConf.to_container(merged, resolve=True)  # type: ignore[return-value]


def build_model(
    name: str | None, cfg: Any, data_spec: dict, *, load_backbone_weights: bool = True
) -> nn.Module:
    """Build a registered model.

    Parameters
    ----------
    name
        Registry name (``None``: ``cfg.name``).
    cfg
        A :class:`~tissuegraph.nn.config.ModelConfig` (or dict / DictConfig with its fields).
    data_spec
        What the graphs provide (:func:`data_spec`).
    load_backbone_weights
        Load pretrained / ``checkpoint_path`` image-encoder weights (``False`` when the weights
        come from a tissuegraph checkpoint anyway).
    """
    c = resolve_model_config(cfg)
    name = name or c["name"]
    if name not in _REGISTRY:
        raise ConfigError(
            f"model.name={name!r} is not a registered model (known: {', '.join(list_models())})"
        )
    c["name"] = name
    return _REGISTRY[name](c, dict(data_spec), load_backbone_weights=load_backbone_weights)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel and / or ``torch.compile`` wrapper."""
    m = getattr(model, "module", model)
    return getattr(m, "_orig_mod", m)


def model_config(model: nn.Module) -> dict:
    """``{"name", "cfg", "data_spec"}``: everything needed to rebuild ``model``."""
    m = unwrap(model)
    return {
        ckpt.MC_NAME: m.registry_name,
        ckpt.MC_CFG: dict(m.cfg),
        ckpt.MC_DATA_SPEC: dict(m.data_spec),
    }


# ----------------------------------------------------------------------------- data spec
def merge_data_specs(specs: list[dict], names: list[str] | None = None) -> dict:
    """One spec for several slides: panel and patch input must agree; edge types are joined
    (:meth:`~tissuegraph.graph.schema.DataSpec.merge`)."""
    return DataSpec.merge(specs, names).to_dict()


def check_data_spec(model_spec: dict, spec: dict, *, what: str = "graph") -> None:
    """Raise a one-line :class:`InputError` when ``spec`` (a graph) does not fit the model
    (:meth:`~tissuegraph.graph.schema.DataSpec.check_fits`)."""
    DataSpec.from_dict(model_spec).check_fits(spec, what=what)


def edge_scalars(data: HeteroData) -> dict[EdgeType, Tensor]:
    """One scalar per edge for every relation (the edge weight used by the convolutions).

    - ``(spot, near, spot)``: proximity ``d_0 / d`` (1 for the nearest ring, 1/2 for the second),
      with ``d_0`` the slide's median neighbour distance (``data.near_scale``) or the tile's;
    - relations with ``edge_weight`` (expresses, regulates (signed), member_of): that weight;
    - others (of, in, binds and their reverses): 1.
    """
    out = {}
    for et in data.edge_types:
        store = data[et]
        n = store.edge_index.shape[1]
        dev = store.edge_index.device
        if et == S.SPOT_NEAR_SPOT and S.EDGE_ATTR in store:
            d = store[S.EDGE_ATTR].view(-1).float()
            scale = getattr(data, "near_scale", None)
            if scale is None:
                scale = float(d.median()) if d.numel() else 1.0
            out[et] = (float(scale) / d.clamp_min(1e-3)).clamp(max=4.0)
        elif S.EDGE_WEIGHT in store:
            out[et] = store[S.EDGE_WEIGHT].view(-1).float()
        else:
            out[et] = torch.ones(n, device=dev)
    return out


# ----------------------------------------------------------------------------- the model
def _fuse(dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.LayerNorm(dim))


@register_model("hetero_gnn")
class TissueGraphModel(nn.Module):
    r"""Encoders, heterogeneous GNN and pretraining heads.

    Node inputs: ``spot.x`` ``[N, G]`` (+ optional bool ``spot.x_mask`` ``[N]``: expression
    hidden), ``patch_k.img`` uint8 ``[M_k, 3, S, S]`` or ``patch_k.feat`` ``[M_k, D]``,
    ``gene.index`` ``[G]``, ``pathway.index`` ``[P]``; the schema's edge types.
    Row ``i`` of ``patch_0`` belongs to spot ``i``.

    ``forward(data)`` returns a dict:

    - ``enc``: {node type: ``[n, D]``} encoder outputs (before message passing);
    - ``h``: {node type: ``[n, D]``} embeddings after message passing;
    - ``expr``: ``[N, D]`` expression-side spot embedding;
    - ``image``: ``[N, D]`` image-side spot embedding (its ``patch_0``) or ``None``;
    - ``fused``: ``[N, D]`` the spot embedding used for analysis.

    Fusion: ``middle`` — spots and patches are separate node types exchanging messages;
    ``expr = h[spot]``, ``image = h[patch_0]``, ``fused = MLP([expr, image])``.
    ``late`` — an expression branch (spot/gene/pathway relations) and an image branch (patch
    relations) with separate GNNs; same read-out. ``early`` — ``patch_0`` features are
    concatenated to the spot input and ``patch_0`` is not a node; ``fused = h[spot]``, and the
    modality-specific embeddings are the encoder outputs.
    """

    registry_name = "hetero_gnn"

    def __init__(self, cfg: dict, data_spec: dict, *, load_backbone_weights: bool = True):
        super().__init__()
        self.cfg = resolve_model_config(cfg)
        self.data_spec = dict(data_spec)
        c, spec = self.cfg, self.data_spec
        if c["fusion"] not in FUSIONS:
            raise ConfigError(f"model.fusion={c['fusion']!r} is not one of {', '.join(FUSIONS)}")
        if c["n_layers"] < 1 or c["hidden_dim"] < 1:
            raise ConfigError("model.n_layers and model.hidden_dim must be >= 1")
        if c["out_dim"] < 0:
            raise ConfigError("model.out_dim must be >= 0 (0: model.hidden_dim)")
        if not 0.0 <= float(c["edge_dropout"]) < 1.0:
            raise ConfigError(f"model.edge_dropout={c['edge_dropout']} must be in [0, 1)")
        d = c["hidden_dim"]
        e = c["out_dim"] or d  # the embedding: the last layer's output
        self.dim = e
        self.fusion = c["fusion"]
        self.n_genes = spec["n_genes"]
        self.n_scales = spec["n_scales"] if spec["patch_input"] else 0
        self.patch_types = [S.patch(k) for k in range(self.n_scales)]
        self.has_pathways = spec["n_pathways"] > 0
        edge_types = [tuple(e) for e in spec["edge_types"]]

        # encoders (standardisation buffers when the graphs carry fitted statistics)
        self.expr_encoder = ExpressionEncoder(
            self.n_genes,
            c["expr_hidden_dim"],
            d,
            c["dropout"],
            standardize=bool(spec.get("std_scale", False)),
            n_pcs=int(spec.get("std_pcs", 0) or 0),
            clip=float(spec.get("std_clip", 10.0) or 10.0),
        )
        self.gene_emb = nn.Embedding(max(1, self.n_genes), d)
        self.pathway_emb = (
            nn.Embedding(max(1, spec["n_pathways"]), d) if self.has_pathways else None
        )
        self.image_encoder: nn.Module | None = None
        ie = c["image_encoder"]
        if spec["patch_input"] == "img":
            self.image_encoder = ImageEncoder(
                ie["name"],
                d,
                self.n_scales,
                pretrained=bool(ie["pretrained"]) and load_backbone_weights,
                checkpoint_path=ie["checkpoint_path"] if load_backbone_weights else None,
                freeze=ie["freeze"],
                input_px=ie["input_px"],
                channels_last=bool(ie.get("channels_last", False)),
            )
        elif spec["patch_input"] == "feat":
            self.image_encoder = FeatureEncoder(spec["feat_dim"], d, self.n_scales)
        nn.init.normal_(self.gene_emb.weight, std=0.1)
        if self.pathway_emb is not None:
            nn.init.normal_(self.pathway_emb.weight, std=0.1)

        gnn_kw = dict(
            conv=c["conv"],
            heads=c["heads"],
            aggr=c["aggr"],
            dropout=c["dropout"],
            use_edge_weights=c["use_edge_weights"],
            residual=c["residual"],
            norm=c["norm"],
            out_dim=e,
            final_activation=c["final_activation"],
        )
        molecular = [S.SPOT]
        if c["use_genes"]:
            molecular += [S.GENE] + ([S.PATHWAY] if self.has_pathways else [])
        has_img = self.image_encoder is not None
        if e != d and has_img and self.fusion != "middle":
            raise ConfigError(
                f"model.out_dim={e} differs from model.hidden_dim={d}: only fusion=middle "
                f"supports that with patches (fusion={self.fusion!r}); set out_dim: 0"
            )
        self.gnn_image: HeteroGNN | None = None
        self.early_input = None
        self.fuse = None
        if self.fusion == "late" and has_img:
            e_expr = [et for et in edge_types if et[0] in molecular and et[2] in molecular]
            e_img = [et for et in edge_types if S.is_patch(et[0]) and S.is_patch(et[2])]
            self.gnn = HeteroGNN(molecular, e_expr, d, c["n_layers"], **gnn_kw)
            if e_img:
                self.gnn_image = HeteroGNN(self.patch_types, e_img, d, c["n_layers"], **gnn_kw)
            self.fuse = _fuse(e)
        elif self.fusion == "early" and has_img:
            nodes = molecular + self.patch_types[1:]
            ets = sorted({self._early_edge(et) for et in edge_types} - {None})
            ets = [et for et in ets if et[0] in nodes and et[2] in nodes]
            self.gnn = HeteroGNN(nodes, ets, d, c["n_layers"], **gnn_kw)
            self.early_input = nn.Sequential(nn.Linear(2 * d, d), nn.LayerNorm(d))
        else:
            nodes = molecular + self.patch_types
            ets = [et for et in edge_types if et[0] in nodes and et[2] in nodes]
            self.gnn = HeteroGNN(nodes, ets, d, c["n_layers"], **gnn_kw)
            if has_img:
                self.fuse = _fuse(e)

        # heads (on the embedding width e, or on encoder outputs of width d)
        p = c["proj_dim"]
        self.proj_expr = ProjectionHead(e, p)
        self.proj_image = ProjectionHead(e, p)
        self.proj_child = ProjectionHead(d, p)  # patch encoder outputs (width d)
        self.proj_parent = ProjectionHead(d, p)
        self.loc_head = LocalisationHead(e, S.N_LOC)
        self.proj_cell = ProjectionHead(d, p)
        self.decoder = ExpressionDecoder(e, self.n_genes)
        # spatial-domain heads: DGI discriminator, masked-feature and reconstruction decoders
        # (targets: the standardised input z of the expression encoder)
        z_dim = self.expr_encoder.input_dim
        self.discriminator = Bilinear(e, e, 1)
        self.feature_decoder = NeighbourDecoder(e, z_dim)
        self.recon_head = nn.Linear(e, z_dim)
        init = math.log(1 / 0.07)
        self.logit_scale = nn.Parameter(torch.tensor(init))
        self.logit_scale_region = nn.Parameter(torch.tensor(init))
        self.logit_scale_loc = nn.Parameter(torch.tensor(math.log(1 / 0.1)))

    # -- helpers
    @staticmethod
    def _early_edge(et: EdgeType) -> EdgeType | None:
        p0 = S.patch(0)
        if et in (S.PATCH0_OF_SPOT, S.SPOT_REV_OF_PATCH0):
            return None
        return tuple(S.SPOT if t == p0 else t for t in et)  # type: ignore[return-value]

    @property
    def n_layers(self) -> int:
        return int(self.cfg["n_layers"])

    def encode_nodes(self, data: HeteroData) -> dict[str, Tensor]:
        """Encoder outputs (before message passing) for every node type in ``data``.

        ``spot.z`` (optional): the standardised input, precomputed with this model's
        statistics (the trainer attaches it once per slide), used instead of ``spot.x``."""
        spot = data[S.SPOT]
        mask = spot.get("x_mask", None)
        enc = {S.SPOT: self.expr_encoder(spot[S.X], mask, z=spot.get(S.Z, None))}
        dev = enc[S.SPOT].device
        gidx = (
            data[S.GENE][S.INDEX]
            if S.GENE in data.node_types
            else torch.arange(self.n_genes, device=dev)
        )
        enc[S.GENE] = self.gene_emb(gidx)
        if self.has_pathways and S.PATHWAY in data.node_types:
            enc[S.PATHWAY] = self.pathway_emb(data[S.PATHWAY][S.INDEX])
        if self.image_encoder is not None:
            types = [t for t in self.patch_types if t in data.node_types]
            attr = S.IMG if self.data_spec["patch_input"] == "img" else S.FEAT
            xs = [data[t][attr] for t in types]
            sizes = [x.shape[0] for x in xs]
            scale = torch.cat(
                [
                    torch.full((n,), S.patch_level(t), dtype=torch.long, device=dev)
                    for t, n in zip(types, sizes)
                ]
            )
            z = self.image_encoder(torch.cat(xs, 0), scale)
            for t, part in zip(types, torch.split(z, sizes)):
                enc[t] = part
        return enc

    def spot_edge_keep(self, data: HeteroData) -> Tensor | None:
        """A random keep-mask over the spot graph's edges (``model.edge_dropout``, training
        only; ``None``: keep all). Drawn from the global RNG, as dropout is."""
        p = float(self.cfg["edge_dropout"])  # resolved config: the default is filled in
        if not self.training or p <= 0 or S.SPOT_NEAR_SPOT not in data.edge_types:
            return None
        ei = data[S.SPOT_NEAR_SPOT].edge_index
        return (torch.rand(ei.shape[1]) >= p).to(ei.device)

    def forward(
        self,
        data: HeteroData,
        perm: Tensor | None = None,
        enc: dict | None = None,
        edge_keep: Tensor | None = None,
    ) -> dict[str, Any]:
        """Embeddings of ``data``.

        ``perm`` ``[N]`` (optional): spot ``i`` gets the expression of spot ``perm[i]`` (its
        encoding and its ``expresses`` edges move together; the graph and the image stay): the
        feature-shuffle corruption of the local-global objective. ``enc``: encoder outputs of
        an earlier pass over the same ``data`` to reuse. ``edge_keep`` ``[E]`` bool
        (optional): the spot-graph edges to pass messages along (:meth:`spot_edge_keep`)."""
        enc = dict(enc) if enc is not None else self.encode_nodes(data)
        eidx = dict(data.edge_index_dict)
        if perm is not None:
            enc[S.SPOT] = enc[S.SPOT][perm]
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(perm.numel(), device=perm.device)
            for et in (S.SPOT_EXPRESSES_GENE, S.GENE_REV_EXPRESSES_SPOT):
                if et in eidx:
                    side = 0 if et[0] == S.SPOT else 1
                    ei = eidx[et].clone()
                    ei[side] = inv[ei[side]]
                    eidx[et] = ei
        esc = edge_scalars(data) if self.cfg["use_edge_weights"] else None
        if edge_keep is not None and S.SPOT_NEAR_SPOT in eidx:
            eidx[S.SPOT_NEAR_SPOT] = eidx[S.SPOT_NEAR_SPOT][:, edge_keep]
            if esc is not None and S.SPOT_NEAR_SPOT in esc:
                esc[S.SPOT_NEAR_SPOT] = esc[S.SPOT_NEAR_SPOT][edge_keep]
        image = None
        if self.fusion == "early" and self.early_input is not None:
            h_in = dict(enc)
            h_in[S.SPOT] = self.early_input(torch.cat([enc[S.SPOT], enc[S.patch(0)]], -1))
            h_in.pop(S.patch(0))
            e2, s2 = {}, {}
            for et, ei in eidx.items():
                new = self._early_edge(et)
                if new is not None:
                    e2[new] = ei
                    if esc is not None:
                        s2[new] = esc[et]
            h = self.gnn(h_in, e2, s2 if esc is not None else None)
            h[S.patch(0)] = h[S.SPOT]
            expr, image, fused = enc[S.SPOT], enc[S.patch(0)], h[S.SPOT]
        else:
            h = self.gnn(enc, eidx, esc)
            if self.gnn_image is not None:
                h.update(self.gnn_image(enc, eidx, esc))
            elif self.fusion == "late":
                h.update({t: enc[t] for t in self.patch_types if t in enc})
            expr = h[S.SPOT]
            if self.fuse is not None and S.patch(0) in h:
                image = h[S.patch(0)]
                fused = self.fuse(torch.cat([expr, image], -1))
            else:
                fused = expr
        return {"enc": enc, "h": h, "expr": expr, "image": image, "fused": fused}

    def localisation_logits(
        self, data: HeteroData, out: dict, k: int, edge_index: Tensor
    ) -> Tensor:
        """9-way logits of each child ``patch_k`` cell inside its parent ``patch_k+1``.

        With pixel crops, the parent's image is cut into its 3x3 grid of cells (row-major,
        rows along +y), each cell is encoded by the shared image encoder at scale ``k``, and
        the child's encoding is scored against the nine cell encodings (cosine similarity /
        temperature): the task becomes "which part of the region is this patch", which a
        pooled parent vector cannot answer. With stored features (no pixels), the
        :class:`LocalisationHead` on the message-passed child and parent embeddings is used.

        Shapes: ``edge_index`` ``[2, E]`` (child, parent) -> logits ``[E, 9]``.
        """
        child_t, parent_t = S.patch(k), S.patch(k + 1)
        if not isinstance(self.image_encoder, ImageEncoder) or S.IMG not in data[parent_t]:
            return self.loc_head(
                out["h"][child_t][edge_index[0]], out["h"][parent_t][edge_index[1]]
            )
        parents, inv = torch.unique(edge_index[1], return_inverse=True)
        img = data[parent_t][S.IMG][parents].float()  # [U, 3, s, s]
        u, c, s = img.shape[0], img.shape[1], img.shape[-1]
        big = nn.functional.interpolate(
            img, size=(3 * s, 3 * s), mode="bilinear", align_corners=False
        )
        cells = big.reshape(u, c, 3, s, 3, s).permute(0, 2, 4, 1, 3, 5).reshape(u * 9, c, s, s)
        scale = torch.full((u * 9,), k, dtype=torch.long, device=img.device)
        zc = nn.functional.normalize(self.proj_cell(self.image_encoder(cells, scale)), dim=-1)
        zc = zc.reshape(u, 9, -1)[inv]  # [E, 9, p]
        za = nn.functional.normalize(self.proj_cell(out["enc"][child_t][edge_index[0]]), dim=-1)
        scale_loc = self.logit_scale_loc.clamp(max=math.log(100.0)).exp()
        return scale_loc * torch.einsum("ep,enp->en", za, zc)

    def predict_expression(self, fused: Tensor) -> Tensor:
        """Decoded normalised expression ``[N, G]`` from fused embeddings ``[N, D]``."""
        return self.decoder(fused)

    def temperature(self, region: bool = False, min_temperature: float = 0.01) -> Tensor:
        """Current contrastive temperature ``1 / exp(logit_scale)`` (clamped)."""
        ls = self.logit_scale_region if region else self.logit_scale
        return 1.0 / ls.clamp(max=math.log(1 / min_temperature)).exp()


# ----------------------------------------------------------------------------- save/load
def read_checkpoint(path: str | os.PathLike) -> dict:
    """The raw dict of a model file or training checkpoint
    (:func:`tissuegraph.nn.checkpoint.read`)."""
    return ckpt.read(path)


def save_model(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a model file (:func:`tissuegraph.nn.checkpoint.model_file`, atomically);
    :func:`load_model` rebuilds it."""
    m = unwrap(model)
    obj = ckpt.model_file(model_config(m), m.state_dict())
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def load_model(path_or_obj, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model from a file written by :func:`save_model` or a training checkpoint
    (a path or the dict read from one).

    Read with ``torch.load(weights_only=True)``; the image backbone is created without
    downloading weights (they are in the file). Returns the model in eval mode.
    """
    if isinstance(path_or_obj, dict):
        return ckpt.rebuild(path_or_obj, device)
    return ckpt.load(path_or_obj, device).model
