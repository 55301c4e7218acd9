#!/usr/bin/env bash
# Transcodes a camera clip to the H.264 MP4 the demo reads, with a camera name and a CCTV-style
# timestamp burned in (the text the demo's OCR pipeline publishes).
#   samples/make_sample.sh INPUT OUTPUT.mp4
set -euo pipefail
in=$1; out=$2
tmp="$out.partial.mp4"
gst-launch-1.0 -q -e filesrc location="$in" ! decodebin ! videoconvert \
  ! textoverlay text="NORTH GATE CAM 3" font-desc="DejaVu Sans Bold 18" valignment=top halignment=left shaded-background=true \
  ! clockoverlay time-format="%Y-%m-%d %H:%M:%S" font-desc="DejaVu Sans Mono Bold 16" valignment=bottom halignment=right shaded-background=true \
  ! videoconvert ! x264enc speed-preset=fast key-int-max=10 bitrate=800 ! video/x-h264,profile=main ! h264parse \
  ! mp4mux ! filesink location="$tmp"
mv "$tmp" "$out"
