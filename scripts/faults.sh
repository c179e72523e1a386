#!/usr/bin/env bash
# Fault matrix: the bundled demo config (the shipped demo model, its three live test sources,
# 1 s hop) plus a source whose pipeline errors every 5 s, against its own mosquitto, driven
# through one fault after another:
#   1. steady                               60 s
#   2. the spool's disk full                60 s  (the spool on a 1 MiB tmpfs: needs root)
#   3. the spool directory removed          30 s
#   4. the broker flapping every 3 s        60 s
#   5. 20 SIGHUPs a second for 10 s, configs alternating valid / invalid
#   6. steady again                         60 s, then SIGTERM
# A QoS 1 subscriber with a persistent session checks what a consumer gets: every event seq
# delivered at least once (or each gap accounted for by the spool's drop counters), no end
# without its start, no panic, RSS sampled every 10 s. Not part of the test command.
#
# Usage: sudo scripts/faults.sh   (needs a release build, mosquitto, root for the tmpfs)
# Writes target/faults/report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out="$PWD/target/faults"
if mountpoint -q "$out/disk" 2>/dev/null; then umount "$out/disk"; fi
rm -rf "$out"
mkdir -p "$out/disk"
mount -t tmpfs -o size=1m tmpfs "$out/disk"
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pick_port() { local p; for p in $(seq "$1" "$(($1 + 200))"); do port_free "$p" && { echo "$p"; return; }; done; exit 1; }
broker_port=$(pick_port 18930)
metrics_port=$(pick_port 19560)
spool="$out/disk/spool"

sed -e "s|^path = \"models/|path = \"$PWD/models/|" \
    -e "s|^url = \"mqtt://127.0.0.1:1883\"|url = \"mqtt://127.0.0.1:$broker_port\"|" \
    -e "s|^dir = \"target/demo/spool\"|dir = \"$spool\"|" config.toml > "$out/valid.toml"
cat >> "$out/valid.toml" <<TOML

[metrics]
listen = "127.0.0.1:$metrics_port"

[[source]]
name = "flaky"
kind = "pipeline"
live = true
video_pipeline = "videotestsrc is-live=true pattern=ball ! video/x-raw,width=160,height=120,framerate=15/1 ! identity error-after=75"
audio_pipeline = "audiotestsrc is-live=true wave=sine freq=660 ! audio/x-raw,rate=16000,channels=1"
backoff_initial = 0.5
backoff_max = 2
TOML
grep -q "127.0.0.1:$broker_port" "$out/valid.toml" && grep -q "$spool" "$out/valid.toml" || {
  echo "faults: could not rewrite config.toml's [mqtt] url / [spool] dir" >&2; exit 1; }
sed -e 's/^threads = 2/threads = "two"/' "$out/valid.toml" > "$out/invalid.toml"
cp "$out/valid.toml" "$out/config.toml"

pids=()
broker_pid=""
cleanup() {
  for pid in "${pids[@]}" $broker_pid; do kill "$pid" 2>/dev/null || true; done
  sleep 0.5
  umount "$out/disk" 2>/dev/null || true
}
trap cleanup EXIT
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location %s/\nuser root\n' \
  "$broker_port" "$out" > "$out/mosquitto.conf"
start_broker() {
  mosquitto -c "$out/mosquitto.conf" >> "$out/mosquitto.log" 2>&1 &
  broker_pid=$!
  for _ in $(seq 50); do port_free "$broker_port" || break; sleep 0.05; done
}
stop_broker() { kill -TERM "$broker_pid" 2>/dev/null || true; wait "$broker_pid" 2>/dev/null || true; broker_pid=""; }
start_broker
# A consumer with a persistent session: the broker keeps its QoS 1 messages while it is away.
mosquitto_sub -h 127.0.0.1 -p "$broker_port" -q 1 -c -i faults-consumer -t 'mbt-edge/+/+/events' > "$out/events.jsonl" &
pids+=($!)
sleep 0.5

"${MBT_EDGE:-target/release/mbt-edge}" run --config "$out/config.toml" 2> "$out/run.log" &
pid=$!
pids+=("$pid")
rss_max=0
sample_rss() {
  local rss; rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
  [ "$rss" -gt "$rss_max" ] && rss_max=$rss
  echo "$(date +%s) $rss" >> "$out/rss.txt"
}
phase() { echo "$(date +%s) $1" >> "$out/phases.txt"; echo "== $(date +%T) $1"; }
wait_s() { local end=$(( $(date +%s) + $1 )); while [ "$(date +%s)" -lt "$end" ]; do sample_rss; sleep 2; done; }
alive() { kill -0 "$pid" 2>/dev/null || { echo "faults: the daemon died" >&2; tail -30 "$out/run.log" >&2; exit 1; }; }
health() { curl -s --max-time 2 "http://127.0.0.1:$metrics_port/health" || true; }

phase steady; wait_s 60; alive
phase disk_full
head -c 2m /dev/zero > "$out/disk/filler" 2>/dev/null || true
wait_s 20; echo "   /health: $(health)" | tee -a "$out/health.txt"; wait_s 40; alive
rm -f "$out/disk/filler"
phase spool_dir_removed
rm -rf "$spool"
wait_s 30; alive
phase broker_flapping
end=$(( $(date +%s) + 60 ))
while [ "$(date +%s)" -lt "$end" ]; do stop_broker; sleep 1.5; start_broker; sleep 1.5; sample_rss; done
alive
phase sighup_storm
for i in $(seq 1 200); do
  if [ $((i % 2)) -eq 0 ]; then cp "$out/valid.toml" "$out/config.toml"; else cp "$out/invalid.toml" "$out/config.toml"; fi
  kill -HUP "$pid"; sleep 0.05
done
cp "$out/valid.toml" "$out/config.toml"; kill -HUP "$pid"
alive
phase steady_again; wait_s 60; alive
phase stop
kill -TERM "$pid"
wait "$pid" || { echo "faults: the daemon did not stop cleanly" >&2; exit 1; }
sleep 2

python3 - "$out" "$rss_max" <<'PY' | tee "$out/report.md"
import json, sys, datetime
out, rss_max = sys.argv[1], int(sys.argv[2])
events = [json.loads(l) for l in open(f"{out}/events.jsonl") if l.strip().startswith("{")]
phases = [(int(t), name) for t, name in (l.split() for l in open(f"{out}/phases.txt"))]
log = open(f"{out}/run.log").read()
def when(e):
    return datetime.datetime.fromisoformat(e["window"]["end"].replace("Z", "+00:00")).timestamp()
def phase_of(t):
    name = phases[0][1]
    for start, n in phases:
        if t >= start: name = n
    return name
seqs = sorted({e["seq"] for e in events})
missing = sorted(set(range(1, max(seqs) + 1)) - set(seqs)) if seqs else []
starts = {e["id"] for e in events if e["type"] == "start"}
orphans = [e["id"] for e in events if e["type"] == "end" and e["id"] not in starts]
print("# Fault matrix (scripts/faults.sh): demo config + a source erroring every 5 s\n")
print("| phase | seconds | event messages (distinct seq) | replayed | duplicates |")
print("| --- | --- | --- | --- | --- |")
for (start, name), nxt in zip(phases, phases[1:] + [(None, None)]):
    if name == "stop": continue
    mine = [e for e in events if phase_of(when(e)) == name]
    distinct = {e["seq"] for e in mine}
    print(f"| {name} | {(nxt[0] or start) - start} | {len(distinct)} | {sum(1 for e in mine if e['replayed'])} | {len(mine) - len(distinct)} |")
print()
print(f"- seq 1..{seqs[-1] if seqs else 0}: {len(seqs)} delivered, missing {len(missing)} {missing[:20]}")
print(f"- ends without their start: {len(orphans)}")
print(f"- spool drops logged: overflow {log.count('spool full: dropped')}, age {log.count('too old: dropped')}")
print(f"- 'spool cannot write' lines: {log.count('spool cannot write')}, 'writable again': {log.count('spool writable again')}")
print(f"- reloads applied: {log.count('reloaded:')}, refused: {log.count('reload refused')}")
print(f"- flaky source restarts: {log.count('source restarted')}; panics: {log.count('panicked')}")
print(f"- max RSS: {rss_max // 1024} MiB")
print("- /health during the full disk: " + open(f"{out}/health.txt").read().strip())
PY
