"""The hand-made development plan hand40.json: in every layer of SmolLM2-135M, KV heads 0 and 1 (query heads
0-5) keep 4 sinks + the last 1634 tokens and KV head 2 stays full, i.e. 40.0% of the cache saved at 4096
tokens and nothing at 1024. No statistics chose these heads; it only exercised the benchmark."""

from chai_compile.adapters import adapter_for
from chai_compile.choices import LayerKind
from chai_compile.fingerprint import model_info
from chai_compile.loading import load_model
from chai_compile.mapping import ClusterMapping, LayerMapping, Span

info = model_info(adapter_for(load_model("smollm2-135m").model))
spans = (Span(4, 1634),) * 6 + (None,) * 3
plan = ClusterMapping.build(info, [LayerMapping(i, LayerKind.SPAN, spans=spans) for i in range(info.num_layers)],
                            {"hand": "kv groups 0,1 span s4 w1634 (40% saving at 4096), group 2 full"})
plan.write("hand40.json")
