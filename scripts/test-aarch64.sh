#!/usr/bin/env bash
# aarch64 (Raspberry Pi 5, Jetson) from this x86-64 Debian 12 machine: cross-builds the
# binary (plain, --features cuda-12 and cuda) and the arm64 .deb, runs under qemu-user the
# model parity tests (both shipped models, f32 and int8, against their PyTorch and
# onnxruntime fixtures: tract's NEON kernels), the feature tests (log-mel against NumPy,
# frames) and `classify` of a generated clip, whose top-1 class must be the x86 binary's for
# every window. Emulation proves correctness only: nothing here is timed.
#
# Usage: scripts/test-aarch64.sh   (scripts/test.sh runs it after the x86 tests; it needs
#   scripts/install-deps.sh --aarch64, the x86 release binary target/release/mbt-edge, and
#   MBT_PYTHON for the log-mel parity test)
# Output: target/aarch64-unknown-linux-gnu/release/mbt-edge (the cuda build, built last),
#   target/debian/mbt-edge_<version>-1_arm64.deb (the plain build, the one tested) and the
#   same under target/debian/cuda-12/ and target/debian/cuda/,
#   target/aarch64/ (the classify outputs of both architectures).
#
# The cross settings: scripts/aarch64-env.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

target=aarch64-unknown-linux-gnu
out=target/aarch64
dev_dir="$PWD/target/aarch64-linux-gnu-dev"
[ -d "$dev_dir/pkgconfig" ] || { echo "test-aarch64: run scripts/install-deps.sh --aarch64 first" >&2; exit 1; }
rustup target list --installed 2>/dev/null | grep -qx "$target" || rustup target add "$target"

. scripts/aarch64-env.sh

step() { echo "== aarch64: $1"; step_started=$SECONDS; }
done_step() { echo "   $((SECONDS - step_started)) s"; }

step "cross build (release: the library, the binary and the test binaries)"
# One build for all: a plain `cargo build` would compile tract a second time (the tests'
# dev-dependencies change some shared crates' features). The x86 .deb is made from the binary
# `cargo test --release` built in the same way.
cargo test --release --locked --target "$target" --lib --test model --no-run
bin="target/$target/release/mbt-edge"
file "$bin"
file "$bin" | grep -q "ARM aarch64" || { echo "test-aarch64: $bin is not an aarch64 binary" >&2; exit 1; }
# The newest glibc symbol version it links (build-deb.sh below holds it to the .deb's floor).
echo "   newest glibc symbol: $(readelf -V --wide "$bin" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)"
done_step

step "model parity under qemu (tests/model.rs: tract's aarch64 kernels against the fixtures, the encoders side by side)"
# The check-config tests of tests/model.rs start the binary as a child, which the kernel
# cannot exec without binfmt; they are architecture-independent and run on x86.
cargo test --release --locked --target "$target" --test model -- \
    matches_pytorch matches_its_onnxruntime_outputs give_the_same_logits encoders_side_by_side \
    cuda_without_a_driver --show-output
done_step

step "feature and model unit tests under qemu (log-mel against NumPy, frames, every kernel path)"
# MBT_PYTHON (x86) is started by the emulated test as a child: the host kernel runs it natively.
cargo test --release --locked --target "$target" --lib -- features:: model:: --show-output
done_step

step "classify a generated clip under qemu and on x86: the same top-1 class per window"
mkdir -p "$out"
# The 10 s ball_tone clip of tests/acceptance.rs (VP8 + Opus in WebM).
gst-launch-1.0 -q webmmux name=mux ! filesink location="$out/clip.webm" \
  videotestsrc num-buffers=150 pattern=ball motion=wavy foreground-color=0xffffa020 background-color=0xff182848 \
  ! video/x-raw,width=160,height=120,framerate=15/1 ! vp8enc deadline=1 target-bitrate=2000000 ! queue ! mux. \
  audiotestsrc num-buffers=500 samplesperbuffer=960 wave=sine freq=440 volume=0.3 \
  ! audio/x-raw,rate=48000,channels=2 ! opusenc ! queue ! mux.
printf '[model]\npath = "%s"\nthreads = 1\n' "$PWD/models/avsynth-edge.onnx" > "$out/classify.toml"
target/release/mbt-edge classify --config "$out/classify.toml" --input "$out/clip.webm" --top 100 \
    > "$out/x86_64.jsonl" 2> "$out/x86_64.log" || { cat "$out/x86_64.log" >&2; exit 1; }
qemu-aarch64 "$bin" classify --config "$out/classify.toml" --input "$out/clip.webm" --top 100 \
    > "$out/aarch64.jsonl" 2> "$out/aarch64.log" || { cat "$out/aarch64.log" >&2; exit 1; }
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
load = lambda arch: [json.loads(line) for line in open(f"{out}/{arch}.jsonl")]
x86, arm = load("x86_64"), load("aarch64")
assert x86 and len(x86) == len(arm), f"windows: x86 {len(x86)}, aarch64 {len(arm)}"
worst = 0.0
for index, (a, b) in enumerate(zip(x86, arm)):
    if a["top"][0]["label"] != b["top"][0]["label"]:
        sys.exit(f"test-aarch64: window {index}: top-1 {a['top'][0]['label']} on x86, {b['top'][0]['label']} on aarch64")
    scores = {t["label"]: t for t in b["top"]}
    for t in a["top"]:
        for key in ("score", "audio", "video"):
            if isinstance(t.get(key), (int, float)):
                worst = max(worst, abs(t[key] - scores[t["label"]][key]))
labels = [w["top"][0]["label"] for w in x86]
print(f"   windows: {len(x86)}, top-1 the same in all: {labels}; max |score difference| {worst:.2e}")
PY
done_step

step "arm64 Debian package (the plain build)"
MBT_EDGE_BIN="$bin" scripts/build-deb.sh > "$out/deb.txt"
deb=$(sed -n 's/^build-deb: //p' "$out/deb.txt")
dpkg-deb -I "$deb" | grep -E "Architecture|Depends"
[ "$(dpkg-deb -f "$deb" Architecture)" = arm64 ] || { echo "test-aarch64: $deb is not arm64" >&2; exit 1; }
done_step

# tract-cuda loads CUDA at run time: these build without CUDA installed.
for feature in cuda-12 cuda; do
  step "cross build with --features $feature (JetPack $([ "$feature" = cuda-12 ] && echo 6 || echo 7))"
  cargo build --release --locked --target "$target" --features "$feature"
  file "$bin" | grep -q "ARM aarch64"
  # Packaged as docs/install.md tells a Jetson user to (beside the plain one, not over it).
  OUT_DIR="target/debian/$feature" MBT_EDGE_BIN="$bin" scripts/build-deb.sh > "$out/deb-$feature.txt"
  sed -n 's/^build-deb: //p' "$out/deb-$feature.txt"
  done_step
done
