"""Static membership: the plan's clusters, frozen (what export uses), laid out by `chai_compile.layout`.

Q and K projections hold only the representatives' and kept K heads' rows, and the K cache only the
kept heads. Scores are one batched matmul of q in the layout's "slots" ([B, kept, n * S, d]) against K
as stored, with no K copy (n > 1 only when representatives share a K head; missing slots are zero
queries). Probabilities are gathered from slots to heads (small: [.., S, T] per head, never per d) and
multiplied with V viewed per GQA group, so V is never copied either. On CUDA in fp16/bf16 without a
padding mask the Triton kernels in chai_compile.kernels replace this path, over the layout's permuted
head order.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from chai_compile.adapters import AttentionCall, ModelAdapter
from chai_compile.choices import Membership
from chai_compile.layout import ClusterLayout
from chai_compile.rewrite.base import ClusteredAttention, head_rows, masked_softmax, owned_linear

_HALF = (torch.float16, torch.bfloat16)


@functools.cache
def _kernels() -> Any:
    """chai_compile.kernels when Triton is usable, else None (the torch path then runs everywhere)."""
    try:
        from chai_compile import kernels
    except ImportError:
        return None
    return kernels if getattr(kernels, "HAS_TRITON", False) else None


class StaticClusteredAttention(ClusteredAttention):
    membership = Membership.STATIC

    def __init__(self, adapter: ModelAdapter, layer_index: int, layout: ClusterLayout) -> None:
        super().__init__(adapter, layer_index, layout.num_clusters, len(layout.kept_k_heads))
        self.layout = layout
        self.use_kernels = True  # tests and benchmarks switch the CUDA kernels off to compare paths
        p = adapter.projections(layer_index)
        d = self.head_dim
        self.q_proj = owned_linear(head_rows(p.q_weight, layout.representatives, d),
                                   head_rows(p.q_bias, layout.representatives, d))
        self.k_proj = owned_linear(head_rows(p.k_weight, layout.kept_k_heads, d),
                                   head_rows(p.k_bias, layout.kept_k_heads, d))
        self.num_slots = layout.num_slots
        self.slots_are_clusters = self.num_slots == layout.num_clusters
        # Skip the probability gather when slot i is head i (identity mapping, all-singleton MHA).
        self.slots_are_heads = layout.slot_of_head == tuple(range(self.num_heads))
        dev = p.q_weight.device
        # Non-persistent: state_dict keeps only weights; .to(device) moves these with the module.
        for name, values in (("slot_of_cluster", layout.slot_of_cluster), ("slot_of_head", layout.slot_of_head),
                             ("inverse_permutation", layout.inverse_permutation)):
            self.register_buffer(name, torch.tensor(values, device=dev), persistent=False)
        for name, t in zip(("cluster_offsets", "k_head_index", "v_head_index"), layout.index_tensors(dev),
                           strict=True):
            self.register_buffer(name, t, persistent=False)

    @torch.no_grad()
    def load_refit(self, q_rows: dict[int, tuple[torch.Tensor, torch.Tensor | None]],
                   o_weight: torch.Tensor | None) -> None:
        """Take a plan's refit weights: representatives' Q rows and the output projection."""
        d = self.head_dim
        for head, (w, b) in q_rows.items():
            pos = self.layout.representatives.index(head)
            self.q_proj.weight[pos * d : (pos + 1) * d] = w.to(self.q_proj.weight)
            if b is not None:
                self.q_proj.bias[pos * d : (pos + 1) * d] = b.to(self.q_proj.bias)
        if o_weight is not None:
            self.o_proj.weight.copy_(o_weight.to(self.o_proj.weight))

    def attend(self, call: AttentionCall, cache: Any) -> torch.Tensor:
        q, k, v = positioned_qkv(self, call)
        k, v = self.update_cache(cache, k, v)
        mask = call.attention_mask
        # The kernels never materialise probabilities: a layer that shared layers read takes the torch path.
        if self.use_kernels and self.publish is None and mask is None and q.is_cuda and q.dtype in _HALF:
            out = self._kernel(q, k, v)
            if out is not None:
                return out
        return self.scores_path(q, k, v, mask)

    def scores_path(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
                    ) -> torch.Tensor:
        """The torch path (and the portable export): [B, H, S, d] in original head order."""
        b, c, s, d = q.shape
        n = self.layout.slots_per_k
        if not self.slots_are_clusters:
            q = q.new_zeros(b, self.num_slots, s, d).index_copy(1, self.slot_of_cluster, q)
        # One matmul per slot rank r against K as stored: no K copy, and per-head shapes equal to the
        # eager path's, so the identity mapping reproduces it bit for bit.
        kt = k.transpose(-1, -2)
        if n == 1:
            scores = torch.matmul(q, kt)  # slot j reads kept K head j
        else:
            q = q.view(b, self.num_kept, n, s, d)
            scores = torch.cat([torch.matmul(q[:, :, r], kt).unsqueeze(2) for r in range(n)], dim=2)
            scores = scores.flatten(1, 2)  # [B, kept * n slots, S, T]
        probs = masked_softmax(scores.float() * self.scale, mask).to(v.dtype)
        if not self.slots_are_heads:
            probs = probs.index_select(1, self.slot_of_head)
        self.hand_over(probs)
        # Heads of one GQA group share their V: [B, KV, g, S, T] @ [B, KV, 1, T, d]. (matmul expands V
        # over the group internally, as eager's repeat_kv does; a reshape/view of P to [B, KV, g*S, T]
        # would avoid that but adds symbolic-shape guards that make torch.export reject a dynamic length.)
        out = torch.matmul(probs.unflatten(1, (self.num_kv_heads, self.group)), v.unsqueeze(2))
        return out.flatten(1, 2)

    def _kernel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        """Fused Triton path: only without a mask (no padding), for decode or a prefill with an empty cache."""
        kernels = _kernels()
        b, _, s, _ = q.shape
        t = k.shape[-2]
        # tl.dot needs a K dimension of at least 16: tiny test configs (d = 8) take the torch path.
        if kernels is None or self.head_dim < 16 or not (s == 1 or s == t):
            return None
        idx = (self.cluster_offsets, self.k_head_index, self.v_head_index)
        if s == 1:
            lengths = torch.full((b,), t, dtype=torch.int32, device=q.device)
            out = kernels.clustered_decode(q[:, :, 0], k, v, lengths, *idx, self.scale).unsqueeze(2)
        else:
            out = kernels.clustered_prefill(q.contiguous(), k, v, *idx, self.scale, causal=True)
        return out.index_select(1, self.inverse_permutation)  # permuted -> original head order



def positioned_qkv(m: Any, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positioned q [B, C, S, d] (clusters in layout order), k [B, kept, S, d] and v [B, KV, S, d] of a
    static layer: a StaticClusteredAttention, or the fused export's layer built from one (same projections)."""
    x = call.hidden_states
    b, s, _ = x.shape
    q, k, v = (proj(x).view(b, s, n, m.head_dim).transpose(1, 2) for proj, n in
               ((m.q_proj, m.num_clusters), (m.k_proj, m.num_kept), (m.v_proj, m.num_kv_heads)))
    if m.q_scale != 1.0:
        q = q * m.q_scale  # OPT scales q after projection (before positions: it has none)
    q, k = m.adapter.position(q, k, call)
    return q, k, v
