"""``rf-inspect --export``: the largest captured FX graph as GraphML or DOT, attention sites marked.

Node attributes: ``op``, ``target``, ``shape`` (e.g. ``1x2x298x16``), ``role`` (``"attention"``
for an SDPA or ``rainfusion::attention`` site, ``"layout"`` for a node on the way from a 5-D
video input to a site, else ``""``), and for sites ``site`` / ``status``. For looking at in a
graph viewer (yEd, Gephi, Graphviz); not a serialisation of the graph that can be run.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import networkx as nx
import torch

if TYPE_CHECKING:
    from rf_compile.cli.inspection import Captured, Inspection

ROLE_COLORS = {"attention": "#ff7f0e", "layout": "#9ecae1", "": "#ffffff"}


def graph_digraph(graph: Captured) -> nx.DiGraph:
    """The FX graph as a DiGraph (node name -> user) with str/int attributes only (GraphML-safe)."""
    from rf_compile.passes.find_attention import example

    digraph = nx.DiGraph()
    for node in graph.gm.graph.nodes:
        value = example(node)
        shape = "x".join(str(size) for size in value.shape) if isinstance(value, torch.Tensor) else ""
        digraph.add_node(
            node.name, op=node.op, target=_target_name(node.target), shape=shape, role="", site="", status=""
        )
        digraph.add_edges_from((node.name, user.name) for user in node.users)
    sites = {site.node.name: site for site in graph.sites}
    for name in layout_nodes(graph, digraph):
        digraph.nodes[name]["role"] = "layout"
    for name, site in sites.items():
        digraph.nodes[name].update(role="attention", site=site.report.name, status=site.report.status)
    return digraph


def layout_nodes(graph: Captured, digraph: nx.DiGraph) -> set[str]:
    """Nodes on a shortest path from a 5-D video input of the graph to a site's query.

    ``infer_layout`` does not say which nodes it read; these paths run through the patch
    embedding and the reshapes that build the token sequence, which is what it reads.
    """
    from rf_compile.passes.find_attention import example

    videos = [
        node.name
        for node in graph.gm.graph.find_nodes(op="placeholder")
        if isinstance(value := example(node), torch.Tensor)
        and value.dim() == 5
        and not any(kind in node.name for kind in ("_parameters_", "_buffers_"))
    ]
    used: set[str] = set()
    for site in graph.sites:
        query = site.args["query"]
        if not isinstance(query, torch.fx.Node):
            continue
        for video in videos:
            if nx.has_path(digraph, video, query.name):
                used.update(nx.shortest_path(digraph, video, query.name))
    return used


def _target_name(target: object) -> str:
    if isinstance(target, str):
        return target
    try:
        return torch.fx.node._get_qualified_name(target)
    except (AttributeError, RuntimeError):
        return str(target)


def largest_graph(result: Inspection) -> Captured:
    """The captured graph with the most attention sites (then the most nodes)."""
    return max(result.graphs, key=lambda graph: (len(graph.sites), len(graph.gm.graph.nodes)))


def write_dot(digraph: nx.DiGraph, path: str | os.PathLike) -> None:
    """Graphviz DOT text: one box per node (name, target, shape), filled by role."""

    def escape(text: str) -> str:
        return text.replace("\\", "\\\\").replace('"', '\\"')

    lines = ["digraph fx {", '  node [shape=box, style=filled, fontname="monospace", fontsize=10];']
    for name, data in digraph.nodes(data=True):
        label = "\\n".join(escape(part) for part in (name, data["target"], data["shape"], data["site"]) if part)
        lines.append(f'  "{escape(name)}" [label="{label}", fillcolor="{ROLE_COLORS[data["role"]]}"];')
    lines += [f'  "{escape(a)}" -> "{escape(b)}";' for a, b in digraph.edges]
    lines.append("}")
    with open(path, "w") as file:
        file.write("\n".join(lines) + "\n")


def export_graph(result: Inspection, path: str | os.PathLike) -> None:
    """Write the largest captured graph to ``path`` (``.graphml`` or ``.dot``)."""
    digraph = graph_digraph(largest_graph(result))
    if str(path).endswith(".dot"):
        write_dot(digraph, path)
    else:
        nx.write_graphml(digraph, path)
