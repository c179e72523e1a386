#!/usr/bin/env bash
# Runs the daemon on the bundled demo config (config.toml: the shipped demo model and test
# sources playing some of its classes) and prints every MQTT message it publishes; the live
# page is at http://127.0.0.1:9464/.
# Usage: scripts/demo.sh   (Ctrl-C stops it)
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked

mkdir -p target/demo
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

# A broker on 127.0.0.1:1883 unless one is already there.
if ! (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null; then
  printf 'listener 1883 127.0.0.1\nallow_anonymous true\n' > target/demo/mosquitto.conf
  mosquitto -c target/demo/mosquitto.conf > target/demo/mosquitto.log 2>&1 &
  pids+=($!)
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null && break; sleep 0.1; done
fi

echo "== the live page: http://127.0.0.1:9464/"
echo "== MQTT messages from mbt-edge (topic payload):"
mosquitto_sub -h 127.0.0.1 -p 1883 -v -t 'mbt-edge/#' &
pids+=($!)

target/release/mbt-edge run --config config.toml "$@"
