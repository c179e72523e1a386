#!/usr/bin/env bash
# Many live streams on one daemon: N test sources (320x240 at 15 fps, 16 kHz audio, all
# live, 1 s hop) classified by the shipped demo model for MINUTES. Prints windows built and
# dropped (total, and the spread of drops between sources), how busy inference was, and the
# daemon's CPU (share of one core) and RSS. Not part of the test command.
# Usage: scripts/measure-sources.sh [N] [MINUTES]   (default 100 sources, 5 minutes; needs a
# release build: cargo build --release)
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-100}"
minutes="${2:-5}"
out=target/measure-sources
rm -rf "$out"
mkdir -p "$out"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
{
  cat <<TOML
[model]
path = "$PWD/models/avsynth-edge.onnx"
threads = 2
max_batch = 4

[window]
hop = 1.0

[metrics]
listen = "127.0.0.1:$port"

[mqtt]
url = "mqtt://127.0.0.1:1"

[spool]
dir = "$PWD/$out/spool"
TOML
  for i in $(seq 1 "$n"); do
    printf '\n[[source]]\nname = "s%03d"\nkind = "test"\npattern = "ball"\nwave = "sine"\nfreq = %d\nwidth = 320\nheight = 240\nfps = 15\n' "$i" $((200 + i * 10))
  done
} > "$out/config.toml"
"${MBT_EDGE:-target/release/mbt-edge}" run --config "$out/config.toml" --log-level warn 2> "$out/run.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
scrape() { curl -s "http://127.0.0.1:$port/metrics"; }
sleep 20   # warm-up: pipelines start, model load, first windows
scrape > "$out/before.txt"
t0=$(date +%s.%N); c0=$(cpu_ticks)
sleep $((minutes * 60))
t1=$(date +%s.%N); c1=$(cpu_ticks)
scrape > "$out/after.txt"
rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
python3 - "$out" "$n" "$minutes" "$t0" "$t1" "$c0" "$c1" "$ticks" "$rss" <<'PY'
import re, sys
out, n, minutes, t0, t1, c0, c1, ticks, rss = sys.argv[1:]
def read(name):
    values = {}
    for line in open(f"{out}/{name}"):
        m = re.match(r'^(\w+)(\{[^}]*\})? ([0-9.eE+-]+)$', line.strip())
        if m:
            values[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return values
before, after = read("before.txt"), read("after.txt")
def per_source(metric):
    return {labels: after[(name, labels)] - before.get((name, labels), 0.0)
            for (name, labels) in after if name == metric}
built = per_source("mbt_edge_windows_built_total")
dropped = per_source("mbt_edge_windows_dropped_total")
seconds = float(t1) - float(t0)
busy = (after.get(("mbt_edge_inference_latency_seconds_sum", ""), 0) - before.get(("mbt_edge_inference_latency_seconds_sum", ""), 0)) / seconds
cpu = (int(c1) - int(c0)) / int(ticks) / seconds
drops = sorted(dropped.values())
print(f"{n} sources, {minutes} min ({seconds:.0f} s measured)")
print(f"windows built {sum(built.values()):.0f}, dropped {sum(drops):.0f}"
      f" ({100 * sum(drops) / max(sum(built.values()), 1):.1f} %)")
if drops:
    print(f"drops per source: min {drops[0]:.0f}, median {drops[len(drops) // 2]:.0f}, max {drops[-1]:.0f}")
    shares = sorted(dropped[labels] / built[labels] for labels in dropped if built.get(labels))
    print(f"dropped share per source: min {shares[0]:.2f}, median {shares[len(shares) // 2]:.2f}, max {shares[-1]:.2f}")
    low = sorted(dropped, key=dropped.get)[:3]
    print("fewest drops: " + ", ".join(f"{labels} {dropped[labels]:.0f} of {built.get(labels, 0):.0f}" for labels in low))
print(f"inference busy {100 * busy:.0f} % of the time; daemon CPU {100 * cpu:.0f} % of one core; RSS {int(rss) // 1024} MiB")
PY
