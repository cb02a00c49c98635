"""Span layers' decode step on the Triton decode kernel (rewrite/span_kernel.py).

The bridge against the float64 reference (kernels/reference.py) over a span cache filled token by token:
bounded groups before and after the ring wraps, sinks 0 and > 0, several spans in one layer and in one
group, a full group beside bounded ones, MHA and GQA, left padding and a mask with a hole. Then a model's
decode loop on the kernel against its torch path step by step. Both run on the CPU under the Triton
interpreter (TRITON_INTERPRET=1 pytest tests/test_span_kernel.py, fp32, tiny shapes); the fp16/bf16 test
needs CUDA.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from chai_compile.adapters import adapter_for
from chai_compile.choices import LayerKind
from chai_compile.compat import model_forward
from chai_compile.fingerprint import model_info
from chai_compile.kernels import HAS_TRITON
from chai_compile.kernels.reference import clustered_attention
from chai_compile.mapping import ClusterMapping, LayerMapping, Span
from chai_compile.rewrite import apply_mapping, span_kernel
from chai_compile.rewrite.span import SpanAttention, head_groups
from chai_compile.rewrite.span_cache import SpanCacheLayer
from chai_compile.rewrite.span_step import SpanStep
from tests.kernel_device import DEV, needs_kernel

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]

D = 16  # the smallest head size the kernels take (tl.dot)
SCALE = D**-0.5


@pytest.fixture
def launches(monkeypatch):
    """Counts kernel launches and torch fallbacks of span_decode."""
    from chai_compile import kernels

    counts = {"kernel": 0, "torch": 0}
    for obj, name, key in ((kernels, "clustered_decode", "kernel"), (span_kernel, "_torch_heads", "torch")):
        fn = getattr(obj, name)

        def counted(*a, _fn=fn, _key=key, **kw):
            counts[_key] += 1
            return _fn(*a, **kw)

        monkeypatch.setattr(obj, name, counted)
    return counts


def reference_step(q, k, v, index, spans, group):
    """float64 attention of every head's query q [B, H, d] over the whole history k, v [B, KV, T, d] with
    real indices [B, T] (the last one is the query's): real tokens, sinks plus window."""
    i, j = index[:, -1:], index
    heads = []
    for h, sp in enumerate(spans):
        ok = (i >= 0) & (j >= 0) & (j <= i)
        if sp is not None:
            ok &= (j < sp.sinks) | (j > i - sp.window)
        heads.append(clustered_attention(q[:, h : h + 1, None], k, v, ok[:, None, None], [0, 1], [h // group],
                                         [h // group], SCALE))
    return torch.cat(heads, 1)[:, :, 0]


# (name, spans, KV heads, real mask rows (1: token, 0: padding), prefill length, padded mask, kernel-only)
S = Span
LEFT = ("1" * 12, "00000" + "1" * 7)  # the second row starts after the prefill (fewer tokens than sinks)
CASES = [
    # MHA: three bounded groups (sinks 0, 2, 1; windows 3, 3, 5) and a full head, left padding.
    ("mha", (S(0, 3), S(2, 3), S(1, 5), None), 4, LEFT, 5, True, True),
    # GQA: a bounded group (2 sinks, window 4) read by Span(1, 4) and Span(2, 3) (the narrower window takes
    # torch once the ring wraps), a full group read by a full head and Span(0, 3).
    ("gqa", (S(1, 4), S(2, 3), None, S(0, 3)), 2, LEFT, 4, True, False),
    # A full group's span head with sinks: on the kernel without padding (mask given or not) ...
    ("gqa-full-sinks", (None, S(2, 3), S(2, 3), S(2, 3)), 2, ("1" * 10, "1" * 10), 4, True, True),
    ("gqa-full-sinks-nomask", (None, S(2, 3), S(2, 3), S(2, 3)), 2, ("1" * 10, "1" * 10), 4, False, True),
    # ... on torch with padding; its bounded group stays on the kernel.
    ("gqa-full-sinks-padded", (None, S(2, 3), S(2, 3), S(2, 3)), 2, ("1" * 10, "00" + "1" * 8), 4, True, False),
    # A padding slot after real ones: the full group cannot use row arithmetic and takes torch.
    ("mha-hole", (S(0, 3), S(2, 3), S(1, 5), None), 4, ("1" * 10, "0011011111"), 5, True, False),
    # A padding token in the decode (its row is not compared): the same from then on.
    ("mha-padding-step", (S(0, 3), S(2, 3), S(1, 5), None), 4, ("1" * 10, "0111101111"), 4, True, False),
]


def test_span_classes_read_consecutive_heads_as_views():
    """A class whose heads are consecutive is read from q and written to the output as views (no gather);
    interleaved heads are gathered."""
    one_kv = lambda spans: span_kernel.span_classes(spans, head_groups(spans, 1), len(spans), torch.device("cpu"))  # noqa: E731
    blocks = one_kv((S(1, 4), S(1, 4), S(2, 3), S(2, 3)))
    assert [(c.heads.tolist(), c.at) for c in blocks] == [([0, 1], slice(0, 2)), ([2, 3], slice(2, 4))]
    mixed = one_kv((S(1, 4), S(2, 3), S(1, 4), S(2, 3)))
    assert [(c.heads.tolist(), c.at) for c in mixed] == [([0, 2], None), ([1, 3], None)]


@needs_kernel
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_span_decode_matches_float64_reference(case, launches):
    name, spans, num_kv, rows, prefill, padded, kernel_only = case
    group, length = len(spans) // num_kv, len(rows[0])
    gen = torch.Generator().manual_seed(len(name))
    b, h = len(rows), len(spans)
    q = torch.randn(b, h, length, D, generator=gen).to(DEV)
    k = torch.randn(b, num_kv, length, D, generator=gen).to(DEV)
    v = torch.randn(b, num_kv, length, D, generator=gen).to(DEV)
    valid = torch.tensor([[c == "1" for c in r] for r in rows], device=DEV)
    k = k.masked_fill(~valid[:, None, :, None], float("nan"))  # padding keys are never scored
    index = torch.where(valid, valid.long().cumsum(1) - 1, -1)

    groups = head_groups(spans, num_kv)
    layer = SpanCacheLayer(groups)
    layer.lazy_initialization(k[:, :, :0], v[:, :, :0])

    def store(lo: int, hi: int) -> torch.Tensor:  # what SpanAttention.attend does with a chunk
        after = valid[:, :hi].long().sum(1)
        for i, grp in enumerate(groups):
            kvs = torch.tensor(grp.kv_heads, device=DEV)
            layer.store(i, k[:, kvs, lo:hi], v[:, kvs, lo:hi], index[:, lo:hi], after, hi - lo)
        layer.advance(after, hi - lo)
        return after

    store(0, prefill)
    classes = span_kernel.span_classes(spans, groups, group, torch.device(DEV))
    worst = 0.0
    for t in range(prefill, length):
        real = store(t, t + 1)
        step = SpanStep((None,) * 5, index[:, t : t + 1], real)
        got = span_kernel.span_decode(q[:, :, t], layer, classes, step, SCALE, padded)
        want = reference_step(q[:, :, t], k[:, :, : t + 1], v[:, :, : t + 1], index[:, : t + 1], spans, group)
        live = valid[:, t]
        worst = max(worst, (got.double() - want)[live].abs().max().item())
    assert worst < 2e-5, (name, worst)
    assert launches["kernel"] > 0 and (launches["torch"] == 0) == kernel_only, launches
    if name == "gqa":  # Span(2, 3) runs on the kernel until the capacity (2 + 4) is passed
        assert launches["torch"] == length - (2 + 4)


def tiny(num_kv: int, spans: tuple[Span | None, ...], dtype: torch.dtype, device: str, attn: str = "eager"):
    """Two layers (dense, span), 4 heads of size 16. Eager attention hands a 4D mask every step, sdpa none
    without padding."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=num_kv, vocab_size=97, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation(attn)
    info = model_info(adapter_for(model))
    plan = ClusterMapping.build(info, [LayerMapping(0, LayerKind.DENSE), LayerMapping(1, LayerKind.SPAN, spans=spans)])
    return apply_mapping(model, plan).to(device, dtype)


@torch.no_grad()
def forced_logits(model, ids: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Prefill, then decode the given tokens one by one (teacher forcing: both paths see the same input)."""
    cache = DynamicCache(config=model.config)
    out = [model_forward(model, cache, input_ids=ids, attention_mask=mask).logits[:, -1]]
    for i in range(tokens.shape[1]):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        out.append(model_forward(model, cache, input_ids=tokens[:, i : i + 1], attention_mask=mask).logits[:, -1])
    return out


def set_kernels(model, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, SpanAttention):
            m.use_kernels = on


MODELS = [("mha", 4, (S(1, 3), None, S(0, 4), S(1, 3))), ("gqa", 2, (S(1, 3), S(0, 3), None, S(2, 2)))]


@needs_kernel
@pytest.mark.parametrize("attn, pad", [("eager", 2), ("sdpa", 0)])
@pytest.mark.parametrize("num_kv, spans", [m[1:] for m in MODELS], ids=[m[0] for m in MODELS])
def test_decode_loop_on_kernel_equals_torch_path(num_kv, spans, attn, pad, launches, monkeypatch):
    """fp32 on the kernel (forced: the model path takes it for CUDA fp16/bf16) against the torch path, the
    rings wrapped after 4-5 tokens: eager with a left-padded row (full groups check their slots), sdpa
    without padding (no mask: no check)."""
    monkeypatch.setattr(SpanAttention, "_on_kernel", lambda self, q: self.use_kernels)
    model = tiny(num_kv, spans, torch.float32, DEV, attn)
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 97, (2, 5), generator=gen).to(DEV)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    tokens = torch.randint(3, 97, (2, 5), generator=gen).to(DEV)
    set_kernels(model, False)
    want = forced_logits(model, ids, mask, tokens)
    assert launches["kernel"] == 0
    set_kernels(model, True)
    got = forced_logits(model, ids, mask, tokens)
    assert launches["kernel"] > 0
    diffs = [(g - w).abs().max().item() for g, w in zip(got, want, strict=True)]
    assert max(diffs) < 1e-5, diffs


@pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("attn, padded", [("eager", True), ("sdpa", False)])
@pytest.mark.parametrize("num_kv, spans", [m[1:] for m in MODELS], ids=[m[0] for m in MODELS])
def test_decode_loop_on_kernel_cuda_half(num_kv, spans, attn, padded, dtype, launches):
    """The model path itself (no forcing): CUDA fp16/bf16 decode on the kernel against the torch path, then
    generate() with left padding."""
    model = tiny(num_kv, spans, dtype, "cuda", attn)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 97, (3, 9), generator=gen).cuda()
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0
        mask[2, :8] = 0
    tokens = torch.randint(3, 97, (3, 12), generator=gen).cuda()
    set_kernels(model, False)
    want = forced_logits(model, ids, mask, tokens)
    set_kernels(model, True)
    got = forced_logits(model, ids, mask, tokens)
    assert launches["kernel"] > 0
    tol = 2e-2 if dtype == torch.float16 else 6e-2  # logits of ~1: a few units of the last place
    diffs = [(g.float() - w.float()).abs().max().item() for g, w in zip(got, want, strict=True)]
    assert max(diffs) < tol, diffs
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert out.shape == (3, 9 + 12)
