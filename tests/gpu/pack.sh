#!/usr/bin/env bash
# Packs what tests/gpu/check.sh needs on a machine with an NVIDIA GPU and no network into
# .gpu-carry/ (under 64 MiB): the poolpipe binary built with --features gpu (stripped), the
# shared libraries it links that a bare machine may lack (GStreamer, GLib), and the models.
# Run after ./setup.sh gpu. The ONNX Runtime GPU build and the CUDA libraries are not carried
# (2.3 GB): check.sh takes them from that machine's Python environment (onnxruntime-gpu and the
# nvidia-* CUDA 13 wheels).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=.gpu-carry
rm -rf "$OUT"; mkdir -p "$OUT/lib" "$OUT/models"
BIN="${CARGO_TARGET_DIR:-target}/release/poolpipe"
cargo build --release --locked --features gpu
strip -o "$OUT/poolpipe" "$BIN"
# Every linked library outside glibc and the C++ runtime.
ldd "$BIN" | awk '/=> \//{print $3}' \
  | grep -vE '/(libc|libm|libdl|libpthread|librt|ld-linux[^/]*|libstdc\+\+|libgcc_s)\.so' \
  | xargs -r cp -L -t "$OUT/lib"
cp engines/ppocr/ch_PP-OCRv4_det_infer.onnx engines/bench/mobilenetv2.onnx "$OUT/models/"
cp engines/gen_bench_models.py "$OUT/"
du -sh "$OUT"
