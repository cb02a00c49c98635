#!/usr/bin/env bash
# ONNX Runtime CUDA (onnxruntime-gpu) on the GPU machine: the compiled op library with its CUDA kernel, then
# decode-step time of the original, CHAI portable and CHAI fused (in-place cache) graphs, fp16, IO binding.
#   bash benchmarks/device_ort_cuda.sh build       # op library with CUDA + tests/test_ort_ops.py under onnxruntime-gpu
#   bash benchmarks/device_ort_cuda.sh export      # the six graphs, in the background (CPU work)
#   OUT=$OUT bash benchmarks/device_ort_cuda.sh time smollm2|llama7b
# After benchmarks/device_stage.sh unpack. SmolLM2-135M with docs/results/smollm2/kv20.json; the LLaMA-7B-shaped
# stack is 4 layers of random weights with 8 clusters of 4 heads (bench_ort_decode.llama7b_stack).
set -uo pipefail
export PYTHONPATH="/root/ortsite:$PWD:/root/site" PYTHONUNBUFFERED=1 CHAI_COMPILE_CACHE=/root/cc
export CHAI_ORT_OPS=/root/ortbuild/libchai_ort_ops.so
W=/root/w
case "${1:-}" in
  build)
    cmake -S plugins/onnxruntime -B /root/ortbuild -DCHAI_ORT_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release >/root/ortbuild.log 2>&1 \
      && cmake --build /root/ortbuild -j >>/root/ortbuild.log 2>&1 || { tail -20 /root/ortbuild.log; exit 1; }
    nm -D "$CHAI_ORT_OPS" | grep -E "RegisterCustomOps|chaiClusteredAttentionEnqueue"
    python3 -m pytest -q -p no:cacheprovider tests/test_ort_ops.py 2>&1 | tail -3 ;;
  export)
    mkdir -p $W/smol $W/l7b
    for g in "original portable concat" "portable portable concat" "fused fused inplace"; do
      set -- $g
      map=$([ "$1" = original ] && echo --no-mapping || echo "--mapping docs/results/smollm2/kv20.json")
      setsid nohup python3 -m chai_compile export smollm2-135m --out $W/smol/$1 --overwrite --dtype fp16 \
        --attention $2 --kv-cache $3 $map >$W/smol-$1.log 2>&1 &
    done
    setsid nohup python3 -c "
import sys; sys.path.insert(0, 'benchmarks')
from pathlib import Path
from bench_ort_decode import llama7b_stack
from bench_ort_fused import GRAPHS
llama7b_stack(4, Path('$W/l7b'), 'fp16', GRAPHS)
print('llama7b exported')" >$W/l7b.log 2>&1 &
    sleep 1; echo exports started ;;
  time)
    case "${2:-}" in
      smollm2) dirs="$W/smol/original $W/smol/portable $W/smol/fused"; name=ort_cuda_smollm2_fp16 ;;
      llama7b) dirs="$W/l7b/original $W/l7b/portable $W/l7b/fused"; name=ort_cuda_llama7b_fp16 ;;
      *) echo "time smollm2|llama7b" >&2; exit 2 ;;
    esac
    python3 benchmarks/bench_ort_fused.py $dirs --dtype fp16 --provider cuda --batch 1,8,32 --past 512,2048,8192 \
      --iters 30 --out "$OUT/$name.json" 2>&1 | grep -v Warning ;;
  *) echo "usage: device_ort_cuda.sh build|export|time" >&2; exit 2 ;;
esac
