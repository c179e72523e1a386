#!/usr/bin/env bash
# The whole test suite: system packages, Rust build and tests, lints, the systemd unit, the
# Debian package, the CUDA build, the Python model tests.
# Usage: scripts/test.sh   (from anywhere; CI runs it through .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"

echo "== python: light environment for the model tests and the log-mel parity test (no torch)"
VENV=target/py-ci
if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
"$VENV/bin/pip" install -q -r models/requirements-ci.txt
export MBT_PYTHON="$PWD/$VENV/bin/python"

echo "== rust: format and lints"
cargo fmt --check
cargo clippy --release --all-targets --locked -- -D warnings

echo "== rust: tests"
cargo test --release --locked

echo "== python: model tooling"
(cd models && "$MBT_PYTHON" -m pytest -q tests)

echo "== systemd unit: verify and security exposure"
scripts/check-unit.sh

echo "== Debian package"
scripts/build-deb.sh

echo "== GPU build (tract-cuda loads CUDA at run time: builds without a GPU)"
cargo build --release --locked --features cuda
