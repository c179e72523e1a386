#!/usr/bin/env bash
# Soak: runs the daemon on the bundled demo config (config.toml: the shipped demo model, three
# live test sources, 1 s hop) against its own mosquitto for MINUTES minutes, and reports RSS
# over time, CPU, windows built and dropped, and whether every event reached a subscriber.
# Not part of CI's time budget.
#
# Usage: scripts/soak.sh [MINUTES]   (default 60; needs a release build and mosquitto)
# Writes target/soak/samples.tsv (one line a minute) and target/soak/report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${1:-60}"
out=target/soak
rm -rf "$out"
mkdir -p "$out"
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pick_port() { local p; for p in $(seq "$1" "$(($1 + 200))"); do port_free "$p" && { echo "$p"; return; }; done; exit 1; }
broker_port=$(pick_port 18830)
metrics_port=$(pick_port 19460)

# The demo config with its own broker, spool and metrics port.
sed -e "s|^path = \"models/|path = \"$PWD/models/|" \
    -e "s|^url = \"mqtt://127.0.0.1:1883\"|url = \"mqtt://127.0.0.1:$broker_port\"|" \
    -e "s|^dir = \"target/demo/spool\"|dir = \"$PWD/$out/spool\"|" config.toml > "$out/config.toml"
printf '\n[metrics]\nlisten = "127.0.0.1:%s"\n' "$metrics_port" >> "$out/config.toml"
grep -q "127.0.0.1:$broker_port" "$out/config.toml" && grep -q "$PWD/$out/spool" "$out/config.toml" || {
  echo "soak: could not rewrite config.toml's [mqtt] url / [spool] dir" >&2; exit 1; }

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT
printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$broker_port" > "$out/mosquitto.conf"
mosquitto -c "$out/mosquitto.conf" > "$out/mosquitto.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do port_free "$broker_port" || break; sleep 0.1; done
# QoS 1 subscription: what a consumer gets.
mosquitto_sub -h 127.0.0.1 -p "$broker_port" -q 1 -t 'mbt-edge/+/+/events' > "$out/events.jsonl" &
pids+=($!)
sleep 0.5

"${MBT_EDGE:-target/release/mbt-edge}" run --config "$out/config.toml" 2> "$out/run.log" &
pid=$!
pids+=("$pid")
ticks=$(getconf CLK_TCK)
sources=$(grep -c '^\[\[source\]\]' "$out/config.toml")
cpu_ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$pid/status"; }
scrape() { curl -s --max-time 5 "http://127.0.0.1:$metrics_port/metrics" || true; }
sum_metric() { awk -v name="$1" '$1 ~ "^"name"[{ ]" || $1 == name {s += $2} END {printf "%d", s}'; }

t0=$(date +%s.%N)
c0=$(cpu_ticks)
printf 'minute\trss_kib\tcpu_pct_one_core\twindows_built\twindows_dropped\tevents_started\tspool_events\n' > "$out/samples.tsv"
for minute in $(seq 1 "$minutes"); do
  sleep $(echo "$t0 + $minute * 60 - $(date +%s.%N)" | bc)
  kill -0 "$pid" 2>/dev/null || { echo "soak: the daemon died at minute $minute" >&2; tail -20 "$out/run.log" >&2; exit 1; }
  metrics=$(scrape)
  t=$(date +%s.%N); c=$(cpu_ticks)
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$minute" "$(rss_kib)" \
    "$(echo "scale=1; 100 * ($c - $c0) / $ticks / ($t - $t0)" | bc)" \
    "$(sum_metric mbt_edge_windows_built_total <<< "$metrics")" \
    "$(sum_metric mbt_edge_windows_dropped_total <<< "$metrics")" \
    "$(sum_metric mbt_edge_events_total <<< "$metrics")" \
    "$(sum_metric mbt_edge_spool_events <<< "$metrics")" >> "$out/samples.tsv"
  tail -1 "$out/samples.tsv"
done
final_metrics=$(scrape)
kill -TERM "$pid"
wait "$pid" || { echo "soak: the daemon did not stop cleanly" >&2; exit 1; }
sleep 1

# Every event the daemon spooled has a seq 1..N; a consumer must have every one of them.
python3 - "$out" "$minutes" "$sources" <<'PY' | tee "$out/report.md"
import json, sys, csv
out, minutes, sources = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
events = [json.loads(line) for line in open(f"{out}/events.jsonl") if line.strip()]
seqs = sorted({e["seq"] for e in events})
log = open(f"{out}/run.log").read()
rows = list(csv.DictReader(open(f"{out}/samples.tsv"), delimiter="\t"))
expected = set(range(1, max(seqs) + 1)) if seqs else set()
missing = sorted(expected - set(seqs))
by_label = {}
for e in events:
    if e["type"] == "start":
        key = f'{e["source"]}:{e["label"]}'
        by_label[key] = by_label.get(key, 0) + 1
starts = {e["id"] for e in events if e["type"] == "start"}
ends = {e["id"] for e in events if e["type"] == "end"}
print(f"# Soak: {minutes} min, {sources} live test sources (config.toml), 1 s hop\n")
print("| minute | RSS KiB | CPU % of one core (since start) | windows built | windows dropped | events started |")
print("| --- | --- | --- | --- | --- | --- |")
for row in rows:
    if int(row["minute"]) in (1, 5, 10, 20, 30, 40, 50, 60) or int(row["minute"]) == minutes:
        print(f'| {row["minute"]} | {row["rss_kib"]} | {row["cpu_pct_one_core"]} | {row["windows_built"]} | {row["windows_dropped"]} | {row["events_started"]} |')
last = rows[-1]
print()
print(f"- CPU per stream: {float(last['cpu_pct_one_core']) / sources:.1f} % of one core (whole process / {sources} sources, test-source rendering included)")
print(f"- event messages received: {len(events)} (seq 1..{max(seqs) if seqs else 0}), missing seqs: {len(missing)} {missing[:20]}")
print(f"- events started: {len(starts)}, ended: {len(starts & ends)}; by source:label {dict(sorted(by_label.items()))}")
print(f"- windows dropped: {last['windows_dropped']}; 'window dropped' log lines: {log.count('window dropped')}")
print(f"- source restarts logged: {log.count('source restarted')} (the tour source ends and restarts every 40 s by design)")
print(f"- panics: {log.count('panicked')}; ERROR lines: {sum(1 for l in log.splitlines() if ' ERROR ' in l)}")
PY
