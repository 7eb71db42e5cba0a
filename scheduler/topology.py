"""Cluster topology: which ranks share a node, and how fast a ring's slowest link is.

A networkx graph with one vertex per node (machine) carrying its intra-node (NVLink)
bandwidth, and one edge per node pair carrying the per-rank inter-node (NIC) bandwidth
(a non-blocking fat tree: every pair is one hop). In a cluster of node pools each node has
its pool's NVLink and NIC figures, and a link between two nodes runs at the slower NIC.
A ring's KV hand-off runs at the speed of the slowest hop of its ring order, so a ring
inside one node runs at NVLink speed and one that spans nodes at NIC speed. The balance
scheduler keeps rings inside one node when they fit and otherwise spans the fewest nodes.
"""

from __future__ import annotations

from collections.abc import Sequence

import networkx as nx

from scheduler.specs import ClusterSpec


class Topology:
    """Nodes and links of a cluster of `world_size` ranks (the last node may be partial)."""

    def __init__(self, cluster: ClusterSpec, world_size: int | None = None, *,
                 pow2_rings: bool = False):
        self.world_size = world_size or cluster.world_size
        # Megatron-Core's dynamic context parallelism builds its CP groups in powers of
        # two; the pow2 baseline plans with the same scheduler under that restriction.
        self.pow2_rings = pow2_rings
        if self.world_size < 1:
            raise ValueError(f"world_size={self.world_size} must be >= 1")
        self.gpus_per_node = cluster.gpus_per_node
        self.num_nodes = -(-self.world_size // self.gpus_per_node)
        self.graph: nx.Graph[int] = nx.Graph()
        self._nic = _node_figures(cluster, self.num_nodes, "inter_node_bandwidth_gbps")
        for n, bw in enumerate(_node_figures(cluster, self.num_nodes,
                                             "intra_node_bandwidth_gbps")):
            self.graph.add_node(n, bandwidth_gbps=bw)
        # Sizing figures (`bandwidth_for_size`): what a ring can count on in any pool.
        self._inter = cluster.inter_node_bandwidth_gbps
        self._intra = cluster.intra_node_bandwidth_gbps
        # Edges are implicit for big clusters (a complete graph of 1,536 nodes has >1M
        # edges); `link_bandwidth` falls back to the slower NIC for absent pairs.
        if self.num_nodes <= 64:
            for u in range(self.num_nodes):
                for v in range(u + 1, self.num_nodes):
                    self.graph.add_edge(u, v, bandwidth_gbps=min(self._nic[u], self._nic[v]))

    def allows(self, ring_size: int) -> bool:
        """Whether a ring of this size may be formed (any size, or powers of two)."""
        return not self.pow2_rings or ring_size & (ring_size - 1) == 0

    def allowed_at_least(self, ring_size: int) -> int | None:
        """The smallest allowed ring size >= ring_size within the world, or None."""
        d = ring_size if not self.pow2_rings else 1 << max(0, ring_size - 1).bit_length()
        return d if d <= self.world_size else None

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def ranks_of(self, node: int) -> range:
        lo = node * self.gpus_per_node
        return range(lo, min(lo + self.gpus_per_node, self.world_size))

    def link_bandwidth(self, u: int, v: int) -> float:
        """Per-rank bandwidth between two nodes (a node to itself: NVLink)."""
        if u == v:
            return self.graph.nodes[u]["bandwidth_gbps"]
        data = self.graph.get_edge_data(u, v)
        return data["bandwidth_gbps"] if data else min(self._nic[u], self._nic[v])

    def ring_bandwidth(self, ranks: Sequence[int]) -> float:
        """Bandwidth of the slowest hop of the ring in its given order."""
        nodes = [r // self.gpus_per_node for r in ranks]
        if len(set(nodes)) == 1:
            return self.link_bandwidth(nodes[0], nodes[0])
        hops = {(min(a, b), max(a, b)) for a, b in zip(nodes, nodes[1:] + nodes[:1], strict=True)}
        return min(self.link_bandwidth(a, b) for a, b in hops)

    def bandwidth_for_size(self, ring_size: int) -> float:
        """Bandwidth a ring of this size gets when placed as the scheduler places it (with
        node pools: the slowest pool's, which every placement can count on)."""
        return self._intra if ring_size <= self.gpus_per_node else self._inter

    def nodes_spanned(self, ranks: Sequence[int]) -> int:
        return len({r // self.gpus_per_node for r in ranks})

    def ring_order(self, ranks: Sequence[int]) -> list[int]:
        """Ranks sorted so that each node's members are adjacent (fewest inter-node hops)."""
        return sorted(ranks)


def _node_figures(cluster: ClusterSpec, num_nodes: int, name: str) -> list[float]:
    """One bandwidth figure per node: the cluster's, or each node's pool's."""
    if cluster.pools is None:
        return [getattr(cluster, name)] * num_nodes
    per_node = [getattr(p, name) for p in cluster.pools for _ in range(p.num_nodes)]
    return (per_node + per_node[-1:] * num_nodes)[:num_nodes]
