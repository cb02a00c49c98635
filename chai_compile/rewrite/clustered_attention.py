"""One attention module for every family: clustered head attention (CHAI) with a smaller K cache.

For one layer with H query heads, KV key/value heads (GQA group g = H / KV) and C clusters:

    q      = x W_q[reps]          # C heads: only representatives are projected
    k      = x W_k[kept]          # only the KV heads some representative reads
    v      = x W_v                # whole
    P_c    = softmax(q_c k_{kv(c)}^T * scale + mask)        # C score matrices, fp32 softmax
    out_h  = P_{cluster(h)} v_{h // g}                       # every head keeps its own V
    y      = concat_h(out_h) W_o                             # whole

The cache receives K with `kept` heads and V with KV heads; transformers' DynamicCache concatenates
whatever it is given, so the saving is real memory, measured by `kv_cache_bytes`.

Static membership (the exported form) lays representatives out in "slots": slot j * n + r is the
r-th representative reading kept K head j. Scores are then one batched matmul of q viewed as
[B, kept, n * S, d] against K as stored, with no K copy (n > 1 only when representatives share a
K head; missing slots are zero queries). Probabilities are gathered from slots to heads (small:
they are [.., S, T] per head, never per d) and multiplied with V viewed per GQA group, so V is
never copied either. On CUDA in fp16/bf16 without a padding mask the Triton kernels in
chai_compile.kernels replace this path.

Dynamic membership (the paper's online mode) decides clusters per request from the first 5
tokens; it needs every K head in the cache (membership is unknown ahead of time), so it saves
score compute and Q projection, not memory.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from chai_compile.adapters import AttentionCall, ModelAdapter
from chai_compile.errors import ChaiError, UnsupportedArchitectureError
from chai_compile.mapping import LayerMapping
from chai_compile.rewrite.dynamic import membership_from_prefix

MEMBERSHIPS = ("static", "dynamic")
# Attribute set on a transformers cache object to carry per-request dynamic membership per layer.
DYNAMIC_STATE_ATTR = "_chai_dynamic_membership"
_HALF = (torch.float16, torch.bfloat16)


class RewriteError(ChaiError):
    """The rewrite cannot be applied or run as asked."""


@dataclasses.dataclass(frozen=True)
class StaticLayout:
    """Where every head goes in the static (frozen-mapping) layer; all lists are plain ints."""

    reps: list[int]  # per cluster (in slot order): representative query head
    kept: list[int]  # kept K heads (original KV indices, sorted)
    k_of_cluster: list[int]  # per cluster: index into kept
    slots_per_k: int  # n: representative slots per kept K head
    slot_of_cluster: list[int]
    slot_of_head: list[int]  # per original query head
    # Fused-kernel layout over the same cluster order (see mapping.FusedLayout)
    permutation: list[int]
    cluster_offsets: list[int]
    v_head_index: list[int]

    @classmethod
    def build(cls, clusters: Sequence[tuple[int, Sequence[int]]], num_heads: int, num_kv_heads: int) -> StaticLayout:
        group = num_heads // num_kv_heads
        # Order clusters by the K head their representative reads, so each K head's slots are contiguous.
        order = sorted(clusters, key=lambda c: (c[0] // group, c[0]))
        reps = [rep for rep, _ in order]
        kept = sorted({rep // group for rep in reps})
        k_of_cluster = [kept.index(rep // group) for rep in reps]
        n = max(k_of_cluster.count(j) for j in range(len(kept)))
        slot_of_cluster, seen = [], [0] * len(kept)
        for j in k_of_cluster:
            slot_of_cluster.append(j * n + seen[j])
            seen[j] += 1
        slot_of_head = [-1] * num_heads
        perm, offsets = [], [0]
        for c, (rep, members) in enumerate(order):
            for h in members:
                slot_of_head[h] = slot_of_cluster[c]
            perm.extend([rep] + [h for h in sorted(members) if h != rep])
            offsets.append(len(perm))
        return cls(reps, kept, k_of_cluster, n, slot_of_cluster, slot_of_head, perm, offsets,
                   [h // group for h in perm])


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear owning copies of weight [out, in] and bias (no random init of a throwaway)."""
    out_f, in_f = weight.shape
    lin = nn.utils.skip_init(nn.Linear, in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def _rows(w: torch.Tensor | None, heads: Sequence[int], head_dim: int) -> torch.Tensor | None:
    """Rows of a head-major [heads * d, ...] weight or [heads * d] bias for the given heads (a copy)."""
    if w is None:
        return None
    idx = torch.tensor(list(heads), device=w.device)
    per_head = w.reshape(-1, head_dim, *w.shape[1:])
    return per_head.index_select(0, idx).reshape(len(heads) * head_dim, *w.shape[1:])


@functools.cache
def _kernels() -> Any:
    """chai_compile.kernels when Triton is usable, else None (the torch path then runs everywhere)."""
    try:
        from chai_compile import kernels
    except ImportError:
        return None
    return kernels if getattr(kernels, "HAS_TRITON", False) else None


def _static_layer_types() -> tuple[type, ...]:
    try:
        from transformers.cache_utils import StaticLayer
    except ImportError:
        return ()
    return (StaticLayer,)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """fp32 softmax of scores [B, X, S, T] under any mask transformers hands an attention module.

    None: causal, aligned bottom-right (queries are the last S of T positions); 4D bool: True
    attends; 4D float: additive (eager); 2D [B, T]: padding (flash-attention style), plus causal.
    Masked entries get the fp32 minimum, not -inf, so fully masked rows (left-padding queries) give
    uniform weights instead of NaN, as the eager path does.
    """
    s, t = scores.shape[-2:]
    lowest = torch.finfo(scores.dtype).min
    if mask is not None and mask.dim() == 4 and mask.dtype != torch.bool:
        return (scores + mask[..., :t].to(scores.dtype)).softmax(-1)
    keep = None
    if mask is None or mask.dim() == 2:
        if s > 1:
            pos = torch.arange(t, device=scores.device)
            keep = pos[None, :] <= pos[t - s :, None]  # [S, T]
        if mask is not None:
            pad = mask[:, None, None, :t].bool()
            keep = pad if keep is None else pad & keep
    else:
        keep = mask[..., :t]
    if keep is not None:
        scores = scores.masked_fill(~keep, lowest)
    return scores.softmax(-1)


class ClusteredAttention(nn.Module):
    """Drop-in replacement for a family's attention module: same call convention, returns (output, None)."""

    def __init__(
        self,
        adapter: ModelAdapter,
        layer_index: int,
        layer: LayerMapping,
        membership: str = "static",
    ) -> None:
        super().__init__()
        if membership not in MEMBERSHIPS:
            raise RewriteError(f"membership must be one of {', '.join(MEMBERSHIPS)}", value=membership)
        spec = adapter.spec
        h, kv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.layer_idx = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, d
        self.group = h // kv
        self.membership = membership
        self.num_clusters = layer.num_clusters if layer.kind == "clustered" else h
        self.use_kernels = True  # tests and benchmarks switch the CUDA kernels off to compare paths
        try:
            self.scale = float(adapter.scaling())
        except NotImplementedError as e:
            raise UnsupportedArchitectureError(f"layer {layer_index}: {e}") from None
        # The adapter parses the family's call convention and applies its positions; keep a copy
        # without the model so the module does not hold its own model alive (and deep-copies cleanly).
        self.adapter = copy.copy(adapter)
        self.adapter.model = None
        # What adapter_for() reads on a rewritten model to find the family's call convention.
        self.original_forward = adapter.attention_forward()

        p = adapter.projections(layer_index)
        self.q_scale = float(p.q_scale)
        self.v_proj = _linear(p.v_weight, p.v_bias)
        self.o_proj = _linear(p.o_weight, p.o_bias)
        if membership == "static":
            clusters = [(c.representative, c.members) for c in layer.clusters] if layer.kind == "clustered" \
                else [(i, (i,)) for i in range(h)]
            lay = StaticLayout.build(clusters, h, kv)
            self.layout = lay
            self.q_proj = _linear(_rows(p.q_weight, lay.reps, d), _rows(p.q_bias, lay.reps, d))
            self.k_proj = _linear(_rows(p.k_weight, lay.kept, d), _rows(p.k_bias, lay.kept, d))
            self.num_kept = len(lay.kept)
            self.num_slots = len(lay.kept) * lay.slots_per_k
            self.slots_are_clusters = self.num_slots == len(lay.reps)
            # Skip the probability gather when slot i is head i (identity mapping, all-singleton MHA).
            self.slots_are_heads = lay.slot_of_head == list(range(h))
            dev = p.q_weight.device
            # Non-persistent: state_dict keeps only weights; .to(device) moves these with the module.
            self.register_buffer("slot_of_cluster", torch.tensor(lay.slot_of_cluster, device=dev), persistent=False)
            self.register_buffer("slot_of_head", torch.tensor(lay.slot_of_head, device=dev), persistent=False)
            for name in ("cluster_offsets", "v_head_index"):
                self.register_buffer(name, torch.tensor(getattr(lay, name), dtype=torch.int32, device=dev),
                                     persistent=False)
            self.register_buffer("k_head_index", torch.tensor(lay.k_of_cluster, dtype=torch.int32, device=dev),
                                 persistent=False)
            inverse = [0] * h
            for pos, head in enumerate(lay.permutation):
                inverse[head] = pos
            self.register_buffer("inverse_permutation", torch.tensor(inverse, device=dev), persistent=False)
        else:
            # Representatives vary per request: keep every Q row (gathered per request) and every K head.
            self.layout = None
            self.q_weight = nn.Parameter(p.q_weight.detach().clone())
            self.q_bias = None if p.q_bias is None else nn.Parameter(p.q_bias.detach().clone())
            self.k_proj = _linear(p.k_weight, p.k_bias)
            self.num_kept = kv

    @torch.no_grad()
    def load_refit(self, q_rows: dict[int, tuple[torch.Tensor, torch.Tensor | None]],
                   o_weight: torch.Tensor | None) -> None:
        """Take a plan's refit weights: representatives' Q rows and the output projection."""
        if self.membership != "static":
            raise RewriteError("refit weights are fitted to the plan's static clusters",
                               fix="use --membership static with a plan that carries weights")
        d = self.head_dim
        for head, (w, b) in q_rows.items():
            pos = self.layout.reps.index(head)
            self.q_proj.weight[pos * d : (pos + 1) * d] = w.to(self.q_proj.weight)
            if b is not None:
                self.q_proj.bias[pos * d : (pos + 1) * d] = b.to(self.q_proj.bias)
        if o_weight is not None:
            self.o_proj.weight.copy_(o_weight.to(self.o_proj.weight))

    def extra_repr(self) -> str:
        return (f"layer={self.layer_idx}, membership={self.membership}, heads={self.num_heads}, "
                f"clusters={self.num_clusters}, k_heads={self.num_kept}/{self.num_kv_heads}, head_dim={self.head_dim}")

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        call = self.adapter.call_inputs(args, kwargs)
        x = call.hidden_states
        b, s, _ = x.shape
        cache = call.cache
        cache = getattr(cache, "self_attention_cache", cache)  # GPT-2 may hand an EncoderDecoderCache
        if self.membership == "static":
            out = self._static(call, cache)
        else:
            out = self._dynamic(call, cache)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)), None

    def _update_cache(self, cache: Any, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if cache is None:
            return k, v
        if k.shape[1] != v.shape[1] and hasattr(cache, "layers") and self.layer_idx < len(cache.layers) \
                and isinstance(cache.layers[self.layer_idx], _static_layer_types()):
            raise RewriteError(
                f"layer {self.layer_idx} keeps {k.shape[1]} K heads and {v.shape[1]} V heads; a StaticCache "
                "allocates both with the K head count",
                fix="use the default DynamicCache (cache_implementation='dynamic')",
            )
        return cache.update(k, v, self.layer_idx)

    def _heads(self, t: torch.Tensor, n: int) -> torch.Tensor:
        b, s, _ = t.shape
        return t.view(b, s, n, self.head_dim).transpose(1, 2)

    def _static(self, call: AttentionCall, cache: Any) -> torch.Tensor:
        x = call.hidden_states
        q = self._heads(self.q_proj(x), len(self.layout.reps))
        k = self._heads(self.k_proj(x), self.num_kept)
        v = self._heads(self.v_proj(x), self.num_kv_heads)
        if self.q_scale != 1.0:
            q = q * self.q_scale  # OPT scales q after projection (before positions: it has none)
        q, k = self.adapter.position(q, k, call)
        k, v = self._update_cache(cache, k, v)
        mask = call.attention_mask
        if self.use_kernels and mask is None and q.is_cuda and q.dtype in _HALF:
            out = self._static_kernel(q, k, v)
            if out is not None:
                return out
        return self._static_torch(q, k, v, mask)

    def _static_torch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
                      ) -> torch.Tensor:
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
        # Heads of one GQA group share their V: [B, KV, g, S, T] @ [B, KV, 1, T, d]. (matmul expands V
        # over the group internally, as eager's repeat_kv does; a reshape/view of P to [B, KV, g*S, T]
        # would avoid that but adds symbolic-shape guards that make torch.export reject a dynamic length.)
        out = torch.matmul(probs.unflatten(1, (self.num_kv_heads, self.group)), v.unsqueeze(2))
        return out.flatten(1, 2)

    def _static_kernel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
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

    def _dynamic(self, call: AttentionCall, cache: Any) -> torch.Tensor:
        x = call.hidden_states
        b, s, _ = x.shape
        h, c, d = self.num_heads, self.num_clusters, self.head_dim
        k = self._heads(self.k_proj(x), self.num_kv_heads)
        v = self._heads(self.v_proj(x), self.num_kv_heads)
        store = None if cache is None else cache.__dict__.setdefault(DYNAMIC_STATE_ATTR, {})
        past = 0 if cache is None else cache.get_seq_length(self.layer_idx)
        state = None if store is None or past == 0 else store.get(self.layer_idx)
        if state is None:
            if past:
                raise RewriteError(
                    f"layer {self.layer_idx}: dynamic membership is decided at prefill, but this cache holds "
                    f"{past} tokens from elsewhere", fix="prefill through the rewritten model")
            state = self._decide_membership(call)
            if store is not None:
                store[self.layer_idx] = state
        reps, cluster_of_head, w_sel, b_sel = state
        if reps.shape[0] != b:
            raise RewriteError(f"layer {self.layer_idx}: batch size changed from {reps.shape[0]} to {b} within a "
                               "request (beam search is not supported with dynamic membership)")
        q = torch.bmm(x, w_sel.transpose(1, 2))
        if b_sel is not None:
            q = q + b_sel[:, None, :]
        q = self._heads(q, c)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        q, k = self.adapter.position(q, k, call)
        k, v = self._update_cache(cache, k, v)
        t = k.shape[-2]
        k_rep = k.gather(1, (reps // self.group)[:, :, None, None].expand(b, c, t, d))
        scores = torch.matmul(q * self.scale, k_rep.transpose(-1, -2))
        probs = masked_softmax(scores.float(), call.attention_mask).to(v.dtype)
        probs = probs.gather(1, cluster_of_head[:, :, None, None].expand(b, h, s, t))
        out = torch.matmul(probs.reshape(b, self.num_kv_heads, self.group * s, t), v)
        return out.view(b, h, s, d)

    def _decide_membership(self, call: AttentionCall) -> tuple[torch.Tensor, ...]:
        """Clusters per sequence from its first 5 real tokens; the request's Q weights for its representatives."""
        h, d = self.num_heads, self.head_dim

        def queries_keys(xw: torch.Tensor, sub: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
            q = self._heads(nn.functional.linear(xw, self.q_weight, self.q_bias), h) * self.q_scale
            k = self._heads(self.k_proj(xw), self.num_kv_heads)
            return self.adapter.position(q, k, sub)

        reps, cluster_of_head = membership_from_prefix(call, queries_keys, self.group, self.num_clusters, self.scale)
        w = self.q_weight.view(h, d, -1)[reps]  # [B, C, d, hidden]
        w_sel = w.reshape(w.shape[0], -1, w.shape[-1])
        b_sel = None if self.q_bias is None else self.q_bias.view(h, d)[reps].reshape(w.shape[0], -1)
        return reps, cluster_of_head, w_sel, b_sel
