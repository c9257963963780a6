"""Configuration of the heterogeneous GNN (structured OmegaConf dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ImageEncoderConfig", "ModelConfig", "FUSIONS", "CONVS", "AGGRS"]

FUSIONS = ("early", "middle", "late")
CONVS = ("sage", "graphconv", "gcn", "gatv2", "hgt")
AGGRS = ("sum", "mean", "max")


@dataclass
class ImageEncoderConfig:
    """The timm backbone that encodes ``img`` patches (shared by all scales).

    ``name`` is any ``timm.list_models()`` name or ``hf-hub:<org>/<repo>``.
    ``pretrained`` downloads the backbone's weights (needs network or a filled cache);
    ``checkpoint_path`` loads a local state dict instead (classifier keys are ignored).
    ``freeze`` keeps the backbone fixed (eval mode, no gradients). ``input_px`` resizes the
    stored crops (e.g. 224 for a ViT trained at that size); ``null`` keeps them as stored.
    ``channels_last``: run the backbone in ``torch.channels_last`` memory format (weights
    and input batch); whether it is faster depends on the backbone and the device (measure
    with ``benchmarks/pretrain_throughput.py --channels-last``); results agree up to rounding.
    Ignored when the graphs store ``feat`` (frozen features) instead of pixels: those go
    through a linear projection.
    """

    name: str = "resnet10t"
    pretrained: bool = False
    checkpoint_path: str | None = None
    freeze: bool = False
    input_px: int | None = None
    channels_last: bool = False


@dataclass
class ModelConfig:
    """The heterogeneous GNN.

    ``conv``: ``sage`` (GraphSAGE, mean aggregation, ignores edge weights), ``gcn``
    (symmetric-normalised GCN with self-loops on the spot graph, weighted by proximity;
    GraphSAGE on the other relations), ``graphconv``
    (weighted mean aggregation with the relation's edge weight), ``gatv2`` (attention with the
    edge weight as a 1-d edge feature), ``hgt`` (heterogeneous graph transformer, ignores edge
    weights). ``aggr`` combines the relations arriving at one node type (not used by ``hgt``).
    ``fusion``: ``early`` (image features concatenated to the spot input), ``middle`` (spot and
    patch nodes exchange messages), ``late`` (separate expression and image branches joined
    only in the final embedding). ``residual``: add each layer's input to its update; ``norm``: LayerNorm after each layer.
    ``use_genes``: pass messages through gene / pathway nodes (``False``: the spot graph and
    the patches only).
    ``out_dim``: width of the last layer's output, the embedding (``0``: ``hidden_dim``); a
    wide hidden layer and a narrow embedding, e.g. 256 -> 32. Only ``fusion=middle`` (or no
    patches) supports ``out_dim != hidden_dim``; the last layer has no residual then.
    ``final_activation``: apply the nonlinearity (GELU) to the last layer's output too
    (``False``: the embedding is the last convolution's linear output, as in GAE / STAGATE).
    ``edge_dropout``: fraction of the spot graph's edges dropped at random in each training
    pass (DropEdge; both passes of the local-global contrast share one draw); inference
    always uses every edge. 0: off.
    """

    name: str = "hetero_gnn"
    hidden_dim: int = 128
    n_layers: int = 2
    conv: str = "sage"
    heads: int = 2
    aggr: str = "sum"
    dropout: float = 0.1
    fusion: str = "middle"
    expr_hidden_dim: int = 256
    proj_dim: int = 128
    use_edge_weights: bool = True
    residual: bool = True
    norm: bool = True
    use_genes: bool = True
    out_dim: int = 0
    final_activation: bool = True
    edge_dropout: float = 0.0
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
