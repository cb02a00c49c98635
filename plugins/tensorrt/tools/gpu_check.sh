#!/usr/bin/env bash
# GPU machine check of the CUDA kernel (issue 15), run from the repository root: CMake builds (TensorRT plugin
# + kernel harness, ONNX Runtime op library with CUDA), the GPU tests, then bench_kernel.py (logs and JSON under
# $OUT). The foreign processes on the GPU are listed before timing: a shared GPU throttles the numbers.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
NVCC=$(command -v nvcc || ls /usr/local/cuda*/bin/nvcc 2>/dev/null | head -1)
export PATH="$(dirname "$NVCC"):$PATH"
export TENSORRT_ROOT=${TENSORRT_ROOT:-$PWD/.trt}  # holds include/NvInfer.h (e.g. kernel-lens' headers)
OUT=${OUT:-$PWD/gpu_check}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv | tee $OUT/gpu.txt
t0=$(date +%s)
( cmake -S plugins/tensorrt -B build/trt -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_CUDA_COMPILER=$NVCC \
    -DPython3_EXECUTABLE=$(command -v python) && cmake --build build/trt -j16 ) > $OUT/build_trt.log 2>&1; echo "trt build rc $?"
( cmake -S plugins/onnxruntime -B build/ort -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_CUDA_COMPILER=$NVCC \
    && cmake --build build/ort -j16 ) > $OUT/build_ort.log 2>&1; echo "ort build rc $?"
echo "build s $(( $(date +%s) - t0 ))"; tail -3 $OUT/build_trt.log
export CHAI_TRT_BUILD_DIR=$PWD/build/trt
python -m pytest -q -p no:cacheprovider tests/test_tensorrt_plugin.py 2>&1 | tail -25 > $OUT/test_trt.log
tail -4 $OUT/test_trt.log
CHAI_ORT_OPS=$PWD/build/ort/libchai_ort_ops.so python -m pytest -q -p no:cacheprovider -m "not slow" \
    tests/test_ort_ops.py 2>&1 | tail -3 | tee $OUT/test_ort.log
echo "tests done s $(( $(date +%s) - t0 ))"
nvidia-smi --query-compute-apps=pid,used_memory --format=csv | tee -a $OUT/gpu.txt
python plugins/tensorrt/tools/bench_kernel.py $OUT/trt_kernel_decode_issue15_h200.json \
    > $OUT/bench.log 2>&1; echo "bench rc $?"
grep -v '^{' $OUT/bench.log | tail -60
