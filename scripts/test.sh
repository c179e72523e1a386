#!/usr/bin/env bash
# The whole test suite: system packages, Rust build and tests, lints, the systemd unit, the
# Debian package, the CUDA build, the Python model tests, and aarch64: cross builds, the arm64
# package and the model, feature and classify tests under qemu-user (scripts/test-aarch64.sh).
# Usage: scripts/test.sh   (from anywhere; CI runs it through .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh --aarch64
export PATH="$HOME/.cargo/bin:$PATH"

echo "== python: the model tests' environment (models/requirements-ci.txt: torch, tract, onnxruntime, ...)"
# Cached under target/ like the Rust build: pip runs only when requirements-ci.txt changed
# since the last install (a fresh one downloads about 3 GB, torch's CUDA wheels included).
VENV=target/py-ci
if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
if ! cmp -s models/requirements-ci.txt "$VENV/requirements-ci.txt"; then
    started=$SECONDS
    "$VENV/bin/pip" install -q -r models/requirements-ci.txt
    cp models/requirements-ci.txt "$VENV/requirements-ci.txt"
    echo "python environment installed in $((SECONDS - started)) s"
fi
export MBT_PYTHON="$PWD/$VENV/bin/python"

echo "== rust: GStreamer API level 1.20 (JetPack 6 and Ubuntu 22.04 have GStreamer 1.20.3)"
# The gstreamer crates compile only the calls of the API level their v1_* features name
# (Cargo.toml asks for v1_20), so every build here is the 1.20 build; this fails when any crate
# in the graph raises a gstreamer crate above it.
levels=$(cargo tree --locked -e normal -f '{p} {f}' --prefix none | grep -E '^gstreamer' | sed 's/ (\*)$//' | sort -u)
echo "$levels"
if grep -E 'v1_(2[2-9]|[3-9][0-9])' <<<"$levels"; then
    echo "a gstreamer crate is built above the 1.20 API level (above)" >&2
    exit 1
fi

echo "== rust: format and lints"
cargo fmt --check
cargo clippy --release --all-targets --locked -- -D warnings

echo "== rust: tests"
cargo test --release --locked

echo "== python: model tooling"
# Every test runs: a skip that tests/allowed_skips.txt does not list (with its reason) fails.
(cd models && "$MBT_PYTHON" -m pytest -q -rs tests --allowed-skips tests/allowed_skips.txt)

echo "== systemd unit: verify and security exposure"
scripts/check-unit.sh

echo "== Debian package"
scripts/build-deb.sh

echo "== aarch64: cross builds (plain, cuda-12, cuda), the arm64 package, tests under qemu-user"
# Before the GPU build below, which replaces target/release/mbt-edge: the classify comparison
# runs the x86 binary the tests above built.
scripts/test-aarch64.sh

echo "== GPU build (tract-cuda loads CUDA at run time: builds without a GPU)"
cargo build --release --locked --features cuda
