"""Clustered-attention kernels: the float64 reference against torch's own attention per head (CPU), and the
Triton decode / prefill kernels against the reference with fresh random inputs, poisoned outputs
and padding, lengths that are not multiples of the block size, MHA and GQA (GPU).

The GPU tests also run on the CPU under the Triton interpreter: TRITON_INTERPRET=1 pytest ...
"""

from __future__ import annotations

import math

import pytest
import torch

from chai_compile.kernels import (
    HAS_TRITON,
    DecodeConfig,
    PrefillConfig,
    build_plan,
    clustered_decode,
    clustered_decode_reference,
    clustered_prefill,
    clustered_prefill_reference,
)
from chai_compile.kernels.triton_decode import SMALL_STEP_KEYS, fills_with_one_warp
from tests.kernel_device import DEV, needs_kernel

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def mapping(sizes: list[int], k_heads: list[int], v_heads: list[int], device: str = "cpu"):
    """int32 cluster_offsets, k_head_index, v_head_index from cluster sizes."""
    offs = [0]
    for s in sizes:
        offs.append(offs[-1] + s)
    assert len(v_heads) == offs[-1] and len(k_heads) == len(sizes)

    def i32(x):
        return torch.tensor(x, dtype=torch.int32, device=device)

    return i32(offs), i32(k_heads), i32(v_heads)


def gqa_mapping(sizes: list[int], num_kv: int, group: int, seed: int = 0):
    """A random permutation of GQA heads cut into clusters; reps' K heads compacted to the kept ones."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_kv * group, generator=g).tolist()
    v_heads = [h // group for h in perm]
    offs = [0]
    for s in sizes:
        offs.append(offs[-1] + s)
    rep_kv = [v_heads[offs[c]] for c in range(len(sizes))]  # representative = first member
    kept = sorted(set(rep_kv))
    return [kept.index(r) for r in rep_kv], v_heads, len(kept)


# ------------------------------------------------------------------ reference vs naive (CPU) ---


def sdpa_oracle(q, k, v, allowed, offs, kidx, vidx, scale):
    """Per permuted head, torch's own scaled_dot_product_attention in float64: an implementation of the
    math independent of kernels/reference.py. q [B, C, S, d], allowed [B, S, T] -> [B, H, S, d]."""
    heads = []
    for c in range(len(kidx)):
        for i in range(offs[c], offs[c + 1]):
            heads.append(torch.nn.functional.scaled_dot_product_attention(
                q[:, c].double(), k[:, kidx[c]].double(), v[:, vidx[i]].double(), attn_mask=allowed, scale=scale))
    return torch.stack(heads, dim=1)


def naive_decode(q, k, v, lengths, offs, kidx, vidx, scale, span=None, sinks=0):
    t = torch.arange(k.shape[2])[None, :]
    allowed = t < lengths[:, None]
    if span is not None:
        allowed &= (t < sinks) | ((t >= span[:, :1]) & (t < span[:, 1:]))
    return sdpa_oracle(q[:, :, None], torch.nan_to_num(k), torch.nan_to_num(v), allowed[:, None], offs, kidx, vidx,
                       scale)[:, :, 0]


def naive_prefill(q, k, v, offs, kidx, vidx, scale, causal):
    seq = q.shape[2]
    allowed = torch.ones(seq, seq, dtype=torch.bool)
    return sdpa_oracle(q, k, v, (allowed.tril() if causal else allowed)[None], offs, kidx, vidx, scale)


@pytest.mark.parametrize("gqa", [False, True])
def test_decode_reference_matches_naive(gqa: bool) -> None:
    torch.manual_seed(0)
    sizes = [3, 1, 4]
    if gqa:
        kidx, vidx, hk = gqa_mapping(sizes, num_kv=4, group=2)
        hv = 4
    else:
        kidx, vidx, hk, hv = [2, 0, 1], list(range(8)), 3, 8
    q = torch.randn(2, 3, 8)
    k, v = torch.randn(2, hk, 11, 8), torch.randn(2, hv, 11, 8)
    lengths = torch.tensor([11, 5], dtype=torch.int32)
    offs, ki, vi = mapping(sizes, kidx, vidx)
    got = clustered_decode_reference(q, k, v, lengths, offs, ki, vi, 0.3, out_dtype=torch.float64)
    want = naive_decode(q, k, v, lengths, offs.tolist(), kidx, vidx, 0.3)
    torch.testing.assert_close(got, want)


def test_decode_reference_span_and_sinks() -> None:
    torch.manual_seed(1)
    offs, ki, vi = mapping([2, 2], [0, 1], [0, 1, 2, 3])
    q, k, v = torch.randn(3, 2, 4), torch.randn(3, 2, 20, 4), torch.randn(3, 4, 20, 4)
    lengths = torch.tensor([20, 15, 3], dtype=torch.int32)
    span = torch.tensor([[10, 14], [1, 30], [5, 9]], dtype=torch.int32)
    got = clustered_decode_reference(q, k, v, lengths, offs, ki, vi, 0.5, span=span, sinks=2, out_dtype=torch.float64)
    want = naive_decode(q, k, v, lengths, [0, 2, 4], [0, 1], [0, 1, 2, 3], 0.5, span=span, sinks=2)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("causal", [True, False])
def test_prefill_reference_matches_naive(causal: bool) -> None:
    torch.manual_seed(2)
    kidx, vidx, hk = gqa_mapping([2, 3, 1], num_kv=3, group=2, seed=3)
    offs, ki, vi = mapping([2, 3, 1], kidx, vidx)
    q, k, v = torch.randn(2, 3, 7, 8), torch.randn(2, hk, 7, 8), torch.randn(2, 3, 7, 8)
    got = clustered_prefill_reference(q, k, v, offs, ki, vi, 0.4, causal, out_dtype=torch.float64)
    want = naive_prefill(q, k, v, offs.tolist(), kidx, vidx, 0.4, causal)
    torch.testing.assert_close(got, want)


def test_one_head_per_cluster_is_plain_attention() -> None:
    """C = H with identity indices must be ordinary multi-head attention."""
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16)
    offs, ki, vi = mapping([1] * 4, [0, 1, 2, 3], [0, 1, 2, 3])
    got = clustered_prefill_reference(q, k, v, offs, ki, vi, 0.25, True, out_dtype=torch.float64)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), is_causal=True, scale=0.25
    )
    torch.testing.assert_close(got, want)


def test_plan_dedupes_shared_v_heads_and_tiles() -> None:
    # Cluster 0 = heads 0-3 reading V heads [0, 0, 1, 1]; cluster 1 = heads 4-5 reading [1, 2].
    offs, ki, vi = mapping([4, 2], [0, 1], [0, 0, 1, 1, 1, 2])
    plan = build_plan(offs, ki, vi, tile_width=1)
    assert plan.num_slots == 4 and not plan.identity_slots
    assert plan.slot_of_head.tolist() == [0, 0, 1, 1, 2, 3]
    assert plan.tile_cluster.tolist() == [0, 0, 1, 1]
    assert plan.tile_v_heads.flatten().tolist() == [0, 1, 1, 2]
    # Head-keyed groups of the two-phase kernels: V head 1 is read by both clusters (slots 1 and 2).
    assert plan.shared_v
    assert plan.k_groups[:, :4].tolist() == [[0, 1, 0, 0], [1, 1, 1, 0]]
    v_rows = [(r[0], r[1], r[2 : 2 + r[1]], r[18 : 18 + r[1]]) for r in plan.v_groups.tolist()]
    assert v_rows == [(0, 1, [0], [0]), (1, 2, [1, 2], [0, 1]), (2, 1, [3], [1])]
    mha = build_plan(*mapping([3, 2], [0, 1], [0, 1, 2, 3, 4]), tile_width=2)
    assert mha.identity_slots and mha.num_tiles == 3 and mha.tile_count.tolist() == [2, 1, 2]
    assert not mha.shared_v and mha.v_groups.shape[0] == 5
    # More clusters on one K head than a group row holds: the head gets several rows.
    mqa = build_plan(*mapping([1] * 20, [0] * 20, [0] * 20))
    assert mqa.k_groups[:, 1].tolist() == [16, 4] and mqa.v_groups[:, 1].tolist() == [16, 4]
    # Auto width: a power of two near the mean slots per cluster, capped.
    assert build_plan(*mapping([8] * 4, [0, 1, 2, 3], list(range(32)))).tile_width == 8
    assert build_plan(*mapping([2] * 16, list(range(16)), list(range(32)))).tile_width == 2
    assert build_plan(*mapping([8] * 4, [0, 1, 2, 3], list(range(32))), cap=2).tile_width == 2
    with pytest.raises(ValueError):
        build_plan(*mapping([3, 2], [0, 1], [0, 1, 2, 3, 4])[:2], torch.arange(4, dtype=torch.int32), tile_width=2)


@pytest.mark.parametrize(
    ("batch", "tiles", "t_len", "expected"),
    [
        (1, 32, 4096, True),  # MHA, the H200's 132 SMs: one-warp programs measured 15.6 -> 14.6 us
        (1, 32, 2048, True),  # 10.8 -> 10.0 us
        (2, 32, 2048, True),  # the same keys in two sequences
        (1, 32, 1024, False),  # too few programs of >= 128 keys: one warp measured slower (8.9 vs 8.5 us)
        (1, 8, 4096, False),  # GQA's 8 tiles: one warp measured slower at T <= 2048, even at 4096
    ],
)
def test_one_warp_rule_follows_the_measured_boundary(batch: int, tiles: int, t_len: int, expected: bool) -> None:
    assert fills_with_one_warp(batch, tiles, t_len, sm_count=132) is expected


def test_import_without_triton_is_clean() -> None:
    import chai_compile.kernels as kernels

    assert hasattr(kernels, "clustered_decode")
    if not HAS_TRITON:
        with pytest.raises(RuntimeError, match="triton"):
            clustered_decode(*([None] * 7), 1.0)


# ------------------------------------------------------------------------ kernels vs reference ---


def poison_allocator() -> None:
    """Fill freed cached blocks with NaN so unwritten workspace or output shows up."""
    if DEV == "cuda":
        x = torch.empty(64 << 20, dtype=torch.float32, device=DEV).fill_(float("nan"))
        del x


def padded_cache(batch: int, heads: int, t_max: int, d: int, dtype, lengths: torch.Tensor, strided: bool):
    """Random cache; keys past each length are NaN (must never be read). Optionally non-contiguous."""
    full = torch.randn(batch, heads, t_max, d + (8 if strided else 0), dtype=dtype, device=DEV)
    cache = full[..., :d]
    pos = torch.arange(t_max, device=DEV)
    cache.masked_fill_((pos[None, :] >= lengths.to(DEV)[:, None])[:, None, :, None], float("nan"))
    return cache


DECODE_CASES = [
    # (name, batch, sizes, gqa(num_kv, group) or None, t_max, lengths, d)
    ("mha-even", 2, [4, 4], None, 300, [300, 257], 64),
    ("mha-uneven", 3, [1, 5, 2, 8], None, 1000, [1, 999, 130], 128),
    ("gqa", 2, [3, 5, 4, 4], (4, 4), 517, [517, 33], 128),
    ("odd-d", 1, [2, 1], None, 70, [69], 80),
    ("mqa-many", 2, [2] + [1] * 17, (1, 19), 150, [150, 77], 64),  # one KV head, 18 clusters: >16 per group
]


@needs_kernel
@pytest.mark.parametrize("case", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_decode_kernel(case, dtype) -> None:
    name, batch, sizes, gqa, t_max, lens, d = case
    if DEV == "cpu" and dtype != torch.float32:
        pytest.skip("interpreter: fp32 only")
    torch.manual_seed(hash((name, str(dtype))) % 1000)
    if gqa:
        kidx, vidx, hk = gqa_mapping(sizes, *gqa)
        hv = gqa[0]
    else:
        kidx, vidx, hk, hv = list(range(len(sizes)))[::-1], list(range(sum(sizes))), len(sizes), sum(sizes)
    offs, ki, vi = mapping(sizes, kidx, vidx, DEV)
    lengths = torch.tensor(lens, dtype=torch.int32, device=DEV)
    q = torch.randn(batch, len(sizes), d, dtype=dtype, device=DEV)
    k = padded_cache(batch, hk, t_max, d, dtype, lengths, strided=True)
    v = padded_cache(batch, hv, t_max, d, dtype, lengths, strided=False)
    scale = 1 / math.sqrt(d)
    want = clustered_decode_reference(q, k, v, lengths, offs, ki, vi, scale, out_dtype=torch.float64)
    configs = [
        None,
        DecodeConfig(tile_width=1, block_n=16, min_split=16),
        DecodeConfig(tile_width=8, block_n=64, two_phase=False),  # FMA tiles
        DecodeConfig(tile_width=4, block_n=32, use_dot=True, two_phase=False),  # tensor-core kernel on a wide tile
        DecodeConfig(tile_width=2, use_dot=False, two_phase=False),  # FMA kernel where the default picks the dot one
        DecodeConfig(two_phase=True, block_n=16, min_split=16),  # scores + P.V kernels on every layout
        DecodeConfig(two_phase=False),  # single-pass tiles where the default picks two phases
        DecodeConfig(fuse_merge=False),  # the merge kernel where the default fuses the merge
        DecodeConfig(fuse_merge=True, tile_width=8, use_dot=False, block_n=16, min_split=16),  # fused, FMA tiles
    ]
    for cfg in configs if dtype != torch.float16 else configs[:1]:
        poison_allocator()
        out = torch.full((batch, sum(sizes), d), float("nan"), dtype=dtype, device=DEV)
        got = clustered_decode(q, k, v, lengths, offs, ki, vi, scale, config=cfg, out=out)
        assert got.dtype == dtype and got.shape == (batch, sum(sizes), d)
        torch.testing.assert_close(
            got.double(), want, atol=TOL[dtype], rtol=TOL[dtype], msg=lambda m, cfg=cfg: f"{cfg}: {m}"
        )
    # A bound past SMALL_STEP_KEYS: the defaults of large steps (auto tile width, merge kernel) on these caches.
    got = clustered_decode(q, k, v, lengths, offs, ki, vi, scale, max_length=SMALL_STEP_KEYS + 1)
    torch.testing.assert_close(got.double(), want, atol=TOL[dtype], rtol=TOL[dtype])


@needs_kernel
def test_decode_kernel_span_and_sinks() -> None:
    torch.manual_seed(5)
    batch, d, t_max = 3, 64, 400
    offs, ki, vi = mapping([3, 1], [1, 0], [0, 1, 2, 3], DEV)
    lengths = torch.tensor([400, 250, 40], dtype=torch.int32, device=DEV)
    span = torch.tensor([[100, 237], [0, 300], [30, 90]], dtype=torch.int32, device=DEV)
    sinks = 4
    q = torch.randn(batch, 2, d, device=DEV)
    k = padded_cache(batch, 2, t_max, d, torch.float32, lengths, strided=False)
    v = padded_cache(batch, 4, t_max, d, torch.float32, lengths, strided=False)
    pos = torch.arange(t_max, device=DEV)
    outside = ~((pos[None] < sinks) | ((pos[None] >= span[:, :1]) & (pos[None] < span[:, 1:])))
    k.masked_fill_(outside[:, None, :, None], float("nan"))  # skipped blocks must not be read
    v.masked_fill_(outside[:, None, :, None], float("nan"))
    want = clustered_decode_reference(
        q, k, v, lengths, offs, ki, vi, 0.1, span=span, sinks=sinks, out_dtype=torch.float64
    )
    for cfg in [None, DecodeConfig(block_n=16, min_split=16), DecodeConfig(two_phase=True, block_n=16, min_split=16)]:
        got = clustered_decode(q, k, v, lengths, offs, ki, vi, 0.1, span=span, sinks=sinks, config=cfg)
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


@needs_kernel
@pytest.mark.parametrize(
    "cfg",
    [
        DecodeConfig(fuse_merge=True, block_n=16, min_split=16),
        DecodeConfig(fuse_merge=True, tile_width=8, use_dot=True, block_n=16, min_split=16),
        None,  # small steps: width-1 tiles on tensor cores, merged in the split kernel
    ],
    ids=["tiles", "dot-wide", "default"],
)
def test_decode_fused_merge_repeats(cfg) -> None:
    """The in-kernel merge counts splits with counters that the merging program resets: calls in a row and
    replays of one CUDA graph (new lengths each time) must each merge exactly once, on GQA heads sharing a slot."""
    torch.manual_seed(7)
    batch, d, t_max = 2, 64, 200
    kidx, vidx, hk = gqa_mapping([6, 2], 2, 4)
    offs, ki, vi = mapping([6, 2], kidx, vidx, DEV)
    q = torch.randn(batch, 2, d, device=DEV)
    k = torch.randn(batch, hk, t_max, d, device=DEV)
    v = torch.randn(batch, 2, t_max, d, device=DEV)
    lengths = torch.tensor([t_max, 1], dtype=torch.int32, device=DEV)
    out = torch.full((batch, 8, d), float("nan"), device=DEV)

    def step() -> None:
        clustered_decode(q, k, v, lengths, offs, ki, vi, 0.1, config=cfg, out=out, max_length=t_max)

    def check() -> None:
        want = clustered_decode_reference(q, k, v, lengths, offs, ki, vi, 0.1, out_dtype=torch.float64)
        torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)

    for n in ([t_max, 1], [37, 150], [5, 200]):
        lengths.copy_(torch.tensor(n))
        out.fill_(float("nan"))
        step()
        check()
    if DEV != "cuda":
        return
    step()  # the warm-up outside the capture compiles and sizes the counter buffer
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for n in ([t_max, 1], [64, 199], [1, 2], [t_max, t_max]):
        lengths.copy_(torch.tensor(n))
        out.fill_(float("nan"))
        graph.replay()
        check()


PREFILL_CASES = [
    # (name, batch, sizes, gqa or None, seq, causal, d)
    ("mha-causal", 2, [4, 2, 2], None, 200, True, 64),
    ("mha-full", 1, [1, 3], None, 77, False, 128),
    ("gqa-causal", 2, [3, 5, 4, 4], (4, 4), 129, True, 128),
    ("tiny", 1, [2], None, 1, True, 64),
]


@needs_kernel
@pytest.mark.parametrize("case", PREFILL_CASES, ids=[c[0] for c in PREFILL_CASES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_prefill_kernel(case, dtype) -> None:
    name, batch, sizes, gqa, seq, causal, d = case
    if DEV == "cpu" and dtype != torch.float32:
        pytest.skip("interpreter: fp32 only")
    torch.manual_seed(hash((name, str(dtype))) % 1000)
    if gqa:
        kidx, vidx, hk = gqa_mapping(sizes, *gqa)
        hv = gqa[0]
    else:
        kidx, vidx, hk, hv = list(range(len(sizes))), list(range(sum(sizes)))[::-1], len(sizes), sum(sizes)
    offs, ki, vi = mapping(sizes, kidx, vidx, DEV)
    q = torch.randn(batch, len(sizes), seq, d, dtype=dtype, device=DEV)
    k = torch.randn(batch, hk, seq, d + 8, dtype=dtype, device=DEV)[..., :d]
    v = torch.randn(batch, hv, seq, d, dtype=dtype, device=DEV)
    scale = 1 / math.sqrt(d)
    want = clustered_prefill_reference(q, k, v, offs, ki, vi, scale, causal, out_dtype=torch.float64)
    configs = [None, PrefillConfig(tile_width=1, block_m=32, block_n=32, num_warps=4)]
    if DEV == "cuda" and dtype == torch.bfloat16:  # fp32 tiles this wide exceed shared memory
        configs.append(PrefillConfig(tile_width=4, block_m=64, block_n=32, num_warps=8))
    for cfg in configs if dtype != torch.float16 else configs[:1]:
        poison_allocator()
        out = torch.full((batch, sum(sizes), seq, d), float("nan"), dtype=dtype, device=DEV)
        got = clustered_prefill(q, k, v, offs, ki, vi, scale, causal, config=cfg, out=out)
        assert got.dtype == dtype and got.shape == (batch, sum(sizes), seq, d)
        torch.testing.assert_close(
            got.double(), want, atol=TOL[dtype], rtol=TOL[dtype], msg=lambda m, cfg=cfg: f"{cfg}: {m}"
        )
