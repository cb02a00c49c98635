"""Greedy choice among CHAI K-head drops, span heads and shared layers under one KV budget at a context.

Candidates, each measured (KL of next-token distributions from the original's on the scoring windows)
on top of the plan so far and ranked by KL added per cached token freed:
- chai(l, g): KV head g of layer l leaves the K cache; its query heads take the closest kept head's scores;
- span(l, g, s, w): every query head reading KV head g keeps sinks s plus the last w tokens, so that KV
  head's K and V stop growing at s + w; (s, w) is the least span where all those heads keep at least
  `span_mass` of their attention mass (profile statistic) both on running text and on the repeated rows of
  passage-repeat windows (a head that copies from far back is a retrieval head), and must be shorter than
  the scoring windows
  (a span the calibration cannot exercise is never offered);
- shared(l, j): layer l reuses layer j's probabilities and drops its whole K cache; only the
  `SOURCES_PER_LAYER` most similar earlier layers with head-mean similarity >= `min_similarity`.
One transform kind per layer: a layer with CHAI drops is not offered spans or sharing and vice versa
(the plan format gives a layer one kind; CHAI's saving does not depend on the context, a span's does,
and which wins is left to the measured cost per byte). A shared layer's source may be clustered (the
shared layer takes the probabilities the source's heads actually used) but never has spans.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from chai_compile.choices import LayerKind, Transform
from chai_compile.mapping import Cluster, LayerMapping, Span
from chai_compile.plan.select import Scorer, reassign
from chai_compile.plan.shared_scores import ProbStore, SharedScoresAttention
from chai_compile.profile.long_context import LongContextStats
from chai_compile.profile.spans import smallest_span

SOURCES_PER_LAYER = 2  # shared-layer candidates per layer: the most similar earlier layers only


@dataclasses.dataclass(frozen=True)
class Candidate:
    transform: Transform
    layer: int
    kv_head: int | None = None  # chai and span
    span: Span | None = None
    source: int | None = None  # shared

    def describe(self) -> str:
        if self.transform == Transform.SHARED:
            return f"shared({self.layer}<-{self.source})"
        extra = f", s{self.span.sinks}+w{self.span.window}" if self.span else ""
        return f"{self.transform}({self.layer}.{self.kv_head}{extra})"


@dataclasses.dataclass
class LayerState:
    kept: set[int]  # KV heads whose K a representative reads (CHAI)
    spans: dict[int, Span] = dataclasses.field(default_factory=dict)  # KV head -> span of all its query heads
    shared_from: int | None = None


@dataclasses.dataclass
class Step:
    """The plan after one greedy round."""

    saving: float  # fraction of the native KV cache freed at the context
    kl: float
    ppl: float
    accepted: list[str]


class TransformSelector:
    """Holds the per-layer state, keeps the planning modules in step with it, and runs the greedy rounds."""

    def __init__(self, modules: Sequence[SharedScoresAttention], errors: torch.Tensor, stats: LongContextStats,
                 *, context: int, window: int, transforms: Sequence[Transform], span_mass: float,
                 min_similarity: float, frozen: Sequence[int] = ()) -> None:
        first = modules[0]
        self.mods, self.errors, self.stats = modules, errors, stats
        self.kept = stats.kept_mass()  # span rule and ranking: running text and repeated passages both
        self.h, self.kv, self.group = first.num_heads, first.num_kv_heads, first.group
        self.context, self.window, self.transforms = context, window, set(transforms)
        self.span_mass, self.min_similarity, self.frozen = span_mass, min_similarity, set(frozen)
        self.states = [LayerState(set(range(self.kv))) for _ in modules]
        self.store = ProbStore()
        for m in modules:
            m.store = self.store
        self.native = 2 * len(modules) * self.kv * context  # head-tokens

    # ---- state <-> plan layers and modules ------------------------------------------------------
    def layer_mapping(self, layer: int, st: LayerState | None = None) -> LayerMapping:
        st = st or self.states[layer]
        if st.shared_from is not None:
            return LayerMapping(layer, LayerKind.SHARED, source=st.shared_from)
        if st.spans:
            return LayerMapping(layer, LayerKind.SPAN, spans=tuple(st.spans.get(h // self.group)
                                                                    for h in range(self.h)))
        if len(st.kept) < self.kv:
            clusters: dict[int, list[int]] = {}
            for h, r in enumerate(reassign(self.errors[layer], st.kept, self.group)):
                clusters.setdefault(r, []).append(h)
            return LayerMapping(layer, LayerKind.CLUSTERED, tuple(Cluster(tuple(m), r) for r, m in clusters.items()))
        return LayerMapping(layer, LayerKind.DENSE)

    def tokens(self, layer: int, st: LayerState | None = None) -> int:
        k, v = self.layer_mapping(layer, st).head_tokens(self.h, self.kv, self.context)
        return k + v

    def sync(self, layer: int) -> None:
        st, m = self.states[layer], self.mods[layer]
        m.source = reassign(self.errors[layer], st.kept, self.group)
        m.spans = [st.spans.get(h // self.group) for h in range(self.h)] if st.spans else None
        m.shared_from = st.shared_from
        self.store.sources = {s.shared_from for s in self.states if s.shared_from is not None}

    def after(self, c: Candidate) -> LayerState:
        st = self.states[c.layer]
        if c.transform == Transform.CHAI:
            return LayerState(st.kept - {c.kv_head}, dict(st.spans), st.shared_from)
        if c.transform == Transform.SPAN:
            return LayerState(set(st.kept), {**st.spans, c.kv_head: c.span}, st.shared_from)  # type: ignore[dict-item]
        return LayerState(set(st.kept), dict(st.spans), c.source)

    def apply(self, c: Candidate) -> LayerState:
        """Set the candidate; returns the state it replaced (for `restore`)."""
        old = self.states[c.layer]
        self.states[c.layer] = self.after(c)
        self.sync(c.layer)
        return old

    def restore(self, layer: int, st: LayerState) -> None:
        self.states[layer] = st
        self.sync(layer)

    def saving(self) -> float:
        return 1.0 - sum(self.tokens(i) for i in range(len(self.mods))) / self.native

    # ---- candidates --------------------------------------------------------------------------
    def candidates(self) -> list[Candidate]:
        out: list[Candidate] = []
        sources = {s.shared_from for s in self.states if s.shared_from is not None}
        sim = self.stats.similarity.mean(-1)
        for layer, st in enumerate(self.states):
            if layer in self.frozen or st.shared_from is not None:
                continue
            dense_k = len(st.kept) == self.kv
            if Transform.CHAI in self.transforms and not st.spans and len(st.kept) >= 2:
                out += [Candidate(Transform.CHAI, layer, g) for g in sorted(st.kept)]
            # a shared layer's source must compute every token's probabilities: no spans there (the rewrite
            # refuses a span source, whose bounded heads score only what they kept)
            if Transform.SPAN in self.transforms and dense_k and layer not in sources:
                for g in range(self.kv):
                    heads = list(range(g * self.group, (g + 1) * self.group))
                    sw = None if g in st.spans else smallest_span(
                        self.kept[layer], heads, self.stats.sinks, self.stats.windows, self.span_mass,
                        min(self.window, self.context))
                    if sw is not None:
                        out.append(Candidate(Transform.SPAN, layer, g, span=Span(*sw)))
            if Transform.SHARED in self.transforms and dense_k and not st.spans and layer not in sources:
                earlier = [j for j in range(layer) if self.states[j].shared_from is None
                           and not self.states[j].spans and float(sim[layer, j]) >= self.min_similarity]
                earlier.sort(key=lambda j: -float(sim[layer, j]))
                out += [Candidate(Transform.SHARED, layer, source=j) for j in earlier[:SOURCES_PER_LAYER]]
        return out

    def reachable(self) -> float:
        """Optimistic bound on the saving: every layer at its best single-kind saving among today's candidates."""
        freed = 0
        for layer in range(len(self.mods)):
            best = 0
            cands = [c for c in self.candidates() if c.layer == layer]
            chai = [c for c in cands if c.transform == Transform.CHAI]
            if chai:
                best = (len(chai) - 1) * self.context
            spans = [c for c in cands if c.transform == Transform.SPAN]
            best = max(best, sum(self.tokens(layer) - self.tokens(layer, self.after(c)) for c in spans))
            if any(c.transform == Transform.SHARED for c in cands):
                best = max(best, self.kv * self.context)
            freed += best
        return freed / self.native

    def mass_lost(self, c: Candidate) -> float:
        """Span candidates: the attention mass (profile statistic) the span leaves out, summed over the query
        heads that read the KV head."""
        heads = list(range(c.kv_head * self.group, (c.kv_head + 1) * self.group))  # type: ignore[operator]
        a, b = self.stats.sinks.index(c.span.sinks), self.stats.windows.index(c.span.window)  # type: ignore[union-attr]
        return float((1.0 - self.kept[c.layer, heads, a, b]).sum())

    def run_profile(self, scorer: Scorer, target: float, original: tuple[float, float]) -> list[Step]:
        """Spans in order of mass left out per cached token freed, until the target; only the chosen plan is
        measured (`original`: the (KL, perplexity) of the untouched model), no forward pass per candidate."""
        steps = [Step(0.0, *original, [])]
        ranked = sorted(((self.mass_lost(c) / max(self.tokens(c.layer) - self.tokens(c.layer, self.after(c)), 1), c)
                         for c in self.candidates() if c.transform == Transform.SPAN), key=lambda x: x[0])
        accepted = []
        for _, c in ranked:
            if self.saving() >= target - 1e-12:
                break
            self.apply(c)
            accepted.append(c.describe())
        kl, ppl = scorer.measure()
        steps.append(Step(self.saving(), kl, ppl, accepted))
        return steps

    # ---- the greedy rounds ----------------------------------------------------------------------
    def run(self, scorer: Scorer, target: float, per_round: int, max_ppl: float | None,
            progress: bool = True) -> list[Step]:
        kl, ppl = scorer.measure()
        steps = [Step(0.0, kl, ppl, [])]
        bar = tqdm(total=round(100 * target), desc="plan: KV saved (%)", disable=not progress)
        while self.saving() < target - 1e-12:
            ranked = []
            for c in tqdm(self.candidates(), desc="plan: measure candidates", leave=False, disable=not progress):
                freed = self.tokens(c.layer) - self.tokens(c.layer, self.after(c))
                if freed <= 0:
                    continue
                old = self.apply(c)
                ranked.append(((scorer.measure()[0] - kl) / freed, c))
                self.restore(c.layer, old)
            if not ranked:
                break
            ranked.sort(key=lambda x: x[0])
            accepted, layers, stop = [], set(), False
            for _, c in ranked:
                if len(accepted) >= per_round or self.saving() >= target - 1e-12:
                    break
                if c.layer in layers:  # one change per layer per round: accepted changes do not interact there
                    continue
                if accepted and c not in self.candidates():  # an earlier acceptance this round ruled it out
                    continue  # (e.g. shared(27<-26) after 26 became shared, or a span on a new source)
                old = self.apply(c)
                if max_ppl is not None and scorer.measure()[1] > max_ppl:
                    self.restore(c.layer, old)
                    stop = True
                    break
                accepted.append(c.describe())
                layers.add(c.layer)
            if accepted:
                kl, ppl = scorer.measure()
                steps.append(Step(self.saving(), kl, ppl, accepted))
                bar.n = min(bar.total, round(100 * self.saving()))
                bar.refresh()
            if stop or not accepted:
                break
        bar.close()
        return steps
