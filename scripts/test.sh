#!/usr/bin/env bash
# The whole test suite: system packages, Rust build and tests, lints, the Python model tests.
# Usage: scripts/test.sh   (from anywhere; CI runs it through .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"

echo "== rust: format and lints"
cargo fmt --check
cargo clippy --release --all-targets --locked -- -D warnings

echo "== rust: tests"
cargo test --release --locked

echo "== python: model tooling (light dependencies only: no torch)"
VENV=target/py-ci
if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
"$VENV/bin/pip" install -q -r models/requirements-ci.txt
(cd models && "../$VENV/bin/python" -m pytest -q tests)
