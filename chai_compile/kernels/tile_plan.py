"""Tile tables of the Triton clustered-attention kernels: the cluster layout (chai_compile.layout) cut
into tiles the kernels schedule. Pure torch on the host (no Triton), built once per layer and cached on
the index tensors, so it is tested on any machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from chai_compile.layout import ClusterLayout, check_offsets

# ---------------------------------------------------------------------------------------------
# Plan: cluster layout (chai_compile.layout) -> tile tables (built once per layer, cached on the index
# tensors). The tiles are this kernel's scheduling of the layout; the layout itself is not derived here.
# ---------------------------------------------------------------------------------------------


# Columns of the packed per-tile table (one int32 row per tile; one pointer argument): cluster, K head,
# count, first slot, then the V heads.
T_CLUSTER, T_COUNT, T_VHEADS = 0, 2, 4

# Rows of the head-keyed tables of the two-phase decode: a K head with the clusters scored against it, a
# V head with the slots that read it. 16 = the smallest MMA height, so one row is one tl.dot operand; a
# head with more clusters or slots gets several rows.
GROUP_ROWS = 16


@dataclass(frozen=True)
class ClusterPlan:
    num_heads: int
    num_clusters: int
    tile_width: int  # max V heads (slots) per tile
    num_tiles: int
    num_slots: int  # distinct (cluster, V head) pairs; == num_heads for MHA
    max_k_head: int
    max_v_head: int
    identity_slots: bool  # slot i is head i: outputs can be written in place
    tiles: torch.Tensor  # [NT, 4 + tile_width] int32: cluster, K head, count, first slot, V heads (0-padded)
    slot_of_head: torch.Tensor  # [H] int32
    heads_of_slot: torch.Tensor  # [num_slots, heads_per_slot] int32: the heads reading each slot, -1 padded
    heads_per_slot: int  # 1 for MHA; the GQA heads of one cluster on one V head share a slot
    k_groups: torch.Tensor  # [NK, 2 + GROUP_ROWS] int32: K head, count, clusters (0-padded)
    v_groups: torch.Tensor  # [NV, 2 + 2 * GROUP_ROWS] int32: V head, count, slots, their clusters (0-padded)
    shared_v: bool  # some V head is read by several clusters (GQA clusters cutting across KV groups)
    sources: tuple[torch.Tensor, ...] = ()  # keeps the keyed tensors alive so their pointers stay unique

    @property
    def tile_cluster(self) -> torch.Tensor:
        return self.tiles[:, T_CLUSTER]

    @property
    def tile_count(self) -> torch.Tensor:
        return self.tiles[:, T_COUNT]

    @property
    def tile_v_heads(self) -> torch.Tensor:
        return self.tiles[:, T_VHEADS:]


def auto_tile_width(num_slots: int, num_clusters: int, cap: int = 8) -> int:
    """Power of two near the mean slots per cluster: lanes of a tile past its cluster stay idle."""
    mean = num_slots / num_clusters
    return max(1, min(cap, 1 << max(0, round(math.log2(mean)))))


def build_plan(
    cluster_offsets: torch.Tensor,
    k_head_index: torch.Tensor,
    v_head_index: torch.Tensor,
    tile_width: int | None = None,
    cap: int = 8,
) -> ClusterPlan:
    """The tile plan of a layout given as its index tensors (ClusterLayout.index_tensors)."""
    offs = [int(x) for x in cluster_offsets.tolist()]
    kidx = [int(x) for x in k_head_index.tolist()]
    vidx = [int(x) for x in v_head_index.tolist()]
    num_clusters = len(offs) - 1
    check_offsets(offs)
    if len(kidx) != num_clusters:
        raise ValueError(f"k_head_index has {len(kidx)} entries for {num_clusters} clusters")
    if offs[-1] != len(vidx):
        raise ValueError(f"cluster_offsets end at {offs[-1]} but v_head_index has {len(vidx)} heads")
    if min(kidx) < 0 or min(vidx) < 0:
        raise ValueError("head indices must be >= 0")

    slot_ids: dict[tuple[int, int], int] = {}
    slot_vhead: list[int] = []
    slot_of_head: list[int] = []
    first_slot: list[int] = []
    for c in range(num_clusters):
        first_slot.append(len(slot_vhead))
        for i in range(offs[c], offs[c + 1]):
            key = (c, vidx[i])
            if key not in slot_ids:
                slot_ids[key] = len(slot_vhead)
                slot_vhead.append(vidx[i])
            slot_of_head.append(slot_ids[key])
    first_slot.append(len(slot_vhead))
    width = tile_width or auto_tile_width(len(slot_vhead), num_clusters, cap)
    rows = []
    for c in range(num_clusters):
        for s in range(first_slot[c], first_slot[c + 1], width):
            heads = slot_vhead[s : min(s + width, first_slot[c + 1])]
            rows.append([c, kidx[c], len(heads), s] + heads + [0] * (width - len(heads)))

    k_groups = []
    for kh in sorted(set(kidx)):
        clusters = [c for c in range(num_clusters) if kidx[c] == kh]
        for i in range(0, len(clusters), GROUP_ROWS):
            part = clusters[i : i + GROUP_ROWS]
            k_groups.append([kh, len(part)] + part + [0] * (GROUP_ROWS - len(part)))
    slot_cluster = [c for c in range(num_clusters) for _ in range(first_slot[c], first_slot[c + 1])]
    v_groups = []
    for vh in sorted(set(slot_vhead)):
        slots = [s for s, h in enumerate(slot_vhead) if h == vh]
        for i in range(0, len(slots), GROUP_ROWS):
            part = slots[i : i + GROUP_ROWS]
            pad = [0] * (GROUP_ROWS - len(part))
            v_groups.append([vh, len(part)] + part + pad + [slot_cluster[s] for s in part] + pad)

    readers: list[list[int]] = [[] for _ in slot_vhead]
    for h, s in enumerate(slot_of_head):
        readers[s].append(h)
    per_slot = max(len(r) for r in readers)
    heads_of_slot = [r + [-1] * (per_slot - len(r)) for r in readers]

    dev = cluster_offsets.device
    return ClusterPlan(
        num_heads=len(vidx),
        num_clusters=num_clusters,
        tile_width=width,
        num_tiles=len(rows),
        num_slots=len(slot_vhead),
        max_k_head=max(kidx),
        max_v_head=max(vidx),
        identity_slots=slot_of_head == list(range(len(vidx))),
        tiles=torch.tensor(rows, dtype=torch.int32, device=dev),
        slot_of_head=torch.tensor(slot_of_head, dtype=torch.int32, device=dev),
        heads_of_slot=torch.tensor(heads_of_slot, dtype=torch.int32, device=dev),
        heads_per_slot=per_slot,
        k_groups=torch.tensor(k_groups, dtype=torch.int32, device=dev),
        v_groups=torch.tensor(v_groups, dtype=torch.int32, device=dev),
        shared_v=len(set(slot_vhead)) < len(slot_vhead),
        sources=(cluster_offsets, k_head_index, v_head_index),
    )


def plan_for_layout(layout: ClusterLayout, device: torch.device | str = "cpu", tile_width: int | None = None,
                    cap: int = 8) -> ClusterPlan:
    """The tile plan of one layer's layout."""
    return build_plan(*layout.index_tensors(device), tile_width, cap)


_PLANS: dict[tuple, ClusterPlan] = {}


def get_plan(
    cluster_offsets: torch.Tensor,
    k_head_index: torch.Tensor,
    v_head_index: torch.Tensor,
    tile_width: int | None = None,
    cap: int = 8,
) -> ClusterPlan:
    """Cached build_plan. The mapping is fixed at export, so the host sync happens once per layer.

    Keyed on the tensors' storage pointers and in-place version counters; the plan holds a
    reference to them, so a pointer cannot be reused by another tensor while the entry lives.
    """
    key = (
        cluster_offsets.data_ptr(),
        k_head_index.data_ptr(),
        v_head_index.data_ptr(),
        cluster_offsets._version,
        k_head_index._version,
        v_head_index._version,
        v_head_index.numel(),
        tile_width,
        cap,
    )
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 4096:
            _PLANS.clear()
        plan = _PLANS[key] = build_plan(cluster_offsets, k_head_index, v_head_index, tile_width, cap)
    return plan
