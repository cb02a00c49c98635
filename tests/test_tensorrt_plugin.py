"""TensorRT ClusteredAttention plugin: the field declaration (clusteredAttentionConfig.h, built with g++)
against the fused-op contract, build + exported symbols, a CPU smoke test of the plugin object model that
checks the creator's and the serialized fields against the contract, and (GPU only) the kernel entry
point against the reference.

Set CHAI_TRT_BUILD_DIR to reuse a build directory (the GPU machine builds once, tests reuse it).
"""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chai_compile.export.plugin_kernel import layer_params, load_kernel
from chai_compile.kernels import fused_op

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR = ROOT / "plugins" / "tensorrt"


def _nvcc() -> str | None:
    for cand in (shutil.which("nvcc"), "/usr/local/bin/nvcc", "/usr/local/cuda/bin/nvcc"):
        if cand and Path(cand).exists():
            return cand
    return None


def _tensorrt_headers() -> Path | None:
    root = os.environ.get("TENSORRT_ROOT")
    if root and (Path(root) / "include" / "NvInfer.h").exists():
        return Path(root) / "include"
    try:
        import kernel_lens  # type: ignore[import-not-found]
    except ImportError:
        return None
    inc = Path(kernel_lens.__file__).parent / "include" / "tensorrt"
    return inc if (inc / "NvInfer.h").exists() else None


def _build(build_dir: Path, require_tensorrt: bool) -> None:
    nvcc = _nvcc()
    assert nvcc is not None
    subprocess.run(
        [
            "cmake", "-S", str(PLUGIN_DIR), "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            "-DCMAKE_CUDA_ARCHITECTURES=90",  # one arch keeps CI compile time modest
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DPython3_EXECUTABLE={sys.executable}",  # the interpreter that has kernel-lens (a venv's)
            f"-DCHAI_REQUIRE_TENSORRT={'ON' if require_tensorrt else 'OFF'}",
            # CMake looks for kernel-lens with this Python, the one the tests found it in (not PATH's python3).
            f"-DPython3_EXECUTABLE={sys.executable}",
        ],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    subprocess.run(
        ["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 2)], check=True, capture_output=True, text=True
    )


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cmake build of plugins/tensorrt (plugin, harness, smoke test); skips without nvcc/cmake/headers."""
    if _nvcc() is None:
        pytest.skip("nvcc not found: the CUDA toolkit is needed to compile the plugin")
    if shutil.which("cmake") is None:
        pytest.skip("cmake not found")
    if _tensorrt_headers() is None:
        pytest.skip("TensorRT headers not found: set TENSORRT_ROOT or `pip install kernel-lens`")
    prebuilt = os.environ.get("CHAI_TRT_BUILD_DIR")
    out = Path(prebuilt) if prebuilt else tmp_path_factory.mktemp("trt_build")
    if not (out / "libchai_trt_plugin.so").exists():
        try:
            _build(out, require_tensorrt=True)
        except subprocess.CalledProcessError as exc:
            pytest.fail(f"plugin build failed:\n{exc.stdout}\n{exc.stderr}")
    return out


def _defined_dynamic_symbols(lib: Path) -> set[str]:
    out = subprocess.run(["nm", "-D", "--defined-only", str(lib)], check=True, capture_output=True, text=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


# ---------------------------------------------------------------------------------------------------
# (a) build and exported symbols


@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) not found")
def test_plugin_library_exports_creator_symbols(build_dir: Path) -> None:
    plugin = build_dir / "libchai_trt_plugin.so"
    symbols = _defined_dynamic_symbols(plugin)
    assert {"getCreators", "setLoggerFinder", "chaiClusteredAttentionEnqueue"} <= symbols
    # Hidden visibility: no C++ plugin internals leak out of the library.
    assert not [s for s in symbols if s.startswith("_ZN4chai")], "plugin classes must not be exported"
    needed = subprocess.run(["readelf", "-d", str(plugin)], capture_output=True, text=True).stdout
    assert "libnvinfer" not in needed, "the plugin must not link a TensorRT library (headers only)"

    harness = _defined_dynamic_symbols(build_dir / "libchai_attention_kernel.so")
    assert {
        "chaiClusteredAttentionEnqueue",
        "chaiClusteredAttentionWorkspaceSize",
        "chaiClusteredAttentionParamsSize",
    } <= harness


_TRT_TYPE = {"string": "kCHAR", "int": "kINT32", "ints": "kINT32", "float": "kFLOAT32"}


def test_plugin_smoke_via_get_creators(build_dir: Path) -> None:
    """Creator/plugin object model on the CPU: fields, capabilities, types, formats, serialize, clone.
    The creator's fields are the fused node's attributes, in order and of the matching TensorRT types; the
    smoke test itself checks that the serialized fields are the declared ones."""
    exe = build_dir / "chai_plugin_smoke"
    run = subprocess.run([str(exe), str(build_dir / "libchai_trt_plugin.so")], capture_output=True, text=True)
    assert run.returncode == 0 and "SMOKE OK" in run.stdout, run.stdout + run.stderr
    fields = [tuple(line.split()[1:]) for line in run.stdout.splitlines() if line.startswith("field ")]
    assert fields == [(name, _TRT_TYPE[onnx]) for name, onnx in fused_op.ATTRIBUTES]


# ---------------------------------------------------------------------------------------------------
# (b) the one field declaration (clusteredAttentionConfig.h) == the fused ONNX node's attributes


@pytest.fixture(scope="session")
def declared(tmp_path_factory: pytest.TempPathFactory) -> list[list[str]]:
    """The lines tools/printFields.cpp prints, built with the C++ compiler alone (no CUDA, no TensorRT)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path_factory.mktemp("fields") / "print_fields"
    subprocess.run([cxx, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-DCHAI_KERNEL_NO_CUDA", f"-I{PLUGIN_DIR}",
                    str(PLUGIN_DIR / "tools" / "printFields.cpp"), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return [line.split(" ", 2) if line.startswith("valid") else line.split() for line in out.splitlines()]


def test_declared_fields_match_fused_op_attributes(declared: list[list[str]]) -> None:
    fields = [row[1:] for row in declared if row[0] == "field"]
    assert [(name, onnx) for name, onnx, _ in fields] == list(fused_op.ATTRIBUTES)
    # Graphs and engines from before the in-place contract lack past_present_share_buffer, those from before
    # spans the span attributes; the identity strings default to the plugin's own. Every other one must be there.
    optional = {name for name, _, need in fields if need == "optional"}
    assert optional == {"plugin_namespace", "plugin_version", *fused_op.OPTIONAL_DEFAULTS}


def test_declared_validation_refuses_defaults_and_accepts_a_layer(declared: list[list[str]]) -> None:
    (default_ok, default_says), (small_ok, _) = [row[1:3] for row in declared if row[0] == "valid"]
    assert default_ok == "0" and "num_heads must be in [1, 256]" in default_says
    assert small_ok == "1"


def test_plugin_identity_matches_contract(declared: list[list[str]]) -> None:
    assert ["plugin", fused_op.PLUGIN_NAME, fused_op.PLUGIN_VERSION, fused_op.PLUGIN_NAMESPACE] in declared
    assert fused_op.OP_TYPE == fused_op.PLUGIN_NAME == "ClusteredAttention"
    readme = (PLUGIN_DIR / "README.md").read_text()
    for name in (*fused_op.ATTRIBUTE_NAMES, *fused_op.INPUTS, *fused_op.OUTPUTS):
        assert f"`{name}`" in readme, f"README.md does not document {name}"


# ---------------------------------------------------------------------------------------------------
# The reference itself (CPU): identity property and padding behaviour


def _layer(h: int, offsets: list[int], hk: int, hv: int, d: int) -> dict:
    c = len(offsets) - 1
    return fused_op.node_attributes(
        num_heads=h,
        cluster_offsets=offsets,
        k_head_index=[i % hk for i in range(c)],
        v_head_index=[i * hv // h for i in range(h)],
        num_k_heads=hk,
        num_v_heads=hv,
        head_dim=d,
        scale=1.0 / math.sqrt(d),
    )


def test_reference_with_one_head_per_cluster_is_causal_mha() -> None:
    torch.manual_seed(0)
    b, h, d, p, s = 2, 4, 16, 5, 3
    attrs = _layer(h, list(range(h + 1)), h, h, d)
    attrs["k_head_index"] = list(range(h))
    q, k, v = (torch.randn(b, h, s, d, dtype=torch.float64) for _ in range(3))
    pk, pv = (torch.randn(b, h, p, d, dtype=torch.float64) for _ in range(2))
    mask = torch.ones(b, p + s, dtype=torch.int32)
    out, pres_k, pres_v = fused_op.clustered_attention_reference(q, k, v, pk, pv, mask, **attrs)
    causal = torch.ones(s, p + s, dtype=torch.bool).tril(diagonal=p)
    want = torch.nn.functional.scaled_dot_product_attention(q, pres_k, pres_v, attn_mask=causal)
    torch.testing.assert_close(out, want.permute(0, 2, 1, 3).reshape(b, s, h * d))


def test_reference_rows_without_keys_are_zero() -> None:
    attrs = _layer(4, [0, 2, 4], 2, 4, 8)
    q, k = torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8)
    v = torch.randn(1, 4, 2, 8)
    mask = torch.zeros(1, 2, dtype=torch.int64)
    out, _, _ = fused_op.clustered_attention_reference(q, k, v, k[:, :, :0], v[:, :, :0], mask, **attrs)
    assert out.abs().max() == 0


# ---------------------------------------------------------------------------------------------------
# (c) GPU: the C entry point the plugin's enqueue calls, through ctypes, against the reference


_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ATOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(scope="session")
def harness(build_dir: Path) -> ctypes.CDLL:
    return load_kernel(build_dir)


def run_harness(
    lib: ctypes.CDLL,
    attrs: dict,
    tensors: dict[str, torch.Tensor],
    *,
    num_splits: int = 0,
    share: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Calls chaiClusteredAttentionEnqueue on poisoned (NaN) outputs and returns them.

    share: the in-place contract: past_key/past_value are buffers (rows >= mask length) and the present
    pointers are the same buffers (copies of the inputs are written and returned)."""
    q, k, v = tensors["query"], tensors["key"], tensors["value"]
    pk, pv, mask = tensors["past_key"], tensors["past_value"], tensors["attention_mask"]
    b, _, s, d = q.shape
    p = mask.shape[1] - s if share else pk.shape[2]
    h = attrs["num_heads"]
    out = torch.full((b, s, h * d), float("nan"), dtype=q.dtype, device=q.device)
    if share:
        pk, pv = pk.clone(), pv.clone()
        pres_k, pres_v = pk, pv
    else:
        pres_k = torch.full((b, k.shape[1], p + s, d), float("nan"), dtype=q.dtype, device=q.device)
        pres_v = torch.full((b, v.shape[1], p + s, d), float("nan"), dtype=q.dtype, device=q.device)

    prm = layer_params(attrs)
    prm.batch, prm.seq_len, prm.past_len = b, s, p
    prm.cache_len, prm.share_buffer = pk.shape[2], int(share)
    prm.dtype = _DTYPE_CODE[q.dtype]
    prm.mask_dtype = 1 if mask.dtype == torch.int64 else 0
    ws = torch.empty(lib.chaiClusteredAttentionWorkspaceSize(ctypes.byref(prm)), dtype=torch.uint8, device=q.device)
    for name, t in (
        ("query", q),
        ("key", k),
        ("value", v),
        ("past_key", pk),
        ("past_value", pv),
        ("attention_mask", mask),
        ("output", out),
        ("present_key", pres_k),
        ("present_value", pres_v),
    ):
        assert t.is_contiguous()
        setattr(prm, name, t.data_ptr() if t.numel() else None)
    prm.workspace, prm.workspace_bytes = ws.data_ptr(), ws.numel()
    prm.num_splits = num_splits
    stream = torch.cuda.current_stream().cuda_stream
    status = lib.chaiClusteredAttentionEnqueue(ctypes.byref(prm), ctypes.c_void_p(stream))
    torch.cuda.synchronize()
    assert status == 0, f"chaiClusteredAttentionEnqueue returned {status}"
    return out, pres_k, pres_v


def make_case(
    *, b: int, h: int, offsets: list[int], hk: int, hv: int, d: int, s: int, p: int,
    dtype: torch.dtype, mask_dtype: torch.dtype = torch.int32, pad: bool = True, seed: int = 0,
    k_index: list[int] | None = None, v_index: list[int] | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:  # fmt: skip
    """k_index/v_index replace _layer's tables (e.g. clusters whose members read V heads of other groups)."""
    gen = torch.Generator().manual_seed(seed)
    attrs = _layer(h, offsets, hk, hv, d)
    attrs["k_head_index"] = k_index or attrs["k_head_index"]
    attrs["v_head_index"] = v_index or attrs["v_head_index"]
    c = len(offsets) - 1

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype).cuda()

    mask = torch.ones(b, p + s, dtype=mask_dtype)
    if pad and b > 1:
        mask[1, : (p + s) // 3] = 0  # left padding on the second sequence
        mask[0, (p + s) // 2] = 0  # a hole in the first
    tensors = {
        "query": rnd(b, c, s, d),
        "key": rnd(b, hk, s, d),
        "value": rnd(b, hv, s, d),
        "past_key": rnd(b, hk, p, d),
        "past_value": rnd(b, hv, p, d),
        "attention_mask": mask.cuda(),
    }
    return attrs, tensors


def check_against_reference(lib: ctypes.CDLL, attrs: dict, tensors: dict[str, torch.Tensor], **kw: int) -> None:
    out, pres_k, pres_v = run_harness(lib, attrs, tensors, **kw)
    want, want_k, want_v = fused_op.clustered_attention_reference(**tensors, **attrs)
    assert not out.isnan().any() and not pres_k.isnan().any() and not pres_v.isnan().any(), "unwritten output"
    assert torch.equal(pres_k, want_k) and torch.equal(pres_v, want_v), "present must be the exact concatenation"
    atol = _ATOL[out.dtype]
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=atol)


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# name: b, h, offsets, hk, hv, d, s, p
SHAPES = {
    "mha-decode": dict(b=2, h=8, offsets=[0, 3, 5, 8], hk=3, hv=8, d=64, s=1, p=300),
    "gqa-decode": dict(b=3, h=8, offsets=[0, 2, 6, 8], hk=2, hv=2, d=128, s=1, p=1000),
    "mha-prefill": dict(b=2, h=6, offsets=[0, 1, 4, 6], hk=3, hv=6, d=64, s=37, p=0),
    "gqa-prefill-past": dict(b=2, h=8, offsets=[0, 4, 8], hk=1, hv=4, d=80, s=19, p=50),
    "one-head-per-cluster": dict(b=1, h=4, offsets=[0, 1, 2, 3, 4], hk=4, hv=4, d=32, s=5, p=7),
    # GQA clusters crossing KV groups: members read V heads of other groups, some twice in one cluster
    # (one shared accumulation written to both heads), and the K head is not the members' own.
    "cross-group-decode": dict(b=2, h=8, offsets=[0, 3, 8], hk=2, hv=4, d=128, s=1, p=700,
                               k_index=[1, 0], v_index=[0, 2, 0, 1, 3, 1, 2, 0]),
    # SmolLM2-135M-like: 9 query heads, 3 KV heads, d=64; clusters span KV groups.
    "smollm2-decode": dict(b=2, h=9, offsets=[0, 2, 5, 9], hk=3, hv=3, d=64, s=1, p=900, k_index=[0, 1, 2]),
    # A few new tokens after a long past: the split path with S > 1 and per-row causal ends.
    "small-s-decode": dict(b=1, h=8, offsets=[0, 4, 8], hk=2, hv=8, d=128, s=3, p=3000),
    # d not a multiple of the 16-byte vector: the scalar-load path.
    "scalar-path-decode": dict(b=2, h=6, offsets=[0, 2, 6], hk=2, hv=3, d=36, s=1, p=200),
}


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_kernel_matches_reference(harness: ctypes.CDLL, shape: str, dtype: torch.dtype) -> None:
    attrs, tensors = make_case(**SHAPES[shape], dtype=dtype)
    if shape == "one-head-per-cluster":
        attrs["k_head_index"] = list(range(4))
    check_against_reference(harness, attrs, tensors)
    check_against_reference(harness, attrs, tensors, num_splits=1)  # the unsplit path on the same case


@cuda_only
@pytest.mark.parametrize("splits", [1, 3, 7, 64])
def test_decode_split_counts(harness: ctypes.CDLL, splits: int) -> None:
    """Forced split counts, including splits that get no keys (64 splits over 1001 keys of ragged chunks)."""
    attrs, tensors = make_case(**SHAPES["gqa-decode"], dtype=torch.float16, seed=1)
    check_against_reference(harness, attrs, tensors, num_splits=splits)


@cuda_only
def test_prefill_with_forced_splits(harness: ctypes.CDLL) -> None:
    attrs, tensors = make_case(**SHAPES["gqa-prefill-past"], dtype=torch.float32, seed=2)
    check_against_reference(harness, attrs, tensors, num_splits=4)


@cuda_only
def test_int64_mask_and_fully_masked_row(harness: ctypes.CDLL) -> None:
    attrs, tensors = make_case(**SHAPES["mha-decode"], dtype=torch.bfloat16, mask_dtype=torch.int64, seed=3)
    tensors["attention_mask"][0] = 0  # sequence 0 attends nothing -> zeros
    check_against_reference(harness, attrs, tensors)
    out, _, _ = run_harness(harness, attrs, tensors)
    assert out[0].abs().max() == 0


@cuda_only
def test_large_single_cluster_shares_v_heads(harness: ctypes.CDLL) -> None:
    """One cluster of 128 heads over 8 V heads: 8 accumulations, each written to its 16 heads."""
    attrs, tensors = make_case(b=1, h=128, offsets=[0, 128], hk=1, hv=8, d=128, s=1, p=129, dtype=torch.bfloat16)
    check_against_reference(harness, attrs, tensors)


@cuda_only
@pytest.mark.parametrize("splits", [0, 1, 5])
def test_cluster_wider_than_one_block(harness: ctypes.CDLL, splits: int) -> None:
    """40 distinct V heads in one cluster at d=128: more than one block holds (16), so V-head chunks."""
    attrs, tensors = make_case(b=2, h=40, offsets=[0, 40], hk=1, hv=40, d=128, s=1, p=500, dtype=torch.float16)
    check_against_reference(harness, attrs, tensors, num_splits=splits)


@cuda_only
def test_invalid_tables_are_refused(harness: ctypes.CDLL) -> None:
    attrs, tensors = make_case(**SHAPES["mha-decode"], dtype=torch.float32)
    attrs["v_head_index"] = [0] * 7 + [99]
    with pytest.raises(AssertionError, match="returned 1"):
        run_harness(harness, attrs, tensors)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize(
    "shape", ["mha-decode", "gqa-decode", "gqa-prefill-past", "cross-group-decode", "smollm2-decode", "small-s-decode"]
)
def test_in_place_contract_writes_only_new_rows(harness: ctypes.CDLL, shape: str, dtype: torch.dtype) -> None:
    """past_present_share_buffer: present is the past buffer; rows beyond past + new (NaN here) stay untouched
    and unread, the new rows land at P, and the output matches the float64 reference."""
    cfg = SHAPES[shape]
    attrs, tensors = make_case(**cfg, dtype=dtype, seed=4)
    attrs = {**attrs, "past_present_share_buffer": 1}
    for name in ("past_key", "past_value"):
        t = tensors[name]
        spare = torch.full((t.shape[0], t.shape[1], cfg["s"] + 5, t.shape[3]), float("nan"), dtype=t.dtype,
                           device=t.device)
        tensors[name] = torch.cat([t, spare], dim=2)
    out, buf_k, buf_v = run_harness(harness, attrs, tensors, share=True)
    want, want_k, want_v = fused_op.clustered_attention_reference(**tensors, **attrs)
    torch.testing.assert_close(buf_k, want_k, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(buf_v, want_v, atol=0, rtol=0, equal_nan=True)
    assert buf_k[:, :, cfg["p"] + cfg["s"]:].isnan().all()
    torch.testing.assert_close(out.double(), want, atol=_ATOL[out.dtype], rtol=_ATOL[out.dtype])
