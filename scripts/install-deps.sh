#!/usr/bin/env bash
# Installs the system packages mbt-edge builds, runs and tests with (Debian 12 / Ubuntu 22.04+).
# The RTSP tests serve H.264 (x264enc: plugins-ugly) from GstRtspServer through python3-gi and
# decode it with avdec_h264 (libav): about 74 MB more to download. tests/web.rs drives the
# live page in headless Chromium through chromedriver (about 90 MB).
# Uses sudo when not root. Idempotent: skips apt when everything is already there.
set -euo pipefail

PACKAGES=(
  build-essential pkg-config ca-certificates curl git
  libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev
  gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-tools
  mosquitto mosquitto-clients openssl systemd bc
  gstreamer1.0-plugins-ugly gstreamer1.0-libav gstreamer1.0-rtsp gir1.2-gst-rtsp-server-1.0 python3-gi
  python3 python3-venv python3-pip
  chromium chromium-driver
)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
for package in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "cargo not found: install Rust (1.92 or newer) with rustup first: https://rustup.rs" >&2
    exit 1
  fi
fi
