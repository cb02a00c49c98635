"""The compiled ClusteredAttention op library (plugins/onnxruntime) in ONNX Runtime on the CPU: parity with
the float64 reference for both cache contracts, the in-place buffer really shared, and bad input as one line."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from chai_compile.export import ort_ops
from chai_compile.kernels import fused_op

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

# H=6 query heads in C=3 clusters (sizes 2, 1, 3), 2 kept K heads, 3 V heads (a GQA layer).
LAYER = dict(num_heads=6, cluster_offsets=[0, 2, 3, 6], k_head_index=[0, 1, 1], v_head_index=[0, 0, 1, 1, 2, 2],
             num_k_heads=2, num_v_heads=3)


@pytest.fixture(scope="module")
def library(ort_ops_library):
    return ort_ops_library


def _graph(head_dim: int, share: int, **overrides) -> bytes:
    attrs = fused_op.node_attributes(**{**LAYER, "head_dim": head_dim, "scale": head_dim ** -0.5,
                                        "past_present_share_buffer": share})
    attrs.update(overrides)  # after the Python checks: bad values must be caught by the library itself
    return node_graph(attrs)


def node_graph(attrs: dict, name: str = "layer0") -> bytes:
    """A graph of one ClusteredAttention node with `attrs`, its inputs and outputs as the contract names them."""
    h = onnx.helper
    f, i32 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT32
    ins = [h.make_tensor_value_info(n, i32 if n == "attention_mask" else f, None) for n in fused_op.INPUTS]
    outs = [h.make_tensor_value_info(n, f, None) for n in fused_op.OUTPUTS]
    node = h.make_node(fused_op.OP_TYPE, list(fused_op.INPUTS), list(fused_op.OUTPUTS), domain=fused_op.DOMAIN,
                       name=name, **attrs)
    # IR 10: what ONNX Runtime 1.20+ reads (the installed onnx would write a newer one).
    model = h.make_model(h.make_graph([node], "g", ins, outs), ir_version=10,
                         opset_imports=[h.make_opsetid("", 23), h.make_opsetid(fused_op.DOMAIN, 1)])
    return model.SerializeToString()


def _session(library, graph: bytes):
    opts = ort.SessionOptions()
    ort_ops.register(opts, library)
    return ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])


def _inputs(b: int, s: int, past: int, d: int, rows: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """rows: the cache buffer length for the in-place contract (None: concat, rows = past)."""
    g = torch.Generator().manual_seed(seed)
    rows = past if rows is None else rows
    r = lambda *shape: torch.randn(*shape, generator=g).numpy()  # noqa: E731
    mask = np.ones((b, past + s), np.int32)
    mask[0, :2] = 0  # left padding in the first row
    return {"query": r(b, 3, s, d), "key": r(b, 2, s, d), "value": r(b, 3, s, d), "past_key": r(b, 2, rows, d),
            "past_value": r(b, 3, rows, d), "attention_mask": mask}


def _reference(feeds: dict[str, np.ndarray], d: int, share: int):
    attrs = fused_op.node_attributes(**LAYER, head_dim=d, scale=d ** -0.5, past_present_share_buffer=share)
    return fused_op.clustered_attention_reference(*[torch.from_numpy(feeds[n]) for n in fused_op.INPUTS], **attrs)


@pytest.mark.parametrize(("s", "past", "d"), [(1, 7, 16), (3, 5, 64), (4, 0, 64), (1, 300, 128)])
def test_concat_contract_matches_the_float64_reference(library, s, past, d):
    feeds = _inputs(2, s, past, d)
    out, pk, pv = _session(library, _graph(d, 0)).run(None, feeds)
    ref, rpk, rpv = _reference(feeds, d, 0)
    assert np.abs(out - ref.numpy()).max() < 1e-4
    np.testing.assert_array_equal(pk, rpk.numpy())
    np.testing.assert_array_equal(pv, rpv.numpy())


@pytest.mark.parametrize(("s", "past"), [(1, 9), (2, 4)])
def test_inplace_contract_writes_only_new_rows_into_the_shared_buffer(library, s, past):
    d, rows = 32, 16
    feeds = _inputs(2, s, past, d, rows=rows)
    ref, rpk, rpv = _reference(feeds, d, 1)
    sess = _session(library, _graph(d, 1))
    # One OrtValue bound as past_key and present_key (and one for values): the op must write into it.
    kbuf, vbuf = (ort.OrtValue.ortvalue_from_numpy(feeds[n].copy()) for n in ("past_key", "past_value"))
    bind = sess.io_binding()
    for n in ("query", "key", "value", "attention_mask"):
        bind.bind_cpu_input(n, feeds[n])
    bind.bind_ortvalue_input("past_key", kbuf)
    bind.bind_ortvalue_input("past_value", vbuf)
    bind.bind_output("output", "cpu")
    bind.bind_ortvalue_output("present_key", kbuf)
    bind.bind_ortvalue_output("present_value", vbuf)
    sess.run_with_iobinding(bind)
    out = bind.get_outputs()[0].numpy()
    assert np.abs(out - ref.numpy()).max() < 1e-4
    np.testing.assert_array_equal(kbuf.numpy(), rpk.numpy())  # new rows at [past, past+s), the rest untouched
    np.testing.assert_array_equal(vbuf.numpy(), rpv.numpy())
    assert bind.get_outputs()[1].data_ptr() == kbuf.data_ptr()
    # Unbound (plain run), the same graph returns a fresh buffer with the same contents.
    _, pk, _ = sess.run(None, feeds)
    np.testing.assert_array_equal(pk, rpk.numpy())


@pytest.mark.parametrize(("share", "feeds_change", "expect"), [
    (0, {"past_key": np.zeros((2, 3, 7, 16), np.float32)}, "past_key has 3 heads"),
    (0, {"attention_mask": np.ones((2, 5), np.int32)}, "attention_mask covers 5 tokens"),
    (1, {"attention_mask": np.ones((2, 9), np.int32)}, "the shared cache buffer holds 7 rows"),
    (0, {"query": np.zeros((2, 3, 1, 8), np.float32)}, "query rows have 8 values but head_dim is 16"),
])
def test_shapes_that_disagree_with_the_attributes_fail_as_one_line(library, share, feeds_change, expect):
    feeds = {**_inputs(2, 1, 7, 16), **feeds_change}
    with pytest.raises(Exception) as info:
        _session(library, _graph(16, share)).run(None, feeds)
    err = ort_ops.run_error(info.value)
    assert err is not None and expect in str(err) and "\n" not in str(err), str(info.value)
    assert "layer0" in str(err)


def test_bad_attributes_fail_at_session_creation(library):
    with pytest.raises(Exception) as info:
        _session(library, _graph(16, 0, k_head_index=[0, 1, 5]))
    err = ort_ops.run_error(info.value)
    assert err is not None and "k_head_index" in str(err) and "\n" not in str(err)


def test_missing_or_foreign_library_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(ort_ops.ENV, str(tmp_path / "nope.so"))
    with pytest.raises(ort_ops.OrtOpsError) as info:
        ort_ops.find_library()
    assert "CHAI_ORT_OPS" in info.value.one_line() and "cmake" in info.value.one_line()
    not_a_library = tmp_path / "junk.so"
    not_a_library.write_bytes(b"not an ELF file")
    with pytest.raises(ort_ops.OrtOpsError, match="not a ClusteredAttention op library"):
        ort_ops.register(ort.SessionOptions(), not_a_library)


def test_library_built_for_a_newer_api_version_is_refused_in_one_line(tmp_path):
    """ONNX Runtime offers no API table newer than itself: the library must say so, not crash."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake missing")
    import subprocess

    build = tmp_path / "b"
    subprocess.run(["cmake", "-S", str(ort_ops.PLUGIN_DIR), "-B", str(build), "-DCHAI_ORT_CUDA=OFF",
                    "-DCHAI_ORT_API_VERSION=999"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True)
    lib = build / ort_ops.LIBRARY_NAME
    assert ort_ops.api_version(lib) == 999
    with pytest.raises(ort_ops.OrtOpsError) as info:
        ort_ops.register(ort.SessionOptions(), lib)
    line = info.value.one_line()
    assert "API version 999" in line and "\n" not in line and "fix:" in line


def test_library_from_other_sources_is_refused_in_one_line(tmp_path, library):
    """A build from older sources (no attribute list, or a shorter one) would run span nodes as full
    attention: registering it fails with the rebuild command, before any graph runs."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    import subprocess

    from chai_compile.kernels.fused_op import ATTRIBUTE_NAMES

    assert ort_ops.attributes(library) == ATTRIBUTE_NAMES  # the library under test is current
    old = ",".join(ATTRIBUTE_NAMES[:-4])  # the contract before span layers' ring and span attributes
    for name, body in (("older", ""), ("other", f'const char* ChaiOrtAttributes(void) {{ return "{old}"; }}')):
        src = tmp_path / f"{name}.c"
        src.write_text(f"int ChaiOrtApiVersion(void) {{ return 17; }}\n{body}\n")
        lib = tmp_path / f"lib{name}.so"
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True, capture_output=True)
        with pytest.raises(ort_ops.OrtOpsError) as info:
            ort_ops.register(ort.SessionOptions(), lib)
        line = info.value.one_line()
        why = "no attribute list" if name == "older" else "does not read ring_sinks,ring_window,span_sinks"
        assert "other chai-compile sources" in line and why in line and "build-ort-ops" in line
        assert "\n" not in line
