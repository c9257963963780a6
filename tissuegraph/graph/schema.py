"""The graph schema: the contract between ``build-graphs`` and ``pretrain``.

Every node type, edge type and attribute name used by tissuegraph is defined here, once.
Other modules import these constants instead of writing string literals.

Node types
----------
``spot``
    ``x``        float16 ``[N, G]``  normalised expression of the gene panel
    ``pos``      float32 ``[N, 2]``  spot centre in µm
    ``slide``    int64   ``[N]``     slide index (position of the slide in the manifest)
    ``counts``   optional raw counts (float32 ``[N, G]``)
``patch_0``, ``patch_1``, ...
    ``img``      uint8 ``[M, 3, S, S]`` crops resized to ``S`` pixels, or
    ``feat``     float16 ``[M, D]``     features of a frozen image encoder
    ``pos``      float32 ``[M, 2]``     patch centre in µm
    ``size_um``  float32 ``[1]``        physical side length in µm
    ``patch_0`` is centred on a spot (row ``i`` of ``patch_0`` belongs to spot ``i``);
    ``patch_{k+1}`` tiles the slide on a square lattice three times coarser, so every
    ``patch_k`` lies in one cell of a 3x3 grid of its parent.
``gene``
    ``index``    int64 ``[G]`` index into the panel vocabulary (symbols in the metadata)
``pathway`` (optional)
    ``index``    int64 ``[P]``

Edge types (``edge_index`` int64 ``[2, E]``)
--------------------------------------------
``(spot, near, spot)``                 ``edge_attr`` float32 ``[E, 1]``: distance in µm
``(patch_0, of, spot)``, reverse       one edge per spot
``(patch_k, in, patch_k+1)``, reverse  ``loc`` int64 ``[E]`` in 0..8: the child's cell in the
                                       parent's 3x3 grid (row-major, row = +y)
``(spot, expresses, gene)``, reverse   ``edge_weight`` float32 ``[E]``: normalised expression
``(gene, regulates, gene)``            ``edge_weight`` float32 ``[E]``: signed mode of regulation
``(gene, binds, gene)``                ligand -> receptor (optional)
``(gene, member_of, pathway)``, rev.   ``edge_weight`` float32 ``[E]``: pathway weight

Graph-level metadata lives in ``data.meta`` (a plain ``dict`` of str/int/float/list values):
``schema_version``, ``slide`` (name), ``slide_index``, ``barcodes`` (list of spot ids in row
order), ``genes`` (panel symbols), ``gene_ids``, ``pathways``, ``patch_sizes_um``,
``crop_px``, ``config_hash``, ``units`` ("um"), ``image`` (path or None), ``prior_coverage``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

from tissuegraph.errors import InputError

SCHEMA_VERSION = 1

# node types
SPOT = "spot"
GENE = "gene"
PATHWAY = "pathway"
PATCH_PREFIX = "patch_"


def patch(k: int) -> str:
    """Node type of the image patches at scale ``k`` (0 = finest, centred on spots)."""
    return f"{PATCH_PREFIX}{int(k)}"


def is_patch(node_type: str) -> bool:
    return node_type.startswith(PATCH_PREFIX)


def patch_level(node_type: str) -> int:
    if not is_patch(node_type):
        raise ValueError(f"{node_type!r} is not a patch node type")
    return int(node_type[len(PATCH_PREFIX) :])


# relations
NEAR = "near"
OF = "of"
IN = "in"
EXPRESSES = "expresses"
REGULATES = "regulates"
BINDS = "binds"
MEMBER_OF = "member_of"
REV_PREFIX = "rev_"


def rev(relation: str) -> str:
    """Name of the reverse relation (PyG's ``ToUndirected`` convention)."""
    return f"{REV_PREFIX}{relation}"


# edge types
SPOT_NEAR_SPOT = (SPOT, NEAR, SPOT)
PATCH0_OF_SPOT = (patch(0), OF, SPOT)
SPOT_REV_OF_PATCH0 = (SPOT, rev(OF), patch(0))
SPOT_EXPRESSES_GENE = (SPOT, EXPRESSES, GENE)
GENE_REV_EXPRESSES_SPOT = (GENE, rev(EXPRESSES), SPOT)
GENE_REGULATES_GENE = (GENE, REGULATES, GENE)
GENE_BINDS_GENE = (GENE, BINDS, GENE)
GENE_MEMBER_OF_PATHWAY = (GENE, MEMBER_OF, PATHWAY)
PATHWAY_REV_MEMBER_OF_GENE = (PATHWAY, rev(MEMBER_OF), GENE)


def patch_in_parent(k: int) -> tuple[str, str, str]:
    """``(patch_k, in, patch_k+1)``: containment with the ``loc`` target."""
    return (patch(k), IN, patch(k + 1))


def parent_rev_in_patch(k: int) -> tuple[str, str, str]:
    return (patch(k + 1), rev(IN), patch(k))


# attribute names
X = "x"
# the expression encoder's standardised input, attached in memory by the trainer (never stored)
Z = "z"
POS = "pos"
SLIDE = "slide"
COUNTS = "counts"
IMG = "img"
FEAT = "feat"
SIZE_UM = "size_um"
INDEX = "index"
EDGE_ATTR = "edge_attr"
EDGE_WEIGHT = "edge_weight"
LOC = "loc"
N_LOC = 9

MANIFEST = "manifest.json"
RESOLVED_CONFIG = "config.yaml"
GRAPH_SUFFIX = ".pt"


def patch_types(data) -> list[str]:
    """Patch node types present in ``data`` (a ``HeteroData``), finest first."""
    return sorted((t for t in data.node_types if is_patch(t)), key=patch_level)


@dataclass(frozen=True)
class DataSpec:
    """What a graph (or tile) provides to the model, and what a model was built for.

    Recorded per slide in the manifest (``slides[i]["data_spec"]``) and in every checkpoint
    (``model_config["data_spec"]``) as the plain dict of :meth:`to_dict`. The fields that
    must agree between slides and between a graph and a model are :attr:`MUST_MATCH`;
    ``edge_types`` are joined across slides, and a graph may not bring edge types a model was
    not trained with. The ``std_*`` fields are set by the trainer when the graphs carry
    expression standardisation statistics (and written only then).
    """

    schema_version: int | None = None
    n_genes: int | None = None
    n_pathways: int | None = None
    n_scales: int | None = None
    patch_input: str | None = None  # "img", "feat" or None
    crop_px: int | None = None
    feat_dim: int | None = None
    edge_types: tuple[tuple[str, ...], ...] = ()
    std_scale: bool = False
    std_pcs: int = 0
    std_clip: float | None = None

    #: the keys compared between slides and between a graph and a model
    MUST_MATCH: ClassVar[tuple[str, ...]] = (
        "schema_version",
        "n_genes",
        "n_pathways",
        "n_scales",
        "patch_input",
        "crop_px",
        "feat_dim",
    )
    _STD: ClassVar[tuple[str, ...]] = ("std_scale", "std_pcs", "std_clip")

    @classmethod
    def from_graph(cls, data) -> DataSpec:
        """The spec of a ``HeteroData`` graph or tile."""
        if SPOT not in data.node_types or X not in data[SPOT]:
            raise InputError(
                "graph has no spot nodes with expression 'x' (see tissuegraph.graph.schema)"
            )
        meta = getattr(data, "meta", None) or {}
        patches = patch_types(data)
        patch_input, crop_px, feat_dim = None, 0, 0
        if patches:
            p0 = data[patches[0]]
            if IMG in p0:
                patch_input, crop_px = "img", int(p0[IMG].shape[-1])
            elif FEAT in p0:
                patch_input, feat_dim = "feat", int(p0[FEAT].shape[-1])
            else:
                raise InputError(f"{patches[0]} nodes have neither 'img' nor 'feat'")
        n_pw = _num_nodes(data, PATHWAY)
        return cls(
            schema_version=int(meta.get("schema_version", SCHEMA_VERSION)),
            n_genes=int(data[SPOT][X].shape[1]),
            n_pathways=int(n_pw or 0),
            n_scales=len(patches),
            patch_input=patch_input,
            crop_px=crop_px,
            feat_dim=feat_dim,
            edge_types=tuple(tuple(et) for et in sorted(data.edge_types)),
        )

    @classmethod
    def from_dict(cls, d) -> DataSpec:
        """A spec from its dict (or a spec itself); absent keys read as ``None``."""
        if isinstance(d, cls):
            return d
        kw = {k: d.get(k) for k in cls.MUST_MATCH}
        kw["edge_types"] = tuple(sorted(tuple(e) for e in d.get("edge_types") or ()))
        if d.get("std_scale"):
            kw.update(std_scale=True, std_pcs=int(d.get("std_pcs") or 0), std_clip=d["std_clip"])
        return cls(**kw)

    def to_dict(self) -> dict:
        """The JSON-serialisable dict recorded in manifests and checkpoints."""
        out = {k: getattr(self, k) for k in self.MUST_MATCH}
        out["edge_types"] = [list(e) for e in self.edge_types]
        if self.std_scale:
            out.update({k: getattr(self, k) for k in self._STD})
        return out

    def with_standardization(self, std: dict | None) -> DataSpec:
        """This spec with the ``std_*`` fields of a manifest's ``standardize`` record."""
        if not std:
            return self
        return replace(
            self, std_scale=True, std_pcs=int(std.get("n_pcs") or 0), std_clip=std["clip"]
        )

    def mismatch(self, other: DataSpec) -> tuple[str, Any, Any] | None:
        """The first :attr:`MUST_MATCH` field that differs: ``(key, self's, other's)``."""
        for key in self.MUST_MATCH:
            mine, theirs = getattr(self, key), getattr(other, key)
            if mine != theirs:
                return key, mine, theirs
        return None

    @classmethod
    def merge(cls, specs, names: list[str] | None = None) -> DataSpec:
        """One spec for several slides: :attr:`MUST_MATCH` must agree; edge types are joined."""
        specs = [cls.from_dict(s) for s in specs]
        names = names or [str(i) for i in range(len(specs))]
        first = specs[0]
        for spec, name in zip(specs[1:], names[1:]):
            if diff := spec.mismatch(first):
                key, a, b = diff
                raise InputError(
                    f"slide {name!r} differs from slide {names[0]!r} in {key} "
                    f"({a} vs {b}): build all slides in one build-graphs run"
                )
        ets = {e for s in specs for e in s.edge_types}
        return replace(first, edge_types=tuple(sorted(ets)))

    def check_fits(self, graph, *, what: str = "graph") -> None:
        """Raise a one-line :class:`InputError` when ``graph`` (a spec) does not fit this
        model's spec."""
        graph = DataSpec.from_dict(graph)
        if diff := graph.mismatch(self):
            key, theirs, mine = diff
            raise InputError(
                f"{what} does not match the model: {key} is {theirs} but the model was "
                f"built for {mine} (build the graph with the checkpoint's "
                "build config and panel)"
            )
        extra = set(graph.edge_types) - set(self.edge_types)
        if extra:
            raise InputError(
                f"{what} has edge type(s) the model was not trained with: {sorted(extra)[:3]}"
            )


def data_spec(data) -> dict:
    """What a graph (or tile) provides to the model: panel size, patch input, edge types.

    Returns a JSON-serialisable dict (:meth:`DataSpec.to_dict`): ``schema_version``,
    ``n_genes``, ``n_pathways``, ``n_scales``, ``patch_input`` (``"img"``, ``"feat"`` or
    ``None``), ``crop_px``, ``feat_dim``, ``edge_types`` (sorted ``[src, rel, dst]`` lists).
    """
    return DataSpec.from_graph(data).to_dict()


def _num_nodes(data, node_type: str) -> int:
    if node_type not in data.node_types:
        return 0
    store = data[node_type]
    if INDEX in store:
        return int(store[INDEX].shape[0])
    return int(store.num_nodes or 0)
