"""The export's float64 reference pass: unit by unit, the same logits as the whole model in float64."""

from __future__ import annotations

import copy

import pytest
import torch

from chai_compile.export.validate import float64_weights
from chai_compile.mapping import ClusterMapping
from chai_compile.rewrite import apply_mapping
from tests.conftest import STORIES

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not STORIES.is_dir(), reason="../shared/data/models/stories260K missing")]


def _ids(stories) -> torch.Tensor:
    return stories.tokenizer("Once upon a time, there was a little girl named Lily.", return_tensors="pt").input_ids


@pytest.mark.parametrize("rewritten", [False, True])
def test_float64_by_unit_equals_whole_model_in_float64(stories, rewritten):
    model = copy.deepcopy(stories.model).eval()
    if rewritten:  # a CHAI model: heads paired in every layer
        model = apply_mapping(model, _pairs(model))
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    storage = {n: p.data_ptr() for n, p in model.state_dict().items()}
    ids = _ids(stories)
    with torch.no_grad():
        want = copy.deepcopy(model).double()(ids).logits
        with float64_weights(model):
            got = model(ids).logits
    assert got.dtype == torch.float64
    assert torch.equal(got, want)
    after = model.state_dict()
    assert all(after[n].dtype == t.dtype and torch.equal(after[n], t) for n, t in before.items())
    # the model's own storage comes back (memory-mapped weights stay mapped; no second copy is made)
    assert all(after[n].data_ptr() == ptr for n, ptr in storage.items())


def _pairs(model) -> ClusterMapping:
    from chai_compile.adapters import adapter_for
    from chai_compile.fingerprint import model_info
    from chai_compile.mapping import Cluster, LayerMapping

    adapter = adapter_for(model)
    h = adapter.spec.num_heads
    layers = [LayerMapping(i, "clustered", tuple(Cluster((a, a + 1), a) for a in range(0, h, 2)))
              for i in range(adapter.spec.num_layers)]
    return ClusterMapping.build(model_info(adapter), layers)
