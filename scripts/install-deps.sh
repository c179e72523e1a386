#!/usr/bin/env bash
# Installs the system packages mbt-edge builds, runs and tests with (Debian 12 / Ubuntu 22.04+).
# The RTSP tests serve H.264 (x264enc: plugins-ugly) from GstRtspServer through python3-gi and
# decode it with avdec_h264 (libav): about 74 MB more to download. tests/web.rs drives the
# live page in headless Chromium through chromedriver (about 90 MB).
# Uses sudo when not root. Idempotent: skips apt when everything is already there.
#
# Usage: scripts/install-deps.sh [--aarch64]
#   --aarch64  also the arm64 cross build and its qemu-user runs (scripts/test-aarch64.sh):
#              Debian multiarch (dpkg --add-architecture arm64), the cross gcc, arm64
#              GStreamer with its base and good plugins, qemu-user (about 170 packages, 120 MB).
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  build-essential pkg-config ca-certificates curl git
  libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev
  gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-tools gstreamer1.0-plugins-base-apps
  mosquitto mosquitto-clients openssl systemd bc
  gstreamer1.0-plugins-ugly gstreamer1.0-libav gstreamer1.0-rtsp gir1.2-gst-rtsp-server-1.0 python3-gi
  python3 python3-venv python3-pip
  chromium chromium-driver
)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# The arm64 side of scripts/test-aarch64.sh. libc6:arm64 (pulled in by the arm64 GStreamer)
# puts the arm64 dynamic loader at /lib/ld-linux-aarch64.so.1, so qemu-aarch64 runs the cross
# binaries against the multiarch libraries without a -L sysroot.
AARCH64_PACKAGES=(
  gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
  libgstreamer1.0-dev:arm64 libgstreamer-plugins-base1.0-0:arm64 liborc-0.4-dev:arm64
  gstreamer1.0-plugins-base:arm64 gstreamer1.0-plugins-good:arm64
)
aarch64=0
for arg in "$@"; do
  case "$arg" in
    --aarch64) aarch64=1 ;;
    *) echo "usage: scripts/install-deps.sh [--aarch64]" >&2; exit 64 ;;
  esac
done
if [ "$aarch64" = 1 ]; then
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    $SUDO dpkg --add-architecture arm64
  fi
  PACKAGES+=("${AARCH64_PACKAGES[@]}")
fi

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

# Debian 12's libgstreamer-plugins-base1.0-dev is not Multi-Arch: same, so its arm64 build
# cannot sit beside the amd64 one the x86 build needs. The cross build needs only its
# pkg-config files and the libgstapp/libgstvideo link names: they are unpacked (not
# installed) into target/aarch64-linux-gnu-dev, the link names pointed at the installed arm64
# libraries. Redone when the installed arm64 runtime changes version.
if [ "$aarch64" = 1 ]; then
  dev_dir=target/aarch64-linux-gnu-dev
  version=$(dpkg-query -W -f='${Version}' libgstreamer-plugins-base1.0-0:arm64)
  if [ "$(cat "$dev_dir/version" 2>/dev/null)" != "$version" ]; then
    rm -rf "$dev_dir"
    mkdir -p "$dev_dir/download"
    (cd "$dev_dir/download" && apt-get download -q "libgstreamer-plugins-base1.0-dev:arm64=$version" 2>&1 | grep -v "^W: Download is performed unsandboxed" || true)
    dpkg-deb -x "$dev_dir"/download/*.deb "$dev_dir/root"
    mkdir -p "$dev_dir/lib" "$dev_dir/pkgconfig"
    for link in "$dev_dir"/root/usr/lib/aarch64-linux-gnu/*.so; do
      ln -s "/usr/lib/aarch64-linux-gnu/$(readlink "$link")" "$dev_dir/lib/$(basename "$link")"
    done
    for pc in "$dev_dir"/root/usr/lib/aarch64-linux-gnu/pkgconfig/*.pc; do
      sed "s|^libdir=.*|libdir=$PWD/$dev_dir/lib|" "$pc" > "$dev_dir/pkgconfig/$(basename "$pc")"
    done
    rm -rf "$dev_dir/download" "$dev_dir/root"
    echo "$version" > "$dev_dir/version"
  fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "cargo not found: install Rust (1.92 or newer) with rustup first: https://rustup.rs" >&2
    exit 1
  fi
fi
