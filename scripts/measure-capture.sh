#!/usr/bin/env bash
# Measures what one live stream costs the daemon: CPU (share of one core) and RSS while
# `mbt-edge run` captures a 1280x720 25 fps test video and 48 kHz test audio (converted to
# the model's frame size and 16 kHz inside GStreamer), cuts windows and classifies them with
# the committed tiny model. Prints RSS after 1 minute and after MINUTES minutes.
# Usage: scripts/measure-capture.sh [MINUTES]   (default 10; needs a release build)
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${1:-10}"
out=target/measure
mkdir -p "$out"
cat > "$out/config.toml" <<TOML
[model]
path = "$PWD/models/testdata/mbt-tiny.onnx"
threads = 1

[[source]]
name = "cam"
kind = "test"
pattern = "ball"
width = 1280
height = 720
fps = 25
sample_rate = 48000

[mqtt]
url = "mqtt://127.0.0.1:1"

[spool]
dir = "$PWD/$out/spool"
TOML
"${MBT_EDGE:-target/release/mbt-edge}" run --config "$out/config.toml" --log-level warn 2> "$out/run.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$pid/status"; }
sleep 10   # warm-up: pipeline start, model load
t0=$(date +%s.%N); c0=$(cpu_ticks)
sleep 50
t1=$(date +%s.%N); c1=$(cpu_ticks)
rss1=$(rss_kib)
echo "cpu over 50 s after warm-up: $(echo "scale=1; 100 * ($c1 - $c0) / $ticks / ($t1 - $t0)" | bc) % of one core"
echo "rss after 1 min: $rss1 KiB"
if [ "$minutes" -gt 1 ]; then
  sleep $(( (minutes - 1) * 60 ))
  t2=$(date +%s.%N); c2=$(cpu_ticks)
  echo "cpu over the whole run: $(echo "scale=1; 100 * ($c2 - $c0) / $ticks / ($t2 - $t0)" | bc) % of one core"
  echo "rss after $minutes min: $(rss_kib) KiB"
fi
