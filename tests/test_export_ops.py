"""Exporter details that decide precision and memory: the SiLU translation and the W^T swap."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from chai_compile.export.onnx_export import translation_table, transposed_linears

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _export(module: nn.Module, x: torch.Tensor, path, table) -> np.ndarray:
    prog = torch.onnx.export(module, (x,), dynamo=True, opset_version=23, custom_translation_table=table,
                             verbose=False)
    prog.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def test_silu_keeps_relative_precision_in_the_negative_tail(tmp_path):
    """Gate values of -10..-80 are common in gated MLPs. The default translation (x * Sigmoid(x)) loses
    them in ONNX Runtime's CPU Sigmoid; ours must stay within float32 rounding of the float64 truth."""
    x = torch.linspace(-80.0, 20.0, 4001, dtype=torch.float32)
    truth = (x.double() / (1 + torch.exp(-x.double()))).numpy()
    ours = _export(nn.SiLU(), x, tmp_path / "ours.onnx", translation_table())
    rel = np.abs(ours - truth) / np.maximum(np.abs(truth), 1e-30)
    assert rel.max() < 1e-5, (rel.max(), x[rel.argmax()].item())
    # The reason the translation exists: without it the tail is off by far more than rounding.
    default = _export(nn.SiLU(), x, tmp_path / "default.onnx", {})
    rel_default = np.abs(default - truth) / np.maximum(np.abs(truth), 1e-30)
    if rel_default.max() < 1e-5:
        pytest.skip("this ONNX Runtime's Sigmoid is exact in the tail; the translation is merely harmless")
    assert rel_default.max() > 10 * rel.max()


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16, bias=False))
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight  # tied: must be left alone

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.emb(ids)))


def test_transposed_linears_export_the_same_function_and_restore_the_model(tmp_path):
    torch.manual_seed(0)
    model = _Tiny().eval()
    ids = torch.randint(0, 50, (2, 5))
    want = model(ids).detach().numpy()
    before = [type(m) for m in model.modules()]
    w0 = model.body[0].weight
    with torch.no_grad(), transposed_linears(model):
        assert [type(m).__name__ for m in model.body] == ["_TransposedLinear", "ReLU", "_TransposedLinear"]
        assert type(model.head) is nn.Linear
        assert model.body[0].weight_t.data_ptr() == w0.data_ptr()  # a view: no second copy of the weights
        got = _export(model, ids, tmp_path / "t.onnx", {})
    assert [type(m) for m in model.modules()] == before
    np.testing.assert_allclose(got, want, atol=1e-5)
