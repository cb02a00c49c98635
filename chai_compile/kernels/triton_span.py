"""The span path's key range, shared by the decode kernels (triton_split.py, triton_two_phase.py).

With a span, sequence b attends its first `sinks` keys and the keys in Span[b] = [start, end), both within
its length. The kernels walk these as one virtual range: virtual key v < a is cache row v (a sink), the
others are rows s0 + v - a. Helpers of @triton.jit functions are inlined where they are called.
"""

from __future__ import annotations

from chai_compile.kernels._triton import tl, triton


@triton.jit
def span_range(Span, b, sinks, length):
    """(a, s0, n) of sequence b: a sinks, the span's first row s0, n attended keys in all."""
    span_start = tl.load(Span + b * 2)
    span_end = tl.load(Span + b * 2 + 1)
    a = tl.minimum(sinks, length)
    s0 = tl.maximum(span_start, a)
    e0 = tl.minimum(span_end, length)
    return a, s0, a + tl.maximum(e0 - s0, 0)


@triton.jit
def key_rows(n, a, s0, HAS_SPAN: tl.constexpr):
    """Cache rows (int64) of the virtual keys n; without a span they are the rows themselves."""
    if HAS_SPAN:
        return tl.where(n < a, n, n - a + s0).to(tl.int64)
    else:
        return n.to(tl.int64)
