"""Model fingerprint stored in every mapping: architecture, config digest, Q/K weight digest."""

from __future__ import annotations

import hashlib
import json

import torch

from chai_compile.adapters import ModelAdapter
from chai_compile.device_map import loaded
from chai_compile.mapping import ModelInfo

# Config keys that decide attention shapes; other keys (dtype, version strings) vary harmlessly.
_CONFIG_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "vocab_size", "n_embd", "n_layer", "n_head", "rope_theta", "rope_parameters")


def config_digest(config) -> str:
    d = config.to_dict()
    picked = {k: d[k] for k in _CONFIG_KEYS if k in d}
    return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()


@torch.no_grad()
def model_info(adapter: ModelAdapter) -> ModelInfo:
    """Hash Q/K weights rounded to bf16, so fp32 and bf16 loads of one checkpoint agree."""
    s = adapter.spec
    h = hashlib.sha256()
    norms = []
    for i in range(s.num_layers):
        with loaded(adapter.attention(i)):  # one layer at a time on a model accelerate offloaded
            p = adapter.projections(i)
            for w in (p.q_weight, p.k_weight):
                h.update(w.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
            qn = p.q_weight.detach().float().reshape(s.num_heads, -1).norm(dim=1)
            kn = p.k_weight.detach().float().reshape(s.num_kv_heads, -1).norm(dim=1)
        norms.append(tuple(float(f"{x:.7g}") for x in torch.cat([qn, kn]).cpu().tolist()))
    arch = (adapter.config.architectures or [type(adapter.model).__name__])[0]
    return ModelInfo(
        architecture=arch,
        model_type=adapter.config.model_type,
        num_layers=s.num_layers,
        num_heads=s.num_heads,
        num_kv_heads=s.num_kv_heads,
        head_dim=s.head_dim,
        hidden_size=s.hidden_size,
        config_sha256=config_digest(adapter.config),
        qk_sha256=h.hexdigest(),
        qk_head_norms=tuple(norms),
    )
