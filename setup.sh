#!/usr/bin/env bash
# poolpipe setup: installs everything a fresh Debian 12 machine needs, idempotently.
#
#   ./setup.sh          install system packages, ONNX Runtime, models, sample media; build the release binary
#   ./setup.sh demo     ... then run the demo pipeline (pipelines/demo.toml) on the bundled sample
#   ./setup.sh test     ... then build the Kafka-compatible test broker and run the whole test suite
#                       (what .ci/run runs)
#   ./setup.sh kafka    ... then build only the Kafka-compatible test broker (tansu)
#   ./setup.sh gpu      ... with GPU support: fetches ONNX Runtime's GPU build and the CUDA 13 /
#                       cuDNN 9 libraries from PyPI into engines/lib-gpu (about 1.5 GB of wheels,
#                       2.5 GB unpacked) and builds with --features gpu. Needs an NVIDIA driver
#                       only to run, not to build. TensorRT is not on PyPI: install it from NVIDIA
#                       for tensorrt:N devices (cuda:N works without it).
#
# Every step checks whether its result is already there, so running it twice is cheap.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)

ORT_VERSION=1.31.1          # ONNX Runtime shared library (PyPI wheel `onnxruntime`)
RAPIDOCR_VERSION=1.4.4      # PP-OCRv4 detection + recognition ONNX models (PyPI wheel `rapidocr-onnxruntime`)
ONNX_PY_VERSION=1.19.1      # `onnx` Python package, used by the benchmark-model generator
KUBERNETES_VALIDATE_VERSION=1.37.0
NUMPY_VERSION=2.3.4
YOLO_WHEEL=hafdh-nadhar==0.1.22   # carries the original Darknet YOLOv3-tiny COCO weights and cfg
YOLO_SHA256=dccea06f59b781ec1234ddf8d1e94b9519a97f4245748a7d4db75d5b7080a42c
TANSU_VERSION=0.6.0         # Kafka-compatible broker for the Kafka sink test (crates.io; Debian has none)
# ./setup.sh gpu: ONNX Runtime's GPU build (CUDA 13) and the CUDA libraries its CUDA provider loads.
GPU_WHEELS=(
  "onnxruntime-gpu==$ORT_VERSION"
  nvidia-cuda-runtime==13.0.96 nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35
  nvidia-cufft==12.0.0.61 nvidia-cuda-nvrtc==13.0.88 nvidia-cudnn-cu13==9.28.1.4
)
# Only these shared libraries are unpacked (the wheels hold more).
GPU_LIBS=(
  'onnxruntime/capi/libonnxruntime.so.*' 'onnxruntime/capi/libonnxruntime_providers_*.so'
  'nvidia/cu13/lib/libcudart.so.13' 'nvidia/cu13/lib/libcublas.so.13' 'nvidia/cu13/lib/libcublasLt.so.13'
  'nvidia/cu13/lib/libcurand.so.10' 'nvidia/cu13/lib/libcufft.so.12'
  'nvidia/cu13/lib/libnvrtc.so.13' 'nvidia/cu13/lib/libnvrtc-builtins.so.13.0'
  'nvidia/cudnn/lib/libcudnn*.so.9'
)

APT_PACKAGES=(
  pkg-config unzip python3-venv
  libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev
  gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly
  gstreamer1.0-libav gstreamer1.0-tools gstreamer1.0-x gstreamer1.0-rtsp libgstrtspserver-1.0-dev
  gstreamer1.0-plugins-base-apps   # gst-discoverer-1.0: the recording test checks MP4 durations
  fonts-dejavu-core
  cmake libclang-dev   # HiGHS (MILP solver of the planner) is built from source; bindgen needs libclang
  # Message brokers and their client tools, for the sink tests and `poolpipe bench sinks`. The tests
  # start their own broker processes on 127.0.0.1; the packages' system services are not needed.
  mosquitto mosquitto-clients nats-server redis-server redis-tools kcat
  openssl   # certificates of a private CA for the TLS sink test
  chromium  # headless browser of the dashboard test
  iproute2  # ip netns and tc: the cluster tests' nodes in network namespaces on shaped links
)

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

# --- 1. System packages --------------------------------------------------------------------------
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  log "Installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  log "Debian packages present."
fi

DL="$ROOT/.cache/downloads"
mkdir -p "$DL"
pip_download() { # $1 = requirement; downloads a wheel for CPython 3.11 / manylinux x86_64 into $DL
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
    --platform any -d "$DL" "$1"
}

# --- 2. ONNX Runtime shared library -----------------------------------------------------------------
ORT_DIR="$ROOT/engines/lib"
if [ ! -f "$ORT_DIR/libonnxruntime.so.$ORT_VERSION" ]; then
  log "Fetching ONNX Runtime $ORT_VERSION from PyPI."
  pip_download "onnxruntime==$ORT_VERSION"
  mkdir -p "$ORT_DIR"
  unzip -o -j -q "$DL"/onnxruntime-"$ORT_VERSION"-*.whl "onnxruntime/capi/libonnxruntime.so*" -d "$ORT_DIR"
fi
ln -sf "libonnxruntime.so.$ORT_VERSION" "$ORT_DIR/libonnxruntime.so"

# --- 3. PP-OCR models ---------------------------------------------------------------------------------
OCR_DIR="$ROOT/engines/ppocr"
if [ ! -f "$OCR_DIR/ch_PP-OCRv4_rec_infer.onnx" ] || [ ! -f "$OCR_DIR/ch_PP-OCRv4_det_infer.onnx" ]; then
  log "Fetching PP-OCRv4 models (rapidocr-onnxruntime $RAPIDOCR_VERSION) from PyPI."
  pip_download "rapidocr-onnxruntime==$RAPIDOCR_VERSION"
  mkdir -p "$OCR_DIR"
  unzip -o -j -q "$DL"/rapidocr_onnxruntime-"$RAPIDOCR_VERSION"-*.whl \
    rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx -d "$OCR_DIR"
fi

# --- 4. Python tools: benchmark-model generator and the Python baseline of `poolpipe bench` -----------
VENV="$ROOT/.venv"
# kubernetes-validate checks the manifests of `poolpipe deploy` offline (its schemas ship inside).
if ! "$VENV/bin/python" -c "import onnx, numpy, onnxruntime, kubernetes_validate" 2>/dev/null; then
  log "Creating $VENV (onnx, numpy, onnxruntime, kubernetes-validate)."
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "onnx==$ONNX_PY_VERSION" "numpy==$NUMPY_VERSION" "onnxruntime==$ORT_VERSION" \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi

# --- 5. Benchmark CNNs with random weights -------------------------------------------------------------
BENCH_DIR="$ROOT/engines/bench"
for m in resnet18 resnet50 mobilenetv2; do
  if [ ! -f "$BENCH_DIR/$m.onnx" ]; then
    log "Generating benchmark model $m."
    "$VENV/bin/python" engines/gen_bench_models.py --out "$BENCH_DIR" "$m"
  fi
done

# --- 5a. Recurrent cells with random weights (pipelines/recurrent.toml, `poolpipe bench recurrent`) ------
REC_DIR="$ROOT/engines/recurrent"
for m in gru_stream gru_decoder; do
  if [ ! -f "$REC_DIR/$m.onnx" ]; then
    log "Generating recurrent cell $m."
    "$VENV/bin/python" engines/gen_bench_models.py --out "$REC_DIR" "$m"
  fi
done

# --- 5b. YOLOv3-tiny (COCO, 80 classes) for the detect stage (pipelines/people.toml) ---------------------
# Darknet's weights (public domain) are taken from a PyPI wheel that carries them byte for byte;
# nothing else of that wheel is used. Its cfg has a known bug (the second [yolo] block's mask must
# be 1,2,3 for these weights). engines/darknet2onnx.py converts them (batch norm folded, the YOLO
# heads decoded in the graph, dynamic batch) and checks the result against its numpy reference.
YOLO_DIR="$ROOT/engines/yolo"
if [ ! -f "$YOLO_DIR/yolov3-tiny.onnx" ]; then
  log "Fetching YOLOv3-tiny weights ($YOLO_WHEEL) from PyPI and converting them to ONNX."
  pip_download "$YOLO_WHEEL"
  mkdir -p "$YOLO_DIR"
  unzip -o -j -q "$DL"/hafdh_nadhar-*.whl 'hafdh_nadhar/models/person_prediction/yolov3-tiny.*' -d "$YOLO_DIR"
  echo "$YOLO_SHA256  $YOLO_DIR/yolov3-tiny.weights" | sha256sum -c --quiet - \
    || { log "yolov3-tiny.weights: checksum mismatch"; rm -f "$YOLO_DIR/yolov3-tiny.weights"; exit 1; }
  # The second [yolo] block (the 26x26 head) uses anchors 1,2,3.
  awk 'BEGIN{n=0} /^\[yolo\]/{n++} n==2 && /^mask *=/{print "mask = 1,2,3"; next} {print}' \
    "$YOLO_DIR/yolov3-tiny.cfg" > "$YOLO_DIR/yolov3-tiny.fixed.cfg"
  "$VENV/bin/python" engines/darknet2onnx.py convert --cfg "$YOLO_DIR/yolov3-tiny.fixed.cfg" \
    --weights "$YOLO_DIR/yolov3-tiny.weights" --out "$YOLO_DIR/yolov3-tiny.onnx.partial"
  mv "$YOLO_DIR/yolov3-tiny.onnx.partial" "$YOLO_DIR/yolov3-tiny.onnx"
fi

# --- 6. Sample media -----------------------------------------------------------------------------------
SAMPLE="$ROOT/samples/campus.mp4"
if [ ! -f "$SAMPLE" ]; then
  log "Building the sample clip from Debian's opencv-doc vtest.avi."
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download opencv-doc >/dev/null 2>&1 || { apt-get update -q && apt-get download opencv-doc; })
  dpkg -x "$tmp"/opencv-doc_*.deb "$tmp/x"
  bash samples/make_sample.sh "$tmp/x/usr/share/doc/opencv-doc/examples/data/vtest.avi" "$SAMPLE"
  rm -rf "$tmp"
fi

# --- 6a. GPU libraries (gpu mode only) -------------------------------------------------------------------
FEATURES=()
if [ "${1:-}" = gpu ]; then
  GPU_DIR="$ROOT/engines/lib-gpu"
  if [ ! -f "$GPU_DIR/.complete-$ORT_VERSION" ]; then
    log "Fetching ONNX Runtime $ORT_VERSION (GPU) and the CUDA 13 / cuDNN 9 libraries from PyPI (about 1.5 GB)."
    for w in "${GPU_WHEELS[@]}"; do pip_download "$w"; done
    mkdir -p "$GPU_DIR"
    for w in "${GPU_WHEELS[@]}"; do
      file=$(ls "$DL"/"$(echo "${w%%==*}" | tr - _)"-"${w##*==}"-*.whl)
      unzip -o -j -q "$file" "${GPU_LIBS[@]}" -d "$GPU_DIR" 2>/dev/null || [ $? -eq 11 ]   # 11: some patterns are in other wheels
    done
    touch "$GPU_DIR/.complete-$ORT_VERSION"
    log "engines/lib-gpu: $(du -sh "$GPU_DIR" | cut -f1) unpacked from $(du -ch "$DL"/onnxruntime_gpu-*.whl "$DL"/nvidia_*.whl | tail -1 | cut -f1) of wheels."
  fi
  ln -sf "libonnxruntime.so.$ORT_VERSION" "$GPU_DIR/libonnxruntime.so"
  FEATURES=(--features gpu)
fi

# --- 7. Build ------------------------------------------------------------------------------------------
if ! command -v cargo >/dev/null; then
  log "cargo is not installed: install Rust (https://rustup.rs) and run this again."; exit 1
fi
log "Building the release binary${FEATURES[*]:+ (${FEATURES[*]})}."
cargo build --release --locked "${FEATURES[@]}"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/poolpipe"
export ORT_DYLIB_PATH="$ORT_DIR/libonnxruntime.so"

# --- 8. The text detector cut into two blocks (pipelines/demo-split.toml) --------------------------------
if [ ! -f "$OCR_DIR/det.blocks/manifest.json" ]; then
  log "Cutting the text detector into two blocks."
  "$BIN" split "$OCR_DIR/ch_PP-OCRv4_det_infer.onnx" --blocks 2 --input-shape 3,576,768 --out "$OCR_DIR/det.blocks"
fi

# --- 9. A Kafka-compatible broker for the Kafka sink test (test and kafka modes only) --------------------
# Debian ships Kafka clients (kcat) but no broker; tansu (Apache-2.0, crates.io) speaks the Kafka
# protocol. It is a large build (about 20 minutes on 2 cores, once; reused from CARGO_TARGET_DIR).
# Installed outside the clone (once per machine, shared by every clone): POOLPIPE_TOOLS, default
# ~/.cache/poolpipe.
TOOLS="${POOLPIPE_TOOLS:-$HOME/.cache/poolpipe}"
install_tansu() {
  local root="$TOOLS/tansu-$TANSU_VERSION"
  if "$root/bin/tansu" --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
    log "tansu $TANSU_VERSION present."
    return
  fi
  log "Building tansu $TANSU_VERSION (Kafka-compatible broker for the Kafka sink test; ~20 min once)."
  cargo install tansu --version "$TANSU_VERSION" --locked --no-default-features --features dynostore \
    --root "$root" --target-dir "$TOOLS/tansu-build"
  rm -rf "$TOOLS/tansu-build"   # about 3 GB of intermediate files, not needed once installed
}

case "${1:-}" in
  "") log "Done. Run the demo: $BIN run pipelines/demo.toml" ;;
  gpu)
    export ORT_DYLIB_PATH="$ROOT/engines/lib-gpu/libonnxruntime.so"
    log "Built with GPU support. What this machine has:"
    "$BIN" devices
    log "Run GPU stages with ORT_DYLIB_PATH=$ORT_DYLIB_PATH (the binary finds engines/lib-gpu by itself)." ;;
  demo) exec "$BIN" run pipelines/demo.toml "${@:2}" ;;
  kafka) install_tansu ;;
  test)
    install_tansu
    export POOLPIPE_TANSU="$TOOLS/tansu-$TANSU_VERSION/bin/tansu"   # so the Kafka test runs rather than skips
    log "Running the test suite."
    cargo fmt --all -- --check
    cargo test --release --locked -- --test-threads=2 "${@:2}"
    log "Soak and overload, 2-minute version (tests/soak.sh 90 30)."
    bash tests/soak.sh 90 30
    # GPU support is built and checked here too (no GPU, no driver, no CUDA on this machine): it
    # compiles cleanly, its unit tests pass, and every GPU request fails with its reason.
    log "The gpu feature: clippy, unit tests and GPU refusals without a GPU."
    cargo clippy --release --locked --all-targets --features gpu -- -D warnings
    cargo test --release --locked --features gpu --lib --test gpu -- --test-threads=2
    ;;
  *) log "Unknown mode '$1' (expected: demo, test, kafka, gpu)."; exit 2 ;;
esac
