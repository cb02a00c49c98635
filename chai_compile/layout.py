"""The cluster layout of one layer: the only place where a plan's clusters become head orders and indices.

Every consumer reads it from here: the rewrite (slots and the permutation of its Triton path), the fused
export (the node's cluster_offsets / k_head_index / v_head_index, hence the TensorRT plugin and the ONNX
Runtime op), the fused-op contract's checks and the Triton kernels' tile plan.

Cluster order (documented once): clusters are ordered by the KV head their representative reads, then
by the representative's index. Why: the rewrite's score matmul reads K as stored, one kept K head per
group of "slots", so the representatives reading one K head must sit next to each other. Inside a
cluster the representative comes first, then the other members ascending (kernels that want one
query head per cluster find it at the cluster's offset).

A dense layer has the identity layout (every head its own cluster, every KV head kept): the same
function as the original attention, which the in-place fused export uses for dense layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chai_compile.choices import LayerKind

if TYPE_CHECKING:
    import torch

    from chai_compile.mapping import ClusterMapping, LayerMapping


def check_offsets(offsets: Sequence[int], num_heads: int | None = None) -> None:
    """Raise ValueError unless `offsets` are C + 1 strictly increasing values from 0 (to num_heads).

    The one Python check of cluster_offsets: the contract, the reference and the kernel plan call it.
    """
    offs = [int(x) for x in offsets]
    end = offs[-1] if offs else None
    if len(offs) < 2 or offs[0] != 0 or any(b <= a for a, b in zip(offs, offs[1:], strict=False)) \
            or (num_heads is not None and end != num_heads):
        to = f" to {num_heads}" if num_heads is not None else ""
        raise ValueError(f"cluster_offsets must be C+1 strictly increasing values from 0{to}, got {offs}")


@dataclass(frozen=True)
class ClusterLayout:
    """Where every head of one layer goes. Tuples of plain ints; `index_tensors` gives the kernels' form."""

    num_heads: int
    num_kv_heads: int
    representatives: tuple[int, ...]  # per cluster, in cluster order: its representative query head
    kept_k_heads: tuple[int, ...]  # KV heads some representative reads (original indices, ascending)
    permutation: tuple[int, ...]  # permuted position -> original query head (clusters contiguous)
    cluster_offsets: tuple[int, ...]  # C + 1 entries: cluster c is positions [offsets[c], offsets[c+1])
    k_head_index: tuple[int, ...]  # per cluster: index into kept_k_heads
    v_head_index: tuple[int, ...]  # per permuted position: the V (KV) head it reads
    # Slots: the rewrite's score layout. Slot j * slots_per_k + r is the r-th representative reading kept
    # K head j; missing slots are zero queries (only when representatives share a K head).
    slots_per_k: int
    slot_of_cluster: tuple[int, ...]
    slot_of_head: tuple[int, ...]  # per original query head

    def __post_init__(self) -> None:
        check_offsets(self.cluster_offsets, self.num_heads)

    @property
    def num_clusters(self) -> int:
        return len(self.representatives)

    @property
    def num_slots(self) -> int:
        return len(self.kept_k_heads) * self.slots_per_k

    @property
    def inverse_permutation(self) -> tuple[int, ...]:
        """Original query head -> its permuted position."""
        inverse = [0] * self.num_heads
        for pos, head in enumerate(self.permutation):
            inverse[head] = pos
        return tuple(inverse)

    def index_tensors(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cluster_offsets, k_head_index, v_head_index) as int32 tensors: what the kernels take."""
        import torch

        return tuple(torch.tensor(x, dtype=torch.int32, device=device)  # type: ignore[return-value]
                     for x in (self.cluster_offsets, self.k_head_index, self.v_head_index))


def layer_layout(layer: LayerMapping, num_heads: int, num_kv_heads: int) -> ClusterLayout:
    """The layout of one dense or clustered layer (see the module docstring for the order)."""
    if layer.kind == LayerKind.DENSE:
        clusters: list[tuple[int, Sequence[int]]] = [(h, (h,)) for h in range(num_heads)]
    elif layer.kind == LayerKind.CLUSTERED:
        clusters = [(c.representative, c.members) for c in layer.clusters]
    else:  # shared and span layers have no cluster layout; the plan's readers refuse them first
        raise ValueError(f"layer {layer.index}: a {layer.kind} layer has no cluster layout")
    group = num_heads // num_kv_heads
    clusters.sort(key=lambda c: (c[0] // group, c[0]))
    reps = [rep for rep, _ in clusters]
    kept = sorted({rep // group for rep in reps})
    k_index = [kept.index(rep // group) for rep in reps]
    n = max(k_index.count(j) for j in range(len(kept)))
    slot_of_cluster, seen = [], [0] * len(kept)
    for j in k_index:
        slot_of_cluster.append(j * n + seen[j])
        seen[j] += 1
    slot_of_head = [-1] * num_heads
    perm, offsets = [], [0]
    for c, (rep, members) in enumerate(clusters):
        for h in members:
            slot_of_head[h] = slot_of_cluster[c]
        perm.extend([rep] + sorted(h for h in members if h != rep))
        offsets.append(len(perm))
    return ClusterLayout(num_heads, num_kv_heads, tuple(reps), tuple(kept), tuple(perm), tuple(offsets),
                         tuple(k_index), tuple(h // group for h in perm), n, tuple(slot_of_cluster),
                         tuple(slot_of_head))


def cluster_layout(plan: ClusterMapping, layer: int) -> ClusterLayout:
    """The layout of layer `layer` of `plan`."""
    m = plan.model
    return layer_layout(plan.layers[layer], m.num_heads, m.num_kv_heads)
