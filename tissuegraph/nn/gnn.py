"""The heterogeneous message-passing stack.

Each layer applies one convolution per relation and sums (or averages) the messages that
arrive at a node type (``torch_geometric.nn.HeteroConv``), or one ``HGTConv``; then a residual
connection, LayerNorm and dropout per node type:

.. math::
    h_v^{(l+1)} = \\mathrm{LN}_{t(v)}\\Big(h_v^{(l)} + \\mathrm{Dropout}\\big(\\mathrm{GELU}
    \\big(\\textstyle\\bigoplus_{r \\in R(t(v))} \\mathrm{conv}_r^{(l)}(h^{(l)}, E_r)_v\\big)\\big)\\Big)

All convolutions run on plain PyTorch (no pyg-lib / torch-sparse / torch-scatter needed).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn
from torch_geometric.nn import GATv2Conv, GCNConv, GraphConv, HeteroConv, HGTConv, SAGEConv
from torch_geometric.nn.conv.gcn_conv import gcn_norm

from tissuegraph.errors import ConfigError
from tissuegraph.graph import schema as S
from tissuegraph.nn.config import AGGRS, CONVS

__all__ = ["HeteroGNN", "EdgeType"]

EdgeType = tuple[str, str, str]


def _relation_conv(
    kind: str,
    dim: int,
    heads: int,
    use_edge_weights: bool,
    homogeneous: bool = False,
    out: int | None = None,
) -> nn.Module:
    out = dim if out is None else out
    if kind == "gcn":
        # symmetric-normalised propagation with self-loops on the spot graph (non-negative
        # proximity weights); GraphSAGE mean aggregation on every other relation
        if homogeneous:
            # normalised once per graph by HeteroGNN (self-loops, D^-1/2 A D^-1/2), not per call
            return GCNConv(dim, out, add_self_loops=False, normalize=False)
        return SAGEConv((dim, dim), out, aggr="mean")
    if kind == "sage":
        return SAGEConv((dim, dim), out, aggr="mean")
    if kind == "graphconv":
        return GraphConv((dim, dim), out, aggr="mean")
    if kind == "gatv2":
        if out % heads:
            raise ConfigError(f"model width {out} must be divisible by model.heads={heads}")
        return GATv2Conv(
            (dim, dim),
            out // heads,
            heads=heads,
            edge_dim=1 if use_edge_weights else None,
            # on the spot graph a spot attends to itself too (GAT's self-loops; the loop's
            # edge feature is the mean of its edges'), else without a residual it would
            # lose its own features
            add_self_loops=homogeneous,
            fill_value="mean",
        )
    raise ConfigError(f"model.conv={kind!r} is not one of {', '.join(CONVS)}")


class HeteroGNN(nn.Module):
    """A stack of heterogeneous graph convolutions with residuals and LayerNorm.

    Parameters
    ----------
    node_types
        Node types whose features enter ``forward``.
    edge_types
        Relations ``(src, rel, dst)`` between them.
    hidden_dim
        Width of every node embedding.
    n_layers
        Number of message-passing layers (the spatial-tile halo must have as many hops).
    conv
        ``sage``, ``graphconv``, ``gcn`` (GCN on the spot graph, SAGE on other relations),
        ``gatv2`` or ``hgt``.
    heads
        Attention heads for ``gatv2`` / ``hgt``.
    aggr
        How messages of different relations to one node type are combined (HeteroConv).
    dropout
        Dropout on the layer update.
    use_edge_weights
        Give the per-edge scalar of each relation to ``graphconv`` / ``gcn`` (as edge weight)
        and ``gatv2`` (as a 1-d edge feature).
    residual
        Add the layer's input to its update (``False``: plain stacking, as GCN / STAGATE).
    norm
        LayerNorm after each layer (``False``: none).
    out_dim
        Width of the last layer's output (``None``: ``hidden_dim``); when it differs, the
        last layer has no residual.
    final_activation
        Apply the nonlinearity to the last layer's update too (``False``: linear output).

    Forward: ``h_dict`` {type: ``[N_t, hidden_dim]``}, ``edge_index_dict`` {edge type:
    ``[2, E]``}, ``edge_scalar_dict`` {edge type: ``[E]``} (optional) -> updated ``h_dict``.
    """

    def __init__(
        self,
        node_types: list[str],
        edge_types: list[EdgeType],
        hidden_dim: int,
        n_layers: int,
        *,
        conv: str = "sage",
        heads: int = 2,
        aggr: str = "sum",
        dropout: float = 0.1,
        use_edge_weights: bool = True,
        residual: bool = True,
        norm: bool = True,
        out_dim: int | None = None,
        final_activation: bool = True,
    ):
        super().__init__()
        if conv not in CONVS:
            raise ConfigError(f"model.conv={conv!r} is not one of {', '.join(CONVS)}")
        if aggr not in AGGRS:
            raise ConfigError(f"model.aggr={aggr!r} is not one of {', '.join(AGGRS)}")
        self.node_types = list(node_types)
        self.edge_types = [tuple(e) for e in edge_types]
        self.conv_kind = conv
        self.use_edge_weights = use_edge_weights and conv in ("graphconv", "gatv2", "gcn")
        self.residual = bool(residual)
        self.out_dim = int(out_dim or hidden_dim)
        self.final_activation = bool(final_activation)
        self.layers = nn.ModuleList()
        self.norms = nn.ModuleList()
        for i in range(n_layers):
            width = self.out_dim if i == n_layers - 1 else hidden_dim
            if conv == "hgt":
                if width % heads:
                    raise ConfigError(
                        f"model width {width} must be divisible by model.heads={heads}"
                    )
                layer = HGTConv(hidden_dim, width, (self.node_types, self.edge_types), heads)
            else:
                layer = HeteroConv(
                    {
                        et: _relation_conv(
                            conv,
                            hidden_dim,
                            heads,
                            use_edge_weights,
                            et == S.SPOT_NEAR_SPOT,
                            out=width,
                        )
                        for et in self.edge_types
                    },
                    aggr=aggr,
                )
            self.layers.append(layer)
            self.norms.append(
                nn.ModuleDict(
                    {t: nn.LayerNorm(width) if norm else nn.Identity() for t in node_types}
                )
            )
        self.dropout = nn.Dropout(dropout)
        self.act = nn.GELU()
        self._gcn_cache: tuple | None = None

    def _gcn_normalized(self, ei: Tensor, w: Tensor | None, n: int) -> tuple[Tensor, Tensor]:
        """The spot graph with self-loops and symmetric normalisation (``gcn_norm``).

        Computed once per graph: every layer and pass of a step, and every step that trains
        on the same tile (a one-tile slide), reuse it. The cache holds a weak reference to
        the edge index with its version counter, and the edge weights by value, so a new or
        modified graph is normalised anew.
        """
        key = (n, ei.device, ei._version)
        c = self._gcn_cache
        if c is not None and c[0] == key and c[1]() is ei:
            kept = c[2]
            if (kept is None) == (w is None) and (w is None or torch.equal(kept, w)):
                return c[3]
        out = gcn_norm(ei, w, n, improved=False, add_self_loops=True, dtype=torch.float32)
        self._gcn_cache = (key, weakref.ref(ei), None if w is None else w.detach().clone(), out)
        return out

    def __getstate__(self):
        # the cache (a weak reference, derived tensors) is not model state: pickling a
        # module (torch.save(model), spawned workers) starts without it
        state = super().__getstate__()
        state["_gcn_cache"] = None
        return state

    def reset_parameters(self) -> None:
        for layer in self.layers:
            layer.reset_parameters()
        for norms in self.norms:
            for n in norms.values():
                if hasattr(n, "reset_parameters"):
                    n.reset_parameters()

    def forward(
        self,
        h_dict: dict[str, Tensor],
        edge_index_dict: dict[EdgeType, Tensor],
        edge_scalar_dict: dict[EdgeType, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        eidx = {et: ei for et, ei in edge_index_dict.items() if et in self.edge_types}
        h = {t: v for t, v in h_dict.items() if t in self.node_types}
        kwargs = {}
        if self.use_edge_weights and edge_scalar_dict is not None:
            sc = {et: edge_scalar_dict[et] for et in eidx if et in edge_scalar_dict}
            if self.conv_kind == "gcn":  # GCN takes weights; its SAGE relations do not
                kwargs["edge_weight_dict"] = {
                    et: v for et, v in sc.items() if et == S.SPOT_NEAR_SPOT
                }
            elif self.conv_kind == "graphconv":
                kwargs["edge_weight_dict"] = sc
            else:
                kwargs["edge_attr_dict"] = {et: s.view(-1, 1) for et, s in sc.items()}
        if self.conv_kind == "gcn" and S.SPOT_NEAR_SPOT in eidx and S.SPOT in h:
            weights = dict(kwargs.get("edge_weight_dict", {}))
            ei_n, weights[S.SPOT_NEAR_SPOT] = self._gcn_normalized(
                eidx[S.SPOT_NEAR_SPOT], weights.get(S.SPOT_NEAR_SPOT), h[S.SPOT].shape[0]
            )
            eidx = {**eidx, S.SPOT_NEAR_SPOT: ei_n}
            kwargs["edge_weight_dict"] = weights
        last = len(self.layers) - 1
        for i, (layer, norms) in enumerate(zip(self.layers, self.norms)):
            if self.conv_kind == "hgt":
                out = layer(h, eidx)
            else:
                out = layer(h, eidx, **kwargs)
            new = {}
            for t, x in h.items():
                m = out.get(t)
                if m is None:
                    new[t] = x
                    continue
                m = m.to(x.dtype)
                upd = self.dropout(self.act(m) if i < last or self.final_activation else m)
                skip = self.residual and upd.shape[-1] == x.shape[-1]
                new[t] = norms[t](x + upd if skip else upd)
            h = new
        return h
