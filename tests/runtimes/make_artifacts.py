"""Exports and references for the runtimes tests; run in chai-compile's own environment (transformers 5.x).

    python -m tests.runtimes.make_artifacts WORKDIR

writes WORKDIR/{stories260k,smollm2}-{original,chai}/ (chai-compile export), WORKDIR/stories260k-chai-genai/
(chai-compile genai-pack) and WORKDIR/references.json: each model's prompt ids and the greedy tokens
transformers generates from them (no EOS stop; the tests cut every sequence at its first EOS).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tests.conftest import REPO, STORIES

PROMPTS = ("Once upon a time, there was a little girl", "The dog ran", "Lily and Ben went to the park to play with",
           "Sue had a red ball.")
NEW_TOKENS = 20
MODELS = {"stories260k": str(STORIES), "smollm2": "smollm2-135m"}
SMOLLM2_MAPPING = REPO / "docs" / "results" / "smollm2" / "kv20.json"  # the mapping docs/results.md exports


def stories_mapping(path: Path) -> Path:
    from chai_compile.loading import load_model
    from tests.test_rewrite import paired_mapping

    paired_mapping(load_model(str(STORIES)).model).write(path)
    return path


def references(spec: str) -> dict:
    """Prompt ids (the model's own tokenizer) and transformers' greedy continuation of each, one at a time."""
    from chai_compile.export.validate import torch_greedy
    from chai_compile.loading import load_model

    loaded = load_model(spec)
    rows = [loaded.tokenizer(p)["input_ids"] for p in PROMPTS]
    greedy = [torch_greedy(loaded.model, torch.tensor([r]), NEW_TOKENS)[0].tolist() for r in rows]
    return {"prompt_ids": rows, "greedy": greedy, "eos_token_id": loaded.tokenizer.eos_token_id}


def main(work: Path) -> None:
    from chai_compile.export.cli import release_memory, run_export
    from chai_compile.export.genai_pack import pack_for_genai

    work.mkdir(parents=True, exist_ok=True)
    mappings = {"stories260k": stories_mapping(work / "stories260k-mapping.json"), "smollm2": SMOLLM2_MAPPING}
    refs = {}
    for name, spec in MODELS.items():
        refs[name] = references(spec)
        release_memory()
        for kind, mapping in (("original", None), ("chai", mappings[name])):
            out = work / f"{name}-{kind}"
            run_export(spec, str(mapping) if mapping else None, mapping is None, "onnx", "portable", "fp32", 23,
                       str(out), True, log=lambda m: print(m, file=sys.stderr))
            release_memory()
        pack_for_genai(work / f"{name}-chai", work / f"{name}-chai-genai", overwrite=True)
    (work / "references.json").write_text(json.dumps(refs, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
