#!/usr/bin/env bash
# Soak and overload: 8 streams (test patterns, the sample file looped, RTSP from a local server)
# through a classifier (ResNet-50, random weights; about 25 frames/s on 2 cores) for a while, sampling the process's RSS every 10 s; then an overload
# run at about 10x the pipeline's capacity. Prints RSS growth after warm-up, frame accounting, and
# p99 latency of published frames against the SLO.
#
#   tests/soak.sh [SECONDS=120] [OVERLOAD_SECONDS=60]
#
# Needs ./setup.sh to have run. Everything runs on 127.0.0.1 and stops by itself. Exits 1 when a
# frame is unaccounted for or a published frame missed the SLO (CI runs a 2-minute version).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TOTAL=${1:-120}
OVERLOAD_SECONDS=${2:-60}
BIN=${POOLPIPE_BIN:-${CARGO_TARGET_DIR:-./target}/release/poolpipe}
[ -x "$BIN" ] || { echo "build first: ./setup.sh" >&2; exit 2; }
WORK=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$BIN" serve-rtsp samples/campus.mp4 --port "$PORT" >/dev/null 2>"$WORK/rtsp-server.log" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; rm -rf "$WORK"' EXIT
sleep 1

sources() { # $1 = max_fps of each stream
  for i in 1 2 3; do printf '[[source]]\nname = "pattern-%s"\nuri = "test://ball"\nmax_fps = %s\n\n' "$i" "$1"; done
  for i in 1 2 3; do printf '[[source]]\nname = "file-%s"\nuri = "%s"\nloop = true\nmax_fps = %s\n\n' "$i" "$PWD/samples/campus.mp4" "$1"; done
  for i in 1 2; do printf '[[source]]\nname = "rtsp-%s"\nuri = "rtsp://127.0.0.1:%s/cam"\nmax_fps = %s\n\n' "$i" "$PORT" "$1"; done
}
pipeline() { # $1 = max_fps, $2 = file
  {
    printf '[pipeline]\nname = "soak"\nslo_ms = 3000\nengines_dir = "%s/engines"\n\n' "$PWD"
    sources "$1"
    printf '[[stage]]\nname = "classify"\nmodel = "resnet50"\nthreads = 2\nmax_batch = 8\nmax_wait_ms = 50\nqueue = 16\n\n'
    printf '[[sink]]\ntype = "jsonl"\npath = "/dev/null"\n'
  } > "$2"
}

run() { # $1 = label, $2 = pipeline, $3 = seconds
  "$BIN" run "$2" --api 127.0.0.1:0 --duration "$3" --summary-json "$WORK/$1.json" > /dev/null 2> "$WORK/$1.log" &
  local pid=$! t=0
  echo "seconds rss_kib" > "$WORK/$1.rss"
  while kill -0 $pid 2>/dev/null; do
    sleep 10; t=$((t + 10))
    rss=$(ps -o rss= -p $pid 2>/dev/null | tr -d ' ') || true
    [ -n "$rss" ] && echo "$t $rss" >> "$WORK/$1.rss"
  done
  wait $pid
  python3 - "$WORK/$1.rss" "$WORK/$1.json" "$1" <<'PY'
import json, sys
rows = [tuple(map(int, l.split())) for l in open(sys.argv[1]).read().split("\n")[1:] if l.strip()]
s = json.load(open(sys.argv[2]))
warm = [r for r in rows if r[0] >= max(30, rows[-1][0] // 5)] if rows else []
growth = (warm[-1][1] - warm[0][1]) / warm[0][1] * 100 if len(warm) >= 2 else float("nan")
ing = sum(x["ingested"] for x in s["streams"]); pub = sum(x["published"] for x in s["streams"])
late = sum(x["dropped_late"] for x in s["streams"]); over = sum(x["dropped_overload"] for x in s["streams"])
fail = sum(x["failed"] for x in s["streams"])
balanced = all(x["ingested"] == x["published"] + x["dropped_late"] + x["dropped_overload"] + x["failed"] + x.get("lost", 0) for x in s["streams"])
print(f"{sys.argv[3]}: {s['elapsed_s']:.0f} s, RSS {rows[0][1]/1024:.0f} MiB at {rows[0][0]} s, "
      f"{warm[0][1]/1024 if warm else 0:.0f} -> {warm[-1][1]/1024 if warm else 0:.0f} MiB after warm-up ({growth:+.2f}%), max {max(r[1] for r in rows)/1024:.0f} MiB")
print(f"  frames: ingested {ing}, published {pub}, dropped_late {late}, dropped_overload {over}, failed {fail}, balanced {balanced}")
print("  rss MiB by minute: " + " ".join(f"{r[1]/1024:.0f}" for r in rows if r[0] % 60 == 0))
print(f"  end-to-end p50 {s['end_to_end_p50_ms']} ms, p99 {s['end_to_end_p99_ms']} ms (SLO 3000 ms); reconnects {sum(x['reconnects'] for x in s['streams'])}")
# What must hold at any length: every frame accounted for, published frames within the SLO
# and something published. RSS growth is reported, not judged: a short
# run cannot tell growth from warm-up.
problems = []
if not balanced: problems.append("frame accounting does not balance")
if pub == 0: problems.append("nothing was published")
if (s["end_to_end_p99_ms"] or 0) > 3000: problems.append("p99 of published frames above the SLO")
for p in problems: print(f"  FAILED: {p}")
sys.exit(1 if problems else 0)
PY
}

pipeline 1 "$WORK/soak.toml"       # 8 streams x 1 frame/s: a third of what 2 cores manage
pipeline 30 "$WORK/overload.toml"  # 8 streams x 30 frames/s: about 10x capacity
rc=0
run soak "$WORK/soak.toml" "$SECONDS_TOTAL" || rc=1
run overload "$WORK/overload.toml" "$OVERLOAD_SECONDS" || rc=1
# The RTSP server is a test fixture; if it died, the RTSP streams' reconnects above are its doing.
if ! kill -0 $SERVER 2>/dev/null; then
  echo "note: the RTSP server (poolpipe serve-rtsp) exited during the run; its last log lines:"
  tail -5 "$WORK/rtsp-server.log" | sed 's/^/  /'
fi
exit $rc
