#!/usr/bin/env bash
# GPU check, for a machine with one NVIDIA GPU and no network (under 10 minutes). Run from the
# repository root with .gpu-carry/ made by tests/gpu/pack.sh. Writes its figures under $OUT.
#
#   1. nvidia-smi and `poolpipe devices`;
#   2. ResNet-50 (generated here when Python has `onnx`, else MobileNetV2) and the PP-OCR
#      detector on cpu vs cuda:0 with TF32 off: largest relative difference of the outputs
#      (aim < 1e-3), and images/s at batch 1, 8, 32 on cuda:0 vs Python onnxruntime-gpu on the
#      same model and batch (aim >= 1.0x): `poolpipe bench gpu`;
#   3. the same through tensorrt:0 where TensorRT is installed (else its clear error);
#   4. a pipeline stage on cuda:0 end to end (`poolpipe run` on a test source);
#   5. the detector cut in two, both stages on cuda:0, its activation kept on the GPU from one
#      stage to the next (I/O binding) against copied to the host and back
#      (`keep_activations = false`): frames/s of each run. `bench gpu` (step 2) also times the
#      hand-off alone (the "cut in two" table) and pinned against ordinary host buffers.
# Not measured: device-to-device copies between GPUs (one GPU here).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/gpu-check}"; mkdir -p "$OUT"
C=.gpu-carry
PY="${PYTHON:-python3}"
log() { printf '\n== %s\n' "$*" | tee -a "$OUT/check.log"; }

log "nvidia-smi"
nvidia-smi 2>&1 | tee -a "$OUT/check.log"

# ONNX Runtime GPU and CUDA 13 / cuDNN 9 from this machine's Python environment.
LIB="$PWD/engines/lib-gpu"
if [ ! -f "$LIB/libonnxruntime.so" ]; then
  site=$("$PY" -c 'import onnxruntime, os; print(os.path.dirname(os.path.dirname(onnxruntime.__file__)))')
  mkdir -p "$LIB"
  for d in "$site/onnxruntime/capi" "$site/nvidia/cu13/lib" "$site/nvidia/cudnn/lib"; do
    [ -d "$d" ] && ln -sf "$d"/lib*.so* "$LIB"/ 2>/dev/null
  done
  ln -sf "$(ls "$LIB"/libonnxruntime.so.1.* | head -1)" "$LIB/libonnxruntime.so"
fi
export ORT_DYLIB_PATH="$LIB/libonnxruntime.so"
export LD_LIBRARY_PATH="$PWD/$C/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
BIN="$C/poolpipe"

log "poolpipe devices"
"$BIN" devices 2>&1 | tee -a "$OUT/check.log"

MODELS="$C/models/ch_PP-OCRv4_det_infer.onnx"
if "$PY" -c 'import onnx' 2>/dev/null && "$PY" "$C/gen_bench_models.py" --out "$C/models" resnet50 >/dev/null 2>&1; then
  MODELS="$C/models/resnet50.onnx,$MODELS"
else
  MODELS="$C/models/mobilenetv2.onnx,$MODELS"
fi

for dev in cuda:0 tensorrt:0; do
  log "bench gpu --device $dev"
  timeout 240 "$BIN" bench gpu --device "$dev" --models "$MODELS" --batches 1,8,32 --iters 20 \
    --python "$PY" --engine-cache "$OUT/trt-cache" --json > "$OUT/bench-${dev%%:*}.json" 2> "$OUT/bench-${dev%%:*}.err"
  echo "exit $?" | tee -a "$OUT/check.log"
  cat "$OUT/bench-${dev%%:*}.json" "$OUT/bench-${dev%%:*}.err" | tail -40 | tee -a "$OUT/check.log"
done

log "a stage on cuda:0, end to end"
mkdir -p "$OUT/run"
cat > "$OUT/run/p.toml" <<TOML
[pipeline]
name = "gpu-check"
slo_ms = 2000
engines_dir = "$OUT/run"

[[source]]
name = "pattern"
uri = "test://ball"
pace = "fast"
num_buffers = 300

[[stage]]
name = "det"
model = "det"
device = "cuda:0"
max_batch = 8
max_wait_ms = 5

[[sink]]
type = "jsonl"
path = "$OUT/run/results.jsonl"
TOML
cat > "$OUT/run/det.toml" <<TOML
name = "det"
backend = "onnxruntime"
onnx = "$PWD/$C/models/ch_PP-OCRv4_det_infer.onnx"
kind = "text_detect"

[image]
width = 768
height = 576
pixel_format = "BGR"
layout = "NCHW"
mean = [0.5, 0.5, 0.5]
std = [0.5, 0.5, 0.5]
TOML
timeout 120 "$BIN" run "$OUT/run/p.toml" --api 127.0.0.1:0 --summary-json "$OUT/run/summary.json" 2>&1 | tail -15 | tee -a "$OUT/check.log"
echo "results: $(wc -l < "$OUT/run/results.jsonl" 2>/dev/null || echo 0)" | tee -a "$OUT/check.log"

log "the detector cut in two on ${CUT_DEVICE:-cuda:0}: activation kept on the device vs copied through the host"
DEV="${CUT_DEVICE:-cuda:0}"
"$BIN" split "$C/models/ch_PP-OCRv4_det_infer.onnx" --blocks 2 --input-shape 3,576,768 --out "$OUT/run/det.blocks" 2>&1 | tail -3 | tee -a "$OUT/check.log"
grep -q '^split' "$OUT/run/det.toml" || sed -i '/^kind = /a split = "det.blocks"' "$OUT/run/det.toml"
cut_pipeline() {
  cat <<TOML
[pipeline]
name = "gpu-check-cut"
slo_ms = 5000
engines_dir = "$OUT/run"
keep_activations = $1

[[source]]
name = "pattern"
uri = "test://ball"
pace = "fast"
num_buffers = ${CUT_FRAMES:-600}

[[stage]]
name = "head"
model = "det"
blocks = [0, 1]
device = "$DEV"
max_batch = 8
max_wait_ms = 5

[[stage]]
name = "tail"
model = "det"
blocks = [1, 2]
device = "$DEV"
max_batch = 8
max_wait_ms = 5

[[sink]]
type = "jsonl"
path = "$OUT/run/results-cut-$1.jsonl"
TOML
}
for keep in true false; do
  cut_pipeline "$keep" > "$OUT/run/cut-$keep.toml"
  start=$(date +%s%N)
  timeout 150 "$BIN" run "$OUT/run/cut-$keep.toml" --api 127.0.0.1:0 --summary-json "$OUT/run/summary-cut-$keep.json" > "$OUT/run/cut-$keep.log" 2>&1
  rc=$?
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  n=$(wc -l < "$OUT/run/results-cut-$keep.jsonl" 2>/dev/null || echo 0)
  echo "keep_activations = $keep: exit $rc, $n results in $ms ms" | tee -a "$OUT/check.log"
  tail -12 "$OUT/run/cut-$keep.log" | tee -a "$OUT/check.log"
done
