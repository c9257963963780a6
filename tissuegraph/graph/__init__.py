"""Graph construction: slides -> heterogeneous graphs (``torch_geometric.data.HeteroData``).

Modules (imported explicitly; nothing heavy is imported here):

- :mod:`~tissuegraph.graph.schema`: node / edge type and attribute names.
- :mod:`~tissuegraph.graph.config`: ``BuildConfig``.
- :mod:`~tissuegraph.graph.spatial`: spot graphs (lattice rings, kNN, radius, Delaunay).
- :mod:`~tissuegraph.graph.patches`: multi-scale patch hierarchy, crops, frozen-encoder features.
- :mod:`~tissuegraph.graph.genes`: normalisation, gene panel, expression edges.
- :mod:`~tissuegraph.graph.priors`: TF -> target, ligand -> receptor and pathway edges.
- :mod:`~tissuegraph.graph.build`: ``build_slide_graph`` (one slide), ``as_build_config``.
- :mod:`~tissuegraph.graph.panel`: ``select_panel`` (the gene panel shared by a build).
- :mod:`~tissuegraph.graph.pipeline`: ``build_graphs`` (a ``BuildPlan`` over slides), shards;
  re-exports ``build_slide_graph`` and ``select_panel``.
- :mod:`~tissuegraph.graph.storage`: ``save_graph``, ``load_graph``, ``read_manifest``.
- :mod:`~tissuegraph.graph.inspect`: ``inspect_path``.
"""
