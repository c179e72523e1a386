#!/usr/bin/env bash
# On a machine with an NVIDIA GPU (x86-64 with CUDA 13, or a Jetson with JetPack 6 / CUDA 12):
# builds mbt-edge with CUDA, runs one model through the daemon's runtime on the GPU and on the
# CPU, checks that both give the same scores on a generated clip, and prints the timings.
#
# Usage: scripts/gpu-check.sh [MODEL.onnx]   (default: the shipped demo model)
#   GPU_CHECK_RUNTIME=cpu GPU_CHECK_BUILD=0 scripts/gpu-check.sh   runs the whole script with
#   the CPU twice and the existing release build (a dry run on a machine without a GPU).
# Output: target/gpu-check/{cpu,gpu}.{jsonl,bench.json} and a summary on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
model="$(realpath "${1:-models/avsynth-edge.onnx}")"
gpu_runtime="${GPU_CHECK_RUNTIME:-cuda}"
out=target/gpu-check
mkdir -p "$out"

feature=cuda
if [ -f /etc/nv_tegra_release ]; then feature=cuda-12; fi
if [ "${GPU_CHECK_BUILD:-1}" != 0 ]; then
  echo "== building with --features $feature"
  cargo build --release --locked --features "$feature"
fi
bin=target/release/mbt-edge
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

threads=$(nproc)
for side in cpu gpu; do
  runtime=cpu
  [ "$side" = gpu ] && runtime="$gpu_runtime"
  printf '[model]\npath = "%s"\nruntime = "%s"\nthreads = %s\nmax_batch = 32\n' "$model" "$runtime" "$threads" > "$out/$side.toml"
done
"$bin" check-config --config "$out/gpu.toml" || {
  echo "gpu-check: the $gpu_runtime runtime is refused here (no driver or no GPU?); see the message above" >&2
  exit 1
}

# 20 s of the yard scene (ball_tone), VP8 + Opus.
gst-launch-1.0 -q webmmux name=mux ! filesink location="$out/clip.webm" \
  videotestsrc num-buffers=300 pattern=ball motion=wavy foreground-color=0xffffa020 background-color=0xff182848 \
  ! video/x-raw,width=160,height=120,framerate=15/1 ! vp8enc deadline=1 target-bitrate=2000000 ! queue ! mux. \
  audiotestsrc num-buffers=1000 samplesperbuffer=960 wave=sine freq=440 volume=0.3 \
  ! audio/x-raw,rate=48000,channels=2 ! opusenc ! queue ! mux.

echo "== parity: classify on the CPU and on $gpu_runtime"
for side in cpu gpu; do
  "$bin" classify --config "$out/$side.toml" --input "$out/clip.webm" --top 100 > "$out/$side.jsonl" 2> "$out/$side.log" || {
    cat "$out/$side.log" >&2; echo "gpu-check: classify on $side failed" >&2; exit 1; }
done
grep -h "runtime" "$out/gpu.log" | head -3 || true
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
load = lambda side: [json.loads(line) for line in open(f"{out}/{side}.jsonl")]
cpu, gpu = load("cpu"), load("gpu")
assert len(cpu) == len(gpu) and cpu, (len(cpu), len(gpu))
worst, same_top = 0.0, 0
for a, b in zip(cpu, gpu):
    sa = {t["label"]: t for t in a["top"]}
    sb = {t["label"]: t for t in b["top"]}
    for label, ta in sa.items():
        for key in ("score", "audio", "video"):
            if isinstance(ta.get(key), (int, float)):
                worst = max(worst, abs(ta[key] - sb[label][key]))
    same_top += a["top"][0]["label"] == b["top"][0]["label"]
print(f"windows: {len(cpu)}, same top-1: {same_top}/{len(cpu)}, max |score difference|: {worst:.2e}")
if worst > 1e-3 or same_top != len(cpu):
    sys.exit("gpu-check: the GPU and CPU results differ")
PY

echo "== timings (mbt-edge bench, median per window)"
"$bin" bench --config "$out/cpu.toml" --batch 1,8 --runs 30 --json > "$out/cpu.bench.json"
"$bin" bench --config "$out/gpu.toml" --batch 1,8,32 --runs 50 --json > "$out/gpu.bench.json"
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
for side in ("cpu", "gpu"):
    report = json.load(open(f"{out}/{side}.bench.json"))
    for model in report["models"]:
        for batch in model["batches"]:
            print(f'{side:>3} runtime={report["runtime"]:<5} threads={report["threads"]} batch={batch["batch"]:>2}: '
                  f'{batch["per_window_median_ms"]:8.3f} ms per window, {batch["windows_per_second"]:8.1f} windows/s')
PY
