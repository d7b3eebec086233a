"""GraphIndex: the queries every pattern asks of an fx graph, answered from tables built once.

    index = GraphIndex(gm.graph)
    index.node("add_3")              # by name, O(1) (a graph only offers a scan of its nodes)
    index.position(n)                # place in the graph's order, which is topological
    index.ancestors(n)               # every node n is computed from (cached, frozenset)
    index.descendants(n)             # every node computed from n (cached, frozenset)
    index.ancestors(end, stop=x)     # ... not looking past x: the nodes of a block between x and end
    index.between(a, b)              # nodes on some path a -> b
    index.data_ancestors(n)          # ancestors n's *values* come from (not through x.shape, x.size(0))
    index.digraph                    # networkx view, for dominators and the like

Names, positions and the cached ancestor/descendant sets are a snapshot of the graph when the
index was built; :attr:`stale` says when nodes were added or removed since (build a new index:
one pass over the nodes). Walks with ``stop`` are not cached and follow the graph's edges as
they are now, so a pass can ask for the nodes of a block it is rewriting.
"""
from __future__ import annotations

from functools import cached_property
from typing import Iterable, Union

import torch.fx as fx

from tokenopt.analysis.nodes import is_size_query

NodeRef = Union[fx.Node, str]      # a node, or its name


class GraphIndex:
    def __init__(self, graph: fx.Graph | fx.GraphModule):
        self.graph = graph.graph if isinstance(graph, fx.GraphModule) else graph
        self.nodes: list[fx.Node] = list(self.graph.nodes)
        self._by_name = {n.name: n for n in self.nodes}
        self._position = {n: i for i, n in enumerate(self.nodes)}
        self._ancestors: dict[fx.Node, frozenset] = {}
        self._descendants: dict[fx.Node, frozenset] = {}
        self._data_ancestors: dict[fx.Node, frozenset] = {}

    # ---------------------------------------------------------------- lookup
    def node(self, ref: NodeRef) -> fx.Node:
        if isinstance(ref, fx.Node):
            return ref
        try:
            return self._by_name[ref]
        except KeyError:
            raise KeyError(f"no node named {ref!r} in the indexed graph (the index is a snapshot: "
                           "nodes added by a rewrite need a new GraphIndex)") from None

    def get(self, name: str, default=None) -> fx.Node | None:
        return self._by_name.get(name, default)

    def __contains__(self, ref) -> bool:
        return (ref in self._position) if isinstance(ref, fx.Node) else (ref in self._by_name)

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self):
        return iter(self.nodes)

    @property
    def stale(self) -> bool:
        """True when nodes were added to or removed from the graph since the index was built."""
        return len(self.graph.nodes) != len(self.nodes)

    def position(self, ref: NodeRef) -> int:
        return self._position[self.node(ref)]

    def after(self, ref: NodeRef) -> list[fx.Node]:
        """The nodes after ``ref`` in graph order."""
        return self.nodes[self.position(ref) + 1:]

    def placeholders(self) -> list[fx.Node]:
        return [n for n in self.nodes if n.op == "placeholder"]

    def users(self, ref: NodeRef) -> list[fx.Node]:
        return list(self.node(ref).users)

    def inputs(self, ref: NodeRef) -> list[fx.Node]:
        return list(self.node(ref).all_input_nodes)

    # ---------------------------------------------------------------- reachability
    def ancestors(self, ref: NodeRef, stop: NodeRef | Iterable[NodeRef] | None = None) -> frozenset:
        """Nodes ``ref`` is computed from (not ``ref`` itself). With ``stop``: not looking past
        those nodes, which are left out too (uncached)."""
        n = self.node(ref)
        if stop is None:
            if n not in self._ancestors:
                self._ancestors[n] = self._walk(n, lambda m: m.all_input_nodes, ())
            return self._ancestors[n]
        return self._walk(n, lambda m: m.all_input_nodes, self._stops(stop))

    def descendants(self, ref: NodeRef, stop: NodeRef | Iterable[NodeRef] | None = None) -> frozenset:
        """Nodes computed from ``ref`` (not ``ref`` itself). ``stop`` as for :meth:`ancestors`."""
        n = self.node(ref)
        if stop is None:
            if n not in self._descendants:
                self._descendants[n] = self._walk(n, lambda m: m.users, ())
            return self._descendants[n]
        return self._walk(n, lambda m: m.users, self._stops(stop))

    def data_ancestors(self, ref: NodeRef) -> frozenset:
        """The ancestors ``ref``'s values are computed from: not looking through size queries
        (``x.shape``, ``x.size(0)``: reading a shape is not reading the data). Cached."""
        n = self.node(ref)
        if n not in self._data_ancestors:
            step = lambda m: () if is_size_query(m) else m.all_input_nodes    # noqa: E731
            self._data_ancestors[n] = self._walk(n, step, ())
        return self._data_ancestors[n]

    def between(self, a: NodeRef, b: NodeRef) -> frozenset:
        """Nodes strictly between ``a`` and ``b`` on some path a -> b."""
        return self.descendants(a) & self.ancestors(b)

    def reaches(self, a: NodeRef, b: NodeRef) -> bool:
        """True when ``b`` is computed from ``a``."""
        return self.node(a) in self.ancestors(b)

    @cached_property
    def digraph(self):
        """The graph as a networkx DiGraph over fx nodes (dominators, paths, drawing)."""
        import networkx as nx
        g = nx.DiGraph()
        g.add_nodes_from(self.nodes)
        g.add_edges_from((a, n) for n in self.nodes for a in n.all_input_nodes)
        return g

    def _stops(self, stop) -> set:
        refs = [stop] if isinstance(stop, (fx.Node, str)) else stop
        return {self.node(s) for s in refs}

    @staticmethod
    def _walk(start: fx.Node, step, stops) -> frozenset:
        seen: set[fx.Node] = set()
        todo = [start]
        while todo:
            for m in step(todo.pop()):
                if m not in seen and m not in stops:
                    seen.add(m)
                    todo.append(m)
        seen.discard(start)      # a node is not its own ancestor (graphs are acyclic; defensive)
        return frozenset(seen)
