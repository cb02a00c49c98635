#!/usr/bin/env bash
# Puts ONNX Runtime's C API headers (Debian 13's libonnxruntime-dev) under third_party/ beside this script,
# for systems whose own apt has no such package (Debian 12). Only the .deb is downloaded, through apt with
# a private source list and state: the system's apt configuration is not changed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
[ -f "$here/third_party/include/onnxruntime/onnxruntime_c_api.h" ] && exit 0
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
echo "deb http://deb.debian.org/debian trixie main" > "$work/sources.list"
opts=(-o "Dir::Etc::sourcelist=$work/sources.list" -o Dir::Etc::sourceparts=- -o "Dir::State::Lists=$work/lists"
      -o "Dir::Cache=$work/cache" -o APT::Get::List-Cleanup=0 -o APT::Sandbox::User=root)
apt-get "${opts[@]}" update -qq
(cd "$work" && apt-get "${opts[@]}" download -qq libonnxruntime-dev)
dpkg -x "$work"/libonnxruntime-dev_*.deb "$work/root"
mkdir -p "$here/third_party/include"
cp -r "$work/root/usr/include/onnxruntime" "$here/third_party/include/"
echo "ONNX Runtime headers in $here/third_party/include/onnxruntime"
