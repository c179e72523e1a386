#!/usr/bin/env bash
# Measures what evidence costs per stream: the daemon's CPU (share of one core) with
# [evidence] off and on, for a raw source (a 1280x720 25 fps test camera: stills are JPEG-
# encoded at 5 fps, 640 wide) and for an RTSP camera (tests/rtsp_server.py, 1280x720 25 fps
# H.264 + PCMA) with `copy` (the camera's H.264 kept) and without (stills only). The model is
# the committed tiny one, so inference costs little beside capture. Then it runs the bundled
# demo config for 60 s and prints how long each clip took to write (VP8/Opus encode + mux).
# Usage: scripts/measure-evidence.sh   (needs a release build, mosquitto not required)
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/measure-evidence
rm -rf "$out"; mkdir -p "$out"
bin="${MBT_EDGE:-target/release/mbt-edge}"
ticks=$(getconf CLK_TCK)
port=$((20000 + RANDOM % 20000))
# PyGObject belongs to the system interpreter.
/usr/bin/python3 tests/rtsp_server.py --port "$port" --width 1280 --height 720 --fps 25 --pattern ball > "$out/rtsp.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 50); do grep -q ready "$out/rtsp.log" && break; sleep 0.2; done
grep -q ready "$out/rtsp.log" || { cat "$out/rtsp.log"; exit 1; }

measure() { # name, source table, evidence table
  local name=$1 dir="$out/$1"
  mkdir -p "$dir"
  cat > "$dir/config.toml" <<TOML
[model]
path = "$PWD/models/testdata/mbt-tiny.onnx"
threads = 1

[[source]]
$2

[mqtt]
url = "mqtt://127.0.0.1:1"

[spool]
dir = "$PWD/$dir/spool"

[evidence]
dir = "$PWD/$dir/evidence"
$3
TOML
  "$bin" run --config "$dir/config.toml" --log-level warn 2> "$dir/run.log" &
  local pid=$!
  sleep 10
  local t0 c0 t1 c1
  t0=$(date +%s.%N); c0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  sleep 30
  t1=$(date +%s.%N); c1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  kill -INT $pid; wait $pid || true
  if grep -q "source failed" "$dir/run.log"; then echo "$name: the source failed:"; grep "source failed" "$dir/run.log" | head -3; exit 1; fi
  printf '%-28s %5.1f %% of one core\n' "$name" "$(echo "($c1 - $c0) * 100 / $ticks / ($t1 - $t0)" | bc -l)"
}
raw='name = "cam"
kind = "test"
pattern = "ball"
width = 1280
height = 720
fps = 25
sample_rate = 48000'
rtsp="name = \"cam\"
kind = \"rtsp\"
url = \"rtsp://127.0.0.1:$port/stream\""
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p')"
measure raw-evidence-off "$raw" "enabled = false"
measure raw-evidence-on "$raw" "enabled = true"
measure rtsp-evidence-off "$rtsp" "enabled = false"
measure rtsp-evidence-on-copy "$rtsp" "enabled = true"
measure rtsp-evidence-on-stills "$rtsp
[source.evidence]
copy = false" "enabled = true"

# Clips of the demo (three sources, 160x120 stills): how long each took to write.
demo="$out/demo"; mkdir -p "$demo"
sed -e "s|^dir = \"target/demo/spool\".*|dir = \"$PWD/$demo/spool\"|" config.toml > "$demo/config.toml"
sed -i "s|^path = \"models/|path = \"$PWD/models/|" "$demo/config.toml"
printf '\n[evidence]\ndir = "%s"\n' "$PWD/$demo/evidence" >> "$demo/config.toml"
timeout -s INT 70 "$bin" run --config "$demo/config.toml" 2> "$demo/run.log" || true
echo "demo clips (what=clip): bytes, took_ms"
grep 'what="clip"' "$demo/run.log" | sed -E 's/.*path=([^ ]+) bytes=([0-9]+) took_ms=([0-9]+).*/  \1 \2 \3/'
