"""Profile report: predicted savings (JSON + Markdown) and plots (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from chai_compile.choices import LayerKind
from chai_compile.mapping import ClusterMapping


def savings(mapping: ClusterMapping, context: int = 2048) -> dict[str, Any]:
    """Predicted savings against the model's native cache and attention (GQA included).

    Per token and layer: Q/K projection FLOPs are 2*hidden*d*(q heads + k heads); score FLOPs
    (q.K^T) at `context` keys are 2*d*context per score head; P.V is unchanged.
    """
    m = mapping.model
    s = mapping.summary()
    d, hid = m.head_dim, m.hidden_size
    qk_proj_orig = 2 * hid * d * (s["query_heads_total"] + s["k_heads_total"])
    qk_proj_chai = 2 * hid * d * (s["score_heads_kept"] + s["k_heads_kept"])
    score_orig = 2 * d * context * s["query_heads_total"]
    score_chai = 2 * d * context * s["score_heads_kept"]
    attn_orig = score_orig * 2  # scores + P.V
    attn_chai = score_chai + score_orig
    kv_bytes_per_token_fp16 = 2 * d * 2 * s["k_heads_total"]
    return {
        **s,
        "k_cache_saving_pct": round(100 * s["k_cache_saving"], 2),
        "kv_cache_saving_pct": round(100 * s["kv_cache_saving"], 2),
        "kv_bytes_per_token_fp16": {"original": kv_bytes_per_token_fp16,
                                    "chai": 2 * d * (s["k_heads_total"] + s["k_heads_kept"])},
        "qk_projection_flops_per_token": {"original": qk_proj_orig, "chai": qk_proj_chai,
                                          "saving_pct": round(100 * (1 - qk_proj_chai / qk_proj_orig), 2)},
        "score_flops_per_token": {"context": context, "original": score_orig, "chai": score_chai,
                                  "saving_pct": round(100 * (1 - score_chai / score_orig), 2)},
        "attention_flops_saving_pct": round(100 * (1 - attn_chai / attn_orig), 2),
    }


def markdown(summary: dict[str, Any], mapping: ClusterMapping, title: str) -> str:
    m = mapping.model
    lines = [
        f"# {title}",
        "",
        f"Model: `{m.architecture}` ({m.num_layers} layers, {m.num_heads} query heads, {m.num_kv_heads} KV heads, "
        f"head_dim {m.head_dim}); fingerprint `{m.qk_sha256[:12]}`.",
        "",
        "| quantity | original | CHAI | saving |",
        "|---|---|---|---|",
        f"| score (query) heads | {summary['query_heads_total']} | {summary['score_heads_kept']} | "
        f"{100 * (1 - summary['score_heads_kept'] / summary['query_heads_total']):.1f}% |",
        f"| K-cache heads | {summary['k_heads_total']} | {summary['k_heads_kept']} | "
        f"{summary['k_cache_saving_pct']:.1f}% |",
        f"| KV-cache bytes/token (fp16) | {summary['kv_bytes_per_token_fp16']['original']} | "
        f"{summary['kv_bytes_per_token_fp16']['chai']} | {summary['kv_cache_saving_pct']:.1f}% |",
        f"| Q/K projection FLOPs/token | {summary['qk_projection_flops_per_token']['original']:,} | "
        f"{summary['qk_projection_flops_per_token']['chai']:,} | "
        f"{summary['qk_projection_flops_per_token']['saving_pct']:.1f}% |",
        f"| score FLOPs/token at {summary['score_flops_per_token']['context']} keys | "
        f"{summary['score_flops_per_token']['original']:,} | {summary['score_flops_per_token']['chai']:,} | "
        f"{summary['score_flops_per_token']['saving_pct']:.1f}% |",
        "",
        "## Layers",
        "",
        "| layer | kind | clusters | kept K heads | clusters (representative*) |",
        "|---|---|---|---|---|",
    ]
    for lm in mapping.layers:
        kept = mapping.kept_k_heads(lm.index)
        if lm.kind == LayerKind.DENSE:
            lines.append(f"| {lm.index} | dense | {m.num_heads} | {len(kept)} | |")
            continue
        desc = " ".join("{" + ",".join(f"{h}*" if h == c.representative else str(h) for h in c.members) + "}"
                        for c in lm.clusters)
        lines.append(f"| {lm.index} | clustered | {lm.num_clusters} | {len(kept)} | {desc} |")
    return "\n".join(lines) + "\n"


def plots(out: Path, similarity: np.ndarray, sse: list[list[float]], knees: list[int],
          mapping: ClusterMapping) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    n_layers = similarity.shape[0]
    cols = min(6, n_layers)
    rows = -(-n_layers // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n_layers:
            ax.axis("off")
            continue
        ax.imshow(similarity[i], vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"layer {i}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Head cosine similarity (attention probabilities)")
    fig.tight_layout()
    written.append(_save(fig, out / "similarity.png"))

    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 1.8 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n_layers:
            ax.axis("off")
            continue
        ks = np.arange(1, len(sse[i]) + 1)
        ax.plot(ks, sse[i], marker=".", lw=1)
        chosen = len(mapping.layers[i].representatives(mapping.model.num_heads))
        ax.axvline(knees[i], color="gray", ls=":", lw=1)
        ax.plot([chosen], [sse[i][chosen - 1]], "o", color="red")
        ax.set_title(f"layer {i}: k={chosen}", fontsize=8)
        ax.tick_params(labelsize=6)
    fig.suptitle("k-means error vs k (dotted: knee, red: chosen)")
    fig.tight_layout()
    written.append(_save(fig, out / "knee_curves.png"))

    fig, ax = plt.subplots(figsize=(max(5, 0.25 * n_layers), 3))
    idx = np.arange(n_layers)
    counts = [len(lm.representatives(mapping.model.num_heads)) for lm in mapping.layers]
    kept = [len(mapping.kept_k_heads(i)) for i in range(n_layers)]
    ax.bar(idx - 0.2, counts, 0.4, label="score heads (clusters)")
    ax.bar(idx + 0.2, kept, 0.4, label="K-cache heads kept")
    ax.axhline(mapping.model.num_heads, color="gray", ls=":", lw=1, label="query heads")
    ax.set_xlabel("layer")
    ax.legend(fontsize=7)
    ax.set_title("Clusters per layer")
    fig.tight_layout()
    written.append(_save(fig, out / "clusters_per_layer.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
